//! Shuffled blocks: rows in groups of (at most) b, each group owning tiles of (at most) b columns.

use coarsen_core::patterns::row_classes;
use coarsen_core::Mask;

use super::check_weights;
#[cfg(debug_assertions)]
use super::parts::debug_valid;
use super::parts::{
    check_ascending, check_disjoint_rows, check_regions, check_shape, check_u32_len, invalid, mul,
    Region,
};
use crate::error::{KernelError, Result};

/// A tile of a [`RowGroup`]: the group's rows × these columns, values at `offset`, row-major.
///
/// A tile alone knows nothing of the matrix; [`ShuffledBlocks::from_parts`] checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tile {
    cols: Vec<u32>,
    offset: usize,
}

impl Tile {
    /// A tile on `cols` (strictly ascending, at most b) whose values start at `offset`.
    pub fn new(cols: Vec<u32>, offset: usize) -> Self {
        Tile { cols, offset }
    }

    /// Column indices (at most b), ascending.
    pub fn cols(&self) -> &[u32] {
        &self.cols
    }

    /// Start of the tile's values in [`ShuffledBlocks::values`].
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The parts, in the order [`new`](Self::new) takes them.
    pub fn into_parts(self) -> (Vec<u32>, usize) {
        (self.cols, self.offset)
    }
}

/// A group of (at most b) rows sharing its tiles.
///
/// A group alone knows nothing of the matrix; [`ShuffledBlocks::from_parts`] checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowGroup {
    rows: Vec<u32>,
    tiles: Vec<Tile>,
}

impl RowGroup {
    /// A group of `rows` (strictly ascending, at most b) with its tiles.
    pub fn new(rows: Vec<u32>, tiles: Vec<Tile>) -> Self {
        RowGroup { rows, tiles }
    }

    /// Row indices, ascending.
    pub fn rows(&self) -> &[u32] {
        &self.rows
    }

    /// Its tiles.
    pub fn tiles(&self) -> &[Tile] {
        &self.tiles
    }

    /// The parts, in the order [`new`](Self::new) takes them.
    pub fn into_parts(self) -> (Vec<u32>, Vec<Tile>) {
        (self.rows, self.tiles)
    }
}

/// Shuffled blocks: rows in groups of b, each group owning b×b tiles on arbitrary columns.
///
/// # Invariants
///
/// - `rows` and `cols` fit `u32`, and `rows · cols` fits `usize`; `block` ≥ 1;
/// - every group has at most `block` rows, strictly ascending and below `rows`;
/// - the rows of different groups are disjoint (the kernels write a group's rows of `Y` without
///   adding to them);
/// - every tile has at most `block` columns, below `cols`; the columns of a group's tiles, one
///   tile after the other, are strictly ascending (so no column is in two tiles of a group);
/// - the value regions `offset .. offset + group rows · tile columns` of the tiles lie inside
///   `values`, are disjoint and cover it exactly;
/// - `values.len()` fits `u32`.
#[derive(Clone, Debug, PartialEq)]
pub struct ShuffledBlocks {
    rows: usize,
    cols: usize,
    block: usize,
    groups: Vec<RowGroup>,
    values: Vec<f32>,
}

impl ShuffledBlocks {
    /// Packs `mask`: each row class is cut into groups of at most `block` rows and its columns
    /// into tiles of at most `block` columns. A shuffled-block mask packs into full b×b tiles
    /// (edge tiles aside); any mask packs exactly.
    pub fn pack(mask: &Mask, weights: &[f32], block: usize) -> Result<Self> {
        check_weights("ShuffledBlocks::pack", mask, weights)?;
        if block == 0 {
            return Err(KernelError::Param {
                name: "block",
                value: "0".into(),
                reason: "block size must be at least 1".into(),
            });
        }
        let cols = mask.cols();
        let mut groups = Vec::new();
        let mut values = Vec::new();
        for class in row_classes(mask) {
            for rows in class.rows.chunks(block) {
                let mut tiles = Vec::new();
                for tcols in class.cols.chunks(block) {
                    let offset = values.len();
                    for &r in rows {
                        values.extend(tcols.iter().map(|&c| weights[r * cols + c]));
                    }
                    tiles.push(Tile {
                        cols: tcols.iter().map(|&c| c as u32).collect(),
                        offset,
                    });
                }
                groups.push(RowGroup {
                    rows: rows.iter().map(|&r| r as u32).collect(),
                    tiles,
                });
            }
        }
        ShuffledBlocks::from_parts(mask.rows(), cols, block, groups, values)
    }

    /// Shuffled blocks from their parts, checking the [invariants](Self#invariants).
    pub fn from_parts(
        rows: usize,
        cols: usize,
        block: usize,
        groups: Vec<RowGroup>,
        values: Vec<f32>,
    ) -> Result<Self> {
        let f = ShuffledBlocks {
            rows,
            cols,
            block,
            groups,
            values,
        };
        f.check()?;
        Ok(f)
    }

    /// Shuffled blocks from their parts, checking the invariants only in debug builds.
    ///
    /// # Safety
    ///
    /// The parts must uphold every [invariant](Self#invariants) of the type: a
    /// [`Plan`](crate::Plan) of a value that breaks them may read and write out of bounds.
    pub unsafe fn from_parts_unchecked(
        rows: usize,
        cols: usize,
        block: usize,
        groups: Vec<RowGroup>,
        values: Vec<f32>,
    ) -> Self {
        let f = ShuffledBlocks {
            rows,
            cols,
            block,
            groups,
            values,
        };
        #[cfg(debug_assertions)]
        debug_valid("ShuffledBlocks::from_parts_unchecked", f.check());
        f
    }

    fn check(&self) -> Result<()> {
        const F: &str = "ShuffledBlocks";
        check_shape(F, self.rows, self.cols)?;
        check_u32_len(F, self.values.len())?;
        if self.block == 0 {
            return Err(invalid(
                F,
                "block",
                "block size 0 (must be at least 1)".into(),
            ));
        }
        let mut regions = Vec::new();
        let mut cols = Vec::new();
        for (gi, g) in self.groups.iter().enumerate() {
            let at = || format!("group {gi}");
            check_ascending(F, "groups.rows", &g.rows, self.rows, "rows", at)?;
            if g.rows.len() > self.block {
                let detail = format!(
                    "group {gi} has {} rows, more than b = {}",
                    g.rows.len(),
                    self.block
                );
                return Err(invalid(F, "groups.rows", detail));
            }
            for (ti, t) in g.tiles.iter().enumerate() {
                if t.cols.len() > self.block {
                    let detail = format!(
                        "group {gi}, tile {ti} has {} columns, more than b = {}",
                        t.cols.len(),
                        self.block
                    );
                    return Err(invalid(F, "tiles.cols", detail));
                }
                regions.push(Region {
                    offset: t.offset,
                    len: mul(F, "tiles", g.rows.len(), t.cols.len())?,
                    owner: format!("group {gi}, tile {ti}"),
                });
            }
            cols.clear();
            cols.extend(g.tiles.iter().flat_map(|t| t.cols.iter().copied()));
            let at = || format!("group {gi} (its tiles' columns in a row)");
            check_ascending(F, "tiles.cols", &cols, self.cols, "columns", at)?;
        }
        let owners = self.groups.iter().map(|g| g.rows.as_slice()).enumerate();
        check_disjoint_rows(F, "groups.rows", "group", owners)?;
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

    /// Block size b.
    pub fn block(&self) -> usize {
        self.block
    }

    /// The row groups; their rows are disjoint.
    pub fn groups(&self) -> &[RowGroup] {
        &self.groups
    }

    /// All tile values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// All tile values, mutable (their number never changes).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// The parts, in the order [`from_parts`](Self::from_parts) takes them.
    pub fn into_parts(self) -> (usize, usize, usize, Vec<RowGroup>, Vec<f32>) {
        (self.rows, self.cols, self.block, self.groups, self.values)
    }

    /// The dense matrix.
    pub fn unpack(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for g in &self.groups {
            for t in &g.tiles {
                let w = t.cols.len();
                for (i, &r) in g.rows.iter().enumerate() {
                    for (k, &c) in t.cols.iter().enumerate() {
                        out[r as usize * self.cols + c as usize] =
                            self.values[t.offset + i * w + k];
                    }
                }
            }
        }
        out
    }

    /// The pattern.
    pub fn mask(&self) -> Mask {
        let mut m = Mask::zeros(self.rows, self.cols);
        for g in &self.groups {
            for t in &g.tiles {
                for &r in &g.rows {
                    for &c in &t.cols {
                        m.set(r as usize, c as usize, true);
                    }
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

    fn packed() -> ShuffledBlocks {
        let m = Mask::from_fn(21, 13, |r, c| r < 20 && c != 3);
        ShuffledBlocks::pack(&m, &weights(21 * 13), 8).unwrap()
    }

    #[test]
    fn shuffled_blocks_round_trip_with_edge_tiles() {
        let m = Mask::from_fn(21, 13, |r, c| r < 20 && c != 3);
        let w = weights(21 * 13);
        let p = ShuffledBlocks::pack(&m, &w, 8).unwrap();
        assert_eq!(p.groups().len(), 3);
        assert_eq!(p.groups()[2].rows().len(), 4);
        assert_eq!(p.groups()[0].tiles().len(), 2);
        assert_eq!(p.groups()[0].tiles()[1].cols().len(), 4);
        assert_eq!(p.unpack(), masked(&m, &w));
        assert_eq!(p.mask(), m);
        let (r, c, b, g, v) = p.clone().into_parts();
        assert_eq!(ShuffledBlocks::from_parts(r, c, b, g, v).unwrap(), p);
    }

    fn edited(
        edit: impl FnOnce(&mut usize, &mut Vec<RowGroup>, &mut Vec<f32>),
    ) -> Result<ShuffledBlocks> {
        let (r, c, mut b, mut g, mut v) = packed().into_parts();
        edit(&mut b, &mut g, &mut v);
        ShuffledBlocks::from_parts(r, c, b, g, v)
    }

    #[test]
    fn from_parts_refuses_broken_invariants() {
        // Groups: rows 0..8, 8..16, 16..20; tiles: columns {0,1,2,4,5,6,7,8} (64 values) and
        // {9,..,12} (32 values) for the full groups.
        let p = packed();
        assert_eq!(p.groups()[0].tiles()[1].offset(), 64);
        let e = edited(|_, g, _| g[0].tiles[1].cols[3] = 13);
        expect_parts_error(
            e,
            "tiles.cols",
            &["group 0", "13 is out of range for 13 columns"],
        );
        let e = edited(|_, g, _| g[1].rows[7] = 21);
        expect_parts_error(
            e,
            "groups.rows",
            &["group 1", "21 is out of range for 21 rows"],
        );
        let e = edited(|_, g, _| g[0].rows.swap(2, 3));
        expect_parts_error(e, "groups.rows", &["group 0", "strictly ascending"]);
        let e = edited(|_, g, _| g[0].tiles[1].cols[0] = 8);
        expect_parts_error(e, "tiles.cols", &["group 0", "entry 8 = 8 repeats"]);
        let e = edited(|_, g, _| g[2].rows[0] = 15);
        expect_parts_error(e, "groups.rows", &["row 15 is in group 1 and in group 2"]);
        let e = edited(|_, g, _| g[0].tiles[1].offset = 60);
        expect_parts_error(
            e,
            "offset",
            &["group 0, tile 1", "overlap", "group 0, tile 0"],
        );
        let e = edited(|_, _, v| v.truncate(10));
        expect_parts_error(e, "offset", &["end past the 10 values"]);
        let e = edited(|_, _, v| v.extend([1.0, 2.0]));
        expect_parts_error(e, "values", &["stores"]);
        let e = edited(|b, _, _| *b = 4);
        expect_parts_error(e, "groups.rows", &["group 0 has 8 rows, more than b = 4"]);
        let e = edited(|b, _, _| *b = 0);
        expect_parts_error(e, "block", &["at least 1"]);
        let e = edited(|_, g, _| {
            let t = g[0].tiles.remove(0);
            g[0].tiles.push(t);
        });
        expect_parts_error(e, "tiles.cols", &["group 0", "is below"]);
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "broke an invariant")]
    fn unchecked_debug_asserts() {
        let (r, c, b, mut g, v) = packed().into_parts();
        g[0].rows[0] = 99;
        // SAFETY: none: the parts are broken on purpose, and debug assertions catch it before
        // anything reads them.
        let _ = unsafe { ShuffledBlocks::from_parts_unchecked(r, c, b, g, v) };
    }
}
