//! Shuffled blocks: DSB's EXTRACT (NeurIPS 2022).
//!
//! Rows are clustered by complete linkage on the cosine distance of their binary patterns into
//! `max(R/b, 1)` clusters; clusters are laid out largest first (rows ascending inside) and cut into
//! groups of b rows. In each group, columns are ranked by the ℓ2 norm of their segment of
//! `A = |W|⊙M` and cut into chunks of b; each (group, chunk) is a candidate b×b tile scored by the
//! sum of its column norms. The top K candidates of the layer are kept. K defaults to
//! `ceil(nnz / b²)`, which keeps the layer's density.
//!
//! Shapes that are not multiples of b are handled: the last group may have fewer than b rows and
//! a group's last chunk fewer than b columns (a tile cut by the matrix edge).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::mask::{BitRows, Mask};

use super::{argsort_desc, masked_magnitudes};

/// Parameters of the shuffled-block extraction.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShuffledConfig {
    /// Block size b (tiles are b×b; DSB uses 16).
    pub block: usize,
    /// Number of tiles K; `None` keeps the input density, `ceil(nnz / b²)`.
    pub blocks: Option<usize>,
    /// The seed article's row-similarity threshold q: only rows sharing at least this cosine
    /// similarity are clustered (complete linkage cut at distance 1 − q); rows without such a
    /// partner keep their order after the clusters. `None` is the DSB code: `R/b` clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f64>,
    /// Blocks of whole kernels of a convolution (see
    /// [`Pattern::kernels`](super::Pattern::kernels)).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kernels: bool,
}

impl Default for ShuffledConfig {
    fn default() -> Self {
        ShuffledConfig {
            block: 16,
            blocks: None,
            similarity: None,
            kernels: false,
        }
    }
}

impl ShuffledConfig {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        if self.block == 0 {
            return Err(Error::param("--block", 0, "block size must be at least 1"));
        }
        if self.blocks == Some(0) {
            return Err(Error::param(
                "--blocks",
                0,
                "a layer keeps at least one block (leave it out for the mask's own count)",
            ));
        }
        if let Some(q) = self.similarity {
            if !(0.0..=1.0).contains(&q) {
                return Err(Error::param(
                    "--similarity",
                    q,
                    "a cosine similarity threshold lies in [0, 1]",
                ));
            }
        }
        Ok(())
    }
}

/// The result of [`shuffled_blocks`].
#[derive(Clone, Debug)]
pub struct ShuffledOutcome {
    /// The new mask, the union of the kept tiles.
    pub mask: Mask,
    /// Row groups (the shuffled row order cut into groups of b; the last may be shorter).
    pub groups: Vec<Vec<usize>>,
    /// Kept tiles: (group index, its columns).
    pub tiles: Vec<(usize, Vec<usize>)>,
    /// Every group's columns, ranked and cut into chunks of b (the last may be shorter): the
    /// candidate tiles, kept or not. Density targeting adds and removes these whole.
    pub chunks: Vec<Vec<Vec<usize>>>,
}

/// EXTRACT one layer. `weights` give `A = |W|⊙M` (the mask itself when absent); entries of
/// `grown` (zero-initialised weights just grown by sparse training) take the mean magnitude of
/// the others, as DSB does.
pub fn shuffled_blocks(
    mask: &Mask,
    weights: Option<&[f32]>,
    grown: Option<&Mask>,
    cfg: &ShuffledConfig,
) -> Result<ShuffledOutcome> {
    cfg.validate()?;
    let (rows, cols, b) = (mask.rows(), mask.cols(), cfg.block);
    let mut a = masked_magnitudes(mask, weights);
    if let Some(g) = grown {
        let (sum, n) = a
            .iter()
            .filter(|&&v| v > 0.0)
            .fold((0.0f64, 0usize), |(s, n), &v| (s + v as f64, n + 1));
        let mean = if n > 0 { (sum / n as f64) as f32 } else { 1.0 };
        for (v, &gb) in a.iter_mut().zip(g.as_bytes()) {
            if gb != 0 {
                *v = mean;
            }
        }
    }

    let order = match cfg.similarity {
        None => cluster_rows(mask, (rows / b).max(1)),
        Some(q) => cluster_rows_within(mask, 1.0 - q),
    };
    let groups: Vec<Vec<usize>> = order.chunks(b).map(<[usize]>::to_vec).collect();

    // Candidate tiles: (score, group, chunk index, columns).
    let mut candidates: Vec<(f64, usize, usize, Vec<usize>)> = Vec::new();
    let mut norm = vec![0.0f64; cols];
    let mut chunks = Vec::with_capacity(groups.len());
    for (g, members) in groups.iter().enumerate() {
        norm.iter_mut().for_each(|v| *v = 0.0);
        for &r in members {
            for (c, v) in a[r * cols..(r + 1) * cols].iter().enumerate() {
                norm[c] += (*v as f64) * (*v as f64);
            }
        }
        norm.iter_mut().for_each(|v| *v = v.sqrt());
        let ranked = argsort_desc(cols, |c| norm[c]);
        for (k, chunk) in ranked.chunks(b).enumerate() {
            let score: f64 = chunk.iter().map(|&c| norm[c]).sum();
            if score > 0.0 {
                candidates.push((score, g, k, chunk.to_vec()));
            }
        }
        chunks.push(ranked.chunks(b).map(<[usize]>::to_vec).collect::<Vec<_>>());
    }
    let k = cfg
        .blocks
        .unwrap_or_else(|| mask.nnz().div_ceil(b * b))
        .min(candidates.len());
    candidates.sort_by(|x, y| {
        y.0.partial_cmp(&x.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then((x.1, x.2).cmp(&(y.1, y.2)))
    });
    candidates.truncate(k);
    candidates.sort_by_key(|c| (c.1, c.2));

    let mut out = Mask::zeros(rows, cols);
    let mut tiles = Vec::with_capacity(candidates.len());
    for (_, g, _, tile_cols) in candidates {
        for &r in &groups[g] {
            for &c in &tile_cols {
                out.set(r, c, true);
            }
        }
        tiles.push((g, tile_cols));
    }
    Ok(ShuffledOutcome {
        mask: out,
        groups,
        tiles,
        chunks,
    })
}

/// The rows in clustered order: complete-linkage clusters of the cosine distance between binary
/// rows, largest cluster first (ties by smallest row), rows ascending inside a cluster.
pub fn cluster_rows(mask: &Mask, clusters: usize) -> Vec<usize> {
    let n = mask.rows();
    if n <= 1 || clusters >= n {
        return (0..n).collect();
    }
    agglomerate(mask, |steps| steps.len().min(n - clusters.max(1)))
}

/// Complete-linkage clusters of rows whose cosine distance stays within `max_distance` (every
/// pair of a cluster is that similar), laid out as [`cluster_rows`] does: largest first, rows
/// ascending inside; rows with no partner that close come last, in order.
pub fn cluster_rows_within(mask: &Mask, max_distance: f64) -> Vec<usize> {
    if mask.rows() <= 1 {
        return (0..mask.rows()).collect();
    }
    agglomerate(mask, |steps| {
        steps
            .iter()
            .take_while(|s| s.dissimilarity <= max_distance + 1e-12)
            .count()
    })
}

/// Complete linkage on the cosine distance of binary rows; applies the first `merges(steps)`
/// merges and lays the clusters out largest first (ties by first row), rows ascending inside.
fn agglomerate(mask: &Mask, merges: impl Fn(&[kodama::Step<f64>]) -> usize) -> Vec<usize> {
    let n = mask.rows();
    let all: Vec<usize> = (0..n).collect();
    let bits = BitRows::new(mask, &all);
    let mut condensed = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            condensed.push(bits.cosine_distance(i, j));
        }
    }
    let dendrogram = kodama::linkage(&mut condensed, n, kodama::Method::Complete);
    let take = merges(dendrogram.steps());
    // Apply the first merges with a union-find over cluster labels.
    let mut parent: Vec<usize> = (0..2 * n).collect();
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for (step_index, step) in dendrogram.steps().iter().take(take).enumerate() {
        let new = n + step_index;
        let a = find(&mut parent, step.cluster1);
        let b = find(&mut parent, step.cluster2);
        parent[a] = new;
        parent[b] = new;
    }
    let mut by_root: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for r in 0..n {
        let root = find(&mut parent, r);
        by_root.entry(root).or_default().push(r);
    }
    let mut list: Vec<Vec<usize>> = by_root.into_values().collect();
    list.sort_by(|x, y| y.len().cmp(&x.len()).then(x[0].cmp(&y[0])));
    list.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_bring_similar_rows_together() {
        // Rows alternate between two patterns; clustering puts each pattern's rows together.
        let m = Mask::from_fn(8, 16, |r, c| (c < 8) == (r % 2 == 0));
        let order = cluster_rows(&m, 2);
        let first: Vec<bool> = order[..4].iter().map(|r| r % 2 == 0).collect();
        assert!(first.iter().all(|&x| x == first[0]));
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn a_similarity_threshold_clusters_only_close_rows() {
        // Rows 0..4 share one pattern, rows 4..8 another; rows 8..12 are each alone.
        let m = Mask::from_fn(12, 24, |r, c| match r {
            0..=3 => c < 6,
            4..=7 => (6..12).contains(&c),
            _ => c == 12 + (r - 8) * 3,
        });
        let order = cluster_rows_within(&m, 1.0 - 0.9);
        assert_eq!(order, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        // Interleave the two patterns: the threshold brings each pattern's rows together and
        // leaves the loners last, in order.
        let m2 = Mask::from_fn(12, 24, |r, c| match r {
            0 | 2 | 4 | 6 => c < 6,
            1 | 3 | 5 | 7 => (6..12).contains(&c),
            _ => c == 12 + (r - 8) * 3,
        });
        assert_eq!(
            cluster_rows_within(&m2, 0.1),
            vec![0, 2, 4, 6, 1, 3, 5, 7, 8, 9, 10, 11]
        );
        // q = 0 merges everything into one cluster: the original order.
        assert_eq!(cluster_rows_within(&m2, 1.0), (0..12).collect::<Vec<_>>());
        let cfg = ShuffledConfig {
            block: 4,
            blocks: None,
            similarity: Some(0.9),
            kernels: false,
        };
        let out = shuffled_blocks(&m2, None, None, &cfg).unwrap();
        assert_eq!(out.groups[0], vec![0, 2, 4, 6]);
        assert!(ShuffledConfig {
            similarity: Some(1.5),
            ..cfg
        }
        .validate()
        .is_err());
    }

    #[test]
    fn keeps_density_in_whole_tiles() {
        let m = Mask::from_fn(64, 64, |r, c| (r * 7 + c * 3) % 5 == 0);
        let out = shuffled_blocks(&m, None, None, &ShuffledConfig::default()).unwrap();
        let k = m.nnz().div_ceil(256);
        assert_eq!(out.tiles.len(), k);
        assert_eq!(out.mask.nnz(), k * 256);
        for (g, cols) in &out.tiles {
            assert_eq!(out.groups[*g].len(), 16);
            assert_eq!(cols.len(), 16);
        }
    }

    #[test]
    fn odd_shapes_give_short_edge_tiles() {
        let m = Mask::from_fn(21, 19, |r, c| (r + 2 * c) % 3 == 0);
        let out = shuffled_blocks(&m, None, None, &ShuffledConfig::default()).unwrap();
        assert_eq!(out.groups.len(), 2);
        assert!(out.mask.nnz() > 0);
    }

    #[test]
    fn grown_entries_count_with_mean_magnitude() {
        let m = Mask::ones(16, 32);
        let w: Vec<f32> = (0..512)
            .map(|i| if i % 32 < 16 { 1.0 } else { 0.0 })
            .collect();
        // Without growth, the left half wins; growing the right half makes it compete.
        let out = shuffled_blocks(
            &m,
            Some(&w),
            None,
            &ShuffledConfig {
                block: 16,
                blocks: Some(1),
                similarity: None,
                kernels: false,
            },
        )
        .unwrap();
        assert!(out.tiles[0].1.iter().all(|&c| c < 16));
        let grown = Mask::from_fn(16, 32, |_, c| c >= 16);
        let out2 = shuffled_blocks(
            &m,
            Some(&w),
            Some(&grown),
            &ShuffledConfig {
                block: 16,
                blocks: Some(2),
                similarity: None,
                kernels: false,
            },
        )
        .unwrap();
        assert_eq!(out2.mask.nnz(), 512);
    }
}
