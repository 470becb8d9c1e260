//! `pack` and `PackedMatrix`: a weight matrix packed in one of coarsen's formats, multiplied
//! with NumPy arrays on coarsen's kernels, the GIL released while they run.

use std::time::Instant;

use coarsen_core::{Mask, MatrixView};
use coarsen_infer::{detect_format, LayerFormat};
use coarsen_kernels::{Packed, Plan};
use numpy::{
    PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::arrays::{c_slice, f32_array, f32_out, f32_values, mask_bytes};
use crate::errors::{bad, kernel};

/// The formats `pack` takes besides `auto`.
const FORMATS: &str = "auto, dense, channel, group, shuffled-block, bsr, nm, csr";

/// A weight matrix packed in one of coarsen's formats and planned for this CPU.
#[pyclass(module = "coarsen", name = "PackedMatrix", frozen)]
pub struct PackedMatrix {
    plan: Plan,
    /// Rows kept by a channel-compact plan (its `Y` has only those rows).
    kept_rows: Option<Vec<u32>>,
    /// The channel plan's compact `Y` (or `dY`), kept between calls; a call that finds it
    /// taken (another thread's) allocates its own.
    scratch: std::sync::Mutex<Vec<f32>>,
    view: MatrixView,
    shape: Vec<usize>,
    nnz: usize,
    nbytes: usize,
}

/// Packs `weight` (2-D, or a conv weight in PyTorch's `[Cout, Cin, kh, kw]`) under `mask`.
#[pyfunction]
#[pyo3(signature = (weight, mask, format, block, n, m, col_perm))]
#[allow(clippy::too_many_arguments)]
pub fn pack(
    py: Python<'_>,
    weight: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    format: &str,
    block: Option<(usize, usize)>,
    n: Option<usize>,
    m: Option<usize>,
    col_perm: Option<Vec<usize>>,
) -> PyResult<PackedMatrix> {
    let w = f32_array("weight", weight)?;
    let shape = w.shape().to_vec();
    let view = MatrixView::of(&shape).ok_or_else(|| {
        bad(format!(
            "weight {shape:?}: a layer's weight has rank 2 (linear) or more (conv)"
        ))
    })?;
    let values = f32_values(&w);
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(bad(format!(
            "weight {shape:?}: value {v} at flat index {i} is not finite"
        )));
    }
    let bytes = match mask {
        Some(obj) => {
            let (mshape, bytes) = mask_bytes("mask", obj)?;
            if mshape != shape {
                return Err(bad(format!(
                    "mask {mshape:?} does not match weight {shape:?}"
                )));
            }
            bytes
        }
        None => values.iter().map(|&v| u8::from(v != 0.0)).collect(),
    };
    let mask = Mask::from_bytes(view.rows, view.cols, bytes).map_err(crate::errors::core)?;
    let given = |name: &str, set: bool, fits: bool| -> PyResult<()> {
        if set && !fits {
            return Err(bad(format!("{name}= does not apply to format='{format}'")));
        }
        Ok(())
    };
    given(
        "block",
        block.is_some(),
        matches!(format, "shuffled-block" | "bsr" | "block"),
    )?;
    given("n", n.is_some(), format == "nm")?;
    given("m", m.is_some(), format == "nm")?;
    given("col_perm", col_perm.is_some(), format == "nm")?;
    let format = match format {
        "auto" => detect_format(&mask),
        "dense" => LayerFormat::Dense,
        "channel" => LayerFormat::Channel,
        "group" => LayerFormat::Group,
        "csr" => LayerFormat::Csr,
        "shuffled-block" => {
            let (h, w) = block.unwrap_or((16, 16));
            if h != w {
                return Err(bad(format!(
                    "block=({h}, {w}): shuffled blocks are square; give one size b"
                )));
            }
            LayerFormat::ShuffledBlock { block: h }
        }
        "bsr" | "block" => {
            let (height, width) = block.unwrap_or((16, 16));
            LayerFormat::Bsr { height, width }
        }
        "nm" => LayerFormat::Nm {
            n: n.unwrap_or(2),
            m: m.unwrap_or(4),
            col_perm,
        },
        other => return Err(bad(format!("format='{other}': expected one of {FORMATS}"))),
    };
    py.detach(|| pack_plan(&mask, &values, view, &format))
        .map(|(plan, kept_rows, nbytes)| PackedMatrix {
            plan,
            kept_rows,
            scratch: std::sync::Mutex::new(Vec::new()),
            view,
            shape,
            nnz: mask.nnz(),
            nbytes,
        })
}

/// Packs and plans; gives the plan, a channel plan's kept rows and the packed bytes.
fn pack_plan(
    mask: &Mask,
    values: &[f32],
    view: MatrixView,
    format: &LayerFormat,
) -> PyResult<(Plan, Option<Vec<u32>>, usize)> {
    let packed = format.pack(mask, values, view).map_err(kernel)?;
    let kept_rows = match &packed {
        Packed::Channel(c) => Some(c.kept_rows().to_vec()),
        _ => None,
    };
    let nbytes = packed.nbytes();
    let plan = Plan::new(&packed).map_err(kernel)?;
    Ok((plan, kept_rows, nbytes))
}

/// An input operand: its values (borrowed when it is a C-contiguous float32 array) and its
/// column count.
enum Operand<'py> {
    Borrowed(PyReadonlyArrayDyn<'py, f32>),
    Owned(Vec<f32>),
}

impl Operand<'_> {
    fn as_slice(&self) -> &[f32] {
        match self {
            Operand::Borrowed(a) => c_slice(a).unwrap_or(&[]),
            Operand::Owned(v) => v,
        }
    }
}

/// `x` as `rows × n` float32: returns the values and `n`; `x` is `(rows,)` or `(rows, n)`.
fn operand<'py>(
    what: &str,
    x: &Bound<'py, PyAny>,
    rows: usize,
) -> PyResult<(Operand<'py>, usize, bool)> {
    let a = f32_array(what, x)?;
    let shape = a.shape().to_vec();
    let (n, vector) = match shape.as_slice() {
        [r] if *r == rows => (1, true),
        [r, n] if *r == rows => (*n, false),
        _ => {
            return Err(bad(format!(
                "{what} has shape {shape:?}; expected ({rows},) or ({rows}, n)"
            )))
        }
    };
    let op = if c_slice(&a).is_some() {
        Operand::Borrowed(a)
    } else {
        Operand::Owned(a.as_array().iter().copied().collect())
    };
    // Operands are not scanned for NaN: they come from the caller's memory, not a file, and
    // NaN propagates through the product as in NumPy (a scan would cost a pass over `x`).
    Ok((op, n, vector))
}

impl PackedMatrix {
    /// `Y = W·X` into `y` (`rows × n`), the GIL released.
    fn forward_into(&self, py: Python<'_>, x: &[f32], y: &mut [f32], n: usize) -> PyResult<()> {
        py.detach(|| match &self.kept_rows {
            None => self.plan.forward(x, y, n).map_err(kernel),
            Some(kept) => self.with_scratch(kept.len() * n, |compact| {
                self.plan.forward(x, compact, n).map_err(kernel)?;
                // Each row of Y written once: a kept row copied, a removed one zeroed.
                let mut next = kept.iter().enumerate().peekable();
                for (r, row) in y.chunks_exact_mut(n.max(1)).enumerate() {
                    match next.peek() {
                        Some(&(k, &kr)) if kr as usize == r => {
                            row.copy_from_slice(&compact[k * n..(k + 1) * n]);
                            next.next();
                        }
                        _ => row.fill(0.0),
                    }
                }
                Ok(())
            }),
        })
    }

    /// `dX = Wᵀ·dY` into `dx` (`cols × n`), the GIL released.
    fn backward_into(&self, py: Python<'_>, dy: &[f32], dx: &mut [f32], n: usize) -> PyResult<()> {
        py.detach(|| match &self.kept_rows {
            None => self.plan.backward_input(dy, dx, n).map_err(kernel),
            Some(kept) => self.with_scratch(kept.len() * n, |compact| {
                for (k, &r) in kept.iter().enumerate() {
                    let r = r as usize;
                    compact[k * n..(k + 1) * n].copy_from_slice(&dy[r * n..(r + 1) * n]);
                }
                self.plan.backward_input(compact, dx, n).map_err(kernel)
            }),
        })
    }

    /// Runs `f` on a buffer of `len` floats: the kept scratch when it is free, else a new one.
    fn with_scratch<T>(&self, len: usize, f: impl FnOnce(&mut [f32]) -> T) -> T {
        match self.scratch.try_lock() {
            Ok(mut buf) => {
                if buf.len() != len {
                    buf.clear();
                    buf.resize(len, 0.0);
                }
                f(&mut buf)
            }
            Err(_) => f(&mut vec![0.0f32; len]),
        }
    }

    fn out_shape(rows: usize, n: usize, vector: bool) -> Vec<usize> {
        if vector {
            vec![rows]
        } else {
            vec![rows, n]
        }
    }
}

/// The result of shape `shape`, computed by `run` into `out` when given (checked: a
/// C-contiguous float32 array of that shape; no allocation) or into a new array.
fn result<'py>(
    py: Python<'py>,
    out: Option<&Bound<'py, PyAny>>,
    shape: &[usize],
    run: impl FnOnce(&mut [f32]) -> PyResult<()>,
) -> PyResult<Bound<'py, PyAny>> {
    let Some(out) = out else {
        let mut y = vec![0.0f32; shape.iter().product()];
        run(&mut y)?;
        return f32_out(py, y, shape);
    };
    let arr = out
        .cast::<PyArrayDyn<f32>>()
        .map_err(|_| bad("out: expected a C-contiguous float32 array".to_string()))?;
    if arr.shape() != shape {
        return Err(bad(format!(
            "out has shape {:?}; the result has shape {shape:?}",
            arr.shape()
        )));
    }
    let mut rw: PyReadwriteArrayDyn<'py, f32> =
        arr.try_readwrite().map_err(|e| bad(format!("out: {e}")))?;
    let y = rw
        .as_slice_mut()
        .map_err(|_| bad("out: expected a C-contiguous float32 array".to_string()))?;
    run(y)?;
    Ok(out.clone())
}

#[pymethods]
impl PackedMatrix {
    /// `W @ x` for `x` of shape `(cols,)` or `(cols, n)` (float32; a C-contiguous array is
    /// read in place). With `out`, the result is written there (no allocation). With
    /// `compact=True` a channel-format matrix gives only its kept rows (`kept_rows`), as its
    /// kernel computes them, without the zero rows of the removed channels.
    #[pyo3(signature = (x, out=None, compact=false))]
    fn matmul<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
        compact: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (x, n, vector) = operand("x", x, self.view.cols)?;
        let xs = x.as_slice();
        if compact {
            let shape = Self::out_shape(self.plan.out_dim(), n, vector);
            return result(py, out, &shape, |y| {
                py.detach(|| self.plan.forward(xs, y, n)).map_err(kernel)
            });
        }
        let shape = Self::out_shape(self.view.rows, n, vector);
        result(py, out, &shape, |y| self.forward_into(py, xs, y, n))
    }

    /// `Wᵀ @ dy` for `dy` of shape `(rows,)` or `(rows, n)`: the input gradient of a layer.
    #[pyo3(signature = (dy, out=None))]
    fn t_matmul<'py>(
        &self,
        py: Python<'py>,
        dy: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (dy, n, vector) = operand("dy", dy, self.view.rows)?;
        let shape = Self::out_shape(self.view.cols, n, vector);
        result(py, out, &shape, |dx| {
            self.backward_into(py, dy.as_slice(), dx, n)
        })
    }

    /// The rows a channel-format matrix keeps (ascending; `matmul(x, compact=True)` gives
    /// these rows); `None` for the other formats.
    #[getter]
    fn kept_rows(&self) -> Option<Vec<u32>> {
        self.kept_rows.clone()
    }

    /// The format: `dense`, `channel`, `group`, `shuffled-block`, `bsr`, `nm` or `csr`.
    #[getter]
    fn format(&self) -> &'static str {
        self.plan.format()
    }

    /// `(rows, cols)` of the matrix (a conv weight `[Cout, Cin, kh, kw]` is `Cout × Cin·kh·kw`).
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.view.rows, self.view.cols)
    }

    /// The shape of the weight it was packed from.
    #[getter]
    fn weight_shape(&self) -> Vec<usize> {
        self.shape.clone()
    }

    /// Kept entries (ones of the mask).
    #[getter]
    fn nnz(&self) -> usize {
        self.nnz
    }

    /// Kept fraction of the matrix.
    #[getter]
    fn density(&self) -> f64 {
        self.nnz as f64 / self.view.len().max(1) as f64
    }

    /// Bytes of the packed format (values and indices).
    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }

    /// The instruction set the kernels run with (`avx512`, `avx2`, `neon`, `scalar`).
    #[getter]
    fn isa(&self) -> &'static str {
        self.plan.isa().as_str()
    }

    fn __repr__(&self) -> String {
        format!(
            "PackedMatrix(format='{}', shape={:?}, density={:.4}, nbytes={})",
            self.plan.format(),
            (self.view.rows, self.view.cols),
            self.density(),
            self.nbytes
        )
    }

    /// Times `reps` calls of the same product in Rust (`Plan::forward` into one preallocated
    /// output, the GIL released), for measuring the Python call's overhead; seconds per call.
    fn _time_forward(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        reps: usize,
    ) -> PyResult<Vec<f64>> {
        let (x, n, _) = operand("x", x, self.view.cols)?;
        let xs = x.as_slice();
        py.detach(|| {
            let mut y = vec![0.0f32; self.plan.out_dim() * n];
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    self.plan.forward(xs, &mut y, n).map_err(kernel)?;
                    Ok(t.elapsed().as_secs_f64())
                })
                .collect()
        })
    }
}
