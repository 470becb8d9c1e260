//! Group sparsity: Regroup (Structure-LTH), as the reference code runs it.
//!
//! Per layer: the non-empty rows are split into K parts by a partitioner (rows = vertices,
//! columns = hyperedges). Parts are visited largest first. For a part, columns are ranked by how
//! many of its rows use them, and the block widens by the densest columns until every row has
//! fewer than `(w − 1) / width_ratio` ones left outside it. A part with more than `row_tile` rows
//! gives a block of the first `⌊|P|/row_tile⌋·row_tile` rows and one of the rest (same columns),
//! a part with more than `min_rows` rows gives one block, a smaller part is dropped (its rows
//! become zero). The result is the union of the blocks: zeros inside blocks become ones, ones
//! outside become zeros.
//!
//! `legacy` reproduces the training copy of the reference code: the widening test reads the
//! unsorted column `w` instead of the w-th densest, stops updating rows after the first row that
//! fails, and gives up on a part (no block) when no width up to `C − 1` passes.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::mask::Mask;

use super::argsort_desc;
use super::partition::{partition_rows, Partitioner};

/// How many parts the rows are split into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartCount {
    /// This many parts (the reference code uses 8), capped by the number of non-empty rows.
    Fixed(usize),
    /// Sized to the layer: `max(1, ⌊rows / row_tile⌋)`, so that parts average one row tile and
    /// layers of ≤ 128 rows get blocks too (with 8 parts their parts rarely exceed `min_rows`).
    Auto,
}

impl Serialize for PartCount {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            PartCount::Fixed(n) => s.serialize_u64(*n as u64),
            PartCount::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for PartCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(usize),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(PartCount::Fixed(n)),
            Raw::Word(w) if w == "auto" => Ok(PartCount::Auto),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "parts must be a count or \"auto\", not {w:?}"
            ))),
        }
    }
}

impl PartCount {
    /// The part count for a layer with `rows` non-empty rows.
    pub fn resolve(self, rows: usize, row_tile: usize) -> usize {
        match self {
            PartCount::Fixed(n) => n.min(rows).max(1),
            PartCount::Auto => (rows / row_tile.max(1)).max(1),
        }
    }
}

/// What a layer in which no block is found becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Keep the input mask; the layer is reported `unstructured` with the reason.
    #[default]
    Keep,
    /// One dense block over the whole layer (the reference end-to-end code's choice).
    Dense,
}

/// Parameters of Regroup.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupConfig {
    /// Number of parts (paper t1; code `cn = 8`).
    pub parts: PartCount,
    /// Balance: each bisection puts (50 ± 100·imbalance)% of the rows on a side (hMETIS UBfactor
    /// 10 = 0.10).
    pub imbalance: f64,
    /// A part needs more than this many rows to become a block (code `B2 = 16`).
    pub min_rows: usize,
    /// Row tile of the kernel; larger parts are split at a multiple of it (code `nn = 32`).
    pub row_tile: usize,
    /// Block widening ratio (code `t1 = 1.5`).
    pub width_ratio: f64,
    /// The partitioner.
    pub partitioner: Partitioner,
    /// What a layer without blocks becomes.
    pub fallback: Fallback,
    /// Reproduce the reference training code's widening bugs.
    pub legacy: bool,
    /// Group whole kernels of a convolution (see [`Pattern::kernels`](super::Pattern::kernels)).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub kernels: bool,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            parts: PartCount::Auto,
            imbalance: 0.10,
            min_rows: 16,
            row_tile: 32,
            width_ratio: 1.5,
            partitioner: Partitioner::Metis,
            fallback: Fallback::Keep,
            legacy: false,
            kernels: false,
        }
    }
}

impl GroupConfig {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        if self.parts == PartCount::Fixed(0) {
            return Err(Error::param("--parts", 0, "needs at least 1 part"));
        }
        if !(0.0..0.5).contains(&self.imbalance) {
            return Err(Error::param(
                "--imbalance",
                self.imbalance,
                "must lie in [0, 0.5)",
            ));
        }
        if self.row_tile == 0 {
            return Err(Error::param("--row-tile", 0, "must be at least 1"));
        }
        if !(self.width_ratio.is_finite() && self.width_ratio > 0.0) {
            return Err(Error::param(
                "--width-ratio",
                self.width_ratio,
                "must be positive",
            ));
        }
        self.partitioner.check_available()
    }
}

/// A dense block: these rows × these columns are all ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupBlock {
    /// Row indices, ascending.
    pub rows: Vec<usize>,
    /// Column indices, densest first.
    pub cols: Vec<usize>,
}

/// The result of [`regroup`].
#[derive(Clone, Debug)]
pub struct GroupOutcome {
    /// The new mask (the input mask when no block was found and the fallback keeps it).
    pub mask: Mask,
    /// The blocks (empty when none was found).
    pub blocks: Vec<GroupBlock>,
    /// The number of parts the rows were split into.
    pub parts: usize,
    /// Why no block was found, when none was.
    pub no_block_reason: Option<String>,
}

/// Regroup one layer's mask. `seed` drives the partitioner.
pub fn regroup(mask: &Mask, cfg: &GroupConfig, seed: u64, layer: &str) -> Result<GroupOutcome> {
    cfg.validate()?;
    let rows = mask.nonempty_rows();
    let parts = cfg.parts.resolve(rows.len(), cfg.row_tile);
    let assignment = partition_rows(
        mask,
        &rows,
        parts,
        cfg.imbalance,
        cfg.partitioner,
        seed,
        layer,
    )?;
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); parts];
    for (&r, &p) in rows.iter().zip(&assignment) {
        members[p.min(parts - 1)].push(r);
    }
    members.retain(|m| !m.is_empty());
    // Largest part first; the sort is stable, so equal sizes keep part order.
    members.sort_by_key(|m| std::cmp::Reverse(m.len()));

    let mut blocks = Vec::new();
    for part in &members {
        if part.len() <= cfg.min_rows {
            continue;
        }
        let cols = if cfg.legacy {
            legacy_block_columns(mask, part, cfg.width_ratio)
        } else {
            Some(block_columns(mask, part, cfg.width_ratio))
        };
        let Some(cols) = cols else { continue };
        if part.len() > cfg.row_tile {
            let split = part.len() / cfg.row_tile * cfg.row_tile;
            blocks.push(GroupBlock {
                rows: part[..split].to_vec(),
                cols: cols.clone(),
            });
            if split < part.len() {
                blocks.push(GroupBlock {
                    rows: part[split..].to_vec(),
                    cols,
                });
            }
        } else {
            blocks.push(GroupBlock {
                rows: part.clone(),
                cols,
            });
        }
    }

    if blocks.is_empty() {
        let largest = members.first().map_or(0, Vec::len);
        let reason = format!(
            "no dense block: the largest of {} parts has {} rows (a block needs more than {})",
            members.len(),
            largest,
            cfg.min_rows
        );
        let out = match cfg.fallback {
            Fallback::Keep => mask.clone(),
            Fallback::Dense => Mask::ones(mask.rows(), mask.cols()),
        };
        return Ok(GroupOutcome {
            mask: out,
            blocks,
            parts: members.len(),
            no_block_reason: Some(reason),
        });
    }
    let mut out = Mask::zeros(mask.rows(), mask.cols());
    for b in &blocks {
        for &r in &b.rows {
            for &c in &b.cols {
                out.set(r, c, true);
            }
        }
    }
    Ok(GroupOutcome {
        mask: out,
        blocks,
        parts: members.len(),
        no_block_reason: None,
    })
}

/// Columns of a part ranked by how many of its rows use them, densest first (ties by index).
fn ranked_columns(mask: &Mask, part: &[usize]) -> Vec<usize> {
    let mut count = vec![0u32; mask.cols()];
    for &r in part {
        for (c, &b) in mask.row(r).iter().enumerate() {
            count[c] += b as u32;
        }
    }
    argsort_desc(mask.cols(), |c| count[c])
}

/// The fixed widening rule: the smallest width `w` such that every row of the part has fewer
/// than `(w − 1) / ratio` ones outside the block's first `w` columns.
fn block_columns(mask: &Mask, part: &[usize], ratio: f64) -> Vec<usize> {
    let order = ranked_columns(mask, part);
    let mut outside: Vec<usize> = part.iter().map(|&r| mask.row_nnz(r)).collect();
    for w in 1..=order.len() {
        let c = order[w - 1];
        for (o, &r) in outside.iter_mut().zip(part) {
            if mask.get(r, c) {
                *o -= 1;
            }
        }
        let bound = (w - 1) as f64;
        if outside.iter().all(|&o| bound > ratio * o as f64) {
            return order[..w].to_vec();
        }
    }
    order
}

/// The reference training code's widening loop, bugs included (see the module docs).
fn legacy_block_columns(mask: &Mask, part: &[usize], ratio: f64) -> Option<Vec<usize>> {
    let order = ranked_columns(mask, part);
    let mut outside: Vec<usize> = part.iter().map(|&r| mask.row_nnz(r)).collect();
    for w in 1..mask.cols() {
        let mut failed = false;
        for (o, &r) in outside.iter_mut().zip(part) {
            if mask.get(r, w) {
                *o = o.saturating_sub(1);
            }
            if w as f64 <= ratio * *o as f64 {
                failed = true;
                break;
            }
        }
        if !failed {
            return Some(order[..w].to_vec());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three planted blocks of 40 rows × 24 columns with 10% of their entries missing, plus
    /// scattered noise.
    fn planted() -> Mask {
        Mask::from_fn(120, 96, |r, c| {
            let g = (r * 7) % 3;
            let inside = c / 24 == g && (r * 13 + c * 7) % 10 != 0;
            let noise = (r * 31 + c * 17) % 53 == 0;
            inside || noise
        })
    }

    #[test]
    fn recovers_planted_blocks() {
        let m = planted();
        let cfg = GroupConfig {
            parts: PartCount::Fixed(3),
            ..Default::default()
        };
        let out = regroup(&m, &cfg, 0, "t").unwrap();
        assert!(out.no_block_reason.is_none());
        // Each 40-row part becomes a 32-row and an 8-row block on the same columns, all of them
        // inside its planted 24 columns: the widening rule stops once few ones are left outside.
        assert_eq!(out.blocks.len(), 6);
        for b in &out.blocks {
            let g = b.cols[0] / 24;
            assert!(b.cols.iter().all(|&c| c / 24 == g), "{:?}", b.cols);
            assert!(b.cols.len() >= 12);
            assert!(b.rows.iter().all(|&r| (r * 7) % 3 == g));
        }
        let recall = out.mask.overlap(&m) as f64 / m.nnz() as f64;
        let precision = out.mask.overlap(&m) as f64 / out.mask.nnz() as f64;
        // The same rule on a random balanced partition mixes the planted groups: its blocks are
        // wide, so at similar recall far fewer of their ones were ones of the input.
        let random = GroupConfig {
            partitioner: Partitioner::Random,
            ..cfg
        };
        let r = regroup(&m, &random, 0, "t").unwrap();
        let random_precision = r.mask.overlap(&m) as f64 / r.mask.nnz() as f64;
        assert!(recall > 0.5, "recall {recall}");
        assert!(precision > 0.85, "precision {precision}");
        assert!(
            precision > random_precision + 0.3,
            "{precision} vs {random_precision}"
        );
        assert!(out.mask.nnz() * 2 < r.mask.nnz());
    }

    #[test]
    fn small_layers_fall_back_with_reason() {
        // The reference code's 8 parts: 5 rows each, none above min_rows.
        let eight = GroupConfig {
            parts: PartCount::Fixed(8),
            ..Default::default()
        };
        let m = Mask::from_fn(40, 20, |r, c| (r + c) % 3 == 0);
        let out = regroup(&m, &eight, 0, "t").unwrap();
        assert_eq!(out.mask, m);
        assert!(out.no_block_reason.unwrap().contains("more than 16"));
        let dense = GroupConfig {
            fallback: Fallback::Dense,
            ..eight
        };
        let out = regroup(&m, &dense, 0, "t").unwrap();
        assert_eq!(out.mask.nnz(), 800);
    }

    #[test]
    fn auto_parts_give_small_layers_blocks() {
        let m = Mask::from_fn(64, 30, |r, c| (r * 3 + c * 5) % 4 == 0);
        assert_eq!(PartCount::Auto.resolve(64, 32), 2);
        assert_eq!(PartCount::Auto.resolve(512, 32), 16);
        assert_eq!(PartCount::Auto.resolve(20, 32), 1);
        let cfg = GroupConfig {
            parts: PartCount::Auto,
            ..Default::default()
        };
        let out = regroup(&m, &cfg, 0, "t").unwrap();
        assert!(out.no_block_reason.is_none());
    }

    #[test]
    fn widening_rule() {
        // One part of 20 rows using columns 0..4 fully and column 5 in a single row.
        let m = Mask::from_fn(20, 8, |r, c| c < 4 || (c == 5 && r == 0));
        let cols = block_columns(&m, &(0..20).collect::<Vec<_>>(), 1.5);
        // w = 4: row 0 has 1 outside, 3 > 1.5 holds → block is the 4 dense columns.
        assert_eq!(cols, vec![0, 1, 2, 3]);
        // The legacy loop breaks at the first failing row, so later rows are never updated and
        // the block widens to 7 columns, 3 of them empty.
        let legacy = legacy_block_columns(&m, &(0..20).collect::<Vec<_>>(), 1.5).unwrap();
        assert_eq!(legacy.len(), 7);
    }

    #[test]
    fn deterministic_for_a_seed() {
        let m = planted();
        let a = regroup(&m, &GroupConfig::default(), 5, "t").unwrap();
        let b = regroup(&m, &GroupConfig::default(), 5, "t").unwrap();
        assert_eq!(a.mask, b.mask);
    }
}
