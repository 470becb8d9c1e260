//! The dense engine: faer's GEMM, the baseline every speed-up is measured against, and the
//! kernel of channel-compact layers.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use super::tiled::Tiled;
use super::{split_range, SyncPtr};
use crate::simd::Isa;

/// How the dense GEMM uses several threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threading {
    /// faer's own parallel GEMM.
    Faer,
    /// Columns of `X` split across threads, each running a sequential GEMM (better for few rows
    /// and very many columns).
    SplitColumns,
    /// One sequential GEMM on the calling thread, for callers that run many products in
    /// parallel themselves (e.g. one chunk of a convolution per thread).
    Serial,
}

/// Which GEMM runs the forward product `Y = W·X` of a dense plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseKernel {
    /// faer's general GEMM (the baseline of `coarsen bench`'s kernel tables).
    Faer,
    /// coarsen's register-tiled GEMM for a fixed `W` and a wide `X` (the default).
    Tiled,
}

/// A dense `rows × cols` weight matrix ready to run.
#[derive(Clone, Debug)]
pub(crate) struct DenseEngine {
    rows: usize,
    cols: usize,
    values: Vec<f32>,
    pub(crate) threading: Threading,
    /// The packed copy of `values` the tiled forward product runs on (`None`: faer).
    tiled: Option<Tiled>,
}

impl DenseEngine {
    pub(crate) fn new(isa: Isa, rows: usize, cols: usize, values: Vec<f32>) -> Self {
        DenseEngine {
            rows,
            cols,
            tiled: Some(Tiled::new(isa, rows, cols, &values)),
            values,
            threading: Threading::Faer,
        }
    }

    pub(crate) fn set_values(&mut self, values: &[f32]) {
        self.values.copy_from_slice(values);
        if let Some(t) = &mut self.tiled {
            t.set_values(values);
        }
    }

    /// Chooses the forward GEMM.
    pub(crate) fn set_kernel(&mut self, isa: Isa, kernel: DenseKernel) {
        self.tiled = match kernel {
            DenseKernel::Faer => None,
            DenseKernel::Tiled => Some(Tiled::new(isa, self.rows, self.cols, &self.values)),
        };
    }

    /// The tiled kernel, when it runs the forward product.
    pub(crate) fn tiled(&self) -> Option<&Tiled> {
        self.tiled.as_ref()
    }

    /// The forward GEMM.
    pub(crate) fn kernel(&self) -> DenseKernel {
        if self.tiled.is_some() {
            DenseKernel::Tiled
        } else {
            DenseKernel::Faer
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    fn w(&self) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(&self.values, self.rows, self.cols)
    }

    /// `Y = W·X`.
    pub(crate) fn forward(&self, x: &[f32], y: &mut [f32], n: usize) {
        if let Some(t) = &self.tiled {
            let parts = match self.threading {
                Threading::Serial => 1,
                _ => rayon::current_num_threads(),
            };
            t.forward(x, y, n, parts);
            return;
        }
        self.product(false, x, y, n);
    }

    /// `dX = Wᵀ·dY`.
    pub(crate) fn backward_input(&self, dy: &[f32], dx: &mut [f32], n: usize) {
        self.product(true, dy, dx, n);
    }

    fn product(&self, transpose: bool, x: &[f32], y: &mut [f32], n: usize) {
        let w = if transpose {
            self.w().transpose()
        } else {
            self.w()
        };
        let (m, k) = (w.nrows(), w.ncols());
        let threads = rayon::current_num_threads();
        if self.threading == Threading::SplitColumns && threads > 1 {
            let (xp, yp) = (SyncPtr(x.as_ptr() as *mut f32), SyncPtr(y.as_mut_ptr()));
            crate::team::for_each(threads, |t| {
                let (a, b) = split_range(n, threads, t, 16);
                if a < b {
                    // SAFETY: each thread views its own columns a..b of X and Y, with row
                    // stride n, inside the buffers whose lengths the plan checked.
                    unsafe {
                        let xb = MatRef::from_raw_parts(
                            xp.get().add(a) as *const f32,
                            k,
                            b - a,
                            n as isize,
                            1,
                        );
                        let yb =
                            MatMut::from_raw_parts_mut(yp.get().add(a), m, b - a, n as isize, 1);
                        matmul(yb, Accum::Replace, w, xb, 1.0f32, Par::Seq);
                    }
                }
            });
        } else {
            let xb = MatRef::from_row_major_slice(x, k, n);
            let yb = MatMut::from_row_major_slice_mut(y, m, n);
            let p = if self.threading == Threading::Serial {
                Par::Seq
            } else {
                par(threads)
            };
            matmul(yb, Accum::Replace, w, xb, 1.0f32, p);
        }
    }

    /// `dW = dY·Xᵀ` (dense).
    pub(crate) fn backward_weight(&self, dy: &[f32], x: &[f32], n: usize, dw: &mut [f32]) {
        let dyb = MatRef::from_row_major_slice(dy, self.rows, n);
        let xb = MatRef::from_row_major_slice(x, self.cols, n);
        let out = MatMut::from_row_major_slice_mut(dw, self.rows, self.cols);
        matmul(
            out,
            Accum::Replace,
            dyb,
            xb.transpose(),
            1.0f32,
            par(rayon::current_num_threads()),
        );
    }
}

fn par(threads: usize) -> Par {
    if threads > 1 {
        Par::rayon(threads)
    } else {
        Par::Seq
    }
}
