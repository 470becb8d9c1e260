//! `coarsen export`: a trained sparse network as model.safetensors + model.json.

use anyhow::{bail, Result};
use coarsen_train::data;
use coarsen_train::export::{self, ExportInfo, Preprocessing};
use coarsen_train::infer::{InferenceNet, Path as InferPath};

use crate::args::ExportArgs;
use crate::commands::eval::{load_network, locate};
use crate::commands::shape_text;
use crate::progress;

/// Runs `coarsen export`.
pub fn run(a: &ExportArgs, quiet: bool) -> Result<()> {
    if export::is_export(&a.checkpoint) {
        bail!(
            "{}: already an export directory; give a training run or checkpoint",
            a.checkpoint.display()
        );
    }
    let (exp, _) = locate(&a.checkpoint)?;
    let data_dir = a.data.clone().unwrap_or_else(|| exp.data.clone());
    let sp = progress::spinner("exporting", quiet);
    sp.set_message(format!("loading {}", data_dir.display()));
    let data = data::load(&data_dir, exp.recipe.val_split)?;
    sp.set_message("loading the network");
    let l = load_network(&a.checkpoint, Some(&data))?;
    sp.set_message(format!("writing {}", a.out.display()));
    let info = ExportInfo {
        preprocessing: Some(Preprocessing {
            mean: data.mean.clone(),
            std: data.std.clone(),
        }),
        experiment: Some(l.experiment.clone()),
        source: Some(l.dir.clone()),
    };
    let manifest = export::export_with_formats(
        &l.model,
        &l.masks,
        &l.formats,
        l.meta.as_ref(),
        info,
        &a.out,
    )?;
    // Check: the exported network, loaded back, computes what the checkpoint computes.
    let verified = if a.verify > 0 && data.test.n > 0 {
        sp.set_message("verifying the export against the checkpoint");
        let back = export::load(&a.out)?;
        let n = a.verify.min(data.test.n);
        let idx: Vec<usize> = (0..n).collect();
        let b = data::make_batch(&data.test, &idx, None, (0, 0, 0));
        let run = |m, k, f| -> Result<Vec<f32>> {
            Ok(InferenceNet::with_formats(m, k, f, InferPath::Packed)?
                .forward(&b.pixels, b.size)?)
        };
        let want = run(&l.model, &l.masks, &l.formats)?;
        let got = run(&back.model, &back.masks, &back.formats)?;
        let diff = want
            .iter()
            .zip(&got)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        if diff != 0.0 {
            bail!(
                "{}: the exported network's logits differ from the checkpoint's by up to {diff} on {n} test images",
                a.out.display()
            );
        }
        Some(n)
    } else {
        None
    };
    sp.finish_and_clear();
    println!(
        "{} → {} ({} on {}): sparsity {:.2}%, model.safetensors {:.1} KiB ({:.1}% of dense F32 {:.1} KiB)",
        l.dir.display(),
        a.out.display(),
        manifest.model.name,
        data.name,
        100.0 * manifest.sparsity,
        manifest.file_bytes as f64 / 1024.0,
        100.0 * manifest.file_bytes as f64 / manifest.dense_bytes.max(1) as f64,
        manifest.dense_bytes as f64 / 1024.0
    );
    println!(
        "{:<28} {:>18} {:>9} {:>10}  format",
        "layer", "shape", "density", "values"
    );
    for layer in &manifest.layers {
        let shape = shape_text(&layer.shape);
        println!(
            "{:<28} {:>18} {:>9.4} {:>10}  {}",
            layer.name,
            shape,
            layer.density,
            layer.stored,
            layer.format.name()
        );
    }
    if let Some(n) = verified {
        println!(
            "verified: loaded back, it gives the checkpoint's logits exactly on {n} test images"
        );
    }
    Ok(())
}
