//! Channel sparsity: Refill and Refill+ (Structure-LTH, Algorithm 2).
//!
//! Each row (output channel) gets a score; the top k rows become all ones, the others all zeros.
//! `k = min(R, ceil(d·R + (R − d·R)·ρ))` where `d` is the layer's input density and ρ the extra
//! fraction of Refill+ (0 for Refill), so the layer keeps (slightly more than) its density. Ties
//! are broken by row index, so the result is deterministic.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::mask::Mask;

use super::argsort_desc;

/// How rows are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelCriterion {
    /// ℓ1 of the masked weights of the row, `Σ_j |m_ij·w_ij|` (the paper's choice); the count of
    /// kept entries when no weights are given.
    #[default]
    L1,
    /// Number of kept entries in the row (the reference code's default, `remain`).
    Count,
    /// Scores given from outside, one per row (feature or saliency criteria).
    Scores,
}

impl ChannelCriterion {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelCriterion::L1 => "l1",
            ChannelCriterion::Count => "count",
            ChannelCriterion::Scores => "scores",
        }
    }
}

/// Parameters of Refill / Refill+.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelConfig {
    /// Row score.
    pub criterion: ChannelCriterion,
    /// Refill+'s extra fraction ρ of the otherwise removed channels to keep (0 = Refill).
    pub extra: f64,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            criterion: ChannelCriterion::L1,
            extra: 0.0,
        }
    }
}

impl ChannelConfig {
    /// Refill+ with its default extra fraction 0.1.
    pub fn refill_plus() -> Self {
        ChannelConfig {
            extra: 0.1,
            ..Default::default()
        }
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.extra) {
            return Err(Error::param("--extra", self.extra, "must lie in [0, 1]"));
        }
        Ok(())
    }
}

/// Number of rows Refill keeps for a mask with `nnz` ones in `rows × cols`:
/// `min(rows, ceil(d·rows + (rows − d·rows)·extra))` with `d·rows = nnz / cols`, at least 1 when
/// `nnz > 0`.
pub fn refill_count(nnz: usize, rows: usize, cols: usize, extra: f64) -> usize {
    if nnz == 0 || cols == 0 {
        return 0;
    }
    let base = nnz as f64 / cols as f64;
    let x = base + (rows as f64 - base) * extra;
    // Guard against 12.000000001 becoming 13 through rounding noise.
    let k = (x - 1e-9).ceil().max(1.0) as usize;
    k.min(rows)
}

/// Refill: the channel-sparse version of `mask`. `weights` (row-major, same shape) feed the `l1`
/// criterion; `scores` (one per row) are required by [`ChannelCriterion::Scores`].
///
/// Returns the new mask and the kept rows in ascending order.
pub fn refill(
    mask: &Mask,
    weights: Option<&[f32]>,
    scores: Option<&[f32]>,
    cfg: &ChannelConfig,
) -> Result<(Mask, Vec<usize>)> {
    cfg.validate()?;
    let rows = mask.rows();
    let score: Vec<f64> = match cfg.criterion {
        ChannelCriterion::Scores => {
            let s = scores.ok_or_else(|| {
                Error::param("--criterion", "scores", "no score vector was given")
            })?;
            if s.len() != rows {
                return Err(Error::param(
                    "--scores",
                    s.len(),
                    format!("a layer with {rows} rows needs {rows} scores"),
                ));
            }
            s.iter().map(|&v| v as f64).collect()
        }
        ChannelCriterion::Count => (0..rows).map(|r| mask.row_nnz(r) as f64).collect(),
        ChannelCriterion::L1 => match weights {
            None => (0..rows).map(|r| mask.row_nnz(r) as f64).collect(),
            Some(w) => (0..rows)
                .map(|r| {
                    let ws = &w[r * mask.cols()..(r + 1) * mask.cols()];
                    ws.iter()
                        .zip(mask.row(r))
                        .map(|(w, &m)| if m != 0 { w.abs() as f64 } else { 0.0 })
                        .sum()
                })
                .collect(),
        },
    };
    let k = refill_count(mask.nnz(), rows, mask.cols(), cfg.extra);
    let mut kept: Vec<usize> = argsort_desc(rows, |r| score[r])
        .into_iter()
        .take(k)
        .collect();
    kept.sort_unstable();
    let mut out = Mask::zeros(rows, mask.cols());
    for &r in &kept {
        out.fill_row(r, true);
    }
    Ok((out, kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_formula() {
        // d = 0.2 of 10 rows of 5 columns: nnz = 10, d·R = 2.
        assert_eq!(refill_count(10, 10, 5, 0.0), 2);
        assert_eq!(refill_count(11, 10, 5, 0.0), 3);
        // Refill+: 2 + 8·0.1 = 2.8 → 3.
        assert_eq!(refill_count(10, 10, 5, 0.1), 3);
        assert_eq!(refill_count(1, 10, 5, 0.0), 1);
        assert_eq!(refill_count(50, 10, 5, 0.5), 10);
        assert_eq!(refill_count(0, 10, 5, 0.5), 0);
    }

    #[test]
    fn l1_keeps_heaviest_rows() {
        let m = Mask::ones(4, 2);
        let w = [1.0, 1.0, 5.0, 0.0, 0.1, 0.1, -3.0, -3.0];
        let (out, kept) = refill(&m, Some(&w), None, &ChannelConfig::default()).unwrap();
        assert_eq!(kept, vec![0, 1, 2, 3]);
        assert_eq!(out.nnz(), 8);
        let half = Mask::from_fn(4, 2, |_, c| c == 0);
        let (out, kept) = refill(&half, Some(&w), None, &ChannelConfig::default()).unwrap();
        assert_eq!(kept, vec![1, 3]);
        assert_eq!(out.row(1), &[1, 1]);
        assert_eq!(out.row(0), &[0, 0]);
    }

    #[test]
    fn ties_broken_by_index_and_scores_checked() {
        let m = Mask::from_fn(4, 4, |r, c| c < 2 && r < 4);
        let (_, kept) = refill(
            &m,
            None,
            None,
            &ChannelConfig {
                criterion: ChannelCriterion::Count,
                extra: 0.0,
            },
        )
        .unwrap();
        assert_eq!(kept, vec![0, 1]);
        let cfg = ChannelConfig {
            criterion: ChannelCriterion::Scores,
            extra: 0.0,
        };
        let (_, kept) = refill(&m, None, Some(&[0.0, 1.0, 3.0, 2.0]), &cfg).unwrap();
        assert_eq!(kept, vec![2, 3]);
        assert!(refill(&m, None, Some(&[1.0]), &cfg).is_err());
        assert!(refill(&m, None, None, &cfg).is_err());
    }
}
