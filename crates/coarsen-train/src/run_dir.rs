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
use crate::train::check_masks;

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

/// Where a network lives: what [`locate`] finds in a run, stage, checkpoint or export
/// directory, before anything large is read.
#[derive(Debug)]
pub struct Located {
    /// The directory given.
    pub checkpoint: PathBuf,
    /// The experiment that trained it (defaults where an export does not record one).
    pub experiment: Experiment,
    /// The directory of `weights.safetensors` and `masks.safetensors`, or the export.
    pub dir: PathBuf,
    /// `model.json`, when it is an export.
    pub manifest: Option<Manifest>,
}

/// Finds the experiment of a run, stage, checkpoint or export directory, and the directory
/// holding its `weights.safetensors` and `masks.safetensors` (for an export: the directory
/// itself, with its `model.json`).
pub fn locate(checkpoint: &Path) -> Result<Located> {
    if !checkpoint.is_dir() {
        return Err(not_found(
            checkpoint,
            "not a directory (give a run, stage-N, checkpoint or export directory)",
        ));
    }
    if export::is_export(checkpoint) {
        let manifest = export::read_manifest(checkpoint)?;
        let experiment = export::experiment(&manifest).unwrap_or_else(|| {
            let (model, width) = manifest
                .model
                .as_ref()
                .map_or_else(|| ("graph".into(), 1.0), |m| (m.name.clone(), m.width));
            Experiment {
                model,
                width,
                ..Experiment::default()
            }
        });
        return Ok(Located {
            checkpoint: checkpoint.to_path_buf(),
            experiment,
            dir: checkpoint.to_path_buf(),
            manifest: Some(manifest),
        });
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
    let experiment: Experiment = serde_json::from_slice(&raw)
        .map_err(|e| not_found(&exp_path, format!("not a coarsen experiment: {e}")))?;
    let dir = if checkpoint.join("weights.safetensors").exists() {
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
    Ok(Located {
        checkpoint: checkpoint.to_path_buf(),
        experiment,
        dir,
        manifest: None,
    })
}

/// Loads the network of a run, stage, checkpoint or export directory ([`locate`] then
/// [`Located::load`]).
pub fn load(checkpoint: &Path, data: Option<&DataSplits>) -> Result<Loaded> {
    locate(checkpoint)?.load(data)
}

impl Located {
    /// Whether it is an export directory.
    pub fn is_export(&self) -> bool {
        self.manifest.is_some()
    }

    /// Loads the network. `data` gives the input shape and classes of a run's network; an
    /// export records its own and must agree with it.
    pub fn load(self, data: Option<&DataSplits>) -> Result<Loaded> {
        let Located {
            checkpoint,
            experiment,
            dir,
            manifest,
        } = self;
        if let Some(manifest) = manifest {
            let e = export::load_manifest(&checkpoint, manifest)?;
            if let Some(d) = data {
                let have = (e.network.input(), e.network.classes());
                let want = ([d.test.channels, d.test.height, d.test.width], d.classes);
                if have != want {
                    return Err(not_found(
                        &checkpoint,
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
                &checkpoint,
                "a training run's network needs its data set for its input shape",
            ));
        };
        let model = Model::new(&experiment.model_spec(data), experiment.seed)?;
        crate::checksum::verify(&dir, &[])?;
        model.load_weights(&coarsen_core::WeightFile::read(
            dir.join("weights.safetensors"),
        )?)?;
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
}
