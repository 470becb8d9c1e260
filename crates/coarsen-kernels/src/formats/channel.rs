//! Channel-compact: the kept rows of a channel-sparse matrix, dense; optionally only the columns
//! of the input channels the producer layer kept.

use coarsen_core::Mask;

use super::check_weights;
#[cfg(debug_assertions)]
use super::parts::debug_valid;
use super::parts::{check_ascending, check_count, check_shape, mul};
use crate::error::{KernelError, Result};

/// Kept rows (and optionally kept input columns) of a channel-sparse matrix, stored dense.
///
/// Its kernels read `X` with [`in_dim`](Self::in_dim) rows (all columns, or only the kept input
/// columns) and write `Y` with one row per kept row: channel sparsity physically shrinks both.
///
/// # Invariants
///
/// - `rows` and `cols` fit `u32`, and `rows · cols` fits `usize`;
/// - `kept_rows` is strictly ascending, every entry below `rows`;
/// - `kept_cols`, when given, is strictly ascending, every entry below `cols`;
/// - `values.len() == kept_rows.len() · in_dim` (`in_dim` = `kept_cols.len()`, or `cols`).
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelCompact {
    rows: usize,
    cols: usize,
    kept_rows: Vec<u32>,
    kept_cols: Option<Vec<u32>>,
    values: Vec<f32>,
}

impl ChannelCompact {
    /// Packs a channel-sparse mask: every row must be all ones or all zeros.
    /// `input_channels` = (kept input channels, entries per channel) restricts the columns to
    /// those channels (`c·inner + s`), for a layer whose producer lost channels.
    pub fn pack(
        mask: &Mask,
        weights: &[f32],
        input_channels: Option<(&[u32], usize)>,
    ) -> Result<Self> {
        check_weights("ChannelCompact::pack", mask, weights)?;
        let cols = mask.cols();
        let mut kept_rows = Vec::new();
        for r in 0..mask.rows() {
            let n = mask.row_nnz(r);
            if n == cols && cols > 0 {
                kept_rows.push(r as u32);
            } else if n != 0 {
                return Err(KernelError::Structure {
                    format: "channel",
                    structure: "channel-sparse".into(),
                    detail: format!("row {r} has {n} of {cols} ones"),
                });
            }
        }
        let kept_cols = match input_channels {
            None => None,
            Some((channels, inner)) => {
                let mut kc = Vec::with_capacity(channels.len().saturating_mul(inner).min(cols));
                for &c in channels {
                    let end = (c as usize)
                        .checked_add(1)
                        .and_then(|e| e.checked_mul(inner));
                    if end.is_none_or(|e| e > cols) {
                        return Err(KernelError::Param {
                            name: "input_channels",
                            value: c.to_string(),
                            reason: format!("channel {c} × {inner} is beyond {cols} columns"),
                        });
                    }
                    kc.extend((0..inner).map(|s| (c as usize * inner + s) as u32));
                }
                kc.sort_unstable();
                kc.dedup();
                Some(kc)
            }
        };
        let mut values = Vec::new();
        for &r in &kept_rows {
            let row = &weights[r as usize * cols..(r as usize + 1) * cols];
            match &kept_cols {
                None => values.extend_from_slice(row),
                Some(kc) => values.extend(kc.iter().map(|&c| row[c as usize])),
            }
        }
        ChannelCompact::from_parts(mask.rows(), cols, kept_rows, kept_cols, values)
    }

    /// A channel-compact matrix from its parts, checking the [invariants](Self#invariants).
    pub fn from_parts(
        rows: usize,
        cols: usize,
        kept_rows: Vec<u32>,
        kept_cols: Option<Vec<u32>>,
        values: Vec<f32>,
    ) -> Result<Self> {
        let f = ChannelCompact {
            rows,
            cols,
            kept_rows,
            kept_cols,
            values,
        };
        f.check()?;
        Ok(f)
    }

    /// A channel-compact matrix from its parts, checking the invariants only in debug builds.
    ///
    /// # Safety
    ///
    /// The parts must uphold every [invariant](Self#invariants) of the type: a
    /// [`Plan`](crate::Plan) of a value that breaks them may read and write out of bounds.
    pub unsafe fn from_parts_unchecked(
        rows: usize,
        cols: usize,
        kept_rows: Vec<u32>,
        kept_cols: Option<Vec<u32>>,
        values: Vec<f32>,
    ) -> Self {
        let f = ChannelCompact {
            rows,
            cols,
            kept_rows,
            kept_cols,
            values,
        };
        #[cfg(debug_assertions)]
        debug_valid("ChannelCompact::from_parts_unchecked", f.check());
        f
    }

    fn check(&self) -> Result<()> {
        const F: &str = "ChannelCompact";
        check_shape(F, self.rows, self.cols)?;
        check_ascending(
            F,
            "kept_rows",
            &self.kept_rows,
            self.rows,
            "rows",
            String::new,
        )?;
        if let Some(kc) = &self.kept_cols {
            check_ascending(F, "kept_cols", kc, self.cols, "columns", String::new)?;
        }
        let want = mul(F, "values", self.kept_rows.len(), self.in_dim())?;
        check_count(F, "values", self.values.len(), want, || {
            format!(
                "{} kept rows × {} columns",
                self.kept_rows.len(),
                self.in_dim()
            )
        })
    }

    /// Rows of the full matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the full matrix.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Kept rows, ascending.
    pub fn kept_rows(&self) -> &[u32] {
        &self.kept_rows
    }

    /// Kept columns, ascending, when the input lost channels; `None` keeps all columns.
    pub fn kept_cols(&self) -> Option<&[u32]> {
        self.kept_cols.as_deref()
    }

    /// Values, `kept_rows × in_dim`, row-major.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Values, mutable (their number never changes).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// The parts, in the order [`from_parts`](Self::from_parts) takes them.
    pub fn into_parts(self) -> (usize, usize, Vec<u32>, Option<Vec<u32>>, Vec<f32>) {
        (
            self.rows,
            self.cols,
            self.kept_rows,
            self.kept_cols,
            self.values,
        )
    }

    /// Rows of `X` the kernels read: all columns, or the kept ones.
    pub fn in_dim(&self) -> usize {
        self.kept_cols.as_ref().map_or(self.cols, Vec::len)
    }

    /// The dense matrix (kept rows and columns; zeros elsewhere).
    pub fn unpack(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        let d = self.in_dim();
        for (i, &r) in self.kept_rows.iter().enumerate() {
            let src = &self.values[i * d..(i + 1) * d];
            let dst = &mut out[r as usize * self.cols..(r as usize + 1) * self.cols];
            match &self.kept_cols {
                None => dst.copy_from_slice(src),
                Some(kc) => kc.iter().zip(src).for_each(|(&c, &v)| dst[c as usize] = v),
            }
        }
        out
    }

    /// The pattern: kept rows × kept columns.
    pub fn mask(&self) -> Mask {
        let mut m = Mask::zeros(self.rows, self.cols);
        for &r in &self.kept_rows {
            match &self.kept_cols {
                None => m.fill_row(r as usize, true),
                Some(kc) => kc.iter().for_each(|&c| m.set(r as usize, c as usize, true)),
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_and_refuse_partial_rows() {
        let m = Mask::from_fn(4, 6, |r, _| r % 2 == 1);
        let w: Vec<f32> = (0..24).map(|i| i as f32 + 1.0).collect();
        let p = ChannelCompact::pack(&m, &w, None).unwrap();
        assert_eq!(p.kept_rows(), &[1, 3]);
        let dense = p.unpack();
        assert_eq!(&dense[6..12], &w[6..12]);
        assert!(dense[..6].iter().all(|&v| v == 0.0));
        assert_eq!(p.mask(), m);
        // Input channels 0 and 2 of a layer with 2 entries per channel: columns 0, 1, 4, 5.
        let q = ChannelCompact::pack(&m, &w, Some((&[0, 2], 2))).unwrap();
        assert_eq!(q.kept_cols(), Some(&[0u32, 1, 4, 5][..]));
        assert_eq!(q.values()[..4], [7.0, 8.0, 11.0, 12.0]);
        let bad = Mask::from_fn(2, 3, |r, c| r == 0 && c < 2);
        assert!(ChannelCompact::pack(&bad, &[0.0; 6], None).is_err());
    }
}
