//! `coarsen eval`: accuracy, per-layer density and pattern of a trained network.

use std::path::PathBuf;

use anyhow::Result;
use coarsen_infer::{InferenceNet, Path as InferPath};
use coarsen_train::data;
use coarsen_train::methods::{self, LayerResult};
use coarsen_train::run_dir::{locate, Loaded};
use coarsen_train::train::engine_accuracy;
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
    /// Over the prunable layers (those with a mask).
    sparsity: f64,
    /// Over all conv and linear weights.
    sparsity_all: f64,
    layers: Vec<LayerResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sparse: Option<SparseEval>,
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
    pub layers: Vec<coarsen_infer::LayerInfo>,
    /// Per sparse layer: packed or on the dense kernels, as tuning chose.
    pub tuned: Vec<coarsen_infer::LayerChoice>,
    /// Whether the tuned network measured no faster than the dense path as a whole, and runs
    /// dense (`coarsen_infer::timing::time_tuned`).
    pub runs_dense: bool,
    /// Median milliseconds of ONNX Runtime on the same network at the same batch, when its
    /// environment is present (see `crate::peer`).
    pub ort_ms: Option<f64>,
}

/// Said where the tuned network measured no faster than the dense path as a whole.
pub const RUNS_DENSE: &str =
    "the tuned network measured no faster than the dense path as a whole: it runs dense (saving 0)";

/// Runs `net` packed and dense: packed test accuracy, and latency of both at `batch`
/// (test images, interleaved, median of `reps`).
pub fn sparse_eval(
    l: &Loaded,
    data: &data::DataSplits,
    batch: usize,
    reps: usize,
    tuning: coarsen_infer::Tuning,
    peer: Option<&crate::peer::OrtPeer>,
    bf16: bool,
) -> Result<SparseEval> {
    let options = coarsen_infer::InferOptions {
        bf16,
        ..Default::default()
    };
    let mut packed =
        InferenceNet::with_options(&l.network, &l.formats, InferPath::Packed, options)?;
    let dense = InferenceNet::new(&l.network, &l.formats, InferPath::Dense)?;
    let acc = engine_accuracy(&packed, &data.test, 1000)?;
    let n = batch.clamp(1, data.test.n.max(1));
    let idx: Vec<usize> = (0..n).map(|i| i % data.test.n.max(1)).collect();
    let b = coarsen_train::data::make_batch(&data.test, &idx, None, (0, 0, 0));
    let mut tuned = packed.tune_cached(b.size, tuning)?;
    // The packed network's layers as tuning left them (their formats), whether or not the
    // whole network then runs dense (`runs_dense`).
    let layers = packed.layers().to_vec();
    let settled = coarsen_infer::timing::time_tuned(
        (&l.network, &l.formats),
        &mut packed,
        &mut tuned,
        tuning,
        &dense,
        &b.pixels,
        b.size,
        reps,
    )?;
    let t = settled.timing;
    let ort_ms = match peer {
        Some(p) => Some(p.time(&l.network, b.size, reps, rayon::current_num_threads())?),
        None => None,
    };
    Ok(SparseEval {
        packed_test_accuracy: acc,
        batch: b.size,
        dense_ms: t.dense_ms,
        packed_ms: t.packed_ms,
        time_saving: t.time_saving,
        ideal_time_saving: t.ideal_time_saving,
        layers,
        tuned,
        runs_dense: settled.runs_dense,
        ort_ms,
    })
}

/// Runs `coarsen eval`.
pub fn run(a: &EvalArgs, quiet: bool) -> Result<()> {
    let at = locate(&a.checkpoint)?;
    if let Some(j) = &a.json {
        // The report never replaces a file of the network it evaluates.
        let files: Vec<std::path::PathBuf> = [&at.dir, &at.checkpoint]
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        let inputs: Vec<(&str, &std::path::Path)> = files
            .iter()
            .map(|p| ("a file of the evaluated network", p.as_path()))
            .collect();
        crate::commands::check_outputs(&inputs, &[("--json", j.as_path())])?;
    }
    let exp = at.experiment.clone();
    let data_dir = a.data.clone().unwrap_or_else(|| exp.data.clone());
    let sp = progress::spinner("evaluating", quiet);
    sp.set_message(format!("loading {}", data_dir.display()));
    let data = data::load(&data_dir, exp.recipe.val_split)?;
    let loaded = at.load(Some(&data))?;
    let (meta, dir) = (&loaded.meta, &loaded.dir);
    // Accuracy of the network as stored, BatchNorm folded, on the dense path.
    let net = InferenceNet::new(&loaded.network, &loaded.formats, InferPath::Dense)?;
    sp.set_message("test set");
    let test = engine_accuracy(&net, &data.test, a.batch)?;
    sp.set_message("validation set");
    let val = engine_accuracy(&net, &data.val, a.batch)?;
    let sparse = if a.sparse {
        sp.set_message("packed inference: accuracy and latency against the dense path");
        Some(sparse_eval(
            &loaded,
            &data,
            a.batch,
            a.reps,
            a.tuning.tuning(),
            None,
            a.bf16,
        )?)
    } else {
        None
    };
    sp.finish_and_clear();
    let layers = methods::describe_layers(&loaded.network, meta.as_ref())?;
    let sparsity = loaded.network.sparsity();
    println!(
        "{} ({} on {}): test accuracy {:.2}%, validation accuracy {:.2}%, {}",
        dir.display(),
        exp.model,
        data.name,
        100.0 * test,
        100.0 * val,
        sparsity.describe()
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
        println!("  {}", coarsen_infer::describe_choices(&s.tuned));
        if s.runs_dense {
            println!("  {RUNS_DENSE}");
        }
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
                sparsity: sparsity.prunable,
                sparsity_all: sparsity.all,
                layers,
                sparse,
            },
        )?;
    }
    Ok(())
}
