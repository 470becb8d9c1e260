//! The matrix view of a weight tensor.

/// How a weight tensor is seen as a matrix `W[rows, cols]`.
///
/// A conv weight `[Cout, Cin, kh, kw]` is `W[Cout, Cin·kh·kw]` (PyTorch's row-major
/// `view(Cout, -1)`), a linear weight `[out, in]` is itself. Column `j = c·inner + s` where `c` is
/// the input channel and `s` the position inside the kernel window (`inner = kh·kw`, 1 for a
/// linear layer). Tensors of rank < 2 have no matrix view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatrixView {
    /// Rows: output channels.
    pub rows: usize,
    /// Columns: `in_channels · inner`.
    pub cols: usize,
    /// Input channels (the N:M and channel-permutation axis).
    pub in_channels: usize,
    /// Entries per input channel in a row (`kh·kw` for a conv, 1 for a linear layer).
    pub inner: usize,
}

impl MatrixView {
    /// The view of a tensor of this shape, or `None` if its rank is below 2.
    pub fn of(shape: &[usize]) -> Option<Self> {
        if shape.len() < 2 {
            return None;
        }
        let inner: usize = shape[2..].iter().product();
        Some(MatrixView {
            rows: shape[0],
            cols: shape[1] * inner,
            in_channels: shape[1],
            inner,
        })
    }

    /// A plain 2-D view (`inner = 1`).
    pub fn matrix(rows: usize, cols: usize) -> Self {
        MatrixView {
            rows,
            cols,
            in_channels: cols,
            inner: 1,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the view has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Column index of input channel `c` at kernel position `s`.
    #[inline]
    pub fn col(&self, c: usize, s: usize) -> usize {
        c * self.inner + s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_and_linear_views() {
        let v = MatrixView::of(&[64, 32, 3, 3]).unwrap();
        assert_eq!((v.rows, v.cols, v.in_channels, v.inner), (64, 288, 32, 9));
        assert_eq!(v.col(2, 4), 22);
        let l = MatrixView::of(&[10, 512]).unwrap();
        assert_eq!((l.rows, l.cols, l.in_channels, l.inner), (10, 512, 512, 1));
        assert!(MatrixView::of(&[5]).is_none());
        assert!(MatrixView::of(&[]).is_none());
    }
}
