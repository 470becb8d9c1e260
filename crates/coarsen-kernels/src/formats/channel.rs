//! Channel-compact: the kept rows of a channel-sparse matrix, dense; optionally only the columns
//! of the input channels the producer layer kept.

use coarsen_core::Mask;

use super::check_weights;
use crate::error::{KernelError, Result};

/// Kept rows (and optionally kept input columns) of a channel-sparse matrix, stored dense.
///
/// Its kernels read `X` with [`in_dim`](Self::in_dim) rows (all columns, or only the kept input
/// columns) and write `Y` with one row per kept row: channel sparsity physically shrinks both.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelCompact {
    /// Rows of the full matrix.
    pub rows: usize,
    /// Columns of the full matrix.
    pub cols: usize,
    /// Kept rows, ascending.
    pub kept_rows: Vec<u32>,
    /// Kept columns, ascending, when the input lost channels; `None` keeps all columns.
    pub kept_cols: Option<Vec<u32>>,
    /// Values, `kept_rows × in_dim`, row-major.
    pub values: Vec<f32>,
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
                let mut kc = Vec::with_capacity(channels.len() * inner);
                for &c in channels {
                    for s in 0..inner {
                        let col = c as usize * inner + s;
                        if col >= cols {
                            return Err(KernelError::Param {
                                name: "input_channels",
                                value: c.to_string(),
                                reason: format!("channel {c} × {inner} is beyond {cols} columns"),
                            });
                        }
                        kc.push(col as u32);
                    }
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
        Ok(ChannelCompact {
            rows: mask.rows(),
            cols,
            kept_rows,
            kept_cols,
            values,
        })
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
        assert_eq!(p.kept_rows, vec![1, 3]);
        let dense = p.unpack();
        assert_eq!(&dense[6..12], &w[6..12]);
        assert!(dense[..6].iter().all(|&v| v == 0.0));
        assert_eq!(p.mask(), m);
        // Input channels 0 and 2 of a layer with 2 entries per channel: columns 0, 1, 4, 5.
        let q = ChannelCompact::pack(&m, &w, Some((&[0, 2], 2))).unwrap();
        assert_eq!(q.kept_cols.as_deref(), Some(&[0u32, 1, 4, 5][..]));
        assert_eq!(q.values[..4], [7.0, 8.0, 11.0, 12.0]);
        let bad = Mask::from_fn(2, 3, |r, c| r == 0 && c < 2);
        assert!(ChannelCompact::pack(&bad, &[0.0; 6], None).is_err());
    }
}
