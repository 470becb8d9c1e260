//! The directories coarsen writes and reads back: a `coarsen train` run (`experiment.json`,
//! `stage-{s}/`, `checkpoint/`, `results.json`), one of its stage or checkpoint directories,
//! or a `coarsen export` directory. `coarsen eval`, `export`, `predict` and the demo load
//! networks through [`load`].

use std::path::{Path, PathBuf};

use coarsen_core::{CoarsenMetadata, MaskSet};
use coarsen_infer::{layer_formats, Formats, Network};

use crate::data::DataSplits;
use crate::error::{Result, TrainError};
use crate::export::{self, Manifest};
use crate::methods::{Experiment, RunResults};
use crate::model::Model;
use crate::optim::apply_masks;
use crate::train::{check_masks, load_tensors};

/// The file of a run that records its experiment.
pub const EXPERIMENT_FILE: &str = "experiment.json";

/// A trained network loaded back from a `coarsen train` or `coarsen export` output.
#[derive(Debug)]
pub struct Loaded {
    /// The directory of the weights and masks (or of the export).
    pub dir: PathBuf,
    /// The experiment that trained it (defaults where an export does not record one).
    pub experiment: Experiment,
    /// The network: graph, tensors, masks.
    pub network: Network,
    /// Every conv and linear weight's packed format.
    pub formats: Formats,
    /// The masks' coarsen metadata.
    pub meta: Option<CoarsenMetadata>,
    /// `model.json`, when loaded from an export.
    pub manifest: Option<Manifest>,
}

fn not_found(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The experiment of a run, stage, checkpoint or export directory, and the directory holding
/// its `weights.safetensors` and `masks.safetensors` (for an export: the directory itself).
pub fn locate(checkpoint: &Path) -> Result<(Experiment, PathBuf)> {
    if !checkpoint.is_dir() {
        return Err(not_found(
            checkpoint,
            "not a directory (give a run, stage-N, checkpoint or export directory)",
        ));
    }
    if export::is_export(checkpoint) {
        let m = match coarsen_infer::export::read_manifest(checkpoint)? {
            coarsen_infer::export::AnyManifest::V2(m) => (
                export::experiment(&m),
                m.model.as_ref().map(|i| (i.name.clone(), i.width)),
            ),
            coarsen_infer::export::AnyManifest::V1(m) => (
                m.experiment
                    .as_ref()
                    .and_then(|v| serde_json::from_value(v.clone()).ok()),
                Some((m.model.name.clone(), m.model.width)),
            ),
        };
        let exp = m.0.unwrap_or_else(|| {
            let (model, width) = m.1.unwrap_or_else(|| ("graph".into(), 1.0));
            Experiment {
                model,
                width,
                ..Experiment::default()
            }
        });
        return Ok((exp, checkpoint.to_path_buf()));
    }
    let run_dir = [checkpoint.to_path_buf(), checkpoint.join("..")]
        .into_iter()
        .find(|d| d.join(EXPERIMENT_FILE).exists())
        .ok_or_else(|| {
            not_found(
                checkpoint,
                format!("no {EXPERIMENT_FILE} here or in the parent directory, and no model.json; is this a `coarsen train` or `coarsen export` output?"),
            )
        })?;
    let exp_path = run_dir.join(EXPERIMENT_FILE);
    let raw = std::fs::read(&exp_path).map_err(|e| TrainError::io(&exp_path, e))?;
    let exp: Experiment = serde_json::from_slice(&raw)
        .map_err(|e| not_found(&exp_path, format!("not a coarsen experiment: {e}")))?;
    let weights_dir = if checkpoint.join("weights.safetensors").exists() {
        checkpoint.to_path_buf()
    } else if checkpoint.join("results.json").exists() {
        checkpoint.join(RunResults::read(checkpoint)?.final_stage)
    } else if checkpoint
        .join("checkpoint")
        .join("weights.safetensors")
        .exists()
    {
        checkpoint.join("checkpoint")
    } else {
        return Err(not_found(
            checkpoint,
            "no weights.safetensors, results.json or checkpoint/ inside",
        ));
    };
    Ok((exp, weights_dir))
}

/// Loads the network of a run, stage, checkpoint or export directory. `data` gives the input
/// shape and classes of a run's network; an export records its own and must agree with it.
pub fn load(checkpoint: &Path, data: Option<&DataSplits>) -> Result<Loaded> {
    let (experiment, dir) = locate(checkpoint)?;
    if export::is_export(checkpoint) {
        let e = export::load(checkpoint)?;
        if let Some(d) = data {
            let have = (e.network.input(), e.network.classes());
            let want = ([d.test.channels, d.test.height, d.test.width], d.classes);
            if have != want {
                return Err(not_found(
                    checkpoint,
                    format!(
                        "the export takes {:?} images and {} classes; {} has {:?} and {}",
                        have.0,
                        have.1,
                        d.source.display(),
                        want.0,
                        want.1
                    ),
                ));
            }
        }
        return Ok(Loaded {
            dir,
            experiment,
            meta: e.manifest.coarsen.clone(),
            network: e.network,
            formats: e.formats,
            manifest: Some(e.manifest),
        });
    }
    let Some(data) = data else {
        return Err(not_found(
            checkpoint,
            "a training run's network needs its data set for its input shape",
        ));
    };
    let model = Model::new(&experiment.model_spec(data), experiment.seed)?;
    let wpath = dir.join("weights.safetensors");
    let weights = load_tensors(&wpath)?;
    model.load_state(&|n| weights.get(n).cloned(), &wpath)?;
    let mpath = dir.join("masks.safetensors");
    let (masks, meta) = if mpath.exists() {
        let (masks, meta) = MaskSet::read(&mpath)?;
        check_masks(&masks, &model, &mpath)?;
        (masks, meta)
    } else {
        (MaskSet::new(), None)
    };
    apply_masks(&model, &masks)?;
    let network = model.network(&masks)?;
    let formats = layer_formats(network.graph(), &masks, meta.as_ref())?;
    Ok(Loaded {
        dir,
        experiment,
        network,
        formats,
        meta,
        manifest: None,
    })
}
