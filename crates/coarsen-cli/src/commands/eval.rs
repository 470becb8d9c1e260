//! `coarsen eval`: accuracy, per-layer density and pattern of a trained network.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use coarsen_train::data;
use coarsen_train::export;
use coarsen_train::infer::{layer_formats, LayerFormat};
use coarsen_train::methods::{self, Experiment, LayerResult, RunResults};
use coarsen_train::model::Model;
use coarsen_train::optim::apply_masks;
use coarsen_train::train::{accuracy, load_masks, load_tensors};
use serde::Serialize;

use crate::args::EvalArgs;
use crate::commands::{shape_text, write_json};
use crate::progress;

/// What `--json` writes.
#[derive(Serialize)]
struct EvalReport {
    checkpoint: PathBuf,
    model: String,
    dataset: String,
    test_accuracy: f64,
    val_accuracy: f64,
    sparsity: f64,
    layers: Vec<LayerResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sparse: Option<SparseEval>,
}

/// The run directory's experiment and the directory holding `weights.safetensors` and
/// `masks.safetensors`; for an export directory, the experiment it records and the directory.
pub fn locate(checkpoint: &Path) -> Result<(Experiment, PathBuf)> {
    if !checkpoint.is_dir() {
        bail!(
            "{}: not a directory (give a run, stage-N, checkpoint or export directory)",
            checkpoint.display()
        );
    }
    if export::is_export(checkpoint) {
        let m = export::read_manifest(checkpoint)?;
        let exp = m.experiment.unwrap_or_else(|| Experiment {
            model: m.model.name.clone(),
            width: m.model.width,
            ..Experiment::default()
        });
        return Ok((exp, checkpoint.to_path_buf()));
    }
    let run_dir = [checkpoint.to_path_buf(), checkpoint.join("..")]
        .into_iter()
        .find(|d| d.join("experiment.json").exists())
        .with_context(|| {
            format!(
                "{}: no experiment.json here or in the parent directory, and no model.json; is this a `coarsen train` or `coarsen export` output?",
                checkpoint.display()
            )
        })?;
    let exp_path = run_dir.join("experiment.json");
    let exp: Experiment = serde_json::from_slice(
        &std::fs::read(&exp_path).with_context(|| format!("reading {}", exp_path.display()))?,
    )
    .with_context(|| format!("reading {}", exp_path.display()))?;
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
        bail!(
            "{}: no weights.safetensors, results.json or checkpoint/ inside",
            checkpoint.display()
        );
    };
    Ok((exp, weights_dir))
}

/// A trained network loaded back from a `coarsen train` or `coarsen export` output.
pub struct Loaded {
    /// The directory of the weights and masks (or of the export).
    pub dir: PathBuf,
    /// The experiment that trained it (defaults where an export does not record one).
    pub experiment: Experiment,
    /// The network, masks applied.
    pub model: Model,
    /// The masks.
    pub masks: coarsen_train::optim::Masks,
    /// The masks' coarsen metadata.
    pub meta: Option<coarsen_core::CoarsenMetadata>,
    /// Every conv and linear weight's packed format.
    pub formats: BTreeMap<String, LayerFormat>,
}

/// Loads the network of a run, stage, checkpoint or export directory. `data` gives the input
/// shape and classes of a run's network; an export records its own and must agree with it.
pub fn load_network(checkpoint: &Path, data: Option<&data::DataSplits>) -> Result<Loaded> {
    let (exp, dir) = locate(checkpoint)?;
    if export::is_export(checkpoint) {
        let e = export::load(checkpoint)?;
        if let Some(d) = data {
            let want = exp.model_spec(d);
            let have = &e.manifest.model;
            if (want.input, want.classes) != (have.input, have.classes) {
                bail!(
                    "{}: the exported {} takes {:?} images and {} classes; {} has {:?} and {}",
                    checkpoint.display(),
                    have.name,
                    have.input,
                    have.classes,
                    d.source.display(),
                    want.input,
                    want.classes
                );
            }
        }
        return Ok(Loaded {
            dir,
            experiment: exp,
            model: e.model,
            masks: e.masks,
            meta: e.manifest.coarsen,
            formats: e.formats,
        });
    }
    let Some(data) = data else {
        bail!(
            "{}: a training run's network needs its data set for its input shape",
            checkpoint.display()
        );
    };
    let model = Model::new(&exp.model_spec(data), exp.seed)?;
    let wpath = dir.join("weights.safetensors");
    let weights = load_tensors(&wpath)?;
    model.load_state(&|n| weights.get(n).cloned(), &wpath)?;
    let mpath = dir.join("masks.safetensors");
    let (masks, meta) = if mpath.exists() {
        let file = coarsen_core::MaskFile::read(&mpath)?;
        (load_masks(&mpath)?, file.metadata)
    } else {
        (Default::default(), None)
    };
    apply_masks(&model, &masks)?;
    let formats = layer_formats(&model, &masks, meta.as_ref())?;
    Ok(Loaded {
        dir,
        experiment: exp,
        model,
        masks,
        meta,
        formats,
    })
}

/// Packed against dense inference of one network.
#[derive(Serialize)]
pub struct SparseEval {
    /// Test accuracy on the packed path.
    pub packed_test_accuracy: f64,
    /// Images per timed pass.
    pub batch: usize,
    /// Median milliseconds of the dense path.
    pub dense_ms: f64,
    /// Median milliseconds of the packed path.
    pub packed_ms: f64,
    /// `1 − packed_ms / dense_ms`.
    pub time_saving: f64,
    /// `1 − packed multiply-adds / dense multiply-adds`.
    pub ideal_time_saving: f64,
    /// Per layer: format, matrix multiplied, values stored.
    pub layers: Vec<coarsen_train::infer::LayerInfo>,
}

/// Runs `net` packed and dense: packed test accuracy, and latency of both at `batch`
/// (test images, interleaved, median of `reps`).
pub fn sparse_eval(
    l: &Loaded,
    data: &data::DataSplits,
    batch: usize,
    reps: usize,
) -> Result<SparseEval> {
    use coarsen_train::infer::{InferenceNet, Path as InferPath};
    let packed = InferenceNet::with_formats(&l.model, &l.masks, &l.formats, InferPath::Packed)?;
    let dense = InferenceNet::with_formats(&l.model, &l.masks, &l.formats, InferPath::Dense)?;
    let acc = packed.accuracy(&data.test, 1000)?;
    let n = batch.clamp(1, data.test.n.max(1));
    let idx: Vec<usize> = (0..n).map(|i| i % data.test.n.max(1)).collect();
    let b = coarsen_train::data::make_batch(&data.test, &idx, None, (0, 0, 0));
    let t = coarsen_train::infer::time_paths(&packed, &dense, &b.pixels, b.size, reps)?;
    Ok(SparseEval {
        packed_test_accuracy: acc,
        batch: b.size,
        dense_ms: t.dense_ms,
        packed_ms: t.packed_ms,
        time_saving: t.time_saving,
        ideal_time_saving: t.ideal_time_saving,
        layers: packed.layers().to_vec(),
    })
}

/// Runs `coarsen eval`.
pub fn run(a: &EvalArgs, quiet: bool) -> Result<()> {
    let (exp, _) = locate(&a.checkpoint)?;
    let data_dir = a.data.clone().unwrap_or_else(|| exp.data.clone());
    let sp = progress::spinner("evaluating", quiet);
    sp.set_message(format!("loading {}", data_dir.display()));
    let data = data::load(&data_dir, exp.recipe.val_split)?;
    let loaded = load_network(&a.checkpoint, Some(&data))?;
    let (model, masks, meta, dir) = (&loaded.model, &loaded.masks, &loaded.meta, &loaded.dir);
    sp.set_message("test set");
    let test = accuracy(model, &data.test, a.batch)?;
    sp.set_message("validation set");
    let val = accuracy(model, &data.val, a.batch)?;
    let sparse = if a.sparse {
        sp.set_message("packed inference: accuracy and latency against the dense path");
        Some(sparse_eval(&loaded, &data, a.batch, a.reps)?)
    } else {
        None
    };
    sp.finish_and_clear();
    let layers = methods::describe_layers(model, masks, meta.as_ref())?;
    let (kept, all) = layers.iter().fold((0.0, 0.0), |(k, n), l| {
        let len = l.shape.iter().product::<usize>() as f64;
        (k + l.density * len, n + len)
    });
    let sparsity = if all > 0.0 { 1.0 - kept / all } else { 0.0 };
    println!(
        "{} ({} on {}): test accuracy {:.2}%, validation accuracy {:.2}%, sparsity {:.2}% of conv and linear weights",
        dir.display(),
        exp.model,
        data.name,
        100.0 * test,
        100.0 * val,
        100.0 * sparsity
    );
    println!("{:<28} {:>18} {:>9}  pattern", "layer", "shape", "density");
    for l in &layers {
        let shape = shape_text(&l.shape);
        println!(
            "{:<28} {:>18} {:>9.4}  {}{}",
            l.name,
            shape,
            l.density,
            l.pattern,
            l.reason
                .as_ref()
                .map_or(String::new(), |r| format!(" ({r})"))
        );
    }
    if let Some(s) = &sparse {
        println!(
            "packed inference: test accuracy {:.2}%; batch {}: dense {:.2} ms, packed {:.2} ms, time saving {:.1}% (ideal {:.1}%)",
            100.0 * s.packed_test_accuracy,
            s.batch,
            s.dense_ms,
            s.packed_ms,
            100.0 * s.time_saving,
            100.0 * s.ideal_time_saving
        );
        for l in &s.layers {
            println!(
                "  {:<28} {:<15} {:>6}×{:<6} {:>9} values",
                l.name, l.format, l.matrix[0], l.matrix[1], l.stored
            );
        }
    }
    if let Some(p) = &a.json {
        write_json(
            p,
            &EvalReport {
                checkpoint: dir.clone(),
                model: exp.model.clone(),
                dataset: data.name.clone(),
                test_accuracy: test,
                val_accuracy: val,
                sparsity,
                layers,
                sparse,
            },
        )?;
    }
    Ok(())
}
