//! `coarsen predict`: class probabilities (top-k) of the user's own images, on an export or a
//! trained run.

use std::path::PathBuf;

use anyhow::{bail, Result};
use coarsen_infer::export::Preprocessing;
use coarsen_infer::{softmax_rows, InferenceNet};
use coarsen_train::data;
use coarsen_train::export::class_names;
use coarsen_train::run_dir::locate;
use serde::Serialize;

use crate::args::PredictArgs;
use crate::commands::write_json;
use crate::inputs::{self, Scaling};
use crate::progress;

/// One class of an image's top-k.
#[derive(Serialize)]
struct Ranked {
    class: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    probability: f32,
}

/// One image's prediction.
#[derive(Serialize)]
struct Prediction {
    file: PathBuf,
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<u32>,
    top: Vec<Ranked>,
    probabilities: Vec<f32>,
}

/// What `--json` writes.
#[derive(Serialize)]
struct Report {
    model: PathBuf,
    path: String,
    classes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    labels: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accuracy: Option<f64>,
    images: Vec<Prediction>,
}

/// Runs `coarsen predict`.
pub fn run(a: &PredictArgs, quiet: bool) -> Result<()> {
    if a.top == 0 || a.batch == 0 {
        bail!("--top and --batch must be at least 1");
    }
    if let Some(j) = &a.json {
        let inputs: Vec<(&str, &std::path::Path)> =
            a.input.iter().map(|p| ("an input", p.as_path())).collect();
        crate::commands::check_outputs(&inputs, &[("--json", j.as_path())])?;
    }
    let sp = progress::spinner("predicting", quiet);
    sp.set_message(format!("loading {}", a.model.display()));
    // The network, its normalisation and class names: an export records them; a run's come
    // from its data set.
    let at = locate(&a.model)?;
    let (loaded, preprocessing, names) = if at.is_export() {
        let l = at.load(None)?;
        let m = l.manifest.as_ref();
        let pre = m.and_then(|m| m.preprocessing.clone());
        let names = m.and_then(|m| m.labels.clone());
        (l, pre, names)
    } else {
        let dir = a.data.clone().unwrap_or_else(|| at.experiment.data.clone());
        let d = data::load(&dir, at.experiment.recipe.val_split)?;
        let l = at.load(Some(&d))?;
        let pre = Preprocessing {
            mean: d.mean.clone(),
            std: d.std.clone(),
        };
        (l, Some(pre), class_names(&d.name))
    };
    let net = &loaded.network;
    let (input, classes) = (net.input(), net.classes());
    let names = names.filter(|n| n.len() == classes);
    sp.set_message("reading the images");
    let scaling = Scaling {
        preprocessing: preprocessing.as_ref(),
        normalized: a.normalized,
    };
    let images = inputs::read(&a.input, a.labels.as_deref(), input, classes, scaling)?;
    let mut engine = InferenceNet::new(net, &loaded.formats, a.path.path())?;
    if a.path == crate::args::PathArg::Packed {
        sp.set_message("choosing each sparse layer's kernels");
        engine.tune_cached(a.batch.clamp(1, images.n.max(1)), a.tuning.tuning())?;
    }
    sp.set_message(format!("{} images", images.n));
    let probs = probabilities(&engine, &images.pixels, images.n, a.batch)?;
    sp.finish_and_clear();
    let preds: Vec<Prediction> = probs
        .chunks(classes.max(1))
        .enumerate()
        .map(|(i, p)| {
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&x, &y| p[y].total_cmp(&p[x]).then(x.cmp(&y)));
            let (file, index) = images.origin[i].clone();
            Prediction {
                file,
                index,
                label: images.labels.as_ref().map(|l| l[i]),
                top: order
                    .iter()
                    .take(a.top)
                    .map(|&c| Ranked {
                        class: c,
                        label: names.as_ref().map(|n| n[c].clone()),
                        probability: p[c],
                    })
                    .collect(),
                probabilities: p.to_vec(),
            }
        })
        .collect();
    let accuracy = images.labels.as_ref().map(|l| {
        let right = preds
            .iter()
            .zip(l)
            .filter(|(p, &y)| p.top[0].class == y as usize)
            .count();
        right as f64 / preds.len().max(1) as f64
    });
    print_table(
        a,
        &preds,
        &loaded.experiment.model,
        input,
        classes,
        accuracy,
    );
    if let Some(path) = &a.json {
        write_json(
            path,
            &Report {
                model: a.model.clone(),
                path: format!("{:?}", a.path).to_lowercase(),
                classes,
                labels: names,
                accuracy,
                images: preds,
            },
        )?;
    }
    Ok(())
}

/// Softmax of the logits of every image, `batch` images per forward pass.
fn probabilities(net: &InferenceNet, x: &[f32], n: usize, batch: usize) -> Result<Vec<f32>> {
    let [c, h, w] = net.input();
    let hw = h * w;
    let mut out = Vec::with_capacity(n * net.classes());
    for b0 in (0..n).step_by(batch) {
        let nb = batch.min(n - b0);
        // Channel-major: channel `ch` of images b0.. is one contiguous run.
        let mut chunk = Vec::with_capacity(c * nb * hw);
        for ch in 0..c {
            chunk.extend_from_slice(&x[(ch * n + b0) * hw..(ch * n + b0 + nb) * hw]);
        }
        let logits = net.forward(&chunk, nb)?;
        out.extend(softmax_rows(&logits, net.classes()));
    }
    Ok(out)
}

fn print_table(
    a: &PredictArgs,
    preds: &[Prediction],
    model: &str,
    input: [usize; 3],
    classes: usize,
    accuracy: Option<f64>,
) {
    println!(
        "{} ({model}, {}x{}x{} images, {classes} classes, {} path): {} image(s)",
        a.model.display(),
        input[0],
        input[1],
        input[2],
        format!("{:?}", a.path).to_lowercase(),
        preds.len()
    );
    let labelled = preds.iter().any(|p| p.label.is_some());
    let mut header = format!("{:<32} {:>6}", "input", "#");
    if labelled {
        header += &format!(" {:>6}", "label");
    }
    for k in 1..=a.top.min(classes) {
        header += &format!("  {:<22}", format!("top-{k} (p)"));
    }
    println!("{header}");
    for p in preds.iter().take(a.show) {
        let file = p.file.file_name().map_or_else(
            || p.file.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        );
        let mut line = format!("{file:<32} {:>6}", p.index);
        if labelled {
            line += &format!(" {:>6}", p.label.map_or("-".into(), |l| l.to_string()));
        }
        for r in &p.top {
            let name = r.label.clone().unwrap_or_else(|| r.class.to_string());
            line += &format!("  {:<22}", format!("{name} {:.3}", r.probability));
        }
        println!("{line}");
    }
    if preds.len() > a.show {
        println!("… {} more (all in --json)", preds.len() - a.show);
    }
    if let Some(acc) = accuracy {
        println!(
            "top-1 accuracy {:.2}% on {} labelled images",
            100.0 * acc,
            preds.len()
        );
    }
}
