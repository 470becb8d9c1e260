//! Packed formats: a mask plus weights, stored so that a kernel can run them.
//!
//! Structure (which entries exist) is kept apart from values: every format has `pack` (from a
//! mask and dense row-major weights), `unpack` (back to dense, zeros elsewhere), `mask`, and a
//! flat `values` array that training updates in place.

mod blocks;
mod channel;
mod csr;
pub(crate) mod nm;

pub use blocks::{Block, Bsr, GroupBlocks, RowGroup, ShuffledBlocks, Tile};
pub use channel::ChannelCompact;
pub use csr::Csr;
pub use nm::{NmCompressed, PAD as NM_PAD};

use coarsen_core::Mask;

use crate::error::{check_len, Result};

/// A dense matrix `rows × cols`, row-major: the baseline "format".
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Values, row-major.
    pub values: Vec<f32>,
}

impl Dense {
    /// A dense matrix from row-major values.
    pub fn new(rows: usize, cols: usize, values: Vec<f32>) -> Result<Self> {
        check_len("Dense::new", "values", values.len(), rows * cols, || {
            format!("{rows}x{cols}")
        })?;
        Ok(Dense { rows, cols, values })
    }
}

/// Any packed format.
#[derive(Clone, Debug, PartialEq)]
pub enum Packed {
    /// Dense (the baseline).
    Dense(Dense),
    /// Channel-compact.
    Channel(ChannelCompact),
    /// Group blocks.
    Group(GroupBlocks),
    /// Shuffled blocks.
    Shuffled(ShuffledBlocks),
    /// Block sparse rows with aligned tiles.
    Bsr(Bsr),
    /// N:M compressed.
    Nm(NmCompressed),
    /// Compressed sparse rows.
    Csr(Csr),
}

impl Packed {
    /// The format's name: `dense`, `channel`, `group`, `shuffled-block`, `bsr`, `nm`, `csr`.
    pub fn name(&self) -> &'static str {
        match self {
            Packed::Dense(_) => "dense",
            Packed::Channel(_) => "channel",
            Packed::Group(_) => "group",
            Packed::Shuffled(_) => "shuffled-block",
            Packed::Bsr(_) => "bsr",
            Packed::Nm(_) => "nm",
            Packed::Csr(_) => "csr",
        }
    }

    /// Rows and columns of the full matrix.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Packed::Dense(d) => (d.rows, d.cols),
            Packed::Channel(f) => (f.rows, f.cols),
            Packed::Group(f) => (f.rows, f.cols),
            Packed::Shuffled(f) => (f.rows, f.cols),
            Packed::Bsr(f) => (f.rows, f.cols),
            Packed::Nm(f) => (f.rows, f.cols),
            Packed::Csr(f) => (f.rows, f.cols),
        }
    }

    /// The dense matrix, zeros outside the pattern.
    pub fn unpack(&self) -> Vec<f32> {
        match self {
            Packed::Dense(d) => d.values.clone(),
            Packed::Channel(f) => f.unpack(),
            Packed::Group(f) => f.unpack(),
            Packed::Shuffled(f) => f.unpack(),
            Packed::Bsr(f) => f.unpack(),
            Packed::Nm(f) => f.unpack(),
            Packed::Csr(f) => f.unpack(),
        }
    }

    /// The stored values (the layout is the format's own).
    pub fn values(&self) -> &[f32] {
        match self {
            Packed::Dense(d) => &d.values,
            Packed::Channel(f) => &f.values,
            Packed::Group(f) => f.values(),
            Packed::Shuffled(f) => f.values(),
            Packed::Bsr(f) => &f.values,
            Packed::Nm(f) => &f.values,
            Packed::Csr(f) => &f.values,
        }
    }

    /// Mutable stored values, for in-place weight updates.
    pub fn values_mut(&mut self) -> &mut [f32] {
        match self {
            Packed::Dense(d) => &mut d.values,
            Packed::Channel(f) => &mut f.values,
            Packed::Group(f) => f.values_mut(),
            Packed::Shuffled(f) => f.values_mut(),
            Packed::Bsr(f) => &mut f.values,
            Packed::Nm(f) => &mut f.values,
            Packed::Csr(f) => &mut f.values,
        }
    }

    /// Multiply–adds of `W·X` per column of `X`: the entries the format computes with (stored
    /// padding included for the formats that store it).
    pub fn stored(&self) -> usize {
        match self {
            Packed::Channel(f) => f.kept_rows.len() * f.in_dim(),
            Packed::Nm(f) => f.values.len(),
            other => other.values().len(),
        }
    }

    /// Ones of the pattern (the multiply–adds a perfect kernel would do per column of `X`).
    pub fn nnz(&self) -> usize {
        self.mask().nnz()
    }

    /// For every stored value, in the format's value order, the (row, column) of the full
    /// matrix it holds; `None` for padding (N:M slots of short groups, BSR entries past the edge).
    pub fn positions(&self) -> Vec<Option<(usize, usize)>> {
        let mut out = vec![None; self.values().len()];
        match self {
            Packed::Dense(d) => {
                for (i, p) in out.iter_mut().enumerate() {
                    *p = Some((i / d.cols.max(1), i % d.cols.max(1)));
                }
            }
            Packed::Channel(f) => {
                let d = f.in_dim();
                for (i, &r) in f.kept_rows.iter().enumerate() {
                    for k in 0..d {
                        let c = f.kept_cols.as_ref().map_or(k, |kc| kc[k] as usize);
                        out[i * d + k] = Some((r as usize, c));
                    }
                }
            }
            Packed::Group(f) => {
                for b in &f.blocks {
                    let w = b.cols.len();
                    for (i, &r) in b.rows.iter().enumerate() {
                        for (k, &c) in b.cols.iter().enumerate() {
                            out[b.offset + i * w + k] = Some((r as usize, c as usize));
                        }
                    }
                }
            }
            Packed::Shuffled(f) => {
                for g in &f.groups {
                    for t in &g.tiles {
                        let w = t.cols.len();
                        for (i, &r) in g.rows.iter().enumerate() {
                            for (k, &c) in t.cols.iter().enumerate() {
                                out[t.offset + i * w + k] = Some((r as usize, c as usize));
                            }
                        }
                    }
                }
            }
            Packed::Bsr(f) => f.for_each_entry(|r, c, i| out[i] = Some((r, c))),
            Packed::Nm(f) => f.for_each_entry(|r, c, i| out[i] = Some((r, c))),
            Packed::Csr(f) => {
                for r in 0..f.rows {
                    let span = f.row_ptr[r] as usize..f.row_ptr[r + 1] as usize;
                    for (slot, &c) in out[span.clone()].iter_mut().zip(&f.col_idx[span]) {
                        *slot = Some((r, c as usize));
                    }
                }
            }
        }
        out
    }

    /// The pattern as a mask of the full matrix.
    pub fn mask(&self) -> Mask {
        let (rows, cols) = self.shape();
        match self {
            Packed::Dense(_) => Mask::ones(rows, cols),
            Packed::Channel(f) => f.mask(),
            Packed::Group(f) => f.mask(),
            Packed::Shuffled(f) => f.mask(),
            Packed::Bsr(f) => f.mask(),
            Packed::Nm(f) => f.mask(),
            Packed::Csr(f) => f.mask(),
        }
    }
}

/// Checks that `weights` fill a `rows × cols` mask.
pub(crate) fn check_weights(op: &'static str, mask: &Mask, weights: &[f32]) -> Result<()> {
    check_len(op, "weights", weights.len(), mask.len(), || {
        format!("{}x{}", mask.rows(), mask.cols())
    })
}
