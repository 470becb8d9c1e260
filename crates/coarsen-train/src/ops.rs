//! coarsen's own candle operations, forward and backward: im2col (convolution as a GEMM), the
//! weight × activation product of convolutions and linear layers on coarsen-kernels (dense GEMM,
//! or a packed structured-sparse plan), and a fused batch normalisation.
//!
//! Activations are channel-major: a feature map is `[channels, batch, height, width]`, a linear
//! layer's input `[features, batch]`, so every layer is `Y[out, N] = W[out, in]·X[in, N]`.

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Shape, Storage, Tensor,
};
use coarsen_kernels::conv::ConvDims;
use coarsen_kernels::gemm::{matmul, matmul_serial};
use coarsen_kernels::{Packed, Plan};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

fn kerr(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::msg(e)
}

/// The contiguous f32 data of a storage.
fn data<'a>(s: &'a CpuStorage, l: &Layout, op: &'static str) -> CResult<&'a [f32]> {
    let d = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => Err(candle_core::Error::RequiresContiguous { op }),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor, without copying.
fn with_data<R>(t: &Tensor, op: &'static str, f: impl FnOnce(&[f32]) -> R) -> CResult<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => Ok(f(data(c, l, op)?)),
        _ => Err(kerr(format!("{op}: coarsen's operations run on the CPU"))),
    }
}

fn tensor(v: Vec<f32>, shape: impl Into<Shape>) -> CResult<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Geometry of a square convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Kernel side.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub pad: usize,
}

impl ConvGeometry {
    /// The same geometry in coarsen-kernels' general form.
    pub fn general(&self) -> coarsen_kernels::conv::ConvGeometry {
        coarsen_kernels::conv::ConvGeometry::square(self.k, self.stride, self.pad)
    }

    /// Output side for an input side `n`.
    pub fn out(&self, n: usize) -> usize {
        (n + 2 * self.pad).saturating_sub(self.k) / self.stride + 1
    }
}

/// im2col: `[C, B, H, W]` → `[C·k·k, B·Ho·Wo]`, row `(c·k + ky)·k + kx`, column
/// `(b·Ho + oy)·Wo + ox`. Its backward is col2im.
#[derive(Clone, Copy, Debug)]
pub struct Im2Col(pub ConvGeometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "coarsen-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = data(s, l, "im2col")?;
        let [c, b, h, w] = nchw(l.dims(), "im2col")?;
        let g = self.0;
        let (ho, wo) = (g.out(h), g.out(w));
        let n = b * ho * wo;
        let mut col = vec![0.0f32; c * g.k * g.k * n];
        col.par_chunks_mut(n.max(1))
            .enumerate()
            .for_each(|(row, out)| {
                let (ch, ky, kx) = (row / (g.k * g.k), (row / g.k) % g.k, row % g.k);
                for bi in 0..b {
                    for oy in 0..ho {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        let dst = &mut out[(bi * ho + oy) * wo..(bi * ho + oy + 1) * wo];
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        let src = &x[((ch * b + bi) * h + iy as usize) * w..][..w];
                        for (ox, d) in dst.iter_mut().enumerate() {
                            let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                            if ix >= 0 && ix < w as isize {
                                *d = src[ix as usize];
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(col), Shape::from((c * g.k * g.k, n))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let &[c, b, h, w] = arg.dims() else {
            return Err(kerr("im2col backward: bad input shape"));
        };
        let g = self.0;
        let (ho, wo) = (g.out(h), g.out(w));
        let n = b * ho * wo;
        let dx = with_data(grad, "col2im", |dcol| {
            let mut dx = vec![0.0f32; c * b * h * w];
            dx.par_chunks_mut((b * h * w).max(1))
                .enumerate()
                .for_each(|(ch, plane)| {
                    for ky in 0..g.k {
                        for kx in 0..g.k {
                            let row = &dcol[((ch * g.k + ky) * g.k + kx) * n..][..n];
                            for bi in 0..b {
                                for oy in 0..ho {
                                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                    if iy < 0 || iy >= h as isize {
                                        continue;
                                    }
                                    let dst = &mut plane[(bi * h + iy as usize) * w..][..w];
                                    let src = &row[(bi * ho + oy) * wo..][..wo];
                                    for (ox, &v) in src.iter().enumerate() {
                                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                        if ix >= 0 && ix < w as isize {
                                            dst[ix as usize] += v;
                                        }
                                    }
                                }
                            }
                        }
                    }
                });
            dx
        })?;
        Ok(Some(tensor(dx, (c, b, h, w))?))
    }
}

/// A structured-sparse weight prepared for coarsen-kernels: the plan and, for each of its values,
/// the flat index of the weight it holds.
pub struct SparseWeight {
    plan: Plan,
    index: Vec<u32>,
    values: Vec<f32>,
}

/// Index of a padding value (always 0) in [`SparseWeight`].
const NO_WEIGHT: u32 = u32::MAX;

impl SparseWeight {
    /// From a packed pattern; its values are taken from the weight at every forward.
    pub fn new(packed: &Packed) -> coarsen_kernels::Result<Self> {
        let plan = Plan::new(packed)?;
        let cols = packed.shape().1;
        let index = packed
            .positions()
            .iter()
            .map(|p| p.map_or(NO_WEIGHT, |(r, c)| (r * cols + c) as u32))
            .collect();
        let values = vec![0.0; plan.value_count()];
        Ok(SparseWeight {
            plan,
            index,
            values,
        })
    }

    /// Loads the current weight values (row-major `rows × cols`) into the plan.
    fn load(&mut self, w: &[f32]) -> coarsen_kernels::Result<()> {
        for (v, &i) in self.values.iter_mut().zip(&self.index) {
            *v = if i == NO_WEIGHT { 0.0 } else { w[i as usize] };
        }
        self.plan.update_values(&self.values)
    }

    /// Writes a gradient in the plan's value layout into the dense weight gradient.
    fn scatter_grad(&self, dv: &[f32], dw: &mut [f32]) {
        for (&g, &i) in dv.iter().zip(&self.index) {
            if i != NO_WEIGHT {
                dw[i as usize] = g;
            }
        }
    }
}

/// The norms behind DSB's gradient estimate `|∂L/∂W_ij| ≤ ‖dY_i‖₂·‖U_j‖₂`, recorded by a
/// layer's backward pass: `output[i] = ‖dY_i‖₂`, the gradient of output channel (row) i over
/// batch × positions, and `input[j] = ‖U_j‖₂`, row j of the layer's input matrix (im2col for a
/// convolution; the input features for a linear layer).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GrowNorms {
    /// `‖dY_i‖₂` for every row of the weight matrix.
    pub output: Vec<f32>,
    /// `‖U_j‖₂` for every column of the weight matrix.
    pub input: Vec<f32>,
}

/// How a layer multiplies: dense GEMM or a structured-sparse plan.
pub struct LayerKernel {
    sparse: Mutex<Option<SparseWeight>>,
    /// Return the dense weight gradient (not only on the pattern), for growth steps of dynamic
    /// sparse training.
    pub dense_grad: std::sync::atomic::AtomicBool,
    /// Record [`GrowNorms`] in the next backward passes (growth steps of DSB's estimator).
    pub estimate: std::sync::atomic::AtomicBool,
    norms: Mutex<Option<GrowNorms>>,
}

impl LayerKernel {
    /// A dense kernel.
    pub fn dense() -> Arc<Self> {
        Arc::new(LayerKernel {
            sparse: Mutex::new(None),
            dense_grad: std::sync::atomic::AtomicBool::new(false),
            estimate: std::sync::atomic::AtomicBool::new(false),
            norms: Mutex::new(None),
        })
    }

    /// Takes the norms the last backward pass recorded (with [`LayerKernel::estimate`] set).
    pub fn take_norms(&self) -> Option<GrowNorms> {
        self.norms.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn wants_norms(&self) -> bool {
        self.estimate.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn record_norms(&self, n: GrowNorms) {
        *self.norms.lock().unwrap_or_else(|p| p.into_inner()) = Some(n);
    }

    /// Switches to a sparse plan (`Some`) or back to dense (`None`).
    pub fn set_sparse(&self, s: Option<SparseWeight>) {
        *self.sparse.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Whether the layer runs a sparse plan.
    pub fn is_sparse(&self) -> bool {
        self.sparse
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

impl std::fmt::Debug for LayerKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LayerKernel {{ sparse: {} }}", self.is_sparse())
    }
}

/// `Y[R, N] = W[R, C]·X[C, N]` with the weight viewed as a matrix (first dimension rows).
#[derive(Clone, Debug)]
pub struct WeightMatmul(pub Arc<LayerKernel>);

fn matrix_dims(w: &[usize]) -> (usize, usize) {
    (w[0], w[1..].iter().product())
}

impl CustomOp2 for WeightMatmul {
    fn name(&self) -> &'static str {
        "coarsen-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        ws: &CpuStorage,
        wl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (w, x) = (
            data(ws, wl, "weight-matmul")?,
            data(xs, xl, "weight-matmul")?,
        );
        let (r, c) = matrix_dims(wl.dims());
        let &[xc, n] = xl.dims() else {
            return Err(kerr(format!(
                "weight-matmul needs X as [C, N], got {:?}",
                xl.dims()
            )));
        };
        if xc != c {
            return Err(kerr(format!(
                "weight-matmul: W is {r}x{c} but X has {xc} rows"
            )));
        }
        let mut y = vec![0.0f32; r * n];
        let mut sparse = self.0.sparse.lock().unwrap_or_else(|p| p.into_inner());
        match sparse.as_mut() {
            None => matmul(&mut y, r, n, c, w, false, x, false, false).map_err(kerr)?,
            Some(s) => {
                s.load(w).map_err(kerr)?;
                s.plan.forward(x, &mut y, n).map_err(kerr)?;
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((r, n))))
    }

    fn bwd(
        &self,
        w: &Tensor,
        x: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (r, c) = matrix_dims(w.dims());
        let n = x.dims()[1];
        if self.0.wants_norms() {
            let output = with_data(dy, "weight-matmul backward", |v| row_norms(v, n))?;
            let input = with_data(x, "weight-matmul backward", |v| row_norms(v, n))?;
            self.0.record_norms(GrowNorms { output, input });
        }
        let sparse = self.0.sparse.lock().unwrap_or_else(|p| p.into_inner());
        let dense_grad = self.0.dense_grad.load(std::sync::atomic::Ordering::Relaxed);
        let (dx, dw) = with_data(dy, "weight-matmul backward", |dyv| {
            with_data(x, "weight-matmul backward", |xv| {
                with_data(
                    w,
                    "weight-matmul backward",
                    |wv| -> CResult<(Vec<f32>, Vec<f32>)> {
                        let mut dx = vec![0.0f32; c * n];
                        let mut dw = vec![0.0f32; r * c];
                        match sparse.as_ref() {
                            None => matmul(&mut dx, c, n, r, wv, true, dyv, false, false)
                                .map_err(kerr)?,
                            Some(s) => s.plan.backward_input(dyv, &mut dx, n).map_err(kerr)?,
                        }
                        match sparse.as_ref() {
                            Some(s) if !dense_grad => {
                                let mut dv = vec![0.0f32; s.plan.value_count()];
                                s.plan.backward_weight(dyv, xv, n, &mut dv).map_err(kerr)?;
                                s.scatter_grad(&dv, &mut dw);
                            }
                            _ => matmul(&mut dw, r, c, n, dyv, false, xv, true, false)
                                .map_err(kerr)?,
                        }
                        Ok((dx, dw))
                    },
                )
            })
        })????;
        Ok((
            Some(tensor(dw, w.shape().clone())?),
            Some(tensor(dx, (c, n))?),
        ))
    }
}

/// A pointer through which rayon tasks write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct Shared(pub(crate) *mut f32);

// SAFETY: every use hands each task a range no other task touches (its images, or its rows of
// its column chunk), and the buffer outlives the parallel loop.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// # Safety
    /// `[at, at + len)` lies inside the buffer and no other live slice overlaps it.
    pub(crate) unsafe fn slice<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

/// The four dimensions of a channel-major batch `[C, B, H, W]` taken by `op`.
fn nchw(dims: &[usize], op: &str) -> CResult<[usize; 4]> {
    match *dims {
        [c, b, h, w] => Ok([c, b, h, w]),
        _ => Err(kerr(format!("{op} needs [C, B, H, W], got {dims:?}"))),
    }
}

/// The sizes of convolving a `[C, B, H, W]` batch with `g`.
pub(crate) fn conv_dims(dims: &[usize], g: ConvGeometry) -> CResult<ConvDims> {
    nchw(dims, "conv2d")?;
    ConvDims::new(dims, g.general()).map_err(kerr)
}

/// The im2col matrix `[C·k·k, nb·Ho·Wo]` of images `b0 .. b0 + nb`: row by row over the rayon
/// pool (`parallel`), or every row on this thread.
fn im2col(
    d: &ConvDims,
    x: &[f32],
    b0: usize,
    nb: usize,
    col: &mut [f32],
    parallel: bool,
) -> CResult<()> {
    let (hw, nc) = (d.hw(), nb * d.hw());
    if parallel {
        col.par_chunks_mut(nc.max(1))
            .take(d.rows())
            .enumerate()
            .try_for_each(|(row, dst)| d.im2col_row_range(x, row, b0 * hw, (b0 + nb) * hw, dst))
            .map_err(kerr)
    } else {
        d.im2col(x, b0, nb, col).map_err(kerr)
    }
}

/// Adds `dcol` of images `b0 .. b0 + nb` into the input gradient behind `dx`.
///
/// # Safety
/// `dx` points to a `[C, B, H, W]` buffer whose images `b0 .. b0 + nb` nothing else accesses
/// meanwhile.
unsafe fn col2im(
    d: &ConvDims,
    dcol: &[f32],
    b0: usize,
    nb: usize,
    dx: Shared,
    parallel: bool,
) -> CResult<()> {
    let plane = nb * d.h * d.w;
    let at = |ch: usize| (ch * d.b + b0) * d.h * d.w;
    let one = |ch: usize| {
        // SAFETY: channel `ch`'s images `b0 .. b0 + nb` are one contiguous range of `dx` that
        // only this call touches (the caller's promise), and channels are disjoint.
        let p = unsafe { dx.slice(at(ch), plane) };
        d.col2im_channel(dcol, nb, ch, p)
    };
    if parallel {
        (0..d.c).into_par_iter().try_for_each(one).map_err(kerr)
    } else {
        (0..d.c).try_for_each(one).map_err(kerr)
    }
}

/// Copies columns `b0·Ho·Wo ..` of the `[rows, N]` matrix `full` into `[rows, nc]`.
fn gather(d: &ConvDims, full: &[f32], rows: usize, b0: usize, nc: usize, out: &mut [f32]) {
    let (n, off) = (d.n(), b0 * d.hw());
    for r in 0..rows {
        out[r * nc..(r + 1) * nc].copy_from_slice(&full[r * n + off..][..nc]);
    }
}

/// Copies `[rows, nc]` into columns `b0·Ho·Wo ..` of the `[rows, N]` matrix behind `full`.
///
/// # Safety
/// Those columns of `full` are accessed by nothing else meanwhile.
unsafe fn scatter(d: &ConvDims, part: &[f32], rows: usize, b0: usize, nc: usize, full: Shared) {
    let (n, off) = (d.n(), b0 * d.hw());
    for r in 0..rows {
        unsafe { full.slice(r * n + off, nc) }.copy_from_slice(&part[r * nc..(r + 1) * nc]);
    }
}

/// Convolution of a channel-major batch `[C, B, H, W]` by a weight `[Cout, C, k, k]` into
/// `[Cout, B, Ho, Wo]`, forward and backward, as im2col + GEMM over chunks of images: each
/// chunk's im2col matrix stays cache-sized and is never stored for the backward pass (it is
/// rebuilt there). Dense layers run one single-threaded GEMM per chunk on every thread; a
/// structured-sparse layer runs its packed plan chunk after chunk.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// Geometry.
    pub geometry: ConvGeometry,
    /// How the weight multiplies.
    pub kernel: Arc<LayerKernel>,
    /// Apply ReLU to the output (fused: no separate pass, no separate node).
    pub relu: bool,
}

/// `dy ⊙ [y > 0]`, the gradient through a ReLU with output `y`.
fn relu_grad(y: &Tensor, dy: &Tensor) -> CResult<Tensor> {
    let g = with_data(y, "relu backward", |yv| {
        with_data(dy, "relu backward", |dv| {
            let mut g = vec![0.0f32; dv.len()];
            g.par_chunks_mut(1 << 14)
                .zip(yv.par_chunks(1 << 14).zip(dv.par_chunks(1 << 14)))
                .for_each(|(o, (yc, dc))| {
                    for ((o, &y), &d) in o.iter_mut().zip(yc).zip(dc) {
                        *o = if y > 0.0 { d } else { 0.0 };
                    }
                });
            g
        })
    })??;
    tensor(g, dy.shape().clone())
}

/// `‖row‖₂` of every row of a row-major matrix with rows of `n` values.
fn row_norms(m: &[f32], n: usize) -> Vec<f32> {
    if n == 0 {
        return Vec::new();
    }
    m.par_chunks(n)
        .map(|r| r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32)
        .collect()
}

/// `‖U_j‖₂` of every row j of the im2col matrix of the whole batch, a row at a time (one row
/// buffer per worker).
fn im2col_row_norms(d: &ConvDims, x: &[f32]) -> CResult<Vec<f32>> {
    let n = d.n();
    (0..d.rows())
        .into_par_iter()
        .map_init(
            || vec![0.0f32; n],
            |buf, row| -> CResult<f32> {
                d.im2col_row_range(x, row, 0, n, buf).map_err(kerr)?;
                Ok(buf.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32)
            },
        )
        .collect()
}

fn relu_in_place(v: &mut [f32]) {
    for x in v {
        *x = x.max(0.0);
    }
}

/// im2col values per chunk of the dense path (512 KiB: the chunk stays in L2).
const DENSE_CHUNK_FLOATS: usize = 1 << 17;
/// im2col values per chunk of the sparse path (16 MiB: long rows for the packed kernels).
#[cfg(not(test))]
const SPARSE_CHUNK_FLOATS: usize = 1 << 22;
/// Least columns of a sparse-path chunk.
#[cfg(not(test))]
const SPARSE_MIN_COLS: usize = 512;
// Tests run the sparse path over many small chunks.
#[cfg(test)]
const SPARSE_CHUNK_FLOATS: usize = 1;
#[cfg(test)]
const SPARSE_MIN_COLS: usize = 1;

fn chunks(d: &ConvDims, per: usize) -> Vec<(usize, usize)> {
    (0..d.b.div_ceil(per.max(1)))
        .map(|i| (i * per, per.min(d.b - i * per)))
        .collect()
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "coarsen-conv2d"
    }

    fn cpu_fwd(
        &self,
        ws: &CpuStorage,
        wl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (w, x) = (data(ws, wl, "conv2d")?, data(xs, xl, "conv2d")?);
        let d = conv_dims(xl.dims(), self.geometry)?;
        let (r, kk) = matrix_dims(wl.dims());
        if kk != d.rows() {
            return Err(kerr(format!(
                "conv2d: weight {:?} does not match {} input channels with a {}x{} kernel",
                wl.dims(),
                d.c,
                self.geometry.k,
                self.geometry.k
            )));
        }
        let n = d.n();
        let mut y = vec![0.0f32; r * n];
        let yp = Shared(y.as_mut_ptr());
        let mut sparse = self.kernel.sparse.lock().unwrap_or_else(|p| p.into_inner());
        match sparse.as_mut() {
            None => {
                let threads = rayon::current_num_threads();
                let per = d.images_per_chunk(DENSE_CHUNK_FLOATS, 256, 2 * threads);
                chunks(&d, per)
                    .into_par_iter()
                    .try_for_each(|(b0, nb)| -> CResult<()> {
                        let nc = nb * d.hw();
                        let mut col = vec![0.0f32; kk * nc];
                        im2col(&d, x, b0, nb, &mut col, false)?;
                        let mut part = vec![0.0f32; r * nc];
                        matmul_serial(&mut part, r, nc, kk, w, false, &col, false, false)
                            .map_err(kerr)?;
                        if self.relu {
                            relu_in_place(&mut part);
                        }
                        // SAFETY: chunks cover disjoint images, hence disjoint columns of y.
                        unsafe { scatter(&d, &part, r, b0, nc, yp) };
                        Ok(())
                    })?;
            }
            Some(s) => {
                s.load(w).map_err(kerr)?;
                let per = d.images_per_chunk(SPARSE_CHUNK_FLOATS, SPARSE_MIN_COLS, 1);
                for (b0, nb) in chunks(&d, per) {
                    let nc = nb * d.hw();
                    let mut col = vec![0.0f32; kk * nc];
                    im2col(&d, x, b0, nb, &mut col, true)?;
                    let mut part = vec![0.0f32; r * nc];
                    s.plan.forward(&col, &mut part, nc).map_err(kerr)?;
                    if self.relu {
                        relu_in_place(&mut part);
                    }
                    // SAFETY: one chunk at a time.
                    unsafe { scatter(&d, &part, r, b0, nc, yp) };
                }
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((r, d.b, d.ho, d.wo))))
    }

    fn bwd(
        &self,
        w: &Tensor,
        x: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let d = conv_dims(x.dims(), self.geometry)?;
        // Behind a fused ReLU the gradient passes where the output is positive.
        let dy = if self.relu {
            relu_grad(res, dy)?
        } else {
            dy.clone()
        };
        let dy = &dy;
        // The data batch needs no gradient.
        let need_dx = x.track_op();
        let (r, kk) = matrix_dims(w.dims());
        if self.kernel.wants_norms() {
            let output = with_data(dy, "conv2d backward", |v| row_norms(v, d.n()))?;
            let input = with_data(x, "conv2d backward", |v| im2col_row_norms(&d, v))??;
            self.kernel.record_norms(GrowNorms { output, input });
        }
        let sparse = self.kernel.sparse.lock().unwrap_or_else(|p| p.into_inner());
        let dense_grad = self
            .kernel
            .dense_grad
            .load(std::sync::atomic::Ordering::Relaxed);
        let (dx, dw) = with_data(dy, "conv2d backward", |dyv| {
            with_data(x, "conv2d backward", |xv| {
                with_data(
                    w,
                    "conv2d backward",
                    |wv| -> CResult<(Vec<f32>, Vec<f32>)> {
                        let mut dx = vec![0.0f32; xv.len()];
                        let dxp = Shared(dx.as_mut_ptr());
                        let dw = match sparse.as_ref() {
                            None => {
                                let threads = rayon::current_num_threads().max(1);
                                let per = d.images_per_chunk(DENSE_CHUNK_FLOATS, 256, 2 * threads);
                                let all = chunks(&d, per);
                                let parts: Vec<Vec<f32>> = (0..threads.min(all.len()))
                                    .into_par_iter()
                                    .map(|t| -> CResult<Vec<f32>> {
                                        let mut acc = vec![0.0f32; r * kk];
                                        let lo = t * all.len() / threads.min(all.len());
                                        let hi = (t + 1) * all.len() / threads.min(all.len());
                                        for &(b0, nb) in &all[lo..hi] {
                                            let nc = nb * d.hw();
                                            let mut col = vec![0.0f32; kk * nc];
                                            im2col(&d, xv, b0, nb, &mut col, false)?;
                                            let mut dyc = vec![0.0f32; r * nc];
                                            gather(&d, dyv, r, b0, nc, &mut dyc);
                                            matmul_serial(
                                                &mut acc, r, kk, nc, &dyc, false, &col, true, true,
                                            )
                                            .map_err(kerr)?;
                                            if need_dx {
                                                // The chunk's im2col buffer now takes its
                                                // gradient.
                                                matmul_serial(
                                                    &mut col, kk, nc, r, wv, true, &dyc, false,
                                                    false,
                                                )
                                                .map_err(kerr)?;
                                                // SAFETY: chunks cover disjoint images of dx.
                                                unsafe { col2im(&d, &col, b0, nb, dxp, false)? };
                                            }
                                        }
                                        Ok(acc)
                                    })
                                    .collect::<CResult<_>>()?;
                                let mut dw = vec![0.0f32; r * kk];
                                for p in parts {
                                    for (a, v) in dw.iter_mut().zip(p) {
                                        *a += v;
                                    }
                                }
                                dw
                            }
                            Some(s) => {
                                let per =
                                    d.images_per_chunk(SPARSE_CHUNK_FLOATS, SPARSE_MIN_COLS, 1);
                                let mut dw = vec![0.0f32; r * kk];
                                let mut dv = vec![0.0f32; s.plan.value_count()];
                                let mut dv_sum = vec![0.0f32; s.plan.value_count()];
                                for (b0, nb) in chunks(&d, per) {
                                    let nc = nb * d.hw();
                                    let mut col = vec![0.0f32; kk * nc];
                                    im2col(&d, xv, b0, nb, &mut col, true)?;
                                    let mut dyc = vec![0.0f32; r * nc];
                                    gather(&d, dyv, r, b0, nc, &mut dyc);
                                    if dense_grad {
                                        matmul(&mut dw, r, kk, nc, &dyc, false, &col, true, true)
                                            .map_err(kerr)?;
                                    } else {
                                        s.plan
                                            .backward_weight(&dyc, &col, nc, &mut dv)
                                            .map_err(kerr)?;
                                        for (a, v) in dv_sum.iter_mut().zip(&dv) {
                                            *a += v;
                                        }
                                    }
                                    if need_dx {
                                        s.plan.backward_input(&dyc, &mut col, nc).map_err(kerr)?;
                                        // SAFETY: one chunk at a time; channels are disjoint planes.
                                        unsafe { col2im(&d, &col, b0, nb, dxp, true)? };
                                    }
                                }
                                if !dense_grad {
                                    s.scatter_grad(&dv_sum, &mut dw);
                                }
                                dw
                            }
                        };
                        Ok((dx, dw))
                    },
                )
            })
        })????;
        let dx = if need_dx {
            Some(tensor(dx, x.shape().clone())?)
        } else {
            None
        };
        Ok((Some(tensor(dw, w.shape().clone())?), dx))
    }
}

#[inline]
fn max4(a: f32, b: f32, c: f32, d: f32) -> f32 {
    let ab = if a >= b { a } else { b };
    let cd = if c >= d { c } else { d };
    if ab >= cd {
        ab
    } else {
        cd
    }
}

/// 2×2 max pooling with stride 2 over the last two dimensions of `[C, B, H, W]` (odd edges
/// dropped). The gradient goes to the first maximum of each window. (candle 0.11's
/// `max_pool2d` backward multiplies the gradient by the window's count of maxima over 4 — a
/// quarter of the true gradient for a unique maximum — and takes five passes over the map.)
#[derive(Clone, Copy, Debug)]
pub struct MaxPool2;

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "coarsen-maxpool2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = data(s, l, "maxpool2")?;
        let [c, b, h, w] = nchw(l.dims(), "maxpool2")?;
        let (ho, wo) = (h / 2, w / 2);
        let mut y = vec![0.0f32; c * b * ho * wo];
        y.par_chunks_mut((ho * wo).max(1))
            .zip(x.par_chunks((h * w).max(1)))
            .for_each(|(yo, xi)| {
                for oy in 0..ho {
                    let (r0, r1) = (&xi[2 * oy * w..][..w], &xi[(2 * oy + 1) * w..][..w]);
                    for (ox, o) in yo[oy * wo..(oy + 1) * wo].iter_mut().enumerate() {
                        *o = max4(r0[2 * ox], r0[2 * ox + 1], r1[2 * ox], r1[2 * ox + 1]);
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((c, b, ho, wo))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let &[c, b, h, w] = arg.dims() else {
            return Err(kerr("maxpool2 backward: bad input shape"));
        };
        let (ho, wo) = (h / 2, w / 2);
        let dx = with_data(arg, "maxpool2 backward", |x| {
            with_data(res, "maxpool2 backward", |y| {
                with_data(grad, "maxpool2 backward", |g| {
                    let mut dx = vec![0.0f32; c * b * h * w];
                    dx.par_chunks_mut((h * w).max(1))
                        .zip(x.par_chunks((h * w).max(1)))
                        .zip(
                            y.par_chunks((ho * wo).max(1))
                                .zip(g.par_chunks((ho * wo).max(1))),
                        )
                        .for_each(|((dxo, xi), (yi, gi))| {
                            for oy in 0..ho {
                                for ox in 0..wo {
                                    let (m, gv) = (yi[oy * wo + ox], gi[oy * wo + ox]);
                                    let top = 2 * oy * w + 2 * ox;
                                    let i = if xi[top] == m {
                                        top
                                    } else if xi[top + 1] == m {
                                        top + 1
                                    } else if xi[top + w] == m {
                                        top + w
                                    } else {
                                        top + w + 1
                                    };
                                    dxo[i] = gv;
                                }
                            }
                        });
                    dx
                })
            })
        })???;
        Ok(Some(tensor(dx, (c, b, h, w))?))
    }
}

/// Batch statistics of the last training forward of a [`BatchNorm`] op.
#[derive(Clone, Debug, Default)]
pub struct BatchStats {
    /// Per-channel mean.
    pub mean: Vec<f32>,
    /// Per-channel biased variance.
    pub var: Vec<f32>,
}

/// `Σ f(aᵢ, bᵢ)`: sixteen f32 lanes over blocks of 512 values (so the sum vectorises and
/// no long dependency chain forms), the blocks added in f64.
#[inline]
fn sum_by(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    const LANES: usize = 16;
    let mut total = 0.0f64;
    for (ca, cb) in a.chunks(512).zip(b.chunks(512)) {
        let mut acc = [0.0f32; LANES];
        let (mut ia, mut ib) = (ca.chunks_exact(LANES), cb.chunks_exact(LANES));
        for (xa, xb) in (&mut ia).zip(&mut ib) {
            for l in 0..LANES {
                acc[l] += f(xa[l], xb[l]);
            }
        }
        let mut block: f64 = acc.iter().map(|&v| v as f64).sum();
        for (&x, &y) in ia.remainder().iter().zip(ib.remainder()) {
            block += f(x, y) as f64;
        }
        total += block;
    }
    total
}

/// Training-mode batch normalisation over a channel-major tensor `[C, ...]`:
/// `y = γ·(x − μ)/√(σ² + ε) + β` with the batch's per-channel μ and σ².
#[derive(Clone, Debug)]
pub struct BatchNorm {
    /// ε.
    pub eps: f32,
    /// The batch statistics of the forward pass (read to update running averages).
    pub stats: Arc<Mutex<BatchStats>>,
    /// Apply ReLU to the output (fused).
    pub relu: bool,
}

impl CustomOp3 for BatchNorm {
    fn name(&self) -> &'static str {
        "coarsen-batchnorm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, g, b) = (
            data(xs, xl, "batchnorm")?,
            data(gs, gl, "batchnorm")?,
            data(bs, bl, "batchnorm")?,
        );
        let c = xl.dims()[0];
        let m = x.len() / c.max(1);
        let mut y = vec![0.0f32; x.len()];
        let stats: Vec<(f32, f32)> = y
            .par_chunks_mut(m.max(1))
            .zip(x.par_chunks(m.max(1)))
            .enumerate()
            .map(|(ch, (yo, xi))| {
                let mean = sum_by(xi, xi, |v, _| v) / m as f64;
                let mu = mean as f32;
                let var = sum_by(xi, xi, |v, _| (v - mu) * (v - mu)) / m as f64;
                let inv = 1.0 / (var as f32 + self.eps).sqrt();
                let (scale, shift) = (g[ch] * inv, b[ch] - g[ch] * inv * mean as f32);
                if self.relu {
                    for (o, &v) in yo.iter_mut().zip(xi) {
                        *o = (v * scale + shift).max(0.0);
                    }
                } else {
                    for (o, &v) in yo.iter_mut().zip(xi) {
                        *o = v * scale + shift;
                    }
                }
                (mean as f32, var as f32)
            })
            .collect();
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        st.mean = stats.iter().map(|s| s.0).collect();
        st.var = stats.iter().map(|s| s.1).collect();
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dims()[0];
        let dy = if self.relu {
            relu_grad(res, dy)?
        } else {
            dy.clone()
        };
        let dy = &dy;
        let st = self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (dx, dg, db) = with_data(x, "batchnorm backward", |xv| {
            with_data(dy, "batchnorm backward", |dyv| {
                with_data(gamma, "batchnorm backward", |g| {
                    let m = xv.len() / c.max(1);
                    let mut dx = vec![0.0f32; xv.len()];
                    let grads: Vec<(f32, f32)> = dx
                        .par_chunks_mut(m.max(1))
                        .zip(xv.par_chunks(m.max(1)).zip(dyv.par_chunks(m.max(1))))
                        .enumerate()
                        .map(|(ch, (dxo, (xi, dyi)))| {
                            let inv = 1.0 / (st.var[ch] + self.eps).sqrt();
                            let mean = st.mean[ch];
                            let sdy = sum_by(dyi, dyi, |d, _| d);
                            let sdyx = sum_by(dyi, xi, |d, v| d * (v - mean)) * inv as f64;
                            let k = g[ch] * inv / m as f32;
                            let (sdy32, sdyx32) = (sdy as f32, sdyx as f32);
                            for ((o, &d), &v) in dxo.iter_mut().zip(dyi).zip(xi) {
                                let xhat = (v - mean) * inv;
                                *o = k * (m as f32 * d - sdy32 - xhat * sdyx32);
                            }
                            (sdyx32, sdy32)
                        })
                        .collect();
                    (
                        dx,
                        grads.iter().map(|g| g.0).collect::<Vec<_>>(),
                        grads.iter().map(|g| g.1).collect::<Vec<_>>(),
                    )
                })
            })
        })???;
        Ok((
            Some(tensor(dx, x.shape().clone())?),
            Some(tensor(dg, c)?),
            Some(tensor(db, c)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "entry {i}: {x} vs {y}"
            );
        }
    }

    /// The gradients of `0.5·Σ y²` (so that `dY = Y`).
    fn half_square_grads(y: &Tensor) -> candle_core::backprop::GradStore {
        y.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .affine(0.5, 0.0)
            .unwrap()
            .backward()
            .unwrap()
    }

    /// A tensor's values, flattened.
    trait Flat {
        fn flat(&self) -> Vec<f32>;
    }

    impl Flat for Tensor {
        fn flat(&self) -> Vec<f32> {
            self.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        }
    }

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Convolution through im2col + weight-matmul equals candle's own conv2d (NCHW), forward and
    /// backward. (Odd sizes: candle's conv2d backward mis-sizes stride-2 gradients of even inputs.)
    #[test]
    fn conv_matches_candle_forward_and_backward() {
        let (b, ci, h, w, co) = (5, 4, 7, 5, 8);
        for (k, stride, pad) in [
            (3, 1, 1),
            (3, 2, 1),
            (1, 1, 0),
            (1, 2, 0),
            (5, 1, 2),
            (3, 2, 0),
        ] {
            let g = ConvGeometry { k, stride, pad };
            let xn = vals(b * ci * h * w, 1);
            let wn = vals(co * ci * k * k, 2);
            // Every second group of 4 output channels pruned (for the sparse plan).
            let cols = ci * k * k;
            let mask = coarsen_core::Mask::from_fn(co, cols, |i, _| (i / 4) % 2 == 0);
            for way in ["im2col", "conv2d", "conv2d-sparse"] {
                let sparse = way == "conv2d-sparse";
                let wv: Vec<f32> = wn
                    .iter()
                    .zip(mask.as_bytes())
                    .map(|(&v, &m)| if m != 0 || !sparse { v } else { 0.0 })
                    .collect();
                // candle reference on NCHW.
                let xr = Var::from_vec(xn.clone(), (b, ci, h, w), &Device::Cpu).unwrap();
                let wr = Var::from_vec(wv.clone(), (co, ci, k, k), &Device::Cpu).unwrap();
                let yr = xr.conv2d(&wr, pad, stride, 1, 1).unwrap();
                let gr = half_square_grads(&yr);
                // coarsen: channel-major.
                let xc = Var::from_tensor(
                    &xr.as_tensor()
                        .permute((1, 0, 2, 3))
                        .unwrap()
                        .contiguous()
                        .unwrap(),
                )
                .unwrap();
                let wc = Var::from_vec(wv.clone(), (co, ci, k, k), &Device::Cpu).unwrap();
                let (ho, wo) = (g.out(h), g.out(w));
                let y4 = match way {
                    "im2col" => {
                        let col = xc.as_tensor().apply_op1(Im2Col(g)).unwrap();
                        let y = wc
                            .as_tensor()
                            .apply_op2(&col, WeightMatmul(LayerKernel::dense()))
                            .unwrap();
                        y.reshape((co, b, ho, wo)).unwrap()
                    }
                    _ => {
                        let kernel = LayerKernel::dense();
                        if sparse {
                            let packed = Packed::Shuffled(
                                coarsen_kernels::ShuffledBlocks::pack(&mask, &wv, 4).unwrap(),
                            );
                            kernel.set_sparse(Some(SparseWeight::new(&packed).unwrap()));
                        }
                        wc.as_tensor()
                            .apply_op2(
                                xc.as_tensor(),
                                Conv2d {
                                    geometry: g,
                                    kernel,
                                    relu: false,
                                },
                            )
                            .unwrap()
                    }
                };
                assert_eq!(y4.dims(), &[co, b, ho, wo], "{way}");
                let want = yr.permute((1, 0, 2, 3)).unwrap().flat();
                close(&y4.flat(), &want, 1e-5);
                let gs = half_square_grads(&y4);
                let dw = gs.get(wc.as_tensor()).unwrap().flat();
                let dw_want: Vec<f32> = gr
                    .get(wr.as_tensor())
                    .unwrap()
                    .flat()
                    .iter()
                    .zip(mask.as_bytes())
                    .map(|(&v, &m)| if m != 0 || !sparse { v } else { 0.0 })
                    .collect();
                close(&dw, &dw_want, 1e-4);
                let dx = gs
                    .get(xc.as_tensor())
                    .unwrap()
                    .permute((1, 0, 2, 3))
                    .unwrap();
                let dx = dx.flat();
                close(&dx, &gr.get(xr.as_tensor()).unwrap().flat(), 1e-4);
            }
        }
    }

    /// Fused ReLU (in the convolution) and 2×2 max pooling equal candle's relu and max_pool2d,
    /// forward and backward.
    #[test]
    fn fused_relu_and_maxpool_match_candle() {
        let (b, ci, h, w, co) = (3, 2, 6, 8, 4);
        let g = ConvGeometry {
            k: 3,
            stride: 1,
            pad: 1,
        };
        let xn = vals(b * ci * h * w, 5);
        let wn = vals(co * ci * 9, 6);
        let xr = Var::from_vec(xn.clone(), (b, ci, h, w), &Device::Cpu).unwrap();
        let wr = Var::from_vec(wn.clone(), (co, ci, 3, 3), &Device::Cpu).unwrap();
        // Pooling as a max over reshaped windows: candle 0.11's own max_pool2d backward scales
        // the gradient by (maxima in the window)/4, a quarter for a unique maximum.
        let yr = xr
            .conv2d(&wr, 1, 1, 1, 1)
            .unwrap()
            .relu()
            .unwrap()
            .reshape((b, co, h / 2, 2, w / 2, 2))
            .unwrap()
            .max(5)
            .unwrap()
            .max(3)
            .unwrap();
        let gr = yr.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let xc = Var::from_tensor(
            &xr.as_tensor()
                .permute((1, 0, 2, 3))
                .unwrap()
                .contiguous()
                .unwrap(),
        )
        .unwrap();
        let wc = Var::from_vec(wn, (co, ci, 3, 3), &Device::Cpu).unwrap();
        let conv = Conv2d {
            geometry: g,
            kernel: LayerKernel::dense(),
            relu: true,
        };
        let y = wc
            .as_tensor()
            .apply_op2(xc.as_tensor(), conv)
            .unwrap()
            .apply_op1(MaxPool2)
            .unwrap();
        let want = yr.permute((1, 0, 2, 3)).unwrap().flat();
        close(&y.flat(), &want, 1e-5);
        let gs = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        close(
            &gs.get(wc.as_tensor()).unwrap().flat(),
            &gr.get(wr.as_tensor()).unwrap().flat(),
            1e-4,
        );
        let dx = gs
            .get(xc.as_tensor())
            .unwrap()
            .permute((1, 0, 2, 3))
            .unwrap();
        close(&dx.flat(), &gr.get(xr.as_tensor()).unwrap().flat(), 1e-4);
    }

    /// A sparse plan gives the same output and gradients as the dense product of the masked
    /// weight (the weight gradient restricted to the pattern).
    #[test]
    fn sparse_plan_matches_masked_dense() {
        let (r, c, n) = (16, 24, 10);
        let mask = coarsen_core::Mask::from_fn(r, c, |i, j| (i / 8 + j / 8) % 2 == 0);
        let wv = vals(r * c, 3);
        let masked: Vec<f32> = wv
            .iter()
            .zip(mask.as_bytes())
            .map(|(&w, &m)| if m != 0 { w } else { 0.0 })
            .collect();
        let packed =
            Packed::Shuffled(coarsen_kernels::ShuffledBlocks::pack(&mask, &masked, 8).unwrap());
        let kernel = LayerKernel::dense();
        kernel.set_sparse(Some(SparseWeight::new(&packed).unwrap()));
        let x = Var::from_vec(vals(c * n, 4), (c, n), &Device::Cpu).unwrap();
        let w = Var::from_vec(wv.clone(), (r, c), &Device::Cpu).unwrap();
        let y = w
            .as_tensor()
            .apply_op2(x.as_tensor(), WeightMatmul(kernel))
            .unwrap();
        let wd = Var::from_vec(masked.clone(), (r, c), &Device::Cpu).unwrap();
        let yd = wd.as_tensor().matmul(x.as_tensor()).unwrap();
        close(&y.flat(), &yd.flat(), 1e-5);
        let g = y.sum_all().unwrap().backward().unwrap();
        let gd = yd.sum_all().unwrap().backward().unwrap();
        let dw = g.get(w.as_tensor()).unwrap().flat();
        let dwd: Vec<f32> = gd
            .get(wd.as_tensor())
            .unwrap()
            .flat()
            .iter()
            .zip(mask.as_bytes())
            .map(|(&g, &m)| if m != 0 { g } else { 0.0 })
            .collect();
        close(&dw, &dwd, 1e-5);
        close(
            &g.get(x.as_tensor()).unwrap().flat(),
            &gd.get(x.as_tensor()).unwrap().flat(),
            1e-5,
        );
    }

    /// With `estimate` set, convolutions and linear layers record `‖dY_i‖` and `‖U_j‖` (U the
    /// im2col matrix, computed here by its definition), dense and sparse, and those bound the
    /// weight gradient entry by entry (Cauchy–Schwarz).
    #[test]
    fn estimate_norms_match_their_definition_and_bound_the_gradient() {
        // ‖row‖₂ of every row of n values.
        let by_rows = |v: &[f32], n: usize| -> Vec<f32> {
            v.chunks(n)
                .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
                .collect()
        };
        let (b, ci, h, w, co) = (3, 4, 7, 6, 8);
        for (k, stride, pad) in [(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 2, 0)] {
            for sparse in [false, true] {
                let g = ConvGeometry { k, stride, pad };
                let cols = ci * k * k;
                let mask = coarsen_core::Mask::from_fn(co, cols, |i, _| (i / 4) % 2 == 0);
                let wv: Vec<f32> = vals(co * cols, 7)
                    .iter()
                    .zip(mask.as_bytes())
                    .map(|(&v, &m)| if m != 0 || !sparse { v } else { 0.0 })
                    .collect();
                let xv = vals(ci * b * h * w, 8);
                let x = Var::from_vec(xv.clone(), (ci, b, h, w), &Device::Cpu).unwrap();
                let wt = Var::from_vec(wv.clone(), (co, ci, k, k), &Device::Cpu).unwrap();
                let kernel = LayerKernel::dense();
                if sparse {
                    let packed = Packed::Shuffled(
                        coarsen_kernels::ShuffledBlocks::pack(&mask, &wv, 4).unwrap(),
                    );
                    kernel.set_sparse(Some(SparseWeight::new(&packed).unwrap()));
                }
                kernel
                    .dense_grad
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                kernel
                    .estimate
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let y = wt
                    .as_tensor()
                    .apply_op2(
                        x.as_tensor(),
                        Conv2d {
                            geometry: g,
                            kernel: kernel.clone(),
                            relu: false,
                        },
                    )
                    .unwrap();
                // 0.5·Σy²: dY = Y.
                let grads = half_square_grads(&y);
                let norms = kernel.take_norms().expect("norms recorded");
                assert!(kernel.take_norms().is_none(), "taken once");
                let yv = y.flat();
                let n = yv.len() / co;
                let want_out = by_rows(&yv, n);
                close(&norms.output, &want_out, 1e-5);
                let (ho, wo) = (g.out(h), g.out(w));
                let mut want_in = vec![0.0f32; cols];
                for c in 0..ci {
                    for ky in 0..k {
                        for kx in 0..k {
                            let mut acc = 0.0f32;
                            for im in 0..b {
                                for oy in 0..ho {
                                    for ox in 0..wo {
                                        let iy = (oy * stride + ky) as isize - pad as isize;
                                        let ix = (ox * stride + kx) as isize - pad as isize;
                                        if iy >= 0
                                            && ix >= 0
                                            && (iy as usize) < h
                                            && (ix as usize) < w
                                        {
                                            let v = xv[((c * b + im) * h + iy as usize) * w
                                                + ix as usize];
                                            acc += v * v;
                                        }
                                    }
                                }
                            }
                            want_in[(c * k + ky) * k + kx] = acc.sqrt();
                        }
                    }
                }
                close(&norms.input, &want_in, 1e-5);
                let dw = grads.get(wt.as_tensor()).unwrap().flat();
                for i in 0..co {
                    for j in 0..cols {
                        let bound = norms.output[i] * norms.input[j];
                        assert!(dw[i * cols + j].abs() <= bound * (1.0 + 1e-4) + 1e-6);
                    }
                }
            }
        }
        // A linear layer: rows of dY and of X.
        let (r, c, n) = (6, 5, 4);
        let kernel = LayerKernel::dense();
        kernel
            .estimate
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let xv = vals(c * n, 9);
        let x = Var::from_vec(xv.clone(), (c, n), &Device::Cpu).unwrap();
        let wt = Var::from_vec(vals(r * c, 10), (r, c), &Device::Cpu).unwrap();
        let y = wt
            .as_tensor()
            .apply_op2(x.as_tensor(), WeightMatmul(kernel.clone()))
            .unwrap();
        y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let norms = kernel.take_norms().expect("norms recorded");
        let yv = y.flat();
        // d(Σy²)/dy = 2y.
        let want_out: Vec<f32> = (0..r)
            .map(|i| {
                2.0 * yv[i * n..(i + 1) * n]
                    .iter()
                    .map(|v| v * v)
                    .sum::<f32>()
                    .sqrt()
            })
            .collect();
        let want_in = by_rows(&xv, n);
        close(&norms.output, &want_out, 1e-5);
        close(&norms.input, &want_in, 1e-5);
    }

    /// The fused batch norm equals the same formula written with candle's own operations, forward
    /// and backward.
    #[test]
    fn batchnorm_matches_composed_ops() {
        let (c, m) = (3, 40);
        for relu in [false, true] {
            let xv = vals(c * m, 5);
            let x = Var::from_vec(xv.clone(), (c, m), &Device::Cpu).unwrap();
            let g = Var::from_vec(vec![1.5f32, 0.5, -1.0], c, &Device::Cpu).unwrap();
            let b = Var::from_vec(vec![0.1f32, -0.2, 0.3], c, &Device::Cpu).unwrap();
            let op = BatchNorm {
                eps: 1e-5,
                stats: Default::default(),
                relu,
            };
            let y = x
                .as_tensor()
                .apply_op3(g.as_tensor(), b.as_tensor(), op.clone())
                .unwrap();
            let weights = Tensor::from_vec(vals(c * m, 6), (c, m), &Device::Cpu).unwrap();
            let gr = (y.clone() * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            // Composed.
            let x2 = Var::from_vec(xv, (c, m), &Device::Cpu).unwrap();
            let g2 = Var::from_vec(vec![1.5f32, 0.5, -1.0], c, &Device::Cpu).unwrap();
            let mean = x2.as_tensor().mean_keepdim(1).unwrap();
            let xc = x2.as_tensor().broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(1).unwrap();
            let xhat = xc
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap();
            let mut y2 = xhat
                .broadcast_mul(&g2.as_tensor().reshape((c, 1)).unwrap())
                .unwrap()
                .broadcast_add(&b.as_tensor().reshape((c, 1)).unwrap())
                .unwrap();
            if relu {
                y2 = y2.relu().unwrap();
            }
            close(&y.flat(), &y2.flat(), 1e-5);
            let gr2 = (y2 * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            close(
                &gr.get(x.as_tensor()).unwrap().flat(),
                &gr2.get(x2.as_tensor()).unwrap().flat(),
                1e-4,
            );
            close(
                &gr.get(g.as_tensor()).unwrap().flat(),
                &gr2.get(g2.as_tensor()).unwrap().flat(),
                1e-4,
            );
            let st = op.stats.lock().unwrap();
            assert_eq!(st.mean.len(), c);
        }
    }
}
