//! N:M compressed: N values and their in-group positions per group of M input channels.

use coarsen_core::{Mask, MatrixView};

use super::check_weights;
#[cfg(debug_assertions)]
use super::parts::debug_valid;
use super::parts::{check_count, check_shape, check_u32_len, invalid, mul};
use crate::error::{KernelError, Result};

/// Position stored in a padding slot (a group with fewer than N ones).
pub const PAD: u8 = u8::MAX;

/// N:M compressed weights. A group is M consecutive input channels (after `col_perm`) at one
/// (row, kernel position); it stores exactly N value slots with the position (0..M) of each
/// value inside the group. Slots of groups with fewer than N ones hold position `u8::MAX`
/// ([`NM_PAD`](crate::formats::NM_PAD)) and are never read (packing stores 0 there).
/// The last group is shorter when the input channels are not a multiple of M.
///
/// # Invariants
///
/// - `view.cols == view.in_channels · view.inner` (no overflow); `view.rows` and `view.cols`
///   fit `u32`, and `rows · cols` fits `usize`;
/// - `1 ≤ n ≤ m ≤ 64`;
/// - `col_perm` is a permutation of `0..in_channels`;
/// - `values` and `indices` both hold `rows · groups · inner · n` entries (`groups =
///   ceil(in_channels / m)`), a number that fits `u32`;
/// - in the `n` slots of each (row, group, kernel position), the positions that are not padding
///   come first, strictly ascending, each below the group's size (`m`, or less for the last
///   group); the rest are padding.
#[derive(Clone, Debug, PartialEq)]
pub struct NmCompressed {
    view: MatrixView,
    n: usize,
    m: usize,
    col_perm: Vec<u32>,
    values: Vec<f32>,
    indices: Vec<u8>,
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
        if (view.rows, view.cols) != (mask.rows(), mask.cols())
            || view.in_channels.checked_mul(view.inner) != Some(view.cols)
        {
            return Err(KernelError::Param {
                name: "view",
                value: format!("{}x{}", view.rows, view.cols),
                reason: format!(
                    "the mask is {}x{} (and the columns must be {} input channels × {})",
                    mask.rows(),
                    mask.cols(),
                    view.in_channels,
                    view.inner
                ),
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
        // At most `rows · (cols + inner) · n` slots: no overflow for a mask that exists.
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
        NmCompressed::from_parts(view, n, m, perm, values, indices)
    }

    /// N:M compressed weights from their parts, checking the [invariants](Self#invariants).
    pub fn from_parts(
        view: MatrixView,
        n: usize,
        m: usize,
        col_perm: Vec<u32>,
        values: Vec<f32>,
        indices: Vec<u8>,
    ) -> Result<Self> {
        let f = NmCompressed {
            view,
            n,
            m,
            col_perm,
            values,
            indices,
        };
        f.check()?;
        Ok(f)
    }

    /// N:M compressed weights from their parts, checking the invariants only in debug builds.
    ///
    /// # Safety
    ///
    /// The parts must uphold every [invariant](Self#invariants) of the type: a
    /// [`Plan`](crate::Plan) of a value that breaks them may read and write out of bounds.
    pub unsafe fn from_parts_unchecked(
        view: MatrixView,
        n: usize,
        m: usize,
        col_perm: Vec<u32>,
        values: Vec<f32>,
        indices: Vec<u8>,
    ) -> Self {
        let f = NmCompressed {
            view,
            n,
            m,
            col_perm,
            values,
            indices,
        };
        #[cfg(debug_assertions)]
        debug_valid("NmCompressed::from_parts_unchecked", f.check());
        f
    }

    fn check(&self) -> Result<()> {
        const F: &str = "NmCompressed";
        let v = self.view;
        check_shape(F, v.rows, v.cols)?;
        let cols = mul(F, "view", v.in_channels, v.inner)?;
        if cols != v.cols {
            let detail = format!(
                "{} columns, but {} input channels × {} entries make {cols}",
                v.cols, v.in_channels, v.inner
            );
            return Err(invalid(F, "view", detail));
        }
        if self.n == 0 || self.m == 0 || self.n > self.m || self.m > 64 {
            let detail = format!("{}:{} (needs 1 <= N <= M <= 64)", self.n, self.m);
            return Err(invalid(F, "n:m", detail));
        }
        check_count(F, "col_perm", self.col_perm.len(), v.in_channels, || {
            format!("{} input channels", v.in_channels)
        })?;
        let mut seen = vec![false; v.in_channels];
        for (i, &c) in self.col_perm.iter().enumerate() {
            let detail = match seen.get_mut(c as usize) {
                None => format!(
                    "entry {i} = {c} is out of range for {} input channels",
                    v.in_channels
                ),
                Some(true) => format!("entry {i} = {c} repeats (not a permutation)"),
                Some(s) => {
                    *s = true;
                    continue;
                }
            };
            return Err(invalid(F, "col_perm", detail));
        }
        let slots = [v.rows, self.groups(), v.inner, self.n]
            .into_iter()
            .try_fold(1usize, |a, b| mul(F, "values", a, b))?;
        let need = || format!("{}x{} at {}:{}", v.rows, v.cols, self.n, self.m);
        check_count(F, "values", self.values.len(), slots, need)?;
        check_count(F, "indices", self.indices.len(), slots, need)?;
        check_u32_len(F, slots)?;
        self.check_indices()
    }

    /// The positions of every slot set: real ones first, strictly ascending, inside the group.
    fn check_indices(&self) -> Result<()> {
        let (groups, inner, n, m) = (self.groups(), self.view.inner, self.n, self.m);
        for (set, slots) in self.indices.chunks(n).enumerate() {
            let g = set / inner % groups;
            let size = m.min(self.view.in_channels - g * m);
            let mut prev: Option<u8> = None;
            for (k, &pos) in slots.iter().enumerate() {
                let bad = if pos == PAD {
                    None
                } else if prev == Some(PAD) {
                    Some("follows a padding slot")
                } else if pos as usize >= size {
                    Some("is not inside its group")
                } else if prev.is_some_and(|p| pos <= p) {
                    Some("is not above the slot before it")
                } else {
                    None
                };
                if let Some(why) = bad {
                    let (r, s) = (set / inner / groups, set % inner);
                    let detail = format!(
                        "row {r}, group {g} (size {size}), kernel position {s}, slot {k}: \
                         position {pos} {why}"
                    );
                    return Err(invalid("NmCompressed", "indices", detail));
                }
                prev = Some(pos);
            }
        }
        Ok(())
    }

    /// Rows of the full matrix.
    pub fn rows(&self) -> usize {
        self.view.rows
    }

    /// Columns of the full matrix (`in_channels · inner`).
    pub fn cols(&self) -> usize {
        self.view.cols
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.view.in_channels
    }

    /// Entries per input channel in a row (`kh·kw`, or 1).
    pub fn inner(&self) -> usize {
        self.view.inner
    }

    /// The matrix view: rows, columns, input channels and entries per channel.
    pub fn view(&self) -> MatrixView {
        self.view
    }

    /// Values per group.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Group size.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Input-channel permutation, `perm[new] = old` (identity when none was searched).
    pub fn col_perm(&self) -> &[u32] {
        &self.col_perm
    }

    /// Values, `[rows][groups][inner][n]`.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Values, mutable (their number never changes).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// In-group position of each value ([`NM_PAD`](crate::formats::NM_PAD) for padding).
    pub fn indices(&self) -> &[u8] {
        &self.indices
    }

    /// The parts, in the order [`from_parts`](Self::from_parts) takes them.
    pub fn into_parts(self) -> (MatrixView, usize, usize, Vec<u32>, Vec<f32>, Vec<u8>) {
        (
            self.view,
            self.n,
            self.m,
            self.col_perm,
            self.values,
            self.indices,
        )
    }

    /// Number of groups per (row, kernel position).
    pub fn groups(&self) -> usize {
        self.view.in_channels.div_ceil(self.m)
    }

    /// Calls `f(row, col, slot)` for every stored (non-padding) value.
    pub fn for_each_entry(&self, mut f: impl FnMut(usize, usize, usize)) {
        let groups = self.groups();
        let mut slot = 0;
        for r in 0..self.view.rows {
            for g in 0..groups {
                for s in 0..self.view.inner {
                    for _ in 0..self.n {
                        let pos = self.indices[slot];
                        if pos != PAD {
                            let c = self.col_perm[g * self.m + pos as usize] as usize;
                            f(r, c * self.view.inner + s, slot);
                        }
                        slot += 1;
                    }
                }
            }
        }
    }

    /// The dense matrix.
    pub fn unpack(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows() * self.cols()];
        self.for_each_entry(|r, c, slot| out[r * self.cols() + c] = self.values[slot]);
        out
    }

    /// The pattern.
    pub fn mask(&self) -> Mask {
        let mut m = Mask::zeros(self.rows(), self.cols());
        self.for_each_entry(|r, c, _| m.set(r, c, true));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::test_util::{expect_parts_error, masked};

    /// A `[3, 6, 2, 1]` weight at 2:4 under the channel permutation [1, 0, 2, 3, 5, 4]: groups
    /// of channels {1, 0, 2, 3} and {5, 4} (the short last group).
    fn packed() -> (NmCompressed, Mask, Vec<f32>) {
        let view = MatrixView::of(&[3, 6, 2, 1]).unwrap();
        let perm = [1usize, 0, 2, 3, 5, 4];
        let m = Mask::from_fn(3, 12, |r, c| {
            let ch = c / 2;
            (ch == 1 || ch == 3 || ch == 5) && (r + c) % 3 != 0
        });
        let w: Vec<f32> = (0..36).map(|i| i as f32 + 1.0).collect();
        let p = NmCompressed::pack(&m, &w, view, 2, 4, Some(&perm)).unwrap();
        (p, m, w)
    }

    #[test]
    fn round_trip_with_permutation_and_padding() {
        let (p, m, w) = packed();
        assert_eq!(p.groups(), 2);
        assert_eq!(p.values().len(), 3 * 2 * 2 * 2);
        assert_eq!(p.unpack(), masked(&m, &w));
        assert_eq!(p.mask(), m);
        assert!(p.indices().contains(&PAD));
        let (v, n, mm, perm, vals, idx) = p.clone().into_parts();
        assert_eq!(
            NmCompressed::from_parts(v, n, mm, perm, vals, idx).unwrap(),
            p
        );
        let dense = Mask::ones(3, 12);
        let view = p.view();
        assert!(NmCompressed::pack(&dense, &w, view, 2, 4, None).is_err());
    }

    type Parts = (MatrixView, usize, usize, Vec<u32>, Vec<f32>, Vec<u8>);

    fn edited(edit: impl FnOnce(&mut Parts)) -> Result<NmCompressed> {
        let mut p = packed().0.into_parts();
        edit(&mut p);
        let (v, n, m, perm, vals, idx) = p;
        NmCompressed::from_parts(v, n, m, perm, vals, idx)
    }

    #[test]
    fn from_parts_refuses_broken_invariants() {
        let (p, _, _) = packed();
        // Row 0, group 0, kernel position 0: channels 1 (col 2, kept) and 3 (col 6, dropped
        // since (0 + 6) % 3 == 0), so positions [0, PAD].
        assert_eq!(&p.indices()[..2], &[0, PAD]);
        // Slots 4.. are row 0's last group {5, 4}: a position 2 is outside it.
        let e = edited(|p| p.5[4] = 2);
        expect_parts_error(
            e,
            "indices",
            &["row 0, group 1 (size 2)", "slot 0", "position 2"],
        );
        let e = edited(|p| p.5[0] = 4);
        expect_parts_error(e, "indices", &["group 0 (size 4)", "not inside its group"]);
        let e = edited(|p| p.5[1] = 0);
        expect_parts_error(e, "indices", &["slot 1", "not above the slot before it"]);
        let e = edited(|p| p.5[..2].copy_from_slice(&[PAD, 0]));
        expect_parts_error(e, "indices", &["slot 1", "follows a padding slot"]);
        let e = edited(|p| p.3[0] = 0);
        expect_parts_error(e, "col_perm", &["entry 1 = 0 repeats"]);
        let e = edited(|p| p.3[5] = 6);
        expect_parts_error(e, "col_perm", &["entry 5 = 6 is out of range for 6"]);
        let e = edited(|p| {
            p.3.pop();
        });
        expect_parts_error(e, "col_perm", &["holds 5 entries", "needs 6"]);
        let e = edited(|p| {
            p.4.pop();
        });
        expect_parts_error(e, "values", &["holds 23", "needs 24"]);
        let e = edited(|p| p.5.push(PAD));
        expect_parts_error(e, "indices", &["holds 25", "needs 24"]);
        let e = edited(|p| p.2 = 65);
        expect_parts_error(e, "n:m", &["2:65"]);
        let e = edited(|p| p.1 = 0);
        expect_parts_error(e, "n:m", &["0:4"]);
        let e = edited(|p| p.1 = 5);
        expect_parts_error(e, "n:m", &["5:4"]);
        let e = edited(|p| p.0.inner = 3);
        expect_parts_error(e, "view", &["12 columns, but 6 input channels × 3"]);
        let e = edited(|p| p.0.inner = usize::MAX);
        expect_parts_error(e, "view", &["overflows"]);
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "broke an invariant")]
    fn unchecked_debug_asserts() {
        let (v, n, m, perm, vals, mut idx) = packed().0.into_parts();
        idx[0] = 9;
        // SAFETY: none: the parts are broken on purpose, and debug assertions catch it before
        // anything reads them.
        let _ = unsafe { NmCompressed::from_parts_unchecked(v, n, m, perm, vals, idx) };
    }
}
