//! N:M compressed: N values and their in-group positions per group of M input channels.

use coarsen_core::{Mask, MatrixView};

use super::check_weights;
use crate::error::{KernelError, Result};

/// Position stored in a padding slot (a group with fewer than N ones).
pub const PAD: u8 = u8::MAX;

/// N:M compressed weights. A group is M consecutive input channels (after `col_perm`) at one
/// (row, kernel position); it stores exactly N value slots with the position (0..M) of each
/// value inside the group. Slots of groups with fewer than N ones hold 0 with position `u8::MAX` ([`NM_PAD`](crate::formats::NM_PAD)).
/// The last group is shorter when the input channels are not a multiple of M.
#[derive(Clone, Debug, PartialEq)]
pub struct NmCompressed {
    /// Rows of the full matrix.
    pub rows: usize,
    /// Columns of the full matrix (`in_channels · inner`).
    pub cols: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Entries per input channel in a row (`kh·kw`, or 1).
    pub inner: usize,
    /// Values per group.
    pub n: usize,
    /// Group size.
    pub m: usize,
    /// Input-channel permutation, `perm[new] = old` (identity when none was searched).
    pub col_perm: Vec<u32>,
    /// Values, `[rows][groups][inner][n]`.
    pub values: Vec<f32>,
    /// In-group position of each value.
    pub indices: Vec<u8>,
}

impl NmCompressed {
    /// Packs a mask that holds at most `n` ones in every group of `m` input channels after
    /// `col_perm` (`perm[new] = old`; `None` is the identity).
    pub fn pack(
        mask: &Mask,
        weights: &[f32],
        view: MatrixView,
        n: usize,
        m: usize,
        col_perm: Option<&[usize]>,
    ) -> Result<Self> {
        check_weights("NmCompressed::pack", mask, weights)?;
        if n == 0 || m == 0 || n > m || m > 64 {
            return Err(KernelError::Param {
                name: "n:m",
                value: format!("{n}:{m}"),
                reason: "needs 1 <= N <= M <= 64".into(),
            });
        }
        if (view.rows, view.cols) != (mask.rows(), mask.cols()) {
            return Err(KernelError::Param {
                name: "view",
                value: format!("{}x{}", view.rows, view.cols),
                reason: format!("the mask is {}x{}", mask.rows(), mask.cols()),
            });
        }
        let perm: Vec<u32> = match col_perm {
            Some(p) => {
                let mut sorted = p.to_vec();
                sorted.sort_unstable();
                if sorted != (0..view.in_channels).collect::<Vec<_>>() {
                    return Err(KernelError::Param {
                        name: "col_perm",
                        value: format!("{} entries", p.len()),
                        reason: format!("not a permutation of {} input channels", view.in_channels),
                    });
                }
                p.iter().map(|&c| c as u32).collect()
            }
            None => (0..view.in_channels as u32).collect(),
        };
        let groups = view.in_channels.div_ceil(m);
        let mut values = Vec::with_capacity(view.rows * groups * view.inner * n);
        let mut indices = Vec::with_capacity(values.capacity());
        for r in 0..view.rows {
            for (g, group) in perm.chunks(m).enumerate() {
                for s in 0..view.inner {
                    let mut slots = 0;
                    for (pos, &c) in group.iter().enumerate() {
                        let col = view.col(c as usize, s);
                        if mask.get(r, col) {
                            if slots == n {
                                return Err(KernelError::Structure {
                                    format: "nm",
                                    structure: format!("{n}:{m}"),
                                    detail: format!(
                                        "row {r}, kernel position {s}, group {g} holds more than {n} ones"
                                    ),
                                });
                            }
                            values.push(weights[r * view.cols + col]);
                            indices.push(pos as u8);
                            slots += 1;
                        }
                    }
                    for _ in slots..n {
                        values.push(0.0);
                        indices.push(PAD);
                    }
                }
            }
        }
        Ok(NmCompressed {
            rows: view.rows,
            cols: view.cols,
            in_channels: view.in_channels,
            inner: view.inner,
            n,
            m,
            col_perm: perm,
            values,
            indices,
        })
    }

    /// Number of groups per (row, kernel position).
    pub fn groups(&self) -> usize {
        self.in_channels.div_ceil(self.m)
    }

    /// Calls `f(row, col, slot)` for every stored (non-padding) value.
    pub fn for_each_entry(&self, mut f: impl FnMut(usize, usize, usize)) {
        let groups = self.groups();
        let mut slot = 0;
        for r in 0..self.rows {
            for g in 0..groups {
                for s in 0..self.inner {
                    for _ in 0..self.n {
                        let pos = self.indices[slot];
                        if pos != PAD {
                            let c = self.col_perm[g * self.m + pos as usize] as usize;
                            f(r, c * self.inner + s, slot);
                        }
                        slot += 1;
                    }
                }
            }
        }
    }

    /// The dense matrix.
    pub fn unpack(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.for_each_entry(|r, c, slot| out[r * self.cols + c] = self.values[slot]);
        out
    }

    /// The pattern.
    pub fn mask(&self) -> Mask {
        let mut m = Mask::zeros(self.rows, self.cols);
        self.for_each_entry(|r, c, _| m.set(r, c, true));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_permutation_and_padding() {
        let view = MatrixView::of(&[3, 6, 2, 1]).unwrap();
        // Channel permutation [1, 0, 2, 3, 5, 4]; at most 2 of 4 per group after it.
        let perm = [1usize, 0, 2, 3, 5, 4];
        let m = Mask::from_fn(3, 12, |r, c| {
            let ch = c / 2;
            (ch == 1 || ch == 3 || ch == 5) && (r + c) % 3 != 0
        });
        let w: Vec<f32> = (0..36).map(|i| i as f32 + 1.0).collect();
        let p = NmCompressed::pack(&m, &w, view, 2, 4, Some(&perm)).unwrap();
        assert_eq!(p.groups(), 2);
        assert_eq!(p.values.len(), 3 * 2 * 2 * 2);
        let masked: Vec<f32> = w
            .iter()
            .zip(m.as_bytes())
            .map(|(&w, &b)| if b != 0 { w } else { 0.0 })
            .collect();
        assert_eq!(p.unpack(), masked);
        assert_eq!(p.mask(), m);
        assert!(p.indices.contains(&PAD));
        let dense = Mask::ones(3, 12);
        assert!(NmCompressed::pack(&dense, &w, view, 2, 4, None).is_err());
    }
}
