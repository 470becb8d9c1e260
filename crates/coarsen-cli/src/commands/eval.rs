//! `coarsen eval`: accuracy, per-layer density and pattern of a trained network.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use coarsen_train::data;
use coarsen_train::methods::{self, Experiment, LayerResult, RunResults};
use coarsen_train::model::Model;
use coarsen_train::optim::apply_masks;
use coarsen_train::train::{accuracy, load_masks, load_tensors};
use serde::Serialize;

use crate::args::EvalArgs;
use crate::commands::write_json;
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
}

/// The run directory's experiment and the directory holding `weights.safetensors` and
/// `masks.safetensors`.
pub fn locate(checkpoint: &Path) -> Result<(Experiment, PathBuf)> {
    if !checkpoint.is_dir() {
        bail!(
            "{}: not a directory (give a run, stage-N or checkpoint directory)",
            checkpoint.display()
        );
    }
    let run_dir = [checkpoint.to_path_buf(), checkpoint.join("..")]
        .into_iter()
        .find(|d| d.join("experiment.json").exists())
        .with_context(|| {
            format!(
                "{}: no experiment.json here or in the parent directory; is this a `coarsen train` output?",
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
        let p = checkpoint.join("results.json");
        let r: RunResults = serde_json::from_slice(
            &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("reading {}", p.display()))?;
        checkpoint.join(r.final_stage)
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

/// Runs `coarsen eval`.
pub fn run(a: &EvalArgs, quiet: bool) -> Result<()> {
    let (exp, dir) = locate(&a.checkpoint)?;
    let data_dir = a.data.clone().unwrap_or_else(|| exp.data.clone());
    let sp = progress::spinner("evaluating", quiet);
    sp.set_message(format!("loading {}", data_dir.display()));
    let data = data::load(&data_dir, exp.recipe.val_split)?;
    let model = Model::new(&exp.model_spec(&data), exp.seed)?;
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
    sp.set_message("test set");
    let test = accuracy(&model, &data.test, a.batch)?;
    sp.set_message("validation set");
    let val = accuracy(&model, &data.val, a.batch)?;
    sp.finish_and_clear();
    let layers = methods::describe_layers(&model, &masks, meta.as_ref())?;
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
        let shape = l
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("×");
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
    if let Some(p) = &a.json {
        write_json(
            p,
            &EvalReport {
                checkpoint: dir,
                model: exp.model.clone(),
                dataset: data.name.clone(),
                test_accuracy: test,
                val_accuracy: val,
                sparsity,
                layers,
            },
        )?;
    }
    Ok(())
}
