//! Compressed sparse rows: the unstructured baseline.

use coarsen_core::Mask;

use super::check_weights;
use crate::error::{KernelError, Result};

/// Compressed sparse rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Csr {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Entries of row `r` are `row_ptr[r]..row_ptr[r + 1]`.
    pub row_ptr: Vec<u32>,
    /// Column of each entry, ascending within a row.
    pub col_idx: Vec<u32>,
    /// Value of each entry.
    pub values: Vec<f32>,
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
        Ok(Csr {
            rows: mask.rows(),
            cols,
            row_ptr,
            col_idx,
            values,
        })
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

    #[test]
    fn round_trip() {
        let m = Mask::from_fn(5, 7, |r, c| (r * 3 + c) % 4 == 0);
        let w: Vec<f32> = (0..35).map(|i| i as f32 - 10.0).collect();
        let p = Csr::pack(&m, &w).unwrap();
        assert_eq!(p.row_ptr.len(), 6);
        let masked: Vec<f32> = w
            .iter()
            .zip(m.as_bytes())
            .map(|(&w, &b)| if b != 0 { w } else { 0.0 })
            .collect();
        assert_eq!(p.unpack(), masked);
        assert_eq!(p.mask(), m);
    }
}
