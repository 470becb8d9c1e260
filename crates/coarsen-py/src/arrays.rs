//! NumPy arrays in and out: weights as float32, masks as uint8 0/1, each checked where it
//! enters (shape, dtype, finiteness) and named in every message.

use coarsen_core::{MaskFile, MaskTensor, WeightFile, WeightTensor};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::{bad, core};

/// `(name, array)` pairs, as the Python layer passes a dict's items.
pub type Named<'py> = Vec<(String, Bound<'py, PyAny>)>;

/// The values of an array in row-major (C) order, borrowed when it is C-contiguous (a
/// Fortran-ordered array is contiguous too, but in the other order).
pub fn c_slice<'a, T: numpy::Element>(a: &'a PyReadonlyArrayDyn<'_, T>) -> Option<&'a [T]> {
    if a.is_c_contiguous() {
        a.as_slice().ok()
    } else {
        None
    }
}

/// The values of a float32 array in C order, copied.
pub fn f32_values(a: &PyReadonlyArrayDyn<'_, f32>) -> Vec<f32> {
    match c_slice(a) {
        Some(s) => s.to_vec(),
        None => a.as_array().iter().copied().collect(),
    }
}

/// A float32 array: the array itself when it is one (no copy), else `numpy.asarray(obj,
/// dtype=float32)` of a numeric array (one copy); anything else is refused naming `what`.
pub fn f32_array<'py>(
    what: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'py, f32>>() {
        return Ok(a);
    }
    let np = obj.py().import("numpy")?;
    let refuse = |dtype: String| bad(format!("{what}: expected an array of numbers, got {dtype}"));
    let arr = np
        .call_method1("asarray", (obj,))
        .map_err(|_| refuse(obj.get_type().to_string()))?;
    let dtype = arr.getattr("dtype")?;
    let kind: String = dtype.getattr("kind")?.extract()?;
    if !matches!(kind.as_str(), "b" | "i" | "u" | "f") {
        return Err(refuse(dtype.to_string()));
    }
    arr.call_method1("astype", ("float32",))?
        .extract::<PyReadonlyArrayDyn<'py, f32>>()
        .map_err(|_| refuse(dtype.to_string()))
}

/// A uint8 array, or a message naming `what`.
pub fn u8_array<'py>(what: &str, obj: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArrayDyn<'py, u8>> {
    obj.extract::<PyReadonlyArrayDyn<'py, u8>>().map_err(|_| {
        let dtype = obj
            .getattr("dtype")
            .map_or_else(|_| obj.get_type().to_string(), |d| d.to_string());
        bad(format!("{what}: expected a uint8 (0/1) array, got {dtype}"))
    })
}

/// One weight tensor, finite values checked.
pub fn weight_tensor(label: &str, name: &str, obj: &Bound<'_, PyAny>) -> PyResult<WeightTensor> {
    let a = f32_array(&format!("{label}['{}']", name.escape_debug()), obj)?;
    let t = WeightTensor::new(name, a.shape().to_vec(), f32_values(&a)).map_err(core)?;
    t.check_finite(std::path::Path::new(label)).map_err(core)?;
    Ok(t)
}

/// A weights set; `label` (`weights`, `scores`) stands for the file name in messages.
pub fn weight_file(label: &str, items: &Named<'_>) -> PyResult<WeightFile> {
    check_unique(label, items)?;
    let tensors = items
        .iter()
        .map(|(name, obj)| weight_tensor(label, name, obj))
        .collect::<PyResult<Vec<_>>>()?;
    Ok(WeightFile::from_tensors(label, tensors))
}

/// The 0/1 bytes of a mask array (any nonzero byte counts as 1, as in mask files).
pub fn mask_bytes(what: &str, obj: &Bound<'_, PyAny>) -> PyResult<(Vec<usize>, Vec<u8>)> {
    let a = u8_array(what, obj)?;
    let shape = a.shape().to_vec();
    let data = match c_slice(&a) {
        Some(s) => s.iter().map(|&b| u8::from(b != 0)).collect(),
        None => a.as_array().iter().map(|&b| u8::from(b != 0)).collect(),
    };
    Ok((shape, data))
}

/// A mask set; `label` (`masks`, `mask`) stands for the file name in messages.
pub fn mask_file(label: &str, items: &Named<'_>) -> PyResult<MaskFile> {
    check_unique(label, items)?;
    let tensors = items
        .iter()
        .map(|(name, obj)| {
            let (shape, data) = mask_bytes(&format!("{label}['{}']", name.escape_debug()), obj)?;
            Ok(MaskTensor {
                name: name.clone(),
                shape,
                data,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    Ok(MaskFile::new(label, tensors))
}

fn check_unique(label: &str, items: &Named<'_>) -> PyResult<()> {
    let mut names: Vec<&str> = items.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(bad(format!(
            "{label}: tensor '{}' is given twice",
            w[0].escape_debug()
        )));
    }
    Ok(())
}

/// A uint8 array of `shape` that takes over `data` (no copy).
pub fn u8_out<'py>(py: Python<'py>, data: Vec<u8>, shape: &[usize]) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, data)
        .reshape(shape.to_vec())?
        .into_any())
}

/// A float32 array of `shape` that takes over `data` (no copy).
pub fn f32_out<'py>(
    py: Python<'py>,
    data: Vec<f32>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, data)
        .reshape(shape.to_vec())?
        .into_any())
}

/// A mask file's tensors as `(name, uint8 array)` pairs, in the file's order; the arrays take
/// over the file's bytes.
pub fn masks_out(py: Python<'_>, file: MaskFile) -> PyResult<Named<'_>> {
    file.into_tensors()
        .into_iter()
        .map(|t| Ok((t.name, u8_out(py, t.data, &t.shape)?)))
        .collect()
}
