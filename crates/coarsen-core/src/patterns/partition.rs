//! Partitioning the rows of a mask into parts of rows that share columns.
//!
//! Rows are vertices and columns are hyperedges. The METIS partitioner works on the row graph
//! (the clique expansion of that hypergraph): rows `i` and `j` are joined by an edge whose weight
//! is the number of columns they share, and METIS's multilevel recursive bisection minimises the
//! cut weight under a balance constraint. The KaHyPar partitioner (Mt-KaHyPar, cargo feature
//! `kahypar`) partitions the hypergraph itself, as the paper's hMETIS does, minimising the
//! connectivity: for every column, the number of parts whose rows use it, less one. The random partitioner is the baseline that shows
//! what the partitioner buys.

use std::sync::Mutex;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::mask::{BitRows, Mask};

/// Which partitioner splits the rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Partitioner {
    /// METIS 5 multilevel recursive bisection of the row graph (edge weight = shared columns).
    #[default]
    Metis,
    /// A balanced random assignment (baseline).
    Random,
    /// Mt-KaHyPar on the hypergraph itself (rows = vertices, columns = hyperedges), minimising
    /// the connectivity (km1: Σ over columns of the parts using it − 1, the block widths to pay
    /// for) with `imbalance` as its k-way ε; needs a build with the cargo feature `kahypar`.
    Kahypar,
}

impl Partitioner {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Partitioner::Metis => "metis",
            Partitioner::Random => "random",
            Partitioner::Kahypar => "kahypar",
        }
    }

    /// Whether this build can run it (KaHyPar needs the cargo feature `kahypar`).
    pub fn available(self) -> bool {
        self != Partitioner::Kahypar || cfg!(feature = "kahypar")
    }

    /// Checks that this build can run it.
    pub fn check_available(self) -> Result<()> {
        if self.available() {
            Ok(())
        } else {
            Err(kahypar_missing())
        }
    }
}

/// The error of `--partitioner kahypar` in a build without the feature.
fn kahypar_missing() -> Error {
    Error::param(
        "--partitioner",
        "kahypar",
        "this coarsen was built without KaHyPar: rebuild with `cargo install --features kahypar` \
         (Mt-KaHyPar, compiled from source, needs a C++17 compiler)",
    )
}

/// Above this many rows the row graph keeps only each row's strongest neighbours.
const DENSE_GRAPH_LIMIT: usize = 2048;
/// Neighbours kept per row in the sparsified row graph.
const NEIGHBOURS: usize = 64;

/// GKlib installs process-wide signal handlers during a METIS call, so calls are serialised.
static METIS_LOCK: Mutex<()> = Mutex::new(());

/// Splits `rows` (row indices of `mask`) into at most `parts` parts and returns the part of each.
///
/// `imbalance` follows hMETIS's UBfactor: each bisection may put (50 ± 100·imbalance)% of the
/// rows on a side, so with 8 parts and 0.10 a part holds between 6.4% and 21.6% of the rows.
pub fn partition_rows(
    mask: &Mask,
    rows: &[usize],
    parts: usize,
    imbalance: f64,
    partitioner: Partitioner,
    seed: u64,
    layer: &str,
) -> Result<Vec<usize>> {
    let n = rows.len();
    let parts = parts.min(n);
    if parts <= 1 {
        return Ok(vec![0; n]);
    }
    match partitioner {
        Partitioner::Random => Ok(random_partition(n, parts, seed)),
        Partitioner::Metis => metis_partition(mask, rows, parts, imbalance, seed, layer),
        #[cfg(feature = "kahypar")]
        Partitioner::Kahypar => kahypar::partition(mask, rows, parts, imbalance, seed, layer),
        #[cfg(not(feature = "kahypar"))]
        Partitioner::Kahypar => Err(kahypar_missing()),
    }
}

#[cfg(feature = "kahypar")]
mod kahypar {
    use std::sync::Mutex;

    use crate::error::Result;
    use crate::mask::Mask;

    /// Mt-KaHyPar's seed is process-wide, so calls are serialised (each layer's run is then
    /// deterministic under the deterministic preset).
    static LOCK: Mutex<()> = Mutex::new(());

    /// Rows are vertices; each column used by two or more of `rows` is a hyperedge over them.
    pub(super) fn partition(
        mask: &Mask,
        rows: &[usize],
        parts: usize,
        imbalance: f64,
        seed: u64,
        layer: &str,
    ) -> Result<Vec<usize>> {
        let fail = super::failure(mask, layer, "kahypar");
        let mut pins: Vec<Vec<usize>> = vec![Vec::new(); mask.cols()];
        for (v, &r) in rows.iter().enumerate() {
            for (c, &b) in mask.row(r).iter().enumerate() {
                if b != 0 {
                    pins[c].push(v);
                }
            }
        }
        let mut indices = vec![0usize];
        let mut edges = Vec::new();
        for p in pins.into_iter().filter(|p| p.len() >= 2) {
            edges.extend(p);
            indices.push(edges.len());
        }
        if indices.len() == 1 {
            // No column is shared: any balanced split cuts nothing.
            return Ok(super::random_partition(rows.len(), parts, seed));
        }
        let k = i32::try_from(parts).map_err(|e| fail(e.to_string()))?;
        let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let ctx = mt_kahypar::Context::builder()
            .preset(mt_kahypar::Preset::Deterministic)
            .k(k)
            .epsilon(imbalance.max(0.001))
            .objective(mt_kahypar::Objective::Km1)
            .seed((seed & 0x7fff_ffff) as usize)
            .verbose(false)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let hg =
            mt_kahypar::Hypergraph::from_adjacency(&ctx, rows.len(), &indices, &edges, None, None)
                .map_err(|e| fail(e.to_string()))?;
        let part = hg.partition().map_err(|e| fail(e.to_string()))?;
        Ok(part
            .extract_partition()
            .into_iter()
            .map(|p| usize::try_from(p).unwrap_or(0).min(parts - 1))
            .collect())
    }
}

/// A balanced random partition: a seeded shuffle dealt round-robin, so sizes differ by at most 1.
pub fn random_partition(n: usize, parts: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut part = vec![0; n];
    for (k, &i) in order.iter().enumerate() {
        part[i] = k % parts.max(1);
    }
    part
}

/// METIS's `ufactor` (in thousandths) for a (50 ± 100·imbalance)% split at every bisection.
/// METIS's recursive bisection checks each bisection against `1 + ufactor/1000` times its target
/// half, so hMETIS's UBfactor 10 (imbalance 0.10) is `ufactor` 200.
fn metis_ufactor(imbalance: f64) -> i32 {
    ((2.0 * imbalance) * 1000.0).round().max(1.0) as i32
}

/// The row graph in METIS's CSR form (xadj, adjncy, adjwgt).
fn row_graph(bits: &BitRows) -> (Vec<metis::Idx>, Vec<metis::Idx>, Vec<metis::Idx>) {
    let n = bits.len();
    let mut nbrs: Vec<Vec<(usize, u32)>> = vec![Vec::new(); n];
    if n <= DENSE_GRAPH_LIMIT {
        for i in 0..n {
            for j in i + 1..n {
                let w = bits.shared(i, j);
                if w > 0 {
                    nbrs[i].push((j, w));
                    nbrs[j].push((i, w));
                }
            }
        }
    } else {
        // Keep each row's strongest neighbours, then make the graph symmetric.
        let mut keep: Vec<Vec<(usize, u32)>> = Vec::with_capacity(n);
        for i in 0..n {
            let mut all: Vec<(usize, u32)> = (0..n)
                .filter(|&j| j != i)
                .map(|j| (j, bits.shared(i, j)))
                .filter(|&(_, w)| w > 0)
                .collect();
            let k = NEIGHBOURS.min(all.len());
            if k < all.len() {
                all.select_nth_unstable_by(k, |a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                all.truncate(k);
            }
            keep.push(all);
        }
        for (i, list) in keep.iter().enumerate() {
            for &(j, w) in list {
                nbrs[i].push((j, w));
                nbrs[j].push((i, w));
            }
        }
        for list in &mut nbrs {
            list.sort_unstable();
            list.dedup_by_key(|e| e.0);
        }
    }
    let mut xadj = Vec::with_capacity(n + 1);
    let mut adjncy = Vec::new();
    let mut adjwgt = Vec::new();
    xadj.push(0);
    for list in &nbrs {
        for &(j, w) in list {
            adjncy.push(j as metis::Idx);
            adjwgt.push(w as metis::Idx);
        }
        xadj.push(adjncy.len() as metis::Idx);
    }
    (xadj, adjncy, adjwgt)
}

/// The error of a partitioner's failure on `layer`, given the reason.
fn failure<'a>(
    mask: &'a Mask,
    layer: &'a str,
    partitioner: &'static str,
) -> impl Fn(String) -> Error + 'a {
    move |reason| Error::Partition {
        layer: layer.to_string(),
        rows: mask.rows(),
        cols: mask.cols(),
        partitioner,
        reason,
    }
}

fn metis_partition(
    mask: &Mask,
    rows: &[usize],
    parts: usize,
    imbalance: f64,
    seed: u64,
    layer: &str,
) -> Result<Vec<usize>> {
    let fail = failure(mask, layer, "metis");
    let bits = BitRows::new(mask, rows);
    let (xadj, adjncy, adjwgt) = row_graph(&bits);
    let mut part = vec![0 as metis::Idx; rows.len()];
    let nparts = metis::Idx::try_from(parts).map_err(|e| fail(e.to_string()))?;
    let graph = metis::Graph::new(1, nparts, &xadj, &adjncy)
        .map_err(|e| fail(e.to_string()))?
        .set_adjwgt(&adjwgt)
        .set_option(metis::option::Seed((seed & 0x7fff_ffff) as metis::Idx))
        .set_option(metis::option::UFactor(metis_ufactor(imbalance)));
    {
        let _guard = METIS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        graph
            .part_recursive(&mut part)
            .map_err(|e| fail(format!("{e:?}")))?;
    }
    Ok(part.into_iter().map(|p| p.max(0) as usize).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four planted groups of 20 rows, each on its own 30 columns, rows shuffled.
    fn planted() -> (Mask, Vec<usize>) {
        let truth: Vec<usize> = (0..80).map(|r| (r * 7) % 4).collect();
        let m = Mask::from_fn(80, 120, |r, c| c / 30 == truth[r] && (r + c) % 5 != 0);
        (m, truth)
    }

    /// `partitioner` puts the planted groups' rows together and nothing else, the same way
    /// twice for a seed.
    fn recovers_planted_groups(partitioner: Partitioner) {
        let (m, truth) = planted();
        let rows: Vec<usize> = (0..80).collect();
        let part = partition_rows(&m, &rows, 4, 0.1, partitioner, 1, "t").unwrap();
        for i in 0..80 {
            for j in 0..80 {
                assert_eq!(truth[i] == truth[j], part[i] == part[j], "rows {i} {j}");
            }
        }
        assert_eq!(
            part,
            partition_rows(&m, &rows, 4, 0.1, partitioner, 1, "t").unwrap()
        );
    }

    #[test]
    fn metis_recovers_planted_groups() {
        recovers_planted_groups(Partitioner::Metis);
    }

    #[cfg(feature = "kahypar")]
    #[test]
    fn kahypar_recovers_planted_groups() {
        recovers_planted_groups(Partitioner::Kahypar);
    }

    #[cfg(not(feature = "kahypar"))]
    #[test]
    fn kahypar_without_the_feature_says_how_to_get_it() {
        let (m, _) = planted();
        let rows: Vec<usize> = (0..80).collect();
        let e = partition_rows(&m, &rows, 4, 0.1, Partitioner::Kahypar, 1, "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--features") && e.contains("kahypar"), "{e}");
        assert!(!Partitioner::Kahypar.available());
    }

    #[test]
    fn random_is_balanced_and_seeded() {
        let p = random_partition(50, 8, 3);
        let mut sizes = [0; 8];
        for &x in &p {
            sizes[x] += 1;
        }
        assert!(sizes.iter().all(|&s| s == 6 || s == 7));
        assert_eq!(p, random_partition(50, 8, 3));
        assert_ne!(p, random_partition(50, 8, 4));
    }

    #[test]
    fn degenerate_sizes() {
        let m = Mask::ones(3, 3);
        assert_eq!(
            partition_rows(&m, &[0, 1, 2], 8, 0.1, Partitioner::Metis, 0, "t")
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            partition_rows(&m, &[1], 8, 0.1, Partitioner::Metis, 0, "t").unwrap(),
            vec![0]
        );
        assert!(partition_rows(&m, &[], 8, 0.1, Partitioner::Metis, 0, "t")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn parts_respect_the_hmetis_balance() {
        assert_eq!(metis_ufactor(0.10), 200);
        // With 8 parts and UBfactor 10, a part holds at most 0.6³ = 21.6% of the rows.
        for seed in 0..4 {
            let m = Mask::from_fn(64, 300, |r, c| (r * 131 + c * 71 + seed * 7) % 9 < 4);
            let rows: Vec<usize> = (0..64).collect();
            let part =
                partition_rows(&m, &rows, 8, 0.10, Partitioner::Metis, seed as u64, "t").unwrap();
            let mut sizes = [0usize; 8];
            part.iter().for_each(|&p| sizes[p] += 1);
            let max = *sizes.iter().max().unwrap();
            assert!(max <= 15, "seed {seed}: sizes {sizes:?}");
        }
    }

    #[test]
    fn sparsified_graph_is_symmetric() {
        let m = Mask::from_fn(DENSE_GRAPH_LIMIT + 10, 64, |r, c| (r * 31 + c * 17) % 7 < 2);
        let rows: Vec<usize> = (0..m.rows()).collect();
        let bits = BitRows::new(&m, &rows);
        let (xadj, adjncy, adjwgt) = row_graph(&bits);
        let edge = |i: usize, j: usize| {
            (xadj[i] as usize..xadj[i + 1] as usize)
                .find(|&k| adjncy[k] as usize == j)
                .map(|k| adjwgt[k])
        };
        for i in (0..m.rows()).step_by(97) {
            for k in xadj[i] as usize..xadj[i + 1] as usize {
                let j = adjncy[k] as usize;
                assert_eq!(edge(j, i), Some(adjwgt[k]));
                assert_ne!(i, j);
            }
        }
    }
}
