//! coarsen's errors as Python exceptions: a refused input is a `CoarsenError` (a `ValueError`)
//! whose message names the file, tensor and shapes; a failed read or write is an `OSError`
//! (`FileNotFoundError` for a missing file).

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::PyErr;

pyo3::create_exception!(
    coarsen,
    CoarsenError,
    PyValueError,
    "An input coarsen refuses, or an operation that failed on it. A ValueError; the message names the tensor, the file and the shapes."
);

fn io(kind: std::io::ErrorKind, message: String) -> PyErr {
    if kind == std::io::ErrorKind::NotFound {
        PyFileNotFoundError::new_err(message)
    } else {
        PyOSError::new_err(message)
    }
}

/// A coarsen-core error.
pub fn core(e: coarsen_core::Error) -> PyErr {
    match &e {
        coarsen_core::Error::Io { cause, .. } => io(cause.kind(), e.to_string()),
        _ => CoarsenError::new_err(e.to_string()),
    }
}

/// A coarsen-kernels error.
pub fn kernel(e: coarsen_kernels::KernelError) -> PyErr {
    CoarsenError::new_err(e.to_string())
}

/// A coarsen-infer error.
pub fn infer(e: coarsen_infer::InferError) -> PyErr {
    match &e {
        coarsen_infer::InferError::Io { cause, .. } => io(cause.kind(), e.to_string()),
        _ => CoarsenError::new_err(e.to_string()),
    }
}

/// A refused argument.
pub fn bad(message: impl Into<String>) -> PyErr {
    CoarsenError::new_err(message.into())
}
