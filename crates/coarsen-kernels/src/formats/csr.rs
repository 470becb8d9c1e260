//! Compressed sparse rows: the unstructured baseline.

use coarsen_core::Mask;

use super::check_weights;
#[cfg(debug_assertions)]
use super::parts::debug_valid;
use super::parts::{check_ascending, check_count, check_row_ptr, check_shape};
use crate::error::{KernelError, Result};

/// Compressed sparse rows.
///
/// # Invariants
///
/// - `rows` and `cols` fit `u32`, and `rows · cols` fits `usize`;
/// - `row_ptr` has `rows + 1` entries, starts at 0, never decreases and ends at
///   `col_idx.len()`;
/// - the columns of each row are strictly ascending and below `cols`;
/// - `values.len() == col_idx.len()`.
#[derive(Clone, Debug, PartialEq)]
pub struct Csr {
    rows: usize,
    cols: usize,
    row_ptr: Vec<u32>,
    col_idx: Vec<u32>,
    values: Vec<f32>,
}

impl Csr {
    /// Packs the ones of `mask` with their weights.
    pub fn pack(mask: &Mask, weights: &[f32]) -> Result<Self> {
        check_weights("Csr::pack", mask, weights)?;
        if mask.nnz() > u32::MAX as usize {
            return Err(KernelError::Param {
                name: "nnz",
                value: mask.nnz().to_string(),
                reason: "more than 2^32 entries".into(),
            });
        }
        let cols = mask.cols();
        let mut row_ptr = Vec::with_capacity(mask.rows() + 1);
        let mut col_idx = Vec::new();
        let mut values = Vec::new();
        row_ptr.push(0);
        for r in 0..mask.rows() {
            for (c, &b) in mask.row(r).iter().enumerate() {
                if b != 0 {
                    col_idx.push(c as u32);
                    values.push(weights[r * cols + c]);
                }
            }
            row_ptr.push(col_idx.len() as u32);
        }
        Csr::from_parts(mask.rows(), cols, row_ptr, col_idx, values)
    }

    /// A CSR matrix from its parts, checking the [invariants](Self#invariants).
    pub fn from_parts(
        rows: usize,
        cols: usize,
        row_ptr: Vec<u32>,
        col_idx: Vec<u32>,
        values: Vec<f32>,
    ) -> Result<Self> {
        let f = Csr {
            rows,
            cols,
            row_ptr,
            col_idx,
            values,
        };
        f.check()?;
        Ok(f)
    }

    /// A CSR matrix from its parts, checking the invariants only in debug builds.
    ///
    /// # Safety
    ///
    /// The parts must uphold every [invariant](Self#invariants) of the type: a
    /// [`Plan`](crate::Plan) of a value that breaks them may read and write out of bounds.
    pub unsafe fn from_parts_unchecked(
        rows: usize,
        cols: usize,
        row_ptr: Vec<u32>,
        col_idx: Vec<u32>,
        values: Vec<f32>,
    ) -> Self {
        let f = Csr {
            rows,
            cols,
            row_ptr,
            col_idx,
            values,
        };
        #[cfg(debug_assertions)]
        debug_valid("Csr::from_parts_unchecked", f.check());
        f
    }

    fn check(&self) -> Result<()> {
        const F: &str = "Csr";
        check_shape(F, self.rows, self.cols)?;
        // `rows` fits u32 (checked above), so `rows + 1` does not overflow.
        check_count(F, "row_ptr", self.row_ptr.len(), self.rows + 1, || {
            format!("{} rows", self.rows)
        })?;
        check_row_ptr(F, &self.row_ptr, self.col_idx.len())?;
        for (r, w) in self.row_ptr.windows(2).enumerate() {
            let row = &self.col_idx[w[0] as usize..w[1] as usize];
            check_ascending(F, "col_idx", row, self.cols, "columns", || {
                format!("row {r}")
            })?;
        }
        check_count(F, "values", self.values.len(), self.col_idx.len(), || {
            format!("{} entries", self.col_idx.len())
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Entries of row `r` are `row_ptr[r]..row_ptr[r + 1]`.
    pub fn row_ptr(&self) -> &[u32] {
        &self.row_ptr
    }

    /// Column of each entry, ascending within a row.
    pub fn col_idx(&self) -> &[u32] {
        &self.col_idx
    }

    /// Value of each entry.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Values, mutable (their number never changes).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// The parts, in the order [`from_parts`](Self::from_parts) takes them.
    pub fn into_parts(self) -> (usize, usize, Vec<u32>, Vec<u32>, Vec<f32>) {
        (
            self.rows,
            self.cols,
            self.row_ptr,
            self.col_idx,
            self.values,
        )
    }

    /// The dense matrix.
    pub fn unpack(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for r in 0..self.rows {
            for k in self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize {
                out[r * self.cols + self.col_idx[k] as usize] = self.values[k];
            }
        }
        out
    }

    /// The pattern.
    pub fn mask(&self) -> Mask {
        let mut m = Mask::zeros(self.rows, self.cols);
        for r in 0..self.rows {
            for k in self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize {
                m.set(r, self.col_idx[k] as usize, true);
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::test_util::{expect_parts_error, masked};

    fn packed() -> Csr {
        let m = Mask::from_fn(5, 7, |r, c| (r * 3 + c) % 4 == 0);
        let w: Vec<f32> = (0..35).map(|i| i as f32 - 10.0).collect();
        Csr::pack(&m, &w).unwrap()
    }

    #[test]
    fn round_trip() {
        let m = Mask::from_fn(5, 7, |r, c| (r * 3 + c) % 4 == 0);
        let w: Vec<f32> = (0..35).map(|i| i as f32 - 10.0).collect();
        let p = Csr::pack(&m, &w).unwrap();
        assert_eq!(p.row_ptr().len(), 6);
        assert_eq!(p.unpack(), masked(&m, &w));
        assert_eq!(p.mask(), m);
        let (r, c, rp, ci, v) = p.clone().into_parts();
        assert_eq!(Csr::from_parts(r, c, rp, ci, v).unwrap(), p);
    }

    fn edited(edit: impl FnOnce(&mut Vec<u32>, &mut Vec<u32>, &mut Vec<f32>)) -> Result<Csr> {
        let (r, c, mut rp, mut ci, mut v) = packed().into_parts();
        edit(&mut rp, &mut ci, &mut v);
        Csr::from_parts(r, c, rp, ci, v)
    }

    #[test]
    fn from_parts_refuses_broken_invariants() {
        // Rows: [0, 4], [1, 5], [2, 6], [3], [0, 4].
        let p = packed();
        assert_eq!(p.row_ptr(), &[0, 2, 4, 6, 7, 9]);
        let e = edited(|_, ci, _| ci[3] = 7);
        expect_parts_error(
            e,
            "col_idx",
            &["row 1", "entry 1 = 7 is out of range for 7 columns"],
        );
        let e = edited(|_, ci, _| ci.swap(0, 1));
        expect_parts_error(e, "col_idx", &["row 0", "strictly ascending"]);
        let e = edited(|_, ci, _| ci[8] = 0);
        expect_parts_error(e, "col_idx", &["row 4", "repeats"]);
        let e = edited(|rp, _, _| rp[2] = 1);
        expect_parts_error(e, "row_ptr", &["entry 2 = 1 is below entry 1 = 2"]);
        let e = edited(|rp, _, _| rp[5] = 8);
        expect_parts_error(e, "row_ptr", &["ends at 8", "9 entries"]);
        let e = edited(|rp, _, _| rp[0] = 1);
        expect_parts_error(e, "row_ptr", &["starts at 1"]);
        let e = edited(|rp, _, _| {
            rp.pop();
        });
        expect_parts_error(e, "row_ptr", &["holds 5 entries", "needs 6"]);
        let e = edited(|_, _, v| v.push(1.0));
        expect_parts_error(e, "values", &["holds 10", "needs 9"]);
        let e = Csr::from_parts(usize::MAX, 1, vec![0], vec![], vec![]);
        expect_parts_error(e, "rows", &["u32::MAX"]);
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "broke an invariant")]
    fn unchecked_debug_asserts() {
        let (r, c, rp, mut ci, v) = packed().into_parts();
        ci[0] = 70;
        // SAFETY: none: the parts are broken on purpose, and debug assertions catch it before
        // anything reads them.
        let _ = unsafe { Csr::from_parts_unchecked(r, c, rp, ci, v) };
    }
}
