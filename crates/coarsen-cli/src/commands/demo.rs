//! `coarsen demo`: the whole story in one command. A network is trained dense, pruned into a
//! lottery ticket by IMP, made structured by Refill (channels), Regroup (groups), N:M and DSB
//! (shuffled blocks, trained sparse from scratch), retrained, and then run on the packed
//! kernels and timed against the dense network in the same run. Everything lands in a report
//! directory: `report.md`, `report.html`, PNG plots and `results.json`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use coarsen_core::patterns::PartCount;
use coarsen_core::{Mask, MaskFile, MatrixView};
use coarsen_train::data::{self, DataSplits};
use coarsen_train::methods::{self, Experiment, RunOptions, RunResults};
use coarsen_train::train::Recipe;
use serde::Serialize;

use crate::args::DemoArgs;
use crate::chart::{self, Series, PALETTE};
use crate::commands::eval::{sparse_eval, SparseEval};
use crate::commands::train::BarProgress;
use crate::commands::write_json;
use crate::picture;
use coarsen_train::run_dir::load as load_network;

/// One training run of the demo.
struct RunPlan {
    /// Directory name under `runs/` and label in the report.
    name: &'static str,
    /// The experiment.
    exp: Experiment,
    /// A run whose finished stages this one shares.
    reuse: Option<&'static str>,
}

/// One row of the report.
#[derive(Serialize)]
struct Row {
    method: String,
    structure: String,
    /// Sparse layers left without the structure: "layer: reason".
    unstructured_layers: Vec<String>,
    /// Sparsity of the pruned layers.
    sparsity: f64,
    /// Fraction of removed channels of the pruned layers.
    channel_sparsity: f64,
    /// Test accuracy of the packed network.
    test_accuracy: f64,
    /// Test accuracy at the end of training (candle path); equal up to float rounding.
    train_test_accuracy: f64,
    run: PathBuf,
    inference: SparseEval,
}

/// `results.json` of the demo.
#[derive(Serialize)]
struct DemoResults {
    dataset: String,
    model: String,
    recipe: Recipe,
    imp_rounds: usize,
    imp_rate: f64,
    threads: usize,
    rows: Vec<Row>,
    total_seconds: f64,
}

fn plans(args: &DemoArgs, data_dir: &Path) -> Result<Vec<RunPlan>> {
    let mut recipe = Recipe::for_data(data_dir);
    let (rounds, rate, refill_round, regroup_round) = if args.full {
        (7, 0.2, 3, 5)
    } else {
        // Fewer, larger IMP steps: three rounds of 40% reach 78% sparsity in minutes.
        (3, 0.4, 2, 3)
    };
    if !args.full {
        recipe.epochs = 3;
        recipe.train_subset = Some(12_000);
        recipe.eval_every_epoch = false;
    }
    if let Some(e) = args.epochs {
        recipe.epochs = e.max(1);
    }
    recipe.rewind_epoch = recipe.rewind_epoch.min(recipe.epochs.saturating_sub(1));
    if args.train_subset.is_some() {
        recipe.train_subset = args.train_subset;
    }
    recipe.max_batches = args.max_batches;
    let mut base = Experiment {
        data: data_dir.to_path_buf(),
        seed: args.seed,
        recipe,
        ..Experiment::default()
    };
    base.imp.rounds = rounds;
    base.imp.rate = rate;
    if let Some(path) = &args.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        base = base.overlay_toml(&text, path)?;
    }
    let (refill_round, regroup_round) = (
        refill_round.min(base.imp.rounds).max(1),
        regroup_round.min(base.imp.rounds).max(1),
    );
    let with = |method: &str, f: &dyn Fn(&mut Experiment)| {
        let mut e = base.clone();
        e.method = method.to_string();
        f(&mut e);
        e
    };
    Ok(vec![
        RunPlan {
            name: "imp",
            exp: with("imp", &|_| {}),
            reuse: None,
        },
        RunPlan {
            name: "imp-refill",
            exp: with("imp-refill", &|e| e.imp.post_round = Some(refill_round)),
            reuse: Some("imp"),
        },
        RunPlan {
            name: "imp-regroup",
            exp: with("imp-regroup", &|e| {
                e.imp.post_round = Some(regroup_round);
                e.regroup.parts = PartCount::Auto;
            }),
            reuse: Some("imp"),
        },
        RunPlan {
            name: "nm",
            exp: with("nm", &|_| {}),
            reuse: Some("imp"),
        },
        RunPlan {
            name: "dsb",
            exp: with("dsb", &|e| {
                e.sparsity = 0.8;
                e.dynamic.block = 16;
            }),
            reuse: None,
        },
    ])
}

/// Runs `coarsen demo`.
pub fn run(args: &DemoArgs, quiet: bool) -> Result<()> {
    // One demo per report directory: a second one into it stops here.
    let _lock = coarsen_core::DirLock::acquire(&args.out, "demo")?;
    if args.synthetic {
        return crate::commands::demo_synthetic::run(args, quiet);
    }
    let start = std::time::Instant::now();
    let out = &args.out;
    let runs_dir = out.join("runs");
    std::fs::create_dir_all(&runs_dir)
        .with_context(|| format!("creating {}", runs_dir.display()))?;
    let plans = plans(args, &args.data)?;
    for p in &plans {
        p.exp.validate()?;
    }
    let recipe = plans[0].exp.recipe.clone();
    let data = data::load(&args.data, recipe.val_split)?;
    eprintln!(
        "coarsen demo: {} ({} training images used, {} test), small CNN, {} epochs per run, IMP {} rounds of {:.0}%",
        data.name,
        recipe.train_subset.map_or(data.train.n, |n| n.min(data.train.n)),
        data.test.n,
        recipe.epochs,
        plans[0].exp.imp.rounds,
        100.0 * plans[0].exp.imp.rate
    );
    let total = plans.len() + 1;
    for (i, p) in plans.iter().enumerate() {
        let dir = runs_dir.join(p.name);
        if dir.join("results.json").exists() {
            eprintln!("[{}/{total}] {}: finished earlier, kept", i + 1, p.name);
            continue;
        }
        eprintln!("[{}/{total}] training {}", i + 1, p.name);
        let opts = RunOptions {
            resume: dir.join("checkpoint").exists() || dir.join("checkpoint.old").exists(),
            reuse: p.reuse.map(|r| runs_dir.join(r)),
            stop_after_steps: None,
            force: false,
        };
        let progress = BarProgress::new(quiet);
        let res = methods::run(&p.exp, &data, &dir, &opts, &progress);
        progress.finish();
        res?;
    }
    eprintln!(
        "[{total}/{total}] packed inference of every result against the dense network (batch {}, median of {})",
        args.batch, args.reps
    );
    let threads = rayon::current_num_threads();
    let peer = match crate::peer::OrtPeer::find() {
        Ok(p) => Some(p),
        Err(note) => {
            eprintln!("{note}");
            None
        }
    };
    let ctx = EvalContext {
        data: &data,
        args,
        peer: peer.as_ref(),
    };
    let mut rows = Vec::new();
    let imp = RunResults::read(&runs_dir.join("imp"))?;
    // The dense network: IMP's first stage.
    let dense_dir = methods::stage_dir(&runs_dir.join("imp"), 0);
    rows.push(evaluate(
        "dense",
        "dense",
        &dense_dir,
        imp.stages[0].test_accuracy,
        (0.0, 0.0),
        &ctx,
    )?);
    for p in &plans {
        let dir = runs_dir.join(p.name);
        let r = RunResults::read(&dir)?;
        let mut row = evaluate(
            p.name,
            &r.structure(),
            &dir,
            r.test_accuracy,
            (r.sparsity, r.channel_sparsity),
            &ctx,
        )?;
        row.unstructured_layers = r
            .unstructured_layers()
            .into_iter()
            .map(|(name, reason)| format!("{name}: {reason}"))
            .collect();
        rows.push(row);
    }
    let pictures = draw_pictures(out, &runs_dir, &plans, &imp, &rows)?;
    let results = DemoResults {
        dataset: data.name.clone(),
        model: plans[0].exp.model.clone(),
        recipe,
        imp_rounds: plans[0].exp.imp.rounds,
        imp_rate: plans[0].exp.imp.rate,
        threads,
        rows,
        total_seconds: start.elapsed().as_secs_f64(),
    };
    write_json(&out.join("results.json"), &results)?;
    let md = markdown(&results, &pictures, args);
    coarsen_core::io::write_atomic(&out.join("report.md"), md.as_bytes())?;
    let html = html(&results, &pictures, args);
    coarsen_core::io::write_atomic(&out.join("report.html"), html.as_bytes())?;
    print!("{}", table(&results));
    eprintln!(
        "wrote {} (and report.html, results.json, plots) in {:.0} s",
        out.join("report.md").display(),
        results.total_seconds
    );
    Ok(())
}

/// What every row's evaluation shares: the data, the options and the ONNX Runtime peer (looked
/// up once).
struct EvalContext<'a> {
    data: &'a DataSplits,
    args: &'a DemoArgs,
    peer: Option<&'a crate::peer::OrtPeer>,
}

fn evaluate(
    method: &str,
    structure: &str,
    dir: &Path,
    train_acc: f64,
    (sparsity, channel_sparsity): (f64, f64),
    ctx: &EvalContext<'_>,
) -> Result<Row> {
    let EvalContext { data, args, peer } = *ctx;
    let loaded = load_network(dir, Some(data))?;
    let inference = sparse_eval(
        &loaded,
        data,
        args.batch,
        args.reps,
        coarsen_infer::Tuning::Measure,
        peer,
        false,
    )?;
    Ok(Row {
        method: method.to_string(),
        structure: structure.to_string(),
        unstructured_layers: Vec::new(),
        sparsity,
        channel_sparsity,
        test_accuracy: inference.packed_test_accuracy,
        train_test_accuracy: train_acc,
        run: dir.to_path_buf(),
        inference,
    })
}

/// Picture files, relative to the report directory.
struct Pictures {
    accuracy: String,
    saving: String,
    masks: Vec<(String, String)>,
}

fn draw_pictures(
    out: &Path,
    runs: &Path,
    plans: &[RunPlan],
    imp: &RunResults,
    rows: &[Row],
) -> Result<Pictures> {
    // Accuracy against sparsity: the IMP curve, one point per other method.
    let mut series = vec![Series {
        name: "IMP".into(),
        color: PALETTE[0],
        points: imp
            .stages
            .iter()
            .map(|s| (100.0 * s.sparsity, 100.0 * s.test_accuracy))
            .collect(),
    }];
    // IMP's curve starts at the dense network.
    for (i, r) in rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.method != "imp" && r.method != "dense")
    {
        series.push(Series {
            name: r.method.clone(),
            color: PALETTE[i % PALETTE.len()],
            points: vec![(100.0 * r.sparsity, 100.0 * r.test_accuracy)],
        });
    }
    let accuracy = "accuracy_vs_sparsity.png".to_string();
    chart::lines(
        &out.join(&accuracy),
        "test accuracy against sparsity",
        "sparsity of the pruned layers (%)",
        "test accuracy (%)",
        &series,
    )?;
    let saving = "time_saving.png".to_string();
    let items: Vec<(String, f64)> = rows
        .iter()
        .filter(|r| r.method != "dense")
        .map(|r| (r.method.clone(), 100.0 * r.inference.time_saving))
        .collect();
    chart::bars(
        &out.join(&saving),
        "inference time saving against the dense network",
        "time saving (%)",
        &items,
    )?;
    // One layer's mask before (IMP's) and after (structured), reordered so the blocks show.
    let mut masks = Vec::new();
    for name in ["imp-regroup", "imp-refill"] {
        let Some(plan) = plans.iter().find(|p| p.name == name) else {
            continue;
        };
        let Some(round) = plan.exp.imp.post_round else {
            continue;
        };
        let before = methods::stage_dir(&runs.join("imp"), round).join("masks.safetensors");
        let r = RunResults::read(&runs.join(name))?;
        let after = runs
            .join(name)
            .join(&r.final_stage)
            .join("masks.safetensors");
        if !(before.exists() && after.exists()) {
            continue;
        }
        let (b, a) = (MaskFile::read(&before)?, MaskFile::read(&after)?);
        // The largest structured layer shows the structure best.
        let layer = r
            .layers
            .iter()
            .filter(|l| l.pattern != "dense" && l.pattern != "unstructured" && l.shape.len() == 4)
            .max_by_key(|l| l.shape.iter().product::<usize>())
            .or_else(|| r.layers.iter().find(|l| l.density < 1.0));
        let Some(layer) = layer else { continue };
        let (Some(bt), Some(at)) = (b.get(&layer.name), a.get(&layer.name)) else {
            continue;
        };
        let view =
            MatrixView::of(&at.shape).unwrap_or_else(|| MatrixView::matrix(1, at.data.len()));
        let bm = Mask::from_bytes(view.rows, view.cols, bt.data.clone())?;
        let am = Mask::from_bytes(view.rows, view.cols, at.data.clone())?;
        let order = picture::structure_order(&am, view, None);
        let file = format!("mask_{name}.png");
        picture::draw(&[&bm, &am], &order, &out.join(&file))?;
        masks.push((
            format!(
                "`{}` of {name}: IMP's mask at round {round} (left) and after {} (right)",
                layer.name, r.pattern
            ),
            file,
        ));
    }
    Ok(Pictures {
        accuracy,
        saving,
        masks,
    })
}

fn pct(v: f64) -> String {
    format!("{:.1}%", 100.0 * v)
}

fn table(r: &DemoResults) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| method | structure | sparsity | channels removed | test accuracy | dense ms | packed ms | time saving | ideal saving | fraction of ideal | ORT ms |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for row in &r.rows {
        let i = &row.inference;
        let frac = if i.ideal_time_saving > 0.0 {
            format!("{:.2}", i.time_saving / i.ideal_time_saving)
        } else {
            "-".into()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.2}% | {:.2} | {:.2} | {} | {} | {} | {} |",
            row.method,
            row.structure,
            pct(row.sparsity),
            pct(row.channel_sparsity),
            100.0 * row.test_accuracy,
            i.dense_ms,
            i.packed_ms,
            pct(i.time_saving),
            pct(i.ideal_time_saving),
            frac,
            i.ort_ms.map_or("-".to_string(), |o| format!("{o:.2}"))
        );
    }
    let notes: Vec<String> = r
        .rows
        .iter()
        .flat_map(|row| {
            row.unstructured_layers
                .iter()
                .map(move |l| format!("- {}: {l} (left unstructured)", row.method))
        })
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(s, "\nLayers left without their method's structure:\n");
        for n in notes {
            let _ = writeln!(s, "{n}");
        }
    }
    s
}

fn intro(r: &DemoResults, args: &DemoArgs) -> String {
    format!(
        "{} · model `{}` · {} epochs per run on {} training images · IMP {} rounds of {:.0}% · \
         latency: batch {}, median of {} interleaved runs on {} thread(s) · total {:.0} s",
        r.dataset,
        r.model,
        r.recipe.epochs,
        r.recipe
            .train_subset
            .map_or("all".to_string(), |n| n.to_string()),
        r.imp_rounds,
        100.0 * r.imp_rate,
        args.batch,
        args.reps,
        r.threads,
        r.total_seconds
    )
}

const EXPLAIN: &str = "Each row is a network trained by `coarsen train` (its run directory is in \
`results.json`), loaded back, and run on coarsen's packed kernels: BatchNorm folded into the \
convolutions, every layer in the format its pattern allows (channel-compact, group blocks, \
shuffled blocks, N:M; unstructured layers run dense or CSR), removed channels physically \
shrinking the next layer. *test accuracy* is that packed network's; *dense ms* is the same \
network on the dense path (coarsen's tiled GEMM and implicit-GEMM convolutions), timed \
interleaved with the packed path in the same run (each sparse layer runs packed or dense, \
whichever measured faster on this machine); *ORT ms* is ONNX Runtime on the same network \
(exported as ONNX, BatchNorm folded, same batch and threads), timed after them when the \
environment of `scripts/bench-peers` is present (- otherwise); *time saving* is 1 − packed/dense \
(where no layer runs packed, the two paths are one computation, timed once: 0; a network whose \
tuned layers together measured no faster than the dense path runs dense, so 0 too, never a loss); \
*ideal saving* is 1 − packed \
multiply-adds / dense multiply-adds, what a perfect kernel would save; *fraction of ideal* is \
their ratio. `dense` is IMP's first stage; `imp` its last round (unstructured: runs dense, so no \
saving is expected — the point of the papers); `imp-refill` / `imp-regroup` post-process an IMP \
round's mask into channels / groups, rewind and retrain; `nm` prunes the dense network to 2:4 \
with a channel permutation and fine-tunes; `dsb` trains shuffled blocks (b = 16) at 80% sparsity \
from scratch. Small networks on 28×28 inputs leave little work per layer, so overheads weigh \
more than on the CIFAR-sized networks of `coarsen bench --model`.";

fn markdown(r: &DemoResults, p: &Pictures, args: &DemoArgs) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# coarsen demo\n");
    let _ = writeln!(s, "{}\n", intro(r, args));
    s.push_str(&table(r));
    let _ = writeln!(s, "\n{EXPLAIN}\n");
    let _ = writeln!(s, "![accuracy against sparsity]({})\n", p.accuracy);
    let _ = writeln!(s, "![time saving]({})\n", p.saving);
    for (caption, file) in &p.masks {
        let _ = writeln!(
            s,
            "{caption}, rows and columns reordered so the blocks show:\n"
        );
        let _ = writeln!(s, "![{caption}]({file})\n");
    }
    s
}

fn html(r: &DemoResults, p: &Pictures, args: &DemoArgs) -> String {
    let esc = |t: &str| {
        t.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace(['`', '*'], "")
    };
    let mut s = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>coarsen demo</title>\
         <style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}\
         table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}\
         td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}</style></head><body>\n",
    );
    let _ = writeln!(s, "<h1>coarsen demo</h1>\n<p>{}</p>", esc(&intro(r, args)));
    let _ = writeln!(s, "<table>");
    for (i, line) in table(r).lines().enumerate() {
        if i == 1 {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let tag = if i == 0 { "th" } else { "td" };
        let _ = write!(s, "<tr>");
        for c in cells {
            let _ = write!(s, "<{tag}>{}</{tag}>", esc(c));
        }
        let _ = writeln!(s, "</tr>");
    }
    let _ = writeln!(s, "</table>\n<p>{}</p>", esc(EXPLAIN));
    let _ = writeln!(
        s,
        "<p><img src=\"{}\" alt=\"accuracy against sparsity\"></p>",
        p.accuracy
    );
    let _ = writeln!(s, "<p><img src=\"{}\" alt=\"time saving\"></p>", p.saving);
    for (caption, file) in &p.masks {
        let _ = writeln!(
            s,
            "<p>{}</p><p><img src=\"{file}\" alt=\"mask\"></p>",
            esc(caption)
        );
    }
    s.push_str("</body></html>\n");
    s
}
