//! `coarsen export`: a trained sparse network as model.safetensors + model.json (the explicit
//! graph), and/or model.onnx; from a run, an export, or a weights file of a known architecture.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use coarsen_core::{MaskSet, WeightFile};
use coarsen_infer::export::{ExportInfo, Manifest, Preprocessing};
use coarsen_infer::onnx::{to_onnx, OnnxOptions};
use coarsen_infer::{layer_formats, Formats, InferenceNet, Network, Path as InferPath};
use coarsen_train::data::{self, make_batch};
use coarsen_train::export::{self, class_names, info};
use coarsen_train::model::{Model, ModelSpec};
use coarsen_train::run_dir::locate;
use coarsen_train::train::check_masks;
use rand::{Rng, SeedableRng};

use crate::args::{ExportArgs, ExportFormat};
use crate::commands::{parse_sizes, shape_text};
use crate::progress;

/// The file `--format onnx` writes into the export directory.
pub const ONNX_FILE: &str = "model.onnx";

/// A network to export, its formats and where it came from.
struct Source {
    label: String,
    network: Network,
    formats: Formats,
    meta: Option<coarsen_core::CoarsenMetadata>,
    info: ExportInfo,
    /// Channel-major images to verify the export on.
    check: Option<(Vec<f32>, usize)>,
    /// The directory (or file) read.
    dir: PathBuf,
}

/// Runs `coarsen export`.
pub fn run(a: &ExportArgs, quiet: bool) -> Result<()> {
    let from_export = a.checkpoint.as_deref().is_some_and(export::is_export);
    let format = match (a.format, a.onnx) {
        (Some(f), _) => f,
        // An export directory holds coarsen's format already: --onnx adds the ONNX model.
        (None, true) if from_export => ExportFormat::Onnx,
        (None, true) => ExportFormat::Both,
        (None, false) => ExportFormat::Coarsen,
    };
    if from_export && format != ExportFormat::Onnx {
        bail!(
            "{}: already an export directory; give a training run or checkpoint, or --onnx to write its ONNX model",
            a.checkpoint.as_deref().unwrap_or(Path::new("")).display()
        );
    }
    let sp = progress::spinner("exporting", quiet);
    let src = match (&a.checkpoint, &a.model) {
        (Some(c), _) if from_export => from_export_dir(c)?,
        (Some(c), _) => from_run(c, a, &sp)?,
        (None, Some(m)) => from_weights(m, a)?,
        (None, None) => bail!("give a run or export directory, or --model with --weights"),
    };
    refuse_overwriting(&src.dir, &a.out, format)?;
    // One writer per output directory: a second export into it stops here.
    let _lock = coarsen_core::DirLock::acquire(&a.out, "export")?;
    let mut manifest = None;
    if format != ExportFormat::Onnx {
        sp.set_message(format!("writing {}", a.out.display()));
        let write = || {
            Ok(coarsen_infer::export::write(
                &src.network,
                &src.formats,
                src.meta.as_ref(),
                src.info.clone(),
                &a.out,
            )?)
        };
        let check = || match &src.check {
            Some((x, n)) => {
                sp.set_message("verifying the export against its source");
                verify(&src, &a.out, x, *n)
            }
            None => Ok(()),
        };
        let m = write_verified(&a.out, write, check)?;
        manifest = Some(m);
    }
    if format != ExportFormat::Coarsen {
        sp.set_message(format!("writing {}", a.out.join(ONNX_FILE).display()));
        std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
        let opts = OnnxOptions {
            fold_batch_norm: a.fold_bn,
        };
        let bytes = to_onnx(&src.network, &opts)?;
        coarsen_core::io::write_atomic(&a.out.join(ONNX_FILE), &bytes)?;
    }
    sp.finish_and_clear();
    report(&src, manifest.as_ref(), a, format);
    Ok(())
}

/// Writes an export with `write`, then checks it with `check`; an export that does not reproduce
/// its source is removed (both of its files) rather than left to be used.
fn write_verified<T>(
    out: &Path,
    write: impl FnOnce() -> Result<T>,
    check: impl FnOnce() -> Result<()>,
) -> Result<T> {
    let m = write()?;
    if let Err(e) = check() {
        for f in [
            coarsen_infer::export::MANIFEST_FILE,
            coarsen_infer::export::TENSORS_FILE,
        ] {
            let _ = std::fs::remove_file(out.join(f));
        }
        return Err(e.context(format!("the export in {} was removed", out.display())));
    }
    Ok(m)
}

/// Refuses an output directory that is the source itself (unless only model.onnx is added to
/// an export directory).
fn refuse_overwriting(src: &Path, out: &Path, format: ExportFormat) -> Result<()> {
    let same = match (src.canonicalize(), out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same && format != ExportFormat::Onnx {
        bail!(
            "--out {}: is the directory being exported; give another directory",
            out.display()
        );
    }
    if out.join(ONNX_FILE).is_dir() || out.join(export::TENSORS_FILE).is_dir() {
        bail!(
            "--out {}: holds directories named like the export's files",
            out.display()
        );
    }
    Ok(())
}

fn from_run(c: &Path, a: &ExportArgs, sp: &indicatif::ProgressBar) -> Result<Source> {
    let at = locate(c)?;
    let exp = &at.experiment;
    let data_dir = a.data.clone().unwrap_or_else(|| exp.data.clone());
    sp.set_message(format!("loading {}", data_dir.display()));
    let data = data::load(&data_dir, exp.recipe.val_split)?;
    sp.set_message("loading the network");
    let l = at.load(Some(&data))?;
    let spec = l.experiment.model_spec(&data);
    let check = (a.verify > 0 && data.test.n > 0).then(|| {
        let n = a.verify.min(data.test.n);
        let idx: Vec<usize> = (0..n).collect();
        let b = make_batch(&data.test, &idx, None, (0, 0, 0));
        (b.pixels, b.size)
    });
    Ok(Source {
        label: format!("{} on {}", spec.name, data.name),
        info: info(&l.experiment, &spec, &data, Some(l.dir.clone()))?,
        network: l.network,
        formats: l.formats,
        meta: l.meta,
        check,
        dir: l.dir,
    })
}

fn from_export_dir(c: &Path) -> Result<Source> {
    let e = export::load(c)?;
    Ok(Source {
        label: e
            .manifest
            .model
            .as_ref()
            .map_or_else(|| "graph".to_string(), |m| m.name.clone()),
        network: e.network,
        formats: e.formats,
        meta: e.manifest.coarsen.clone(),
        info: ExportInfo::default(),
        check: None,
        dir: c.to_path_buf(),
    })
}

fn from_weights(name: &str, a: &ExportArgs) -> Result<Source> {
    let wpath = a.weights.as_deref().context("--model needs --weights")?;
    // With a data set: its image shape, normalisation, class names and test images.
    let data = match a.data.as_deref() {
        Some(d) => Some(data::load(d, 0)?),
        None => None,
    };
    let input = match (&a.input, &data) {
        (Some(s), _) => parse_sizes("--input", s, "C,H,W")?,
        (None, Some(d)) => [d.test.channels, d.test.height, d.test.width],
        (None, None) if matches!(name, "mlp" | "cnn") => [1, 28, 28],
        (None, None) => [3, 32, 32],
    };
    let file = WeightFile::read(wpath)?;
    // The classes are the rows of the last linear weight, whatever their number.
    let probe = Model::new(
        &ModelSpec {
            name: name.into(),
            width: a.width,
            input,
            classes: 10,
        },
        0,
    )?;
    let last = probe
        .weights()
        .last()
        .map(|p| p.name.clone())
        .context("the architecture has no weights")?;
    let classes = file
        .get(&last)
        .and_then(|t| t.shape.first().copied())
        .with_context(|| {
            format!(
                "{}: no tensor '{last}' [classes, features] for the {name} model",
                wpath.display()
            )
        })?;
    if let Some(d) = &data {
        let have = [d.test.channels, d.test.height, d.test.width];
        if (have, d.classes) != (input, classes) {
            bail!(
                "{}: {have:?} images of {} classes; the {name} weights of {} take {input:?} and {classes}",
                d.source.display(),
                d.classes,
                wpath.display()
            );
        }
    }
    let spec = ModelSpec {
        name: name.into(),
        width: a.width,
        input,
        classes,
    };
    let model = Model::new(&spec, 0)?;
    model.load_weights(&file)?;
    let (masks, meta) = match &a.mask {
        Some(m) => {
            let (masks, meta) = MaskSet::read(m)?;
            check_masks(&masks, &model, m)?;
            (masks, meta)
        }
        None => (MaskSet::new(), None),
    };
    let network = model.network(&masks)?;
    let formats = layer_formats(network.graph(), &masks, meta.as_ref())?;
    let check = (a.verify > 0).then(|| match &data {
        Some(d) if d.test.n > 0 => {
            let idx: Vec<usize> = (0..a.verify.min(d.test.n)).collect();
            let b = make_batch(&d.test, &idx, None, (0, 0, 0));
            (b.pixels, b.size)
        }
        _ => {
            let n = a.verify.min(64);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
            let len = n * input.iter().product::<usize>();
            (
                (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
                n,
            )
        }
    });
    Ok(Source {
        label: format!("{name} from {}", wpath.display()),
        network,
        formats,
        meta,
        info: ExportInfo {
            model: Some(spec.info()),
            labels: data.as_ref().and_then(|d| class_names(&d.name)),
            preprocessing: data.as_ref().map(|d| Preprocessing {
                mean: d.mean.clone(),
                std: d.std.clone(),
            }),
            source: Some(wpath.to_path_buf()),
            ..ExportInfo::default()
        },
        check,
        dir: wpath.to_path_buf(),
    })
}

/// The exported network, loaded back, computes exactly what its source computes.
fn verify(src: &Source, out: &Path, x: &[f32], n: usize) -> Result<()> {
    let back = export::load(out)?;
    let run = |net, formats| -> Result<Vec<f32>> {
        Ok(InferenceNet::new(net, formats, InferPath::Packed)?.forward(x, n)?)
    };
    let want = run(&src.network, &src.formats)?;
    let got = run(&back.network, &back.formats)?;
    // NaN-aware: any NaN on either side counts as a difference.
    if want.len() != got.len()
        || want
            .iter()
            .zip(&got)
            .any(|(x, y)| x.to_bits() != y.to_bits())
    {
        let diff = want
            .iter()
            .zip(&got)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) });
        bail!(
            "{}: the exported network's logits differ from its source's by up to {diff} on {n} images",
            out.display()
        );
    }
    Ok(())
}

fn report(src: &Source, manifest: Option<&Manifest>, a: &ExportArgs, format: ExportFormat) {
    let net = &src.network;
    match manifest {
        Some(m) => println!(
            "{} → {} ({}): {}, model.safetensors {:.1} KiB ({:.1}% of dense F32 {:.1} KiB)",
            src.dir.display(),
            a.out.display(),
            src.label,
            net.sparsity().describe(),
            m.file_bytes as f64 / 1024.0,
            100.0 * m.file_bytes as f64 / m.dense_bytes.max(1) as f64,
            m.dense_bytes as f64 / 1024.0
        ),
        None => println!(
            "{} → {} ({}): {}",
            src.dir.display(),
            a.out.join(ONNX_FILE).display(),
            src.label,
            net.sparsity().describe()
        ),
    }
    println!(
        "{:<28} {:>18} {:>9} {:>10}  format",
        "layer", "shape", "density", "values"
    );
    for (name, shape) in net.weight_shapes() {
        let (density, kept) = net
            .masks()
            .get(&name)
            .map_or((1.0, shape.iter().product()), |m| (m.density(), m.nnz()));
        let format = src.formats.get(&name).map_or("dense", |f| f.name());
        println!(
            "{:<28} {:>18} {:>9.4} {:>10}  {}",
            name,
            shape_text(&shape),
            density,
            kept,
            format
        );
    }
    if manifest.is_some() {
        if let Some((_, n)) = &src.check {
            println!("verified: loaded back, it gives its source's logits exactly on {n} images");
        }
    }
    if format != ExportFormat::Coarsen {
        println!(
            "wrote {} (opset {}, BatchNorm {}; masked weights hold their zeros)",
            a.out.join(ONNX_FILE).display(),
            coarsen_infer::onnx::OPSET,
            if a.fold_bn { "folded" } else { "kept" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coarsen_infer::export::{MANIFEST_FILE, TENSORS_FILE};

    fn write_files(out: &Path) -> Result<()> {
        std::fs::write(out.join(MANIFEST_FILE), b"{}")?;
        std::fs::write(out.join(TENSORS_FILE), b"tensors")?;
        Ok(())
    }

    #[test]
    fn a_failed_verification_removes_the_export() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        let err = write_verified(out, || write_files(out), || bail!("logits differ"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("was removed"), "{err}");
        assert!(!out.join(MANIFEST_FILE).exists());
        assert!(!out.join(TENSORS_FILE).exists());
        // Only the export's own files go.
        assert!(out.join("notes.txt").exists());
    }

    #[test]
    fn a_verified_export_stays() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        write_verified(out, || write_files(out), || Ok(())).unwrap();
        assert!(out.join(MANIFEST_FILE).exists());
        assert!(out.join(TENSORS_FILE).exists());
    }
}
