//! Block sparse rows: aligned `height × width` tiles, stored whole.

use coarsen_core::Mask;

use super::check_weights;
#[cfg(debug_assertions)]
use super::parts::debug_valid;
use super::parts::{
    check_ascending, check_count, check_row_ptr, check_shape, check_u32_len, invalid, mul,
};
use crate::error::{KernelError, Result};

/// Block sparse rows: aligned `height × width` tiles (edge tiles cut by the matrix edge), stored
/// whole; tiles holding no one of the mask are left out.
///
/// # Invariants
///
/// - `rows` and `cols` fit `u32`, and `rows · cols` fits `usize`; `height`, `width` ≥ 1;
/// - `row_ptr` has one entry per block row plus one (`ceil(rows / height) + 1`), starts at 0,
///   never decreases and ends at `col_idx.len()`;
/// - the block columns of each block row are strictly ascending and below
///   `ceil(cols / width)`;
/// - `values.len() == col_idx.len() · height · width`, and fits `u32`.
#[derive(Clone, Debug, PartialEq)]
pub struct Bsr {
    rows: usize,
    cols: usize,
    height: usize,
    width: usize,
    row_ptr: Vec<u32>,
    col_idx: Vec<u32>,
    values: Vec<f32>,
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
        Bsr::from_parts(rows, cols, height, width, row_ptr, col_idx, values)
    }

    /// A BSR matrix from its parts, checking the [invariants](Self#invariants).
    pub fn from_parts(
        rows: usize,
        cols: usize,
        height: usize,
        width: usize,
        row_ptr: Vec<u32>,
        col_idx: Vec<u32>,
        values: Vec<f32>,
    ) -> Result<Self> {
        let f = Bsr {
            rows,
            cols,
            height,
            width,
            row_ptr,
            col_idx,
            values,
        };
        f.check()?;
        Ok(f)
    }

    /// A BSR matrix from its parts, checking the invariants only in debug builds.
    ///
    /// # Safety
    ///
    /// The parts must uphold every [invariant](Self#invariants) of the type: a
    /// [`Plan`](crate::Plan) of a value that breaks them may read and write out of bounds.
    pub unsafe fn from_parts_unchecked(
        rows: usize,
        cols: usize,
        height: usize,
        width: usize,
        row_ptr: Vec<u32>,
        col_idx: Vec<u32>,
        values: Vec<f32>,
    ) -> Self {
        let f = Bsr {
            rows,
            cols,
            height,
            width,
            row_ptr,
            col_idx,
            values,
        };
        #[cfg(debug_assertions)]
        debug_valid("Bsr::from_parts_unchecked", f.check());
        f
    }

    fn check(&self) -> Result<()> {
        const F: &str = "Bsr";
        check_shape(F, self.rows, self.cols)?;
        if self.height == 0 || self.width == 0 {
            let detail = format!("{}x{} (sides must be at least 1)", self.height, self.width);
            return Err(invalid(F, "height × width", detail));
        }
        let (br, bc) = (
            self.rows.div_ceil(self.height),
            self.cols.div_ceil(self.width),
        );
        check_count(F, "row_ptr", self.row_ptr.len(), br + 1, || {
            format!(
                "{br} block rows ({} rows in tiles of {})",
                self.rows, self.height
            )
        })?;
        check_row_ptr(F, &self.row_ptr, self.col_idx.len())?;
        for (i, w) in self.row_ptr.windows(2).enumerate() {
            let at = || format!("block row {i}");
            let tiles = &self.col_idx[w[0] as usize..w[1] as usize];
            let what = "block columns";
            check_ascending(F, "col_idx", tiles, bc, what, at)?;
        }
        let per_tile = mul(F, "height × width", self.height, self.width)?;
        let want = mul(F, "values", self.col_idx.len(), per_tile)?;
        check_count(F, "values", self.values.len(), want, || {
            format!(
                "{} tiles of {}x{}",
                self.col_idx.len(),
                self.height,
                self.width
            )
        })?;
        check_u32_len(F, self.values.len())
    }

    /// Rows of the full matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the full matrix.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Tile height.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Tile width.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Tiles of block row `i` are `row_ptr[i]..row_ptr[i + 1]`.
    pub fn row_ptr(&self) -> &[u32] {
        &self.row_ptr
    }

    /// Block column of each tile, ascending within a block row.
    pub fn col_idx(&self) -> &[u32] {
        &self.col_idx
    }

    /// `height × width` values per tile, row-major (entries past the matrix edge are never
    /// read).
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Values, mutable (their number never changes).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// The parts, in the order [`from_parts`](Self::from_parts) takes them.
    pub fn into_parts(self) -> (usize, usize, usize, usize, Vec<u32>, Vec<u32>, Vec<f32>) {
        (
            self.rows,
            self.cols,
            self.height,
            self.width,
            self.row_ptr,
            self.col_idx,
            self.values,
        )
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
        for (i, span) in self.row_ptr.windows(2).enumerate() {
            for t in span[0] as usize..span[1] as usize {
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
    use crate::formats::test_util::{expect_parts_error, masked, weights};

    fn packed() -> Bsr {
        let m = Mask::from_fn(10, 7, |r, c| {
            (r / 4 + c / 4) % 2 == 0 && !(r == 0 && c == 0)
        });
        Bsr::pack(&m, &weights(70), 4, 4).unwrap()
    }

    #[test]
    fn bsr_round_trip() {
        let m = Mask::from_fn(10, 7, |r, c| {
            (r / 4 + c / 4) % 2 == 0 && !(r == 0 && c == 0)
        });
        let w = weights(70);
        let p = Bsr::pack(&m, &w, 4, 4).unwrap();
        assert_eq!(p.row_ptr().len(), 4);
        assert_eq!(p.unpack(), masked(&m, &w));
        // The hole at (0, 0) lies inside a stored tile, so the pattern covers it.
        assert!(p.mask().get(0, 0));
        assert_eq!(p.mask().overlap(&m), m.nnz());
        let (r, c, h, wd, rp, ci, v) = p.clone().into_parts();
        assert_eq!(Bsr::from_parts(r, c, h, wd, rp, ci, v).unwrap(), p);
    }

    type Parts = (usize, usize, usize, usize, Vec<u32>, Vec<u32>, Vec<f32>);

    fn edited(edit: impl FnOnce(&mut Parts)) -> Result<Bsr> {
        let mut p = packed().into_parts();
        edit(&mut p);
        let (r, c, h, w, rp, ci, v) = p;
        Bsr::from_parts(r, c, h, w, rp, ci, v)
    }

    #[test]
    fn from_parts_refuses_broken_invariants() {
        // Block rows 0, 1, 2 hold tiles at block columns [0], [1], [0].
        let p = packed();
        assert_eq!(
            (p.row_ptr(), p.col_idx()),
            (&[0, 1, 2, 3][..], &[0, 1, 0][..])
        );
        let e = edited(|p| p.5[1] = 2);
        expect_parts_error(
            e,
            "col_idx",
            &["block row 1", "2 is out of range for 2 block columns"],
        );
        let e = edited(|p| {
            p.4 = vec![0, 2, 2, 3];
            p.5 = vec![1, 0, 0];
        });
        expect_parts_error(e, "col_idx", &["block row 0", "strictly ascending"]);
        let e = edited(|p| {
            p.4 = vec![0, 2, 2, 3];
            p.5 = vec![0, 0, 0];
        });
        expect_parts_error(e, "col_idx", &["block row 0", "repeats"]);
        let e = edited(|p| p.4 = vec![0, 2, 1, 3]);
        expect_parts_error(e, "row_ptr", &["entry 2 = 1 is below entry 1 = 2"]);
        let e = edited(|p| p.4 = vec![1, 1, 2, 3]);
        expect_parts_error(e, "row_ptr", &["starts at 1"]);
        let e = edited(|p| p.4 = vec![0, 1, 2, 2]);
        expect_parts_error(e, "row_ptr", &["ends at 2", "3 entries"]);
        let e = edited(|p| p.4 = vec![0, 1, 2]);
        expect_parts_error(e, "row_ptr", &["holds 3 entries", "needs 4"]);
        let e = edited(|p| {
            p.6.pop();
        });
        expect_parts_error(e, "values", &["holds 47", "needs 48"]);
        let e = edited(|p| p.2 = 0);
        expect_parts_error(e, "height × width", &["0x4"]);
        let e = edited(|p| {
            (p.2, p.3) = (1 << 40, 1 << 40);
            p.4 = vec![0, 1];
            p.5 = vec![0];
        });
        expect_parts_error(e, "height × width", &["overflows"]);
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "broke an invariant")]
    fn unchecked_debug_asserts() {
        let (r, c, h, w, rp, mut ci, v) = packed().into_parts();
        ci[0] = 7;
        // SAFETY: none: the parts are broken on purpose, and debug assertions catch it before
        // anything reads them.
        let _ = unsafe { Bsr::from_parts_unchecked(r, c, h, w, rp, ci, v) };
    }
}
