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
use coarsen_kernels::gemm::matmul;
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
        let &[c, b, h, w] = l.dims() else {
            return Err(kerr(format!(
                "im2col needs [C, B, H, W], got {:?}",
                l.dims()
            )));
        };
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
}

/// How a layer multiplies: dense GEMM or a structured-sparse plan.
pub struct LayerKernel {
    sparse: Mutex<Option<SparseWeight>>,
    /// Return the dense weight gradient (not only on the pattern), for growth steps of dynamic
    /// sparse training.
    pub dense_grad: std::sync::atomic::AtomicBool,
}

impl LayerKernel {
    /// A dense kernel.
    pub fn dense() -> Arc<Self> {
        Arc::new(LayerKernel {
            sparse: Mutex::new(None),
            dense_grad: std::sync::atomic::AtomicBool::new(false),
        })
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
                for (v, &i) in s.values.iter_mut().zip(&s.index) {
                    *v = if i == NO_WEIGHT { 0.0 } else { w[i as usize] };
                }
                s.plan.update_values(&s.values).map_err(kerr)?;
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
                                for (&g, &i) in dv.iter().zip(&s.index) {
                                    if i != NO_WEIGHT {
                                        dw[i as usize] = g;
                                    }
                                }
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

/// Batch statistics of the last training forward of a [`BatchNorm`] op.
#[derive(Clone, Debug, Default)]
pub struct BatchStats {
    /// Per-channel mean.
    pub mean: Vec<f32>,
    /// Per-channel biased variance.
    pub var: Vec<f32>,
}

/// Training-mode batch normalisation over a channel-major tensor `[C, ...]`:
/// `y = γ·(x − μ)/√(σ² + ε) + β` with the batch's per-channel μ and σ².
#[derive(Clone, Debug)]
pub struct BatchNorm {
    /// ε.
    pub eps: f32,
    /// The batch statistics of the forward pass (read to update running averages).
    pub stats: Arc<Mutex<BatchStats>>,
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
                let mean = xi.iter().map(|&v| v as f64).sum::<f64>() / m as f64;
                let var = xi.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / m as f64;
                let inv = 1.0 / (var as f32 + self.eps).sqrt();
                let (scale, shift) = (g[ch] * inv, b[ch] - g[ch] * inv * mean as f32);
                for (o, &v) in yo.iter_mut().zip(xi) {
                    *o = v * scale + shift;
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
        _res: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dims()[0];
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
                            let (mut sdy, mut sdyx) = (0.0f64, 0.0f64);
                            for (&d, &v) in dyi.iter().zip(xi) {
                                sdy += d as f64;
                                sdyx += d as f64 * ((v - mean) * inv) as f64;
                            }
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

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Convolution through im2col + weight-matmul equals candle's own conv2d (NCHW), forward and
    /// backward. (Odd sizes: candle's conv2d backward mis-sizes stride-2 gradients of even inputs.)
    #[test]
    fn conv_matches_candle_forward_and_backward() {
        let (b, ci, h, w, co) = (3, 4, 7, 5, 5);
        for (k, stride, pad) in [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (5, 1, 2)] {
            let g = ConvGeometry { k, stride, pad };
            let xn = vals(b * ci * h * w, 1);
            let wn = vals(co * ci * k * k, 2);
            // candle reference on NCHW.
            let xr = Var::from_vec(xn.clone(), (b, ci, h, w), &Device::Cpu).unwrap();
            let wr = Var::from_vec(wn.clone(), (co, ci, k, k), &Device::Cpu).unwrap();
            let yr = xr.conv2d(&wr, pad, stride, 1, 1).unwrap();
            let lr = (yr.sqr().unwrap().sum_all().unwrap())
                .affine(0.5, 0.0)
                .unwrap();
            let gr = lr.backward().unwrap();
            // coarsen: channel-major.
            let xc = Var::from_tensor(
                &xr.as_tensor()
                    .permute((1, 0, 2, 3))
                    .unwrap()
                    .contiguous()
                    .unwrap(),
            )
            .unwrap();
            let wc = Var::from_vec(wn.clone(), (co, ci, k, k), &Device::Cpu).unwrap();
            let col = xc.as_tensor().apply_op1(Im2Col(g)).unwrap();
            let y = wc
                .as_tensor()
                .apply_op2(&col, WeightMatmul(LayerKernel::dense()))
                .unwrap();
            let (ho, wo) = (g.out(h), g.out(w));
            let y4 = y.reshape((co, b, ho, wo)).unwrap();
            let want = yr
                .permute((1, 0, 2, 3))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            close(
                &y4.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                &want,
                1e-5,
            );
            let l = (y4.sqr().unwrap().sum_all().unwrap())
                .affine(0.5, 0.0)
                .unwrap();
            let gs = l.backward().unwrap();
            let dw = gs
                .get(wc.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            close(
                &dw,
                &gr.get(wr.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                1e-4,
            );
            let dx = gs
                .get(xc.as_tensor())
                .unwrap()
                .permute((1, 0, 2, 3))
                .unwrap();
            let dx = dx.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            close(
                &dx,
                &gr.get(xr.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                1e-4,
            );
        }
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
        close(
            &y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &yd.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            1e-5,
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        let gd = yd.sum_all().unwrap().backward().unwrap();
        let dw = g
            .get(w.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let dwd: Vec<f32> = gd
            .get(wd.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(mask.as_bytes())
            .map(|(&g, &m)| if m != 0 { g } else { 0.0 })
            .collect();
        close(&dw, &dwd, 1e-5);
        close(
            &g.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            &gd.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            1e-5,
        );
    }

    /// The fused batch norm equals the same formula written with candle's own operations, forward
    /// and backward.
    #[test]
    fn batchnorm_matches_composed_ops() {
        let (c, m) = (3, 40);
        let xv = vals(c * m, 5);
        let x = Var::from_vec(xv.clone(), (c, m), &Device::Cpu).unwrap();
        let g = Var::from_vec(vec![1.5f32, 0.5, -1.0], c, &Device::Cpu).unwrap();
        let b = Var::from_vec(vec![0.1f32, -0.2, 0.3], c, &Device::Cpu).unwrap();
        let op = BatchNorm {
            eps: 1e-5,
            stats: Default::default(),
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
        let mean = x2.as_tensor().mean_keepdim(1).unwrap();
        let xc = x2.as_tensor().broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(1).unwrap();
        let xhat = xc
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
        let y2 = xhat
            .broadcast_mul(&g.as_tensor().reshape((c, 1)).unwrap())
            .unwrap()
            .broadcast_add(&b.as_tensor().reshape((c, 1)).unwrap())
            .unwrap();
        close(
            &y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &y2.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            1e-5,
        );
        let gr2 = (y2 * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(
            &gr.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            &gr2.get(x2.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            1e-4,
        );
        let st = op.stats.lock().unwrap();
        assert_eq!(st.mean.len(), c);
    }
}
