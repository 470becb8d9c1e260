//! Binary masks in the matrix view, and the bit rows used to compare them fast.

use crate::error::{Error, Result};

/// A binary mask of one layer in its matrix view `[rows, cols]`, row-major, one byte per entry
/// holding 0 or 1.
///
/// Invariant: `data.len() == rows * cols` and every byte is 0 or 1.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Mask {
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "Mask {}x{} nnz {}", self.rows, self.cols, self.nnz())?;
        if self.rows * self.cols <= 4096 {
            for r in 0..self.rows {
                let line: String = self
                    .row(r)
                    .iter()
                    .map(|&b| if b != 0 { '#' } else { '.' })
                    .collect();
                writeln!(f, "  {line}")?;
            }
        }
        Ok(())
    }
}

impl Mask {
    /// An all-zero mask.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Mask {
            rows,
            cols,
            data: vec![0; rows * cols],
        }
    }

    /// An all-one mask.
    pub fn ones(rows: usize, cols: usize) -> Self {
        Mask {
            rows,
            cols,
            data: vec![1; rows * cols],
        }
    }

    /// A mask from row-major bytes; any nonzero byte counts as 1.
    ///
    /// Fails with [`Error::BadLength`] when `data` does not hold `rows * cols` bytes.
    pub fn from_bytes(rows: usize, cols: usize, mut data: Vec<u8>) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::BadLength {
                tensor: "mask".into(),
                shape: vec![rows, cols],
                len: data.len(),
            });
        }
        for b in &mut data {
            *b = u8::from(*b != 0);
        }
        Ok(Mask { rows, cols, data })
    }

    /// A mask with a 1 wherever `pred(row, col)` holds.
    pub fn from_fn(rows: usize, cols: usize, mut pred: impl FnMut(usize, usize) -> bool) -> Self {
        let mut data = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for c in 0..cols {
                data.push(u8::from(pred(r, c)));
            }
        }
        Mask { rows, cols, data }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of entries, `rows * cols`.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the mask has no entries at all (a zero dimension).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The row-major bytes (each 0 or 1).
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    /// Consumes the mask and returns its row-major bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }

    /// Entry `(r, c)`.
    #[inline]
    pub fn get(&self, r: usize, c: usize) -> bool {
        self.data[r * self.cols + c] != 0
    }

    /// Sets entry `(r, c)`.
    #[inline]
    pub fn set(&mut self, r: usize, c: usize, on: bool) {
        self.data[r * self.cols + c] = u8::from(on);
    }

    /// Row `r` as bytes.
    #[inline]
    pub fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Sets every entry of row `r`.
    pub fn fill_row(&mut self, r: usize, on: bool) {
        let v = u8::from(on);
        self.data[r * self.cols..(r + 1) * self.cols].fill(v);
    }

    /// Number of ones.
    pub fn nnz(&self) -> usize {
        self.data.iter().map(|&b| b as usize).sum()
    }

    /// Number of ones in row `r`.
    pub fn row_nnz(&self, r: usize) -> usize {
        self.row(r).iter().map(|&b| b as usize).sum()
    }

    /// Fraction of ones (0 for an empty mask).
    pub fn density(&self) -> f64 {
        if self.data.is_empty() {
            0.0
        } else {
            self.nnz() as f64 / self.data.len() as f64
        }
    }

    /// Number of entries that are 1 in both masks. Panics if the shapes differ.
    pub fn overlap(&self, other: &Mask) -> usize {
        assert_eq!((self.rows, self.cols), (other.rows, other.cols));
        self.data
            .iter()
            .zip(&other.data)
            .map(|(&a, &b)| (a & b) as usize)
            .sum()
    }

    /// Σ |w| over the ones of the mask. Panics if `weights` has another length.
    pub fn magnitude(&self, weights: &[f32]) -> f64 {
        assert_eq!(weights.len(), self.data.len());
        self.data
            .iter()
            .zip(weights)
            .map(|(&m, &w)| if m != 0 { w.abs() as f64 } else { 0.0 })
            .sum()
    }

    /// The kernel view of a mask whose rows are runs of `taps` entries (a convolution's
    /// `kh·kw` per input channel; `cols` a multiple of `taps`): a kernel is kept where one of
    /// its entries is.
    pub(crate) fn kernel_mask(&self, taps: usize) -> Mask {
        Mask::from_fn(self.rows, self.cols / taps, |r, c| {
            (0..taps).any(|t| self.get(r, c * taps + t))
        })
    }

    /// Per kernel of `taps` entries (as [`kernel_mask`](Self::kernel_mask) counts them,
    /// row-major): the root mean square of its weights under the mask, those outside it
    /// counting as zero. `weights` has the mask's length.
    pub(crate) fn kernel_rms(&self, weights: &[f32], taps: usize) -> Vec<f32> {
        debug_assert_eq!(weights.len(), self.data.len());
        self.data
            .chunks_exact(taps)
            .zip(weights.chunks_exact(taps))
            .map(|(m, w)| {
                let sum: f64 = m
                    .iter()
                    .zip(w)
                    .filter(|(&b, _)| b != 0)
                    .map(|(_, &v)| f64::from(v) * f64::from(v))
                    .sum();
                (sum / taps as f64).sqrt() as f32
            })
            .collect()
    }

    /// Indices of the rows with at least one 1.
    pub fn nonempty_rows(&self) -> Vec<usize> {
        (0..self.rows)
            .filter(|&r| self.row(r).contains(&1))
            .collect()
    }

    /// The mask with its columns reordered: column `new` of the result is column `perm[new]` of
    /// `self`. Panics if `perm` is not a permutation of the columns.
    pub fn permute_cols(&self, perm: &[usize]) -> Mask {
        assert_eq!(perm.len(), self.cols);
        let mut out = Mask::zeros(self.rows, self.cols);
        for r in 0..self.rows {
            let src = self.row(r);
            let dst = &mut out.data[r * self.cols..(r + 1) * self.cols];
            for (d, &p) in dst.iter_mut().zip(perm) {
                *d = src[p];
            }
        }
        out
    }
}

/// The rows of a mask packed into 64-bit words, for fast set operations between rows.
#[derive(Clone, Debug)]
pub struct BitRows {
    words_per_row: usize,
    words: Vec<u64>,
    counts: Vec<u32>,
}

impl BitRows {
    /// Packs the given rows of `mask` (in that order).
    pub fn new(mask: &Mask, rows: &[usize]) -> Self {
        let words_per_row = mask.cols().div_ceil(64);
        let mut words = vec![0u64; words_per_row * rows.len()];
        let mut counts = Vec::with_capacity(rows.len());
        for (i, &r) in rows.iter().enumerate() {
            let dst = &mut words[i * words_per_row..(i + 1) * words_per_row];
            let mut count = 0u32;
            for (c, &b) in mask.row(r).iter().enumerate() {
                if b != 0 {
                    dst[c / 64] |= 1u64 << (c % 64);
                    count += 1;
                }
            }
            counts.push(count);
        }
        BitRows {
            words_per_row,
            words,
            counts,
        }
    }

    /// Number of packed rows.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Whether no row is packed.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Number of ones of packed row `i`.
    pub fn count(&self, i: usize) -> u32 {
        self.counts[i]
    }

    /// Number of columns where packed rows `i` and `j` are both 1.
    #[inline]
    pub fn shared(&self, i: usize, j: usize) -> u32 {
        let a = &self.words[i * self.words_per_row..(i + 1) * self.words_per_row];
        let b = &self.words[j * self.words_per_row..(j + 1) * self.words_per_row];
        a.iter().zip(b).map(|(x, y)| (x & y).count_ones()).sum()
    }

    /// Cosine distance `1 - |a∩b| / sqrt(|a|·|b|)` of packed rows `i` and `j`; 1 when either is
    /// empty (as scikit-learn's `cosine_similarity` gives 0 for a zero vector).
    pub fn cosine_distance(&self, i: usize, j: usize) -> f64 {
        let (ci, cj) = (self.counts[i], self.counts[j]);
        if ci == 0 || cj == 0 {
            return 1.0;
        }
        let s = self.shared(i, j) as f64;
        (1.0 - s / ((ci as f64) * (cj as f64)).sqrt()).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_bytes_normalises_and_checks_length() {
        let m = Mask::from_bytes(2, 2, vec![0, 3, 1, 0]).unwrap();
        assert_eq!(m.as_bytes(), &[0, 1, 1, 0]);
        assert!(Mask::from_bytes(2, 2, vec![0; 3]).is_err());
    }

    #[test]
    fn counts_and_rows() {
        let m = Mask::from_fn(3, 4, |r, c| r == 1 && c % 2 == 0);
        assert_eq!(m.nnz(), 2);
        assert_eq!(m.row_nnz(1), 2);
        assert_eq!(m.nonempty_rows(), vec![1]);
        assert!((m.density() - 2.0 / 12.0).abs() < 1e-12);
    }

    #[test]
    fn bitrows_shared_and_cosine() {
        let m = Mask::from_fn(3, 130, |r, c| match r {
            0 => c < 100,
            1 => c >= 50,
            _ => false,
        });
        let b = BitRows::new(&m, &[0, 1, 2]);
        assert_eq!(b.shared(0, 1), 50);
        assert_eq!(b.count(1), 80);
        let d = b.cosine_distance(0, 1);
        assert!((d - (1.0 - 50.0 / (100.0f64 * 80.0).sqrt())).abs() < 1e-12);
        assert_eq!(b.cosine_distance(0, 2), 1.0);
    }

    #[test]
    fn permute_cols_moves_columns() {
        let m = Mask::from_fn(1, 3, |_, c| c == 0);
        assert_eq!(m.permute_cols(&[2, 0, 1]).as_bytes(), &[0, 1, 0]);
    }
}
