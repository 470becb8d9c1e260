//! `coarsen train`: runs a training method, or tabulates finished runs (`--summary`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use coarsen_core::patterns::parse_parts;
use coarsen_train::data;
use coarsen_train::dynamic::{Grow, LinearBlocks, UpdateAt};
use coarsen_train::methods::{self, Experiment, RunOptions, RunResults};
use coarsen_train::sparsity::RefillCriterion;
use coarsen_train::train::{EpochMetrics, Progress, Recipe};
use indicatif::ProgressBar;

use crate::args::TrainArgs;
use crate::commands::write_json;
use crate::progress;

/// Progress of a run: one bar per stage (epoch, loss, accuracy, samples/s) and a line per epoch.
pub struct BarProgress {
    quiet: bool,
    bar: Mutex<Option<(ProgressBar, usize)>>,
}

impl BarProgress {
    /// Bars on standard error unless `quiet`.
    pub fn new(quiet: bool) -> Self {
        BarProgress {
            quiet,
            bar: Mutex::new(None),
        }
    }

    fn println(&self, line: &str) {
        match &*self.bar.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((b, _)) if !b.is_hidden() => b.println(line),
            _ if !self.quiet => eprintln!("{line}"),
            _ => {}
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some((b, _)) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

impl Progress for BarProgress {
    fn stage(&self, stage: usize, name: &str, epochs: usize, steps: usize) {
        self.finish();
        let b = progress::bar(
            (epochs * steps) as u64,
            &format!("stage {stage}"),
            self.quiet,
        );
        *self.bar.lock().unwrap_or_else(|p| p.into_inner()) = Some((b, steps));
        self.println(&format!(
            "stage {stage}: {name} ({epochs} epochs of {steps} steps)"
        ));
    }

    fn batch(&self, epoch: usize, step: usize, loss: f64, acc: f64, samples_per_s: f64) {
        if let Some((b, steps)) = &*self.bar.lock().unwrap_or_else(|p| p.into_inner()) {
            b.set_position((epoch * steps + step) as u64);
            b.set_message(format!(
                "epoch {} loss {loss:.4} acc {:.2}% {samples_per_s:.0} samples/s",
                epoch + 1,
                100.0 * acc
            ));
        }
    }

    fn epoch(&self, m: &EpochMetrics) {
        let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", 100.0 * v));
        self.println(&format!(
            "  stage {} epoch {:>3}: loss {:.4}  train {:.2}%  val {}  test {}  lr {:.4}  {:.0} samples/s  density {:.4}",
            m.stage,
            m.epoch + 1,
            m.train_loss,
            100.0 * m.train_acc,
            pct(m.val_acc),
            pct(m.test_acc),
            m.lr,
            m.samples_per_s,
            m.density
        ));
    }

    fn note(&self, msg: &str) {
        self.println(msg);
    }
}

/// Runs `coarsen train`.
pub fn run(a: &TrainArgs, quiet: bool) -> Result<()> {
    if !a.summary.is_empty() {
        return summary(&a.summary, a.json.as_deref());
    }
    let Some(out) = a.out.as_deref() else {
        bail!("--out DIR is required");
    };
    let exp = experiment(a, out)?;
    exp.validate()?;
    let progress = BarProgress::new(quiet);
    let sp = progress::spinner("loading", quiet);
    sp.set_message(exp.data.display().to_string());
    let data = data::load(&exp.data, exp.recipe.val_split)?;
    sp.finish_and_clear();
    if !quiet {
        eprintln!(
            "{}: {} training, {} validation, {} test images of {}×{}×{}; {} on {} ({} stage{})",
            data.name,
            exp.recipe
                .train_subset
                .map_or(data.train.n, |n| n.min(data.train.n)),
            data.val.n,
            data.test.n,
            data.train.channels,
            data.train.height,
            data.train.width,
            exp.method,
            exp.model,
            exp.stages(),
            if exp.stages() == 1 { "" } else { "s" }
        );
    }
    let opts = RunOptions {
        resume: a.resume,
        reuse: a.reuse.clone(),
        stop_after_steps: a.stop_after_steps,
        force: a.force,
    };
    let result = methods::run(&exp, &data, out, &opts, &progress);
    progress.finish();
    let Some(r) = result.with_context(|| format!("training into {}", out.display()))? else {
        eprintln!(
            "stopped early; continue with: coarsen train --out {} --resume",
            out.display()
        );
        return Ok(());
    };
    print_result(&r, out);
    Ok(())
}

fn print_result(r: &RunResults, out: &Path) {
    println!(
        "{} {} on {}: test accuracy {:.2}%, sparsity {:.2}% ({}), channel sparsity {:.2}%",
        r.method,
        r.model,
        r.dataset,
        100.0 * r.test_accuracy,
        100.0 * r.sparsity,
        r.structure(),
        100.0 * r.channel_sparsity
    );
    for (name, reason) in r.unstructured_layers() {
        println!("  {name}: unstructured ({reason})");
    }
    for s in &r.stages {
        println!(
            "  stage {}: {:<48} sparsity {:>6.2}%  test {:>6.2}%  {:>6.0} s",
            s.stage,
            s.name,
            100.0 * s.sparsity,
            100.0 * s.test_accuracy,
            s.seconds
        );
    }
    if let Some(b) = r.stages.last().and_then(|s| s.best.as_ref()) {
        let last = b.epoch + 1 == r.experiment.recipe.epochs;
        println!(
            "  best by validation: epoch {} (val {:.2}%, test {:.2}%){}",
            b.epoch + 1,
            100.0 * b.val_accuracy,
            100.0 * b.test_accuracy,
            if last {
                ", the last"
            } else {
                "; the saved weights are the last epoch's"
            }
        );
    }
    println!("results: {}", out.join("results.json").display());
}

/// The experiment: recipe defaults of the data set (or the run being resumed), then the TOML
/// file, then the flags.
fn experiment(a: &TrainArgs, out: &Path) -> Result<Experiment> {
    let saved = out.join("experiment.json");
    let mut exp = if a.resume && saved.exists() {
        let bytes =
            std::fs::read(&saved).with_context(|| format!("reading {}", saved.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("reading {}", saved.display()))?
    } else {
        Experiment {
            data: a.data.clone(),
            recipe: Recipe::for_data(&a.data),
            ..Experiment::default()
        }
    };
    if let Some(path) = &a.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        exp = exp.overlay_toml(&text, path)?;
    }
    let default_data = PathBuf::from(data::DEFAULT_DATA_DIR);
    if a.data != default_data || !(a.resume && saved.exists()) {
        exp.data = a.data.clone();
    }
    macro_rules! set {
        ($flag:expr, $field:expr) => {
            if let Some(v) = $flag.clone() {
                $field = v;
            }
        };
    }
    set!(a.method, exp.method);
    set!(a.model, exp.model);
    set!(a.width, exp.width);
    set!(a.seed, exp.seed);
    set!(a.sparsity, exp.sparsity);
    set!(a.rounds, exp.imp.rounds);
    set!(a.rate, exp.imp.rate);
    set!(a.extra, exp.refill.extra);
    set!(a.block, exp.dynamic.block);
    set!(a.delta_t, exp.dynamic.delta_t);
    set!(a.batch_size, exp.recipe.batch_size);
    set!(a.lr, exp.recipe.lr);
    if let Some(e) = a.epochs {
        exp.recipe.epochs = e;
        // The rewind point stays early in a shorter run.
        exp.recipe.rewind_epoch = exp.recipe.rewind_epoch.min(e.saturating_sub(1));
    }
    if a.post_round.is_some() {
        exp.imp.post_round = a.post_round;
    }
    if a.keep_density.is_some() {
        exp.imp.keep_density = a.keep_density.clone();
    }
    if a.every_round {
        exp.imp.every_round = true;
    }
    if let Some(c) = &a.criterion {
        exp.refill.criterion = match c.as_str() {
            "l1" => RefillCriterion::L1,
            "count" => RefillCriterion::Count,
            "feature-l1" => RefillCriterion::FeatureL1,
            "feature-l2" => RefillCriterion::FeatureL2,
            "saliency" => RefillCriterion::Saliency,
            other => {
                bail!("--criterion {other}: expected l1, count, feature-l1, feature-l2 or saliency")
            }
        };
    }
    if let Some(p) = &a.parts {
        exp.regroup.parts = parse_parts(p).with_context(|| format!("--parts {p}"))?;
    }
    if let Some(g) = &a.grow {
        exp.dynamic.grow = match g.as_str() {
            "gradient" => Grow::Gradient,
            "estimate" => Grow::Estimate,
            other => bail!("--grow {other}: expected gradient or estimate"),
        };
    }
    if a.t_end.is_some() {
        exp.dynamic.t_end = a.t_end;
    }
    if a.update_stop.is_some() {
        exp.dynamic.stop = a.update_stop;
    }
    if let Some(u) = &a.update_at {
        exp.dynamic.update = Some(match u.as_str() {
            "backward" => UpdateAt::Backward,
            "step" => UpdateAt::Step,
            other => bail!("--update-at {other}: expected backward or step"),
        });
    }
    if let Some(l) = &a.linear_blocks {
        exp.dynamic.linear = match l.as_str() {
            "blocked" => LinearBlocks::Blocked,
            "unstructured" => LinearBlocks::Unstructured,
            other => bail!("--linear-blocks {other}: expected blocked or unstructured"),
        };
    }
    if a.similarity.is_some() {
        exp.dynamic.similarity = a.similarity;
    }
    if a.train_subset.is_some() {
        exp.recipe.train_subset = a.train_subset;
    }
    if a.max_batches.is_some() {
        exp.recipe.max_batches = a.max_batches;
    }
    Ok(exp)
}

/// One row of `--summary`.
#[derive(serde::Serialize)]
struct Row {
    run: String,
    method: String,
    model: String,
    pattern: String,
    sparsity: f64,
    channel_sparsity: f64,
    test_accuracy: f64,
    dense_accuracy: Option<f64>,
    delta: Option<f64>,
    epochs: usize,
    train_seconds: f64,
}

fn summary(dirs: &[PathBuf], json: Option<&Path>) -> Result<()> {
    let mut results = Vec::new();
    for d in dirs {
        if !d.join("results.json").exists() {
            bail!("{}: no results (unfinished run?)", d.display());
        }
        let r = RunResults::read(d)?;
        results.push((d.display().to_string(), r));
    }
    // A run's own dense stage is its reference; runs without one use a dense run of the same
    // model in the list.
    let dense_of = |r: &RunResults| -> Option<f64> {
        r.stages
            .first()
            .filter(|s| s.name == "dense training")
            .map(|s| s.test_accuracy)
            .or_else(|| {
                results
                    .iter()
                    .find(|(_, o)| o.method == "dense" && o.model == r.model)
                    .map(|(_, o)| o.test_accuracy)
            })
    };
    let rows: Vec<Row> = results
        .iter()
        .map(|(run, r)| {
            let dense = dense_of(r);
            Row {
                run: run.clone(),
                method: r.method.clone(),
                model: r.model.clone(),
                pattern: r.structure(),
                sparsity: r.sparsity,
                channel_sparsity: r.channel_sparsity,
                test_accuracy: r.test_accuracy,
                dense_accuracy: dense,
                delta: dense.map(|d| r.test_accuracy - d),
                epochs: r.experiment.recipe.epochs,
                train_seconds: r.train_seconds,
            }
        })
        .collect();
    println!(
        "| run | method | model | pattern | sparsity | channel sparsity | test acc | dense acc | Δ (pt) | epochs/run | train time |"
    );
    println!("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", 100.0 * v));
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.2}% | {:.2}% | {:.2}% | {} | {} | {} | {:.1} min |",
            r.run,
            r.method,
            r.model,
            r.pattern,
            100.0 * r.sparsity,
            100.0 * r.channel_sparsity,
            100.0 * r.test_accuracy,
            pct(r.dense_accuracy),
            r.delta
                .map_or("-".to_string(), |d| format!("{:+.2}", 100.0 * d)),
            r.epochs,
            r.train_seconds / 60.0
        );
    }
    if let Some(p) = json {
        write_json(p, &rows)?;
    }
    Ok(())
}
