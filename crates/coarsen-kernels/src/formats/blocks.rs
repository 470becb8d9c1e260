//! Formats made of dense blocks: group blocks (any rows × any columns), shuffled blocks (row
//! groups of b with b-column tiles) and BSR (aligned H×W tiles).

use coarsen_core::patterns::row_classes;
use coarsen_core::Mask;

use super::check_weights;
use crate::error::{KernelError, Result};

/// A dense block of [`GroupBlocks`]: these rows × these columns, values at `offset`, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// Row indices, ascending.
    pub rows: Vec<u32>,
    /// Column indices, ascending.
    pub cols: Vec<u32>,
    /// Start of the block's `rows × cols` values in [`GroupBlocks::values`].
    pub offset: usize,
}

/// Group blocks: the mask's row classes (rows with one and the same pattern), each a dense block.
/// Any mask packs exactly; a group-sparse mask packs into few large blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupBlocks {
    /// Rows of the full matrix.
    pub rows: usize,
    /// Columns of the full matrix.
    pub cols: usize,
    /// The blocks; their rows are disjoint.
    pub blocks: Vec<Block>,
    /// All block values.
    pub values: Vec<f32>,
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
        Ok(GroupBlocks {
            rows: mask.rows(),
            cols,
            blocks,
            values,
        })
    }

    /// All values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// All values, mutable.
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
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

/// A tile of a [`RowGroup`]: the group's rows × these columns, values at `offset`, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tile {
    /// Column indices (at most b), ascending.
    pub cols: Vec<u32>,
    /// Start of the tile's values in [`ShuffledBlocks::values`].
    pub offset: usize,
}

/// A group of (at most b) rows sharing its tiles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowGroup {
    /// Row indices, ascending.
    pub rows: Vec<u32>,
    /// Its tiles.
    pub tiles: Vec<Tile>,
}

/// Shuffled blocks: rows in groups of b, each group owning b×b tiles on arbitrary columns.
#[derive(Clone, Debug, PartialEq)]
pub struct ShuffledBlocks {
    /// Rows of the full matrix.
    pub rows: usize,
    /// Columns of the full matrix.
    pub cols: usize,
    /// Block size b.
    pub block: usize,
    /// The row groups.
    pub groups: Vec<RowGroup>,
    /// All tile values.
    pub values: Vec<f32>,
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
        Ok(ShuffledBlocks {
            rows: mask.rows(),
            cols,
            block,
            groups,
            values,
        })
    }

    /// All values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// All values, mutable.
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
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

/// Block sparse rows: aligned `height × width` tiles (edge tiles cut by the matrix edge), stored
/// whole; tiles holding no one of the mask are left out.
#[derive(Clone, Debug, PartialEq)]
pub struct Bsr {
    /// Rows of the full matrix.
    pub rows: usize,
    /// Columns of the full matrix.
    pub cols: usize,
    /// Tile height.
    pub height: usize,
    /// Tile width.
    pub width: usize,
    /// Tiles of block row `i` are `row_ptr[i]..row_ptr[i + 1]`.
    pub row_ptr: Vec<u32>,
    /// Block column of each tile.
    pub col_idx: Vec<u32>,
    /// `height × width` values per tile, row-major (zeros past the matrix edge).
    pub values: Vec<f32>,
}

impl Bsr {
    /// Packs `mask` into aligned tiles; entries of a stored tile outside the mask are stored as 0.
    pub fn pack(mask: &Mask, weights: &[f32], height: usize, width: usize) -> Result<Self> {
        check_weights("Bsr::pack", mask, weights)?;
        if height == 0 || width == 0 {
            return Err(KernelError::Param {
                name: "tile",
                value: format!("{height}x{width}"),
                reason: "tile sides must be at least 1".into(),
            });
        }
        let (rows, cols) = (mask.rows(), mask.cols());
        let (br, bc) = (rows.div_ceil(height), cols.div_ceil(width));
        let mut row_ptr = vec![0u32];
        let mut col_idx = Vec::new();
        let mut values = Vec::new();
        for i in 0..br {
            for j in 0..bc {
                let r0 = i * height;
                let c0 = j * width;
                let any = (r0..(r0 + height).min(rows))
                    .any(|r| (c0..(c0 + width).min(cols)).any(|c| mask.get(r, c)));
                if !any {
                    continue;
                }
                col_idx.push(j as u32);
                for r in r0..r0 + height {
                    for c in c0..c0 + width {
                        let inside = r < rows && c < cols && mask.get(r, c);
                        values.push(if inside { weights[r * cols + c] } else { 0.0 });
                    }
                }
            }
            row_ptr.push(col_idx.len() as u32);
        }
        Ok(Bsr {
            rows,
            cols,
            height,
            width,
            row_ptr,
            col_idx,
            values,
        })
    }

    /// Number of stored tiles.
    pub fn tiles(&self) -> usize {
        self.col_idx.len()
    }

    /// The dense matrix.
    pub fn unpack(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.for_each_entry(|r, c, idx| out[r * self.cols + c] = self.values[idx]);
        out
    }

    /// The pattern: every stored tile, cut by the matrix edge.
    pub fn mask(&self) -> Mask {
        let mut m = Mask::zeros(self.rows, self.cols);
        self.for_each_entry(|r, c, _| m.set(r, c, true));
        m
    }

    /// Calls `f(row, col, value index)` for every in-matrix entry of every stored tile.
    pub(crate) fn for_each_entry(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (h, w) = (self.height, self.width);
        for i in 0..self.row_ptr.len() - 1 {
            for t in self.row_ptr[i] as usize..self.row_ptr[i + 1] as usize {
                let j = self.col_idx[t] as usize;
                for a in 0..h {
                    for b in 0..w {
                        let (r, c) = (i * h + a, j * w + b);
                        if r < self.rows && c < self.cols {
                            f(r, c, t * h * w + a * w + b);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i % 17) as f32 - 8.0).collect()
    }

    fn masked(m: &Mask, w: &[f32]) -> Vec<f32> {
        w.iter()
            .zip(m.as_bytes())
            .map(|(&w, &b)| if b != 0 { w } else { 0.0 })
            .collect()
    }

    #[test]
    fn group_blocks_round_trip() {
        let m = Mask::from_fn(7, 9, |r, c| {
            (r % 3 == 0 && c < 4) || (r % 3 == 1 && c % 2 == 1)
        });
        let w = weights(63);
        let p = GroupBlocks::pack(&m, &w).unwrap();
        assert_eq!(p.blocks.len(), 2);
        assert_eq!(p.unpack(), masked(&m, &w));
        assert_eq!(p.mask(), m);
    }

    #[test]
    fn shuffled_blocks_round_trip_with_edge_tiles() {
        let m = Mask::from_fn(21, 13, |r, c| r < 20 && c != 3);
        let w = weights(21 * 13);
        let p = ShuffledBlocks::pack(&m, &w, 8).unwrap();
        assert_eq!(p.groups.len(), 3);
        assert_eq!(p.groups[2].rows.len(), 4);
        assert_eq!(p.groups[0].tiles.len(), 2);
        assert_eq!(p.groups[0].tiles[1].cols.len(), 4);
        assert_eq!(p.unpack(), masked(&m, &w));
        assert_eq!(p.mask(), m);
    }

    #[test]
    fn bsr_round_trip() {
        let m = Mask::from_fn(10, 7, |r, c| {
            (r / 4 + c / 4) % 2 == 0 && !(r == 0 && c == 0)
        });
        let w = weights(70);
        let p = Bsr::pack(&m, &w, 4, 4).unwrap();
        assert_eq!(p.row_ptr.len(), 4);
        assert_eq!(p.unpack(), masked(&m, &w));
        // The hole at (0, 0) lies inside a stored tile, so the pattern covers it.
        assert!(p.mask().get(0, 0));
        assert_eq!(p.mask().overlap(&m), m.nnz());
    }
}
