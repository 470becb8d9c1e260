//! `load` and `Model`: an export directory (`coarsen export`) on coarsen's inference engine.

use std::path::PathBuf;

use coarsen_infer::export::Preprocessing;
use coarsen_infer::{argmax_rows, export, nchw_to_cbhw, InferenceNet, Path as InferPath};
use numpy::PyUntypedArrayMethods;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{c_slice, f32_array, f32_out, f32_values};
use crate::errors::{bad, infer};

/// A network exported by `coarsen export`, run by coarsen's inference engine.
#[pyclass(module = "coarsen", name = "Model", frozen)]
pub struct Model {
    net: InferenceNet,
    dir: PathBuf,
    preprocessing: Option<Preprocessing>,
    labels: Option<Vec<String>>,
    sparsity: f64,
}

/// Loads an export directory; `dense` runs every layer dense (the baseline) instead of packed.
#[pyfunction]
#[pyo3(signature = (path, dense))]
pub fn load(py: Python<'_>, path: PathBuf, dense: bool) -> PyResult<Model> {
    let e = py.detach(|| export::load(&path)).map_err(infer)?;
    let which = if dense {
        InferPath::Dense
    } else {
        InferPath::Packed
    };
    let net = py
        .detach(|| InferenceNet::new(&e.network, &e.formats, which))
        .map_err(infer)?;
    Ok(Model {
        net,
        dir: path,
        preprocessing: e.manifest.preprocessing,
        labels: e.manifest.labels,
        sparsity: e.manifest.sparsity,
    })
}

impl Model {
    /// The batch as channel-major values for the engine, normalised when asked.
    fn input(&self, x: &Bound<'_, PyAny>, normalize: bool) -> PyResult<(Vec<f32>, usize)> {
        let [c, h, w] = self.net.input();
        let a = f32_array("batch", x)?;
        let shape = a.shape().to_vec();
        let batch = match shape.as_slice() {
            [b, cc, hh, ww] if (*cc, *hh, *ww) == (c, h, w) => *b,
            [cc, hh, ww] if (*cc, *hh, *ww) == (c, h, w) => 1,
            _ => {
                return Err(bad(format!(
                    "batch has shape {shape:?}; this network takes (batch, {c}, {h}, {w}) or ({c}, {h}, {w})"
                )))
            }
        };
        let owned;
        let values: &[f32] = match c_slice(&a) {
            Some(s) => s,
            None => {
                owned = f32_values(&a);
                &owned
            }
        };
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(bad(format!(
                "batch {shape:?}: value {v} at flat index {i} is not finite"
            )));
        }
        let mut cbhw = nchw_to_cbhw(values, batch, [c, h, w]);
        if normalize {
            let p = self.preprocessing.as_ref().ok_or_else(|| {
                bad(format!(
                    "normalize=True: {} records no preprocessing; normalise the batch yourself",
                    self.dir.display()
                ))
            })?;
            p.apply_cbhw(&mut cbhw);
        }
        Ok((cbhw, batch))
    }
}

impl Model {
    /// The logits of a batch (row-major, `batch × classes`) and the batch size, the GIL
    /// released while the network runs.
    fn logits(
        &self,
        py: Python<'_>,
        batch: &Bound<'_, PyAny>,
        normalize: bool,
    ) -> PyResult<(Vec<f32>, usize)> {
        let (x, b) = self.input(batch, normalize)?;
        let logits = py.detach(|| self.net.forward(&x, b)).map_err(infer)?;
        Ok((logits, b))
    }
}

#[pymethods]
impl Model {
    /// Logits of a batch `(batch, C, H, W)` (or one image `(C, H, W)`): `(batch, classes)`.
    /// With `normalize=True` the batch holds pixels in [0, 1] and the export's mean and
    /// standard deviation are applied first.
    #[pyo3(signature = (batch, normalize=false))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        batch: &Bound<'py, PyAny>,
        normalize: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (logits, b) = self.logits(py, batch, normalize)?;
        f32_out(py, logits, &[b, self.net.classes()])
    }

    /// The predicted class of each image of the batch: `(batch,)` int64.
    #[pyo3(signature = (batch, normalize=false))]
    fn predict<'py>(
        &self,
        py: Python<'py>,
        batch: &Bound<'py, PyAny>,
        normalize: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let classes = self.net.classes();
        let (logits, _) = self.logits(py, batch, normalize)?;
        let top: Vec<i64> = argmax_rows(&logits, classes)
            .into_iter()
            .map(i64::from)
            .collect();
        Ok(numpy::PyArray1::from_vec(py, top).into_any())
    }

    /// Each conv and linear layer's format, by weight name, in the order the network runs them.
    #[getter]
    fn formats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for l in self.net.layers() {
            d.set_item(&l.name, &l.format)?;
        }
        Ok(d)
    }

    /// Per-layer details: name, weight shape, format, matrix shape, stored values and
    /// multiply–adds per image.
    #[getter]
    fn layers<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.net
            .layers()
            .iter()
            .map(|l| {
                let d = PyDict::new(py);
                d.set_item("name", &l.name)?;
                d.set_item("shape", l.shape.clone())?;
                d.set_item("format", &l.format)?;
                d.set_item("matrix", (l.matrix[0], l.matrix[1]))?;
                d.set_item("stored", l.stored)?;
                d.set_item("macs_per_image", l.macs_per_image)?;
                Ok(d)
            })
            .collect()
    }

    /// `(C, H, W)` of one input image.
    #[getter]
    fn input_shape(&self) -> (usize, usize, usize) {
        let [c, h, w] = self.net.input();
        (c, h, w)
    }

    /// Number of classes.
    #[getter]
    fn classes(&self) -> usize {
        self.net.classes()
    }

    /// Class names, when the export records them.
    #[getter]
    fn labels(&self) -> Option<Vec<String>> {
        self.labels.clone()
    }

    /// The export's per-channel `(mean, std)` of pixels in [0, 1], when it records them.
    #[getter]
    fn preprocessing(&self) -> Option<(Vec<f32>, Vec<f32>)> {
        self.preprocessing
            .as_ref()
            .map(|p| (p.mean.clone(), p.std.clone()))
    }

    /// Sparsity of the prunable layers, as the export records it.
    #[getter]
    fn sparsity(&self) -> f64 {
        self.sparsity
    }

    /// Multiply–adds per image on this path.
    #[getter]
    fn macs_per_image(&self) -> usize {
        self.net.macs_per_image()
    }

    fn __repr__(&self) -> String {
        let [c, h, w] = self.net.input();
        format!(
            "Model('{}', input=({c}, {h}, {w}), classes={}, layers={})",
            self.dir.display(),
            self.net.classes(),
            self.net.layers().len()
        )
    }
}
