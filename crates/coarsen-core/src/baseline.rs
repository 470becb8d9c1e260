//! The obvious baseline of each pattern: the structure a user gets without coarsen's algorithm,
//! built from the dense weights alone at the density coarsen's conversion reached. The report
//! gives its retained magnitude beside coarsen's, so that a conversion's worth is visible on the
//! user's own network.
//!
//! | pattern | baseline |
//! |---|---|
//! | `channel`, `channel+` | the rows with the largest dense ℓ1 norm |
//! | `group` | random row groups (as many as coarsen's blocks), each with its top columns |
//! | `shuffled-block`, `block` | the aligned tiles with the largest dense ℓ1 norm |
//! | `nm` | plain N:M of the dense weights (no permutation, no input mask), cut to the largest weights when coarsen's result is sparser |

use crate::error::Result;
use crate::mask::Mask;
use crate::patterns::partition::random_partition;
use crate::patterns::{nm_prune, NmConfig, Pattern};
use crate::view::MatrixView;

/// A short description of the baseline of `pattern`, for reports.
pub fn describe(pattern: &Pattern) -> &'static str {
    match pattern {
        Pattern::Channel(_) => "top dense-l1 rows",
        Pattern::Group(_) => "random row groups with their top columns",
        Pattern::ShuffledBlock(_) | Pattern::Block(_) => "top aligned tiles of the dense weights",
        Pattern::Nm(_) => "plain N:M of the dense weights, largest kept",
    }
}

/// The baseline mask of `pattern` for a layer with dense `weights` (row-major, matrix view), at
/// about `target` ones (coarsen's result; at most N/M for `nm`). `groups` is the number of row
/// groups for `group` (coarsen's block count). `None` when the baseline does not apply (no
/// groups, or N:M whose input channels are not a multiple of M).
pub fn baseline_mask(
    pattern: &Pattern,
    weights: &[f32],
    view: MatrixView,
    target: usize,
    groups: usize,
    seed: u64,
) -> Result<Option<Mask>> {
    let (rows, cols) = (view.rows, view.cols);
    if rows == 0 || cols == 0 || weights.len() != rows * cols {
        return Ok(None);
    }
    let abs = |r: usize, c: usize| weights[r * cols + c].abs() as f64;
    let mask = match pattern {
        Pattern::Channel(_) => {
            let scores: Vec<f64> = (0..rows)
                .map(|r| (0..cols).map(|c| abs(r, c)).sum())
                .collect();
            let k = units(target, cols, rows);
            let keep = top(&scores, k);
            let mut m = Mask::zeros(rows, cols);
            for r in keep {
                for c in 0..cols {
                    m.set(r, c, true);
                }
            }
            m
        }
        Pattern::Group(_) => {
            if groups == 0 {
                return Ok(None);
            }
            // Balanced random row groups, as `--partitioner random` makes them.
            let g = groups.min(rows);
            let mut parts: Vec<Vec<usize>> = vec![Vec::new(); g];
            for (r, p) in random_partition(rows, g, seed).into_iter().enumerate() {
                parts[p].push(r);
            }
            // Every (group, column) pair is a candidate strip of |group| entries, scored by its
            // dense magnitude; the best strips are kept until the target is reached.
            let mut strips: Vec<(f64, usize, usize)> = Vec::with_capacity(g * cols);
            for (p, members) in parts.iter().enumerate() {
                for c in 0..cols {
                    let s: f64 = members.iter().map(|&r| abs(r, c)).sum();
                    strips.push((s, p, c));
                }
            }
            strips.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
            let mut m = Mask::zeros(rows, cols);
            let mut nnz = 0;
            for (_, p, c) in strips {
                if nnz >= target {
                    break;
                }
                for &r in &parts[p] {
                    m.set(r, c, true);
                }
                nnz += parts[p].len();
            }
            m
        }
        Pattern::ShuffledBlock(c) => top_tiles(weights, rows, cols, (c.block, c.block), target),
        Pattern::Block(c) => top_tiles(weights, rows, cols, (c.height, c.width), target),
        Pattern::Nm(cfg) => {
            let plain = NmConfig {
                permute: false,
                ..*cfg
            };
            let all = Mask::from_fn(rows, cols, |_, _| true);
            let Ok(n) = nm_prune(&all, Some(weights), view, &plain, seed) else {
                return Ok(None);
            };
            // At coarsen's density when it is lower (N:M of a sparser mask): the largest kept
            // weights, still at most N in every M.
            let mut m = n.mask;
            if m.nnz() > target {
                let mut on: Vec<usize> =
                    (0..rows * cols).filter(|&i| m.as_bytes()[i] != 0).collect();
                on.sort_by(|&a, &b| {
                    weights[b]
                        .abs()
                        .total_cmp(&weights[a].abs())
                        .then(a.cmp(&b))
                });
                for &i in &on[target..] {
                    m.set(i / cols, i % cols, false);
                }
            }
            m
        }
    };
    Ok(Some(mask))
}

/// The aligned `bh × bw` tiles (edge tiles cut by the matrix) with the largest dense ℓ1 norm,
/// added until they hold at least `target` entries.
fn top_tiles(
    weights: &[f32],
    rows: usize,
    cols: usize,
    (bh, bw): (usize, usize),
    target: usize,
) -> Mask {
    let (th, tw) = (rows.div_ceil(bh), cols.div_ceil(bw));
    let tile = |t: usize| {
        let (r0, c0) = ((t / tw) * bh, (t % tw) * bw);
        (r0..(r0 + bh).min(rows), c0..(c0 + bw).min(cols))
    };
    let scores: Vec<f64> = (0..th * tw)
        .map(|t| {
            let (rr, cc) = tile(t);
            rr.flat_map(|r| cc.clone().map(move |c| weights[r * cols + c].abs() as f64))
                .sum()
        })
        .collect();
    let mut m = Mask::zeros(rows, cols);
    let mut nnz = 0;
    for t in top(&scores, scores.len()) {
        if nnz >= target {
            break;
        }
        let (rr, cc) = tile(t);
        for r in rr {
            for c in cc.clone() {
                m.set(r, c, true);
                nnz += 1;
            }
        }
    }
    m
}

/// How many units of `size` entries make about `target` entries (at least 1, at most `max`).
fn units(target: usize, size: usize, max: usize) -> usize {
    ((target as f64 / size.max(1) as f64).round() as usize).clamp(1, max.max(1))
}

/// The indices of the `k` largest scores (ties by index).
fn top(scores: &[f64], k: usize) -> Vec<usize> {
    let mut o: Vec<usize> = (0..scores.len()).collect();
    o.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    o.truncate(k);
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patterns::{BlockConfig, ChannelConfig, GroupConfig, ShuffledConfig};

    fn weights(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 10.0)
            .collect()
    }

    #[test]
    fn channel_keeps_the_heaviest_rows() {
        let (rows, cols) = (6, 4);
        let mut w = vec![0.1f32; rows * cols];
        for c in 0..cols {
            w[2 * cols + c] = 5.0;
            w[4 * cols + c] = -3.0;
        }
        let view = MatrixView::of(&[rows, cols]).unwrap();
        let m = baseline_mask(
            &Pattern::Channel(ChannelConfig::default()),
            &w,
            view,
            8,
            0,
            0,
        )
        .unwrap()
        .unwrap();
        let kept: Vec<usize> = (0..rows).filter(|&r| m.get(r, 0)).collect();
        assert_eq!(kept, vec![2, 4]);
        assert_eq!(m.nnz(), 8);
    }

    #[test]
    fn tiles_and_groups_reach_the_target_and_keep_their_structure() {
        let (rows, cols) = (16, 24);
        let w = weights(rows, cols);
        let view = MatrixView::of(&[rows, cols]).unwrap();
        for p in [
            Pattern::ShuffledBlock(ShuffledConfig {
                block: 4,
                blocks: None,
                similarity: None,
                kernels: false,
            }),
            Pattern::Block(BlockConfig {
                height: 4,
                width: 8,
            }),
        ] {
            let m = baseline_mask(&p, &w, view, 96, 0, 1).unwrap().unwrap();
            assert_eq!(m.nnz(), 96, "{}", p.name());
            // Every aligned tile all ones or all zeros.
            let (bh, bw) = if let Pattern::Block(c) = &p {
                (c.height, c.width)
            } else {
                (4, 4)
            };
            for tr in 0..rows / bh {
                for tc in 0..cols / bw {
                    let on = m.get(tr * bh, tc * bw);
                    for r in 0..bh {
                        for c in 0..bw {
                            assert_eq!(m.get(tr * bh + r, tc * bw + c), on);
                        }
                    }
                }
            }
        }
        let g = baseline_mask(&Pattern::Group(GroupConfig::default()), &w, view, 100, 4, 2)
            .unwrap()
            .unwrap();
        // 4 groups of 4 rows: strips of 4 until 100 are reached.
        assert_eq!(g.nnz(), 100);
        // At most 4 distinct row patterns.
        let mut pats: Vec<Vec<bool>> = (0..rows)
            .map(|r| (0..cols).map(|c| g.get(r, c)).collect())
            .collect();
        pats.sort();
        pats.dedup();
        assert!(pats.len() <= 4);
        assert!(
            baseline_mask(&Pattern::Group(GroupConfig::default()), &w, view, 100, 0, 2)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn nm_is_plain_nm_of_the_dense_weights() {
        let (rows, cols) = (4, 8);
        let w = weights(rows, cols);
        let view = MatrixView::of(&[rows, cols]).unwrap();
        let m = baseline_mask(
            &Pattern::Nm(NmConfig::default()),
            &w,
            view,
            rows * cols,
            0,
            0,
        )
        .unwrap()
        .unwrap();
        assert_eq!(m.nnz(), rows * cols / 2);
        // At a lower density: the largest of those, still 2:4.
        let few = baseline_mask(&Pattern::Nm(NmConfig::default()), &w, view, 5, 0, 0)
            .unwrap()
            .unwrap();
        assert_eq!(few.nnz(), 5);
        assert_eq!(few.overlap(&m), 5);
        for r in 0..rows {
            for g in 0..cols / 4 {
                let kept: Vec<usize> = (0..4).filter(|&i| m.get(r, g * 4 + i)).collect();
                let mut by: Vec<usize> = (0..4).collect();
                by.sort_by(|&a, &b| {
                    w[r * cols + g * 4 + b]
                        .abs()
                        .total_cmp(&w[r * cols + g * 4 + a].abs())
                });
                let mut want = by[..2].to_vec();
                want.sort_unstable();
                assert_eq!(kept, want);
            }
        }
    }
}
