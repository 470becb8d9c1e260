//! Packed formats: a mask plus weights, stored so that a kernel can run them.
//!
//! Structure (which entries exist) is kept apart from values: every format has `pack` (from a
//! mask and dense row-major weights), `unpack` (back to dense, zeros elsewhere), `mask`, and a
//! flat `values` array that training updates in place (`values_mut`: the values may change,
//! their number never does).
//!
//! Fields are private, so that a [`Plan`](crate::Plan) built from safe code never reads or
//! writes out of bounds. Each format lists its invariants in its doc and has two constructors
//! from parts besides `pack`: `from_parts` checks every invariant and returns
//! [`KernelError::Parts`](crate::KernelError::Parts) naming the format, the field and the
//! offending index; the `unsafe` `from_parts_unchecked` only checks them in debug builds, for
//! callers that already know them to hold. `into_parts` gives the parts back.
//!
//! ```
//! use coarsen_kernels::{Csr, KernelError};
//!
//! // A 2×3 matrix with entries (0, 0), (0, 2) and (1, 1).
//! let csr = Csr::from_parts(2, 3, vec![0, 2, 3], vec![0, 2, 1], vec![1.0, 2.0, 3.0]).unwrap();
//! assert_eq!(csr.unpack(), [1.0, 0.0, 2.0, 0.0, 3.0, 0.0]);
//! // Column 3 does not exist.
//! let err = Csr::from_parts(2, 3, vec![0, 2, 3], vec![0, 3, 1], vec![1.0; 3]).unwrap_err();
//! assert!(matches!(err, KernelError::Parts { format: "Csr", field: "col_idx", .. }));
//! ```

mod bsr;
mod channel;
mod csr;
mod dense;
mod group;
pub(crate) mod nm;
mod parts;
mod shuffled;

pub use bsr::Bsr;
pub use channel::ChannelCompact;
pub use csr::Csr;
pub use dense::Dense;
pub use group::{Block, GroupBlocks};
pub use nm::{NmCompressed, PAD as NM_PAD};
pub use shuffled::{RowGroup, ShuffledBlocks, Tile};

use coarsen_core::Mask;

use crate::error::{check_len, Result};

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
            Packed::Dense(d) => (d.rows(), d.cols()),
            Packed::Channel(f) => (f.rows(), f.cols()),
            Packed::Group(f) => (f.rows(), f.cols()),
            Packed::Shuffled(f) => (f.rows(), f.cols()),
            Packed::Bsr(f) => (f.rows(), f.cols()),
            Packed::Nm(f) => (f.rows(), f.cols()),
            Packed::Csr(f) => (f.rows(), f.cols()),
        }
    }

    /// The dense matrix, zeros outside the pattern.
    pub fn unpack(&self) -> Vec<f32> {
        match self {
            Packed::Dense(d) => d.values().to_vec(),
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
            Packed::Dense(d) => d.values(),
            Packed::Channel(f) => f.values(),
            Packed::Group(f) => f.values(),
            Packed::Shuffled(f) => f.values(),
            Packed::Bsr(f) => f.values(),
            Packed::Nm(f) => f.values(),
            Packed::Csr(f) => f.values(),
        }
    }

    /// Mutable stored values, for in-place weight updates (their number never changes).
    pub fn values_mut(&mut self) -> &mut [f32] {
        match self {
            Packed::Dense(d) => d.values_mut(),
            Packed::Channel(f) => f.values_mut(),
            Packed::Group(f) => f.values_mut(),
            Packed::Shuffled(f) => f.values_mut(),
            Packed::Bsr(f) => f.values_mut(),
            Packed::Nm(f) => f.values_mut(),
            Packed::Csr(f) => f.values_mut(),
        }
    }

    /// Multiply–adds of `W·X` per column of `X`: the entries the format computes with (stored
    /// padding included for the formats that store it).
    pub fn stored(&self) -> usize {
        match self {
            Packed::Channel(f) => f.kept_rows().len() * f.in_dim(),
            Packed::Nm(f) => f.values().len(),
            other => other.values().len(),
        }
    }

    /// Bytes the format stores: values (f32) and indices (u32 for rows, columns, pointers and
    /// offsets; u8 for N:M slots), not counting the fixed-size header of each struct.
    pub fn nbytes(&self) -> usize {
        const F: usize = std::mem::size_of::<f32>();
        const U: usize = std::mem::size_of::<u32>();
        let values = self.values().len() * F;
        let index = match self {
            Packed::Dense(_) => 0,
            Packed::Channel(f) => (f.kept_rows().len() + f.kept_cols().map_or(0, <[u32]>::len)) * U,
            Packed::Group(f) => f
                .blocks()
                .iter()
                .map(|b| (b.rows().len() + b.cols().len() + 1) * U)
                .sum(),
            Packed::Shuffled(f) => f
                .groups()
                .iter()
                .map(|g| {
                    g.rows().len() * U
                        + g.tiles()
                            .iter()
                            .map(|t| (t.cols().len() + 1) * U)
                            .sum::<usize>()
                })
                .sum(),
            Packed::Bsr(f) => (f.row_ptr().len() + f.col_idx().len()) * U,
            Packed::Csr(f) => (f.row_ptr().len() + f.col_idx().len()) * U,
            Packed::Nm(f) => f.col_perm().len() * U + f.indices().len(),
        };
        values + index
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
                    *p = Some((i / d.cols().max(1), i % d.cols().max(1)));
                }
            }
            Packed::Channel(f) => {
                let d = f.in_dim();
                for (i, &r) in f.kept_rows().iter().enumerate() {
                    for k in 0..d {
                        let c = f.kept_cols().map_or(k, |kc| kc[k] as usize);
                        out[i * d + k] = Some((r as usize, c));
                    }
                }
            }
            Packed::Group(f) => {
                for b in f.blocks() {
                    let w = b.cols().len();
                    for (i, &r) in b.rows().iter().enumerate() {
                        for (k, &c) in b.cols().iter().enumerate() {
                            out[b.offset() + i * w + k] = Some((r as usize, c as usize));
                        }
                    }
                }
            }
            Packed::Shuffled(f) => {
                for g in f.groups() {
                    for t in g.tiles() {
                        let w = t.cols().len();
                        for (i, &r) in g.rows().iter().enumerate() {
                            for (k, &c) in t.cols().iter().enumerate() {
                                out[t.offset() + i * w + k] = Some((r as usize, c as usize));
                            }
                        }
                    }
                }
            }
            Packed::Bsr(f) => f.for_each_entry(|r, c, i| out[i] = Some((r, c))),
            Packed::Nm(f) => f.for_each_entry(|r, c, i| out[i] = Some((r, c))),
            Packed::Csr(f) => {
                let (row_ptr, col_idx) = (f.row_ptr(), f.col_idx());
                for (r, w) in row_ptr.windows(2).enumerate() {
                    let span = w[0] as usize..w[1] as usize;
                    for (slot, &c) in out[span.clone()].iter_mut().zip(&col_idx[span]) {
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

#[cfg(test)]
pub(crate) mod test_util {
    use coarsen_core::Mask;

    use crate::error::{KernelError, Result};

    /// `n` weights: a repeating ramp from -8 to 8.
    pub(crate) fn weights(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i % 17) as f32 - 8.0).collect()
    }

    /// `w` with zeros outside `m`.
    pub(crate) fn masked(m: &Mask, w: &[f32]) -> Vec<f32> {
        w.iter()
            .zip(m.as_bytes())
            .map(|(&w, &b)| if b != 0 { w } else { 0.0 })
            .collect()
    }

    /// `r` is a [`KernelError::Parts`] error on `field` whose message holds every one of
    /// `needles`.
    #[track_caller]
    pub(crate) fn expect_parts_error<T: std::fmt::Debug>(
        r: Result<T>,
        field: &str,
        needles: &[&str],
    ) {
        match r {
            Err(e @ KernelError::Parts { field: f, .. }) => {
                let msg = e.to_string();
                assert_eq!(f, field, "wrong field in: {msg}");
                for n in needles {
                    assert!(msg.contains(n), "{msg:?} does not say {n:?}");
                }
            }
            other => panic!("expected an invalid-parts error on {field}, got {other:?}"),
        }
    }
}
