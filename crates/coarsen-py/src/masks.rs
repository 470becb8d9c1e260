//! Masks and conversions: `prune`, `convert`, `check`, `read_masks`, `write_masks`: the same
//! algorithms, options, defaults and refusals as `coarsen prune`, `coarsen convert` and the
//! mask files the CLI reads and writes.

use coarsen_core::patterns::{
    check as check_pattern, parse_block, parse_parts, ChannelCriterion, Fallback, PartCount,
    Partitioner, PatternOptions,
};
use coarsen_core::prune::prune_file;
use coarsen_core::{
    CoarsenMetadata, ConvertInputs, DensityTarget, Granularity, Mask, MaskFile, MatrixView,
    Pattern, Scope, Selector,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use crate::arrays::{mask_bytes, mask_file, masks_out, weight_file, Named};
use crate::errors::{bad, core};

/// Magnitude pruning of the selected layers of `weights` to `sparsity` (see `coarsen prune`).
#[pyfunction]
#[pyo3(signature = (weights, sparsity, scope, mask, include, exclude, granularity="weight"))]
#[allow(clippy::too_many_arguments)]
pub fn prune<'py>(
    py: Python<'py>,
    weights: Named<'py>,
    sparsity: f64,
    scope: &str,
    mask: Option<Named<'py>>,
    include: Option<String>,
    exclude: Option<String>,
    granularity: &str,
) -> PyResult<Named<'py>> {
    let scope = match scope {
        "global" => Scope::Global,
        "layer" => Scope::Layer,
        s => return Err(bad(format!("scope='{s}': expected 'global' or 'layer'"))),
    };
    let granularity = match granularity {
        "weight" => Granularity::Weight,
        "kernel" => Granularity::Kernel,
        s => {
            return Err(bad(format!(
                "granularity='{s}': expected 'weight' or 'kernel'"
            )))
        }
    };
    let weights = weight_file("weights", &weights)?;
    let previous = mask.map(|m| mask_file("mask", &m)).transpose()?;
    let sel = Selector::new(include.as_deref(), exclude.as_deref()).map_err(core)?;
    let masks = py
        .detach(|| {
            prune_file(
                &weights,
                previous.as_ref(),
                &sel,
                sparsity,
                scope,
                granularity,
            )
            .map(|(m, _)| m)
        })
        .map_err(core)?;
    masks_out(py, masks)
}

/// What `convert` gives Python: the masks, their metadata (JSON), the report (JSON) and its
/// table.
type Converted<'py> = (Named<'py>, Option<String>, String, String);

/// Converts the selected layers of `masks` into pattern `to` (see `coarsen convert`).
#[pyfunction]
#[pyo3(signature = (weights, masks, to, options, seed, include, exclude, scores, target_density=None, target_scope="layer"))]
#[allow(clippy::too_many_arguments)]
pub fn convert<'py>(
    py: Python<'py>,
    weights: Option<Named<'py>>,
    masks: Named<'py>,
    to: &str,
    options: &Bound<'py, PyDict>,
    seed: u64,
    include: Option<String>,
    exclude: Option<String>,
    scores: Option<Named<'py>>,
    target_density: Option<f64>,
    target_scope: &str,
) -> PyResult<Converted<'py>> {
    let options = pattern_options(options, scores.is_some())?;
    let target = target_density
        .map(|density| -> PyResult<DensityTarget> {
            let scope = coarsen_core::target::parse_scope(target_scope).map_err(|_| {
                bad(format!(
                    "target_scope='{target_scope}': expected 'layer' or 'global'"
                ))
            })?;
            let t = DensityTarget { density, scope };
            t.validate().map_err(core)?;
            Ok(t)
        })
        .transpose()?;
    let pattern = Pattern::from_options(to, &options).map_err(core)?;
    let masks = mask_file("masks", &masks)?;
    let weights = weights.map(|w| weight_file("weights", &w)).transpose()?;
    let scores = scores.map(|s| weight_file("scores", &s)).transpose()?;
    let sel = Selector::new(include.as_deref(), exclude.as_deref()).map_err(core)?;
    let conv = py
        .detach(|| {
            let inputs = ConvertInputs {
                masks: &masks,
                weights: weights.as_ref(),
                scores: scores.as_ref(),
                selector: &sel,
                target,
            };
            coarsen_core::convert(&inputs, &pattern, seed, &|_| {})
        })
        .map_err(core)?;
    let meta = metadata_json(conv.masks.metadata.as_ref(), "metadata")?;
    let report = serde_json::to_string(&conv.report).map_err(|e| bad(format!("report: {e}")))?;
    let table = conv.report.table();
    Ok((masks_out(py, conv.masks)?, meta, report, table))
}

/// Checks one mask against a pattern; raises `CoarsenError` naming the first violation.
#[pyfunction]
#[pyo3(signature = (mask, pattern, options, params, parts, col_perm, name))]
pub fn check(
    mask: &Bound<'_, PyAny>,
    pattern: &str,
    options: &Bound<'_, PyDict>,
    params: Option<&str>,
    parts: Option<usize>,
    col_perm: Option<Vec<usize>>,
    name: &str,
) -> PyResult<()> {
    let pattern = match params {
        Some(json) => {
            let value: serde_json::Value =
                serde_json::from_str(json).map_err(|e| bad(format!("params: {e}")))?;
            Pattern::from_metadata(pattern, &value).map_err(core)?
        }
        None => Pattern::from_options(pattern, &pattern_options(options, false)?).map_err(core)?,
    };
    let label = format!("'{}'", name.escape_debug());
    let (shape, data) = mask_bytes(&label, mask)?;
    let view = MatrixView::of(&shape).ok_or_else(|| {
        bad(format!(
            "{label} {shape:?}: a mask of a layer has rank 2 (linear) or more (conv)"
        ))
    })?;
    let m = Mask::from_bytes(view.rows, view.cols, data).map_err(core)?;
    let parts = parts.unwrap_or_else(|| pattern.max_row_patterns(view.rows));
    check_pattern(&pattern, &m, view, parts, col_perm.as_deref())
        .map_err(|v| bad(format!("{label} {shape:?} is not {}: {v}", pattern.name())))
}

/// A mask file: `(name, uint8 array)` pairs and the coarsen metadata (JSON), if any.
#[pyfunction]
pub fn read_masks(
    py: Python<'_>,
    path: std::path::PathBuf,
) -> PyResult<(Named<'_>, Option<String>)> {
    let file = py.detach(|| MaskFile::read(&path)).map_err(core)?;
    let meta = metadata_json(
        file.metadata.as_ref(),
        &format!("{}: metadata", path.display()),
    )?;
    Ok((masks_out(py, file)?, meta))
}

/// Writes a mask file (U8 tensors, coarsen metadata), atomically.
#[pyfunction]
#[pyo3(signature = (path, masks, metadata))]
pub fn write_masks(
    py: Python<'_>,
    path: std::path::PathBuf,
    masks: Named<'_>,
    metadata: Option<&str>,
) -> PyResult<()> {
    let mut file = mask_file("masks", &masks)?;
    file.metadata = metadata
        .map(serde_json::from_str::<CoarsenMetadata>)
        .transpose()
        .map_err(|e| bad(format!("masks.metadata: not coarsen metadata: {e}")))?;
    py.detach(|| file.write(&path)).map_err(core)
}

/// A mask file's coarsen metadata as JSON for the Python layer; `what` names it in an error.
fn metadata_json(meta: Option<&CoarsenMetadata>, what: &str) -> PyResult<Option<String>> {
    meta.map(serde_json::to_string)
        .transpose()
        .map_err(|e| bad(format!("{what}: {e}")))
}

/// The pattern options of a keyword dict; an unknown keyword is a `TypeError`, `None` is unset.
pub fn pattern_options(d: &Bound<'_, PyDict>, scores: bool) -> PyResult<PatternOptions> {
    let mut o = PatternOptions {
        scores,
        ..Default::default()
    };
    for (k, v) in d.iter() {
        let key: String = k.extract()?;
        if v.is_none() {
            continue;
        }
        match key.as_str() {
            "criterion" => {
                o.criterion = Some(match string(&key, &v)?.as_str() {
                    "l1" => ChannelCriterion::L1,
                    "count" => ChannelCriterion::Count,
                    s => {
                        return Err(bad(format!(
                            "criterion='{s}': expected 'l1' or 'count' (give scores= for scores)"
                        )))
                    }
                })
            }
            "extra" => o.extra = Some(float(&key, &v)?),
            "parts" => {
                o.parts = Some(if v.is_instance_of::<PyString>() {
                    parse_parts(&string(&key, &v)?).map_err(core)?
                } else {
                    PartCount::Fixed(count(&key, &v)?)
                })
            }
            "imbalance" => o.imbalance = Some(float(&key, &v)?),
            "min_rows" => o.min_rows = Some(count(&key, &v)?),
            "row_tile" => o.row_tile = Some(count(&key, &v)?),
            "width_ratio" => o.width_ratio = Some(float(&key, &v)?),
            "partitioner" => {
                o.partitioner = Some(match string(&key, &v)?.as_str() {
                    "metis" => Partitioner::Metis,
                    "random" => Partitioner::Random,
                    "kahypar" => Partitioner::Kahypar,
                    s => {
                        return Err(bad(format!(
                            "partitioner='{s}': expected 'metis', 'random' or 'kahypar'"
                        )))
                    }
                })
            }
            "fallback" => {
                o.fallback = Some(match string(&key, &v)?.as_str() {
                    "keep" => Fallback::Keep,
                    "dense" => Fallback::Dense,
                    s => return Err(bad(format!("fallback='{s}': expected 'keep' or 'dense'"))),
                })
            }
            "legacy_regroup" => o.legacy_regroup = flag(&key, &v)?,
            "block" => o.block = Some(block(&v)?),
            "blocks" => o.blocks = Some(count(&key, &v)?),
            "similarity" => o.similarity = Some(float(&key, &v)?),
            "n" => o.n = Some(count(&key, &v)?),
            "m" => o.m = Some(count(&key, &v)?),
            "permute" => o.permute = flag(&key, &v)?,
            "fill" => o.fill = flag(&key, &v)?,
            "escape_attempts" => o.escape_attempts = Some(count(&key, &v)?),
            "permute_window" => o.permute_window = Some(count(&key, &v)?),
            "kernels" => o.kernels = flag(&key, &v)?,
            _ => {
                // scores= is an argument of its own, not an option.
                return Err(PyTypeError::new_err(format!(
                    "unexpected option '{key}'; the options are {}",
                    PatternOptions::listing(&["scores"])
                )));
            }
        }
    }
    Ok(o)
}

fn string(key: &str, v: &Bound<'_, PyAny>) -> PyResult<String> {
    v.extract::<String>()
        .map_err(|_| bad(format!("{key}={}: expected a string", repr(v))))
}

fn float(key: &str, v: &Bound<'_, PyAny>) -> PyResult<f64> {
    match v.extract::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        Ok(_) => Err(bad(format!("{key}={}: must be finite", repr(v)))),
        Err(_) => Err(bad(format!("{key}={}: expected a number", repr(v)))),
    }
}

fn count(key: &str, v: &Bound<'_, PyAny>) -> PyResult<usize> {
    match v.extract::<i64>() {
        Ok(x) => usize::try_from(x).map_err(|_| bad(format!("{key}={x}: must be ≥ 0"))),
        Err(_) => Err(bad(format!("{key}={}: expected an integer", repr(v)))),
    }
}

fn flag(key: &str, v: &Bound<'_, PyAny>) -> PyResult<bool> {
    v.extract::<bool>()
        .map_err(|_| bad(format!("{key}={}: expected True or False", repr(v))))
}

/// `16`, `"16x8"` or `(16, 8)`.
fn block(v: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
    if let Ok(t) = v.cast::<PyTuple>() {
        if t.len() == 2 {
            let (h, w) = (
                count("block", &t.get_item(0)?)?,
                count("block", &t.get_item(1)?)?,
            );
            if h == 0 || w == 0 {
                return Err(bad(format!("block=({h}, {w}): sizes must be at least 1")));
            }
            return Ok((h, w));
        }
        return Err(bad(format!(
            "block={}: expected b, 'HxW' or (H, W)",
            repr(v)
        )));
    }
    if v.is_instance_of::<PyString>() {
        return parse_block(&string("block", v)?).map_err(core);
    }
    let b = count("block", v)?;
    if b == 0 {
        return Err(bad("block=0: sizes must be at least 1"));
    }
    Ok((b, b))
}

fn repr(v: &Bound<'_, PyAny>) -> String {
    v.repr().map_or_else(|_| "?".into(), |r| r.to_string())
}
