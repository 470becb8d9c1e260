//! Exports of trained networks: coarsen-infer's export format, filled with what training knows
//! (the experiment, the data set's normalisation and class names), and version-1 exports read
//! through the architecture table of [`Model`].

use std::path::{Path, PathBuf};

use coarsen_infer::export::{self as infer_export, ExportInfo, Exported, Preprocessing};
use coarsen_infer::InferError;

use crate::data::DataSplits;
use crate::error::{Result, TrainError};
use crate::methods::Experiment;
use crate::model::{Model, ModelSpec};

pub use coarsen_infer::export::{is_export, Manifest, MANIFEST_FILE, TENSORS_FILE};

/// The class names of the data sets coarsen knows.
pub fn class_names(dataset: &str) -> Option<Vec<String>> {
    let names: &[&str] = match dataset {
        "fashion-mnist" => &[
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ],
        "cifar10" => &[
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ],
        _ => return None,
    };
    Some(names.iter().map(|s| s.to_string()).collect())
}

/// What `model.json` records of a network trained by `exp` on `data`, read from `source`.
pub fn info(
    exp: &Experiment,
    spec: &ModelSpec,
    data: &DataSplits,
    source: Option<PathBuf>,
) -> Result<ExportInfo> {
    let experiment = serde_json::to_value(exp)
        .map_err(|e| TrainError::config("experiment", &exp.method, e.to_string()))?;
    Ok(ExportInfo {
        model: Some(spec.info()),
        labels: class_names(&data.name).filter(|l| l.len() == spec.classes),
        preprocessing: Some(Preprocessing {
            mean: data.mean.clone(),
            std: data.std.clone(),
        }),
        experiment: Some(experiment),
        source,
    })
}

/// The graph of a version-1 export's architecture, from [`Model`]'s table.
fn v1_graph(
    dir: &Path,
    m: &infer_export::ModelInfo,
) -> coarsen_infer::Result<coarsen_infer::Graph> {
    Model::new(&ModelSpec::from_info(m), 0)
        .map(|model| model.graph())
        .map_err(|e| InferError::file(dir.join(MANIFEST_FILE), e.to_string()))
}

/// Reads `model.json` of either version, as version 2 (a version-1 file names one of coarsen's
/// architectures, whose graph [`Model`] builds).
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    Ok(infer_export::read_manifest_with(dir, &|m| {
        v1_graph(dir, m)
    })?)
}

/// Loads an export directory of either version.
pub fn load(dir: &Path) -> Result<Exported> {
    load_manifest(dir, read_manifest(dir)?)
}

/// Loads the tensors of an export directory whose `model.json` was read already.
pub fn load_manifest(dir: &Path, manifest: Manifest) -> Result<Exported> {
    Ok(infer_export::load_tensors(dir, manifest)?)
}

/// The experiment an export records, when it records one coarsen-train can read.
pub fn experiment(manifest: &Manifest) -> Option<Experiment> {
    manifest
        .experiment
        .as_ref()
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}
