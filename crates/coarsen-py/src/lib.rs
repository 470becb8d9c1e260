//! # coarsen-py
//!
//! The extension module `coarsen._coarsen` of the Python package `coarsen` (built by maturin
//! from `pyproject.toml`): coarsen's masks, conversions, packed kernels and inference engine on
//! NumPy arrays. The package's Python layer (`python/coarsen/`) gives the public API, its
//! docstrings and type stubs; this module does the work, releasing the GIL while it runs.

mod arrays;
mod errors;
mod kernels;
mod masks;
mod model;

use pyo3::prelude::*;

/// coarsen's native module; use it through the `coarsen` package.
#[pymodule]
fn _coarsen(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The engine's worker threads (rayon's global pool), pinned one per CPU as the command
    // line's `--pin` does: `COARSEN_PIN=auto|on|off`, default auto. Where the pool exists
    // already (a second import), it stays as it is.
    let pin = match std::env::var("COARSEN_PIN") {
        Ok(v) => v
            .parse::<coarsen_kernels::threads::Pinning>()
            .map_err(|e| errors::CoarsenError::new_err(format!("COARSEN_PIN: {e}")))?,
        Err(_) => coarsen_kernels::threads::Pinning::Auto,
    };
    let _ = coarsen_kernels::threads::global(pin);
    m.add("CoarsenError", m.py().get_type::<errors::CoarsenError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(masks::prune, m)?)?;
    m.add_function(wrap_pyfunction!(masks::convert, m)?)?;
    m.add_function(wrap_pyfunction!(masks::check, m)?)?;
    m.add_function(wrap_pyfunction!(masks::read_masks, m)?)?;
    m.add_function(wrap_pyfunction!(masks::write_masks, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::pack, m)?)?;
    m.add_class::<kernels::PackedMatrix>()?;
    m.add_function(wrap_pyfunction!(model::load, m)?)?;
    m.add_class::<model::Model>()?;
    Ok(())
}
