//! Group blocks: the mask's row classes (rows with one and the same pattern), each a dense block
//! of any rows × any columns.

use coarsen_core::patterns::row_classes;
use coarsen_core::Mask;

use super::check_weights;
#[cfg(debug_assertions)]
use super::parts::debug_valid;
use super::parts::{
    check_ascending, check_disjoint_rows, check_regions, check_shape, check_u32_len, mul, Region,
};
use crate::error::Result;

/// A dense block of [`GroupBlocks`]: these rows × these columns, values at `offset`, row-major.
///
/// A block alone knows nothing of the matrix; [`GroupBlocks::from_parts`] checks it against the
/// shape, the other blocks and the values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    rows: Vec<u32>,
    cols: Vec<u32>,
    offset: usize,
}

impl Block {
    /// A block of `rows × cols` (both strictly ascending) whose values start at `offset`.
    pub fn new(rows: Vec<u32>, cols: Vec<u32>, offset: usize) -> Self {
        Block { rows, cols, offset }
    }

    /// Row indices, ascending.
    pub fn rows(&self) -> &[u32] {
        &self.rows
    }

    /// Column indices, ascending.
    pub fn cols(&self) -> &[u32] {
        &self.cols
    }

    /// Start of the block's `rows × cols` values in [`GroupBlocks::values`].
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The parts, in the order [`new`](Self::new) takes them.
    pub fn into_parts(self) -> (Vec<u32>, Vec<u32>, usize) {
        (self.rows, self.cols, self.offset)
    }
}

/// Group blocks: the mask's row classes (rows with one and the same pattern), each a dense block.
/// Any mask packs exactly; a group-sparse mask packs into few large blocks.
///
/// # Invariants
///
/// - `rows` and `cols` fit `u32`, and `rows · cols` fits `usize`;
/// - the rows of every block are strictly ascending and below `rows`, its columns strictly
///   ascending and below `cols`;
/// - the rows of different blocks are disjoint (the kernels write a block's rows of `Y` without
///   adding to them);
/// - the value regions `offset .. offset + rows·cols` of the blocks lie inside `values`, are
///   disjoint and cover it exactly (so `values.len()` is the sum of the block sizes);
/// - `values.len()` fits `u32`.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupBlocks {
    rows: usize,
    cols: usize,
    blocks: Vec<Block>,
    values: Vec<f32>,
}

impl GroupBlocks {
    /// Packs `mask` with `weights` (row-major, same shape).
    pub fn pack(mask: &Mask, weights: &[f32]) -> Result<Self> {
        check_weights("GroupBlocks::pack", mask, weights)?;
        let cols = mask.cols();
        let mut blocks = Vec::new();
        let mut values = Vec::new();
        for class in row_classes(mask) {
            let offset = values.len();
            for &r in &class.rows {
                values.extend(class.cols.iter().map(|&c| weights[r * cols + c]));
            }
            blocks.push(Block {
                rows: class.rows.iter().map(|&r| r as u32).collect(),
                cols: class.cols.iter().map(|&c| c as u32).collect(),
                offset,
            });
        }
        GroupBlocks::from_parts(mask.rows(), cols, blocks, values)
    }

    /// Group blocks from their parts, checking the [invariants](Self#invariants).
    pub fn from_parts(
        rows: usize,
        cols: usize,
        blocks: Vec<Block>,
        values: Vec<f32>,
    ) -> Result<Self> {
        let f = GroupBlocks {
            rows,
            cols,
            blocks,
            values,
        };
        f.check()?;
        Ok(f)
    }

    /// Group blocks from their parts, checking the invariants only in debug builds.
    ///
    /// # Safety
    ///
    /// The parts must uphold every [invariant](Self#invariants) of the type: a
    /// [`Plan`](crate::Plan) of a value that breaks them may read and write out of bounds.
    pub unsafe fn from_parts_unchecked(
        rows: usize,
        cols: usize,
        blocks: Vec<Block>,
        values: Vec<f32>,
    ) -> Self {
        let f = GroupBlocks {
            rows,
            cols,
            blocks,
            values,
        };
        #[cfg(debug_assertions)]
        debug_valid("GroupBlocks::from_parts_unchecked", f.check());
        f
    }

    fn check(&self) -> Result<()> {
        const F: &str = "GroupBlocks";
        check_shape(F, self.rows, self.cols)?;
        check_u32_len(F, self.values.len())?;
        let mut regions = Vec::with_capacity(self.blocks.len());
        for (i, b) in self.blocks.iter().enumerate() {
            let at = || format!("block {i}");
            check_ascending(F, "blocks.rows", &b.rows, self.rows, "rows", at)?;
            check_ascending(F, "blocks.cols", &b.cols, self.cols, "columns", at)?;
            regions.push(Region {
                offset: b.offset,
                len: mul(F, "blocks", b.rows.len(), b.cols.len())?,
                owner: at(),
            });
        }
        let owners = self.blocks.iter().map(|b| b.rows.as_slice()).enumerate();
        check_disjoint_rows(F, "blocks.rows", "block", owners)?;
        check_regions(F, regions, self.values.len())
    }

    /// Rows of the full matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the full matrix.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The blocks; their rows are disjoint.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// All block values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// All block values, mutable (their number never changes).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// The parts, in the order [`from_parts`](Self::from_parts) takes them.
    pub fn into_parts(self) -> (usize, usize, Vec<Block>, Vec<f32>) {
        (self.rows, self.cols, self.blocks, self.values)
    }

    /// The dense matrix.
    pub fn unpack(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for b in &self.blocks {
            let w = b.cols.len();
            for (i, &r) in b.rows.iter().enumerate() {
                for (k, &c) in b.cols.iter().enumerate() {
                    out[r as usize * self.cols + c as usize] = self.values[b.offset + i * w + k];
                }
            }
        }
        out
    }

    /// The pattern.
    pub fn mask(&self) -> Mask {
        let mut m = Mask::zeros(self.rows, self.cols);
        for b in &self.blocks {
            for &r in &b.rows {
                for &c in &b.cols {
                    m.set(r as usize, c as usize, true);
                }
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::test_util::{expect_parts_error, masked, weights};

    fn packed() -> GroupBlocks {
        let m = Mask::from_fn(7, 9, |r, c| {
            (r % 3 == 0 && c < 4) || (r % 3 == 1 && c % 2 == 1)
        });
        GroupBlocks::pack(&m, &weights(63)).unwrap()
    }

    #[test]
    fn group_blocks_round_trip() {
        let m = Mask::from_fn(7, 9, |r, c| {
            (r % 3 == 0 && c < 4) || (r % 3 == 1 && c % 2 == 1)
        });
        let w = weights(63);
        let p = GroupBlocks::pack(&m, &w).unwrap();
        assert_eq!(p.blocks().len(), 2);
        assert_eq!(p.unpack(), masked(&m, &w));
        assert_eq!(p.mask(), m);
        let (r, c, b, v) = p.clone().into_parts();
        assert_eq!(GroupBlocks::from_parts(r, c, b, v).unwrap(), p);
    }

    /// `packed()` with its parts changed by `edit`.
    fn edited(edit: impl FnOnce(&mut Vec<Block>, &mut Vec<f32>)) -> Result<GroupBlocks> {
        let (r, c, mut b, mut v) = packed().into_parts();
        edit(&mut b, &mut v);
        GroupBlocks::from_parts(r, c, b, v)
    }

    #[test]
    fn from_parts_refuses_broken_invariants() {
        let p = packed();
        // The blocks of `packed()`: rows {0, 3, 6} × columns 0..4 (values 0..12), rows {1, 4} ×
        // the odd columns (values 12..20); rows 2 and 5 are empty.
        assert_eq!(p.blocks()[0].rows(), &[0, 3, 6]);
        assert_eq!(p.blocks()[1].offset(), 12);
        let e = edited(|b, _| b[0].cols[3] = 9);
        expect_parts_error(
            e,
            "blocks.cols",
            &["block 0", "9 is out of range for 9 columns"],
        );
        let e = edited(|b, _| b[1].rows[1] = 7);
        expect_parts_error(
            e,
            "blocks.rows",
            &["block 1", "7 is out of range for 7 rows"],
        );
        let e = edited(|b, _| b[0].cols.swap(0, 1));
        expect_parts_error(e, "blocks.cols", &["block 0", "strictly ascending"]);
        let e = edited(|b, _| b[0].rows[1] = 0);
        expect_parts_error(e, "blocks.rows", &["block 0", "repeats"]);
        let e = edited(|b, _| b[1].rows[0] = 0);
        expect_parts_error(e, "blocks.rows", &["row 0 is in block 0 and in block 1"]);
        let e = edited(|b, _| b[1].rows.push(6));
        expect_parts_error(e, "blocks.rows", &["row 6 is in block 0 and in block 1"]);
        let e = edited(|b, _| b[1].offset -= 1);
        expect_parts_error(e, "offset", &["block 1", "overlap", "block 0"]);
        let e = edited(|b, _| b[1].offset = usize::MAX - 2);
        expect_parts_error(e, "offset", &["block 1", "overflows"]);
        let e = edited(|b, _| b[1].offset += 1);
        expect_parts_error(e, "offset", &["block 1", "end past the 20 values"]);
        let e = edited(|_, v| v.push(0.0));
        expect_parts_error(e, "values", &["holds 21 values", "stores 20"]);
        let e = edited(|_, v| {
            v.pop();
        });
        expect_parts_error(e, "offset", &["end past the 19 values"]);
        let e = GroupBlocks::from_parts(1 << 33, 1, vec![], vec![]);
        expect_parts_error(e, "rows", &["u32::MAX"]);
        // Blocks may come in any order of their values.
        let swapped = edited(|b, v| {
            let (n0, n1) = (12, 8);
            let old = v.clone();
            v[..n1].copy_from_slice(&old[n0..n0 + n1]);
            v[n1..n0 + n1].copy_from_slice(&old[..n0]);
            b[0].offset = n1;
            b[1].offset = 0;
        })
        .unwrap();
        assert_eq!(swapped.unpack(), p.unpack());
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "broke an invariant")]
    fn unchecked_debug_asserts() {
        let (r, c, mut b, v) = packed().into_parts();
        b[0].cols[0] = 100;
        // SAFETY: none: the parts are broken on purpose, and debug assertions catch it before
        // anything reads them.
        let _ = unsafe { GroupBlocks::from_parts_unchecked(r, c, b, v) };
    }
}
