//! `coarsen bench`: structured-sparse kernels against the dense baseline, same run.

use anyhow::{bail, Context, Result};
use std::path::Path;

use coarsen_core::{Mask, MaskFile, MatrixView, Pattern, WeightFile};
use coarsen_infer::LayerFormat;
use coarsen_kernels::bench::{
    default_cases, measure, random_packed, tuned_dense, BenchFormat, Case, Record,
};
use coarsen_kernels::threads::Pinning;
use coarsen_kernels::timing::peak_gflops;
use coarsen_kernels::{Csr, Isa, Packed, Plan};
use serde_json::json;

use crate::args::BenchArgs;
use crate::commands::{check_outputs, ensure_parent, parse_sizes, selector, write_json};
use crate::progress;

/// One thing to time: a shape, a format label and the packed weights.
struct Job {
    case: Case,
    format: String,
    packed: Packed,
}

/// Runs `coarsen bench`.
pub fn run(args: &BenchArgs, quiet: bool, pin: Pinning) -> Result<()> {
    if let Some(j) = &args.json {
        ensure_parent(j)?;
    }
    let inputs: Vec<(&str, &Path)> = [
        ("--mask", args.mask.as_deref()),
        ("--weights", args.weights.as_deref()),
        ("--input", args.input.as_deref()),
    ]
    .into_iter()
    .filter_map(|(f, p)| p.map(|p| (f, p)))
    .collect();
    let outputs: Vec<(&str, &Path)> = [
        ("--json", args.json.as_deref()),
        ("--logits-out", args.logits_out.as_deref()),
    ]
    .into_iter()
    .filter_map(|(f, p)| p.map(|p| (f, p)))
    .collect();
    check_outputs(&inputs, &outputs)?;
    let isa = match &args.isa {
        None => Isa::detect(),
        Some(s) => {
            let isa = Isa::parse(s)
                .with_context(|| format!("--isa {s}: expected scalar, avx2, avx512 or neon"))?;
            if !isa.is_available() {
                bail!(
                    "--isa {s}: this CPU does not support it (available: {})",
                    available()
                );
            }
            isa
        }
    };
    let threads = args
        .threads
        .unwrap_or_else(rayon::current_num_threads)
        .max(1);
    let (pool, pinned) = coarsen_kernels::threads::pool(threads, pin)?;
    pool.install(|| bench(args, isa, threads, quiet, pinned))
}

fn available() -> String {
    Isa::available()
        .iter()
        .map(|i| i.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An export directory, or an architecture under the masks of `--mask` (weights of
/// `--weights`, or seeded random ones), timed packed against dense.
fn given_network(
    args: &BenchArgs,
    m: &str,
    settings: &coarsen_train::bench::BenchSettings,
) -> Result<(coarsen_train::bench::ModelBench, coarsen_infer::Network)> {
    let (network, formats, meta) = if coarsen_train::export::is_export(Path::new(m)) {
        let e = coarsen_train::export::load(Path::new(m))?;
        let meta = e.manifest.coarsen.clone();
        (e.network, e.formats, meta)
    } else {
        let spec = coarsen_train::model::ModelSpec {
            name: m.to_string(),
            width: 1.0,
            input: [3, 32, 32],
            classes: 10,
        };
        let model = coarsen_train::model::Model::new(&spec, args.seed)?;
        if let Some(w) = &args.weights {
            model.load_weights(&WeightFile::read(w)?)?;
        }
        let path = args.mask.as_deref().context("--mask")?;
        let (masks, meta) = coarsen_core::MaskSet::read(path)?;
        coarsen_train::train::check_masks(&masks, &model, path)?;
        let network = model.network(&masks)?;
        let formats = coarsen_infer::layer_formats(network.graph(), &masks, meta.as_ref())?;
        (network, formats, meta)
    };
    let mut r = coarsen_train::bench::network_benchmark(&network, &formats, settings)?;
    r.model = m.to_string();
    r.pattern = meta.map_or_else(|| "as given".to_string(), |m| m.pattern);
    Ok((r, network))
}

/// Interleaved passes of each path with which `--serve` settles whether a tuned packed
/// network runs dense (medians of this many).
const SERVE_SETTLE_REPS: usize = 7;

/// `--serve`: the timing worker of scripts/bench-peers (see the flag's help).
fn serve(args: &BenchArgs, dir: &Path, isa: Isa, pinned: bool) -> Result<()> {
    use std::io::{BufRead, Write};
    let e = coarsen_train::export::load(dir)?;
    let input = args.input.as_deref().context("--serve needs --input")?;
    let out = args
        .logits_out
        .as_deref()
        .context("--serve needs --logits-out")?;
    ensure_parent(out)?;
    let net = &e.network;
    let scaling = crate::inputs::Scaling {
        preprocessing: None,
        normalized: true,
    };
    let x = crate::inputs::read(
        &[input.to_path_buf()],
        None,
        net.input(),
        net.classes(),
        scaling,
    )?;
    let path = args.path.path();
    let options = coarsen_infer::InferOptions {
        bf16: args.bf16,
        ..Default::default()
    };
    let mut engine = coarsen_infer::InferenceNet::with_options(net, &e.formats, path, options)?;
    let tuning = args.tuning.tuning();
    let mut tuned = engine.tune_cached(x.n, tuning)?;
    // As eval, bench --model and the demo do: a tuned packed network that measures no faster
    // than the dense path as a whole runs dense (`time_tuned`), and the detail says so.
    let mut runs_dense = false;
    if path == coarsen_infer::Path::Packed && tuning.measures() {
        let dense = coarsen_infer::InferenceNet::new(net, &e.formats, coarsen_infer::Path::Dense)?;
        runs_dense = coarsen_infer::timing::time_tuned(
            (net, &e.formats),
            &mut engine,
            &mut tuned,
            tuning,
            &dense,
            &x.pixels,
            x.n,
            SERVE_SETTLE_REPS,
        )?
        .runs_dense;
    }
    let logits = engine.forward(&x.pixels, x.n)?;
    crate::inputs::write_npy(out, &[x.n, net.classes()], &logits)?;
    // What the pass multiplies, and the roof it runs under (bench-peers' `roof ms`).
    let macs = engine.macs_per_image().saturating_mul(x.n);
    let kernels = engine.kernel_names(x.n);
    let winograd = kernels.iter().filter(|k| k.starts_with("winograd")).count();
    let bf16 = kernels.iter().filter(|k| k.ends_with(", bf16")).count();
    if args.bf16 && bf16 == 0 {
        anyhow::bail!(
            "--bf16: no layer of {} runs in bfloat16 (it needs a CPU with AVX-512 BF16, and \
             layers in dense blocks that run in place)",
            dir.display()
        );
    }
    let peak = peak_gflops(isa, 0.3);
    let ready = json!({
        "ready": true,
        "macs": macs,
        "fma_peak_gflops": peak,
        "winograd_layers": winograd,
        "bf16_layers": bf16,
        "engine": format!("coarsen-{}", format!("{:?}", args.path).to_lowercase()),
        "detail": format!(
            "{} thread(s){}; {}{}; formats: {}",
            rayon::current_num_threads(),
            if pinned { ", pinned" } else { "" },
            coarsen_infer::describe_choices(&tuned),
            if runs_dense {
                format!("; {}", crate::commands::eval::RUNS_DENSE)
            } else {
                String::new()
            },
            engine
                .layers()
                .iter()
                .map(|l| l.format.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ),
    });
    let stdout = std::io::stdout();
    writeln!(stdout.lock(), "{ready}")?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let cmd: Vec<&str> = line.split_whitespace().collect();
        match cmd[..] {
            ["run", k] => {
                let k: usize = k
                    .parse()
                    .with_context(|| format!("`{line}`: expected `run K`"))?;
                let mut times = Vec::with_capacity(k);
                for _ in 0..k {
                    let t0 = std::time::Instant::now();
                    engine.forward(&x.pixels, x.n)?;
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                writeln!(stdout.lock(), "{}", json!({ "times_ms": times }))?;
            }
            ["quit"] => break,
            [] => {}
            _ => bail!("`{line}`: expected `run K` or `quit`"),
        }
    }
    Ok(())
}

/// `--training`: the training step against stock candle, and training throughput.
fn training(args: &BenchArgs, threads: usize, quiet: bool) -> Result<()> {
    let spin = progress::spinner("training", quiet);
    spin.set_message("masked SGD step, stock candle vs coarsen");
    let step = coarsen_train::bench::step_benchmark(128, args.steps.max(1), args.seed)?;
    println!(
        "masked SGD step of conv3x3(1→32)-conv3x3(32→64)-pool-fc, batch 128, {threads} thread(s), median of {}:",
        step.reps
    );
    println!(
        "  stock candle 0.11 (conv2d, matmul)  {:>9.1} ms",
        step.candle_ms
    );
    println!(
        "  coarsen's operations               {:>9.1} ms   {:.3} of candle's (target ≤ 0.333)",
        step.coarsen_ms,
        step.coarsen_ms / step.candle_ms
    );
    spin.set_message("training throughput of the small CNN");
    let spec = coarsen_train::model::ModelSpec {
        name: "cnn".into(),
        width: 1.0,
        input: [1, 28, 28],
        classes: 10,
    };
    let tp = coarsen_train::bench::throughput(&spec, 128, args.steps.max(1), args.seed)?;
    spin.finish_and_clear();
    println!("training throughput of the small CNN (28×28, batch 128, median step):");
    for t in &tp {
        println!(
            "  {:<11} {:>8.0} samples/s   {}",
            t.mode, t.samples_per_s, t.detail
        );
    }
    if let Some(j) = &args.json {
        write_json(
            j,
            &json!({
                "threads": threads,
                "step": step,
                "ratio": step.coarsen_ms / step.candle_ms,
                "throughput": tp,
            }),
        )?;
    }
    Ok(())
}

/// `--model`: end-to-end inference, packed against dense, same run.
fn models(args: &BenchArgs, isa: Isa, threads: usize, quiet: bool) -> Result<()> {
    let patterns: Vec<String> = match &args.pattern {
        Some(p) => p.split(',').map(|s| s.trim().to_string()).collect(),
        None => vec!["group".into(), "channel".into(), "nm".into()],
    };
    for p in &patterns {
        coarsen_train::bench::bench_format(p)?;
    }
    let sparsities: Option<Vec<f64>> = match &args.sparsity {
        None => None,
        Some(s) => Some(
            s.split(',')
                .map(|v| {
                    let x: f64 = v
                        .trim()
                        .parse()
                        .with_context(|| format!("--sparsity {v}: not a number"))?;
                    if !(0.0..1.0).contains(&x) {
                        bail!("--sparsity {x}: must lie in [0, 1)");
                    }
                    Ok(x)
                })
                .collect::<Result<_>>()?,
        ),
    };
    for m in &args.model {
        let known = ["resnet18", "resnet20", "vgg16", "vgg11"].contains(&m.as_str());
        if !known && !coarsen_train::export::is_export(Path::new(m)) {
            bail!("--model {m}: expected an export directory, resnet18, vgg16, resnet20 or vgg11");
        }
    }
    if args.mask.is_some() && args.model.len() != 1 {
        bail!("--mask goes with one --model architecture");
    }
    let mut runs = Vec::new();
    for m in &args.model {
        if coarsen_train::export::is_export(Path::new(m)) || args.mask.is_some() {
            runs.push((m.clone(), String::new(), 0.0));
            continue;
        }
        for p in &patterns {
            let list = match (&sparsities, p.as_str()) {
                (_, "nm") => vec![0.5],
                (Some(s), _) => s.clone(),
                (None, "channel") => vec![0.5],
                (None, _) => vec![0.78],
            };
            for s in list {
                runs.push((m.clone(), p.clone(), s));
            }
        }
    }
    let peer = crate::peer::OrtPeer::find();
    let bar = progress::bar(runs.len() as u64, "bench", quiet);
    let settings = coarsen_train::bench::BenchSettings {
        batch: args.batch,
        reps: args.reps,
        seed: args.seed,
        tuning: args.tuning.tuning(),
        profile: args.profile,
        bf16: args.bf16,
    };
    let mut records = Vec::new();
    for (m, p, s) in &runs {
        let doing = if args.profile {
            ": timing and profile"
        } else {
            ""
        };
        bar.set_message(format!("{m} {p} {s}{doing}"));
        let (mut record, network) = if p.is_empty() {
            given_network(args, m, &settings)?
        } else {
            coarsen_train::bench::model_benchmark(m, p, *s, &settings)?
        };
        if let Ok(peer) = &peer {
            bar.set_message(format!("{m} {p} {s}: ONNX Runtime"));
            record.ort_ms = Some(peer.time(&network, args.batch, args.reps, threads)?);
        }
        records.push(record);
        bar.inc(1);
    }
    bar.finish_and_clear();
    if args.profile {
        // The roof of every step's GFLOP/s, measured in this run on its threads.
        let peak = measure_peak(isa, threads, quiet);
        for r in &mut records {
            if let Some(p) = &mut r.profile {
                p.fma_peak_gflops = Some(peak);
            }
        }
    }
    println!(
        "end-to-end inference, batch {}, {threads} thread(s), median of {} interleaved runs; dense path: coarsen's tiled GEMM and implicit-GEMM convolution; packed path: sparse layers tuned ({:?})",
        args.batch, args.reps, args.tuning
    );
    let w = records
        .iter()
        .map(|r| r.model.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<w$} {:<15} {:>8} {:>10} {:>10} {:>8} {:>8} {:>8} {:>9} {:>11}",
        "model",
        "pattern",
        "sparsity",
        "dense ms",
        "packed ms",
        "saving",
        "ideal",
        "of ideal",
        "ORT ms",
        "packed/ORT"
    );
    for r in &records {
        let (ort, ratio) = match r.ort_ms {
            Some(o) => (format!("{o:.1}"), format!("{:.2}", r.sparse_ms / o)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<w$} {:<15} {:>8.2} {:>10.1} {:>10.1} {:>7.1}% {:>7.1}% {:>8.2} {:>9} {:>11}",
            r.model,
            r.pattern,
            r.sparsity,
            r.dense_ms,
            r.sparse_ms,
            100.0 * r.time_saving,
            100.0 * r.ideal_time_saving,
            r.fraction_of_ideal,
            ort,
            ratio
        );
    }
    match &peer {
        Ok(_) => println!(
            "ORT ms: ONNX Runtime (scripts/bench-peers' environment) on the same network exported as ONNX (dense weights with the mask's zeros, BatchNorm folded), same batch and threads, timed after coarsen's paths"
        ),
        Err(note) => println!("{note}"),
    }
    for r in &records {
        println!(
            "  {} {}: {}{}",
            r.model,
            r.pattern,
            coarsen_infer::describe_choices(&r.tuned),
            if r.runs_dense {
                format!("; {}", crate::commands::eval::RUNS_DENSE)
            } else {
                String::new()
            }
        );
    }
    for r in &records {
        if let Some(p) = &r.profile {
            print_profile(r, p);
        }
    }
    if let Some(j) = &args.json {
        write_json(j, &records)?;
    }
    Ok(())
}

/// This machine's FMA peak with `isa` on the pool's `threads`, GFLOP/s, behind a spinner.
fn measure_peak(isa: Isa, threads: usize, quiet: bool) -> f64 {
    let spin = progress::spinner("peak", quiet);
    spin.set_message(format!(
        "measuring the {} FMA peak on {threads} threads",
        isa.as_str()
    ));
    let peak = peak_gflops(isa, 0.3);
    spin.finish_and_clear();
    peak
}

/// `--profile`: every step of both paths, with its share of the pass and its GFLOP/s.
fn print_profile(r: &coarsen_train::bench::ModelBench, p: &coarsen_train::bench::PathProfiles) {
    for (path, steps) in [("dense", &p.dense), ("packed", &p.packed)] {
        let total: f64 = steps.iter().map(|s| s.ms).sum();
        println!(
            "\nprofile: {} {} {path} path, batch {}, median of {} passes per step (sum {total:.1} ms)",
            r.model, r.pattern, r.batch, r.reps
        );
        let w = steps.iter().map(|s| s.step.len()).max().unwrap_or(4).max(4);
        let kw = steps
            .iter()
            .map(|s| s.kernel.len())
            .max()
            .unwrap_or(6)
            .max(6);
        println!(
            "{:<w$}  {:<kw$}  {:>9}  {:>6}  {:>8}  {:>7}  {:>7}",
            "step", "kernel", "ms", "share", "GMAC", "GFLOP/s", "of peak"
        );
        for s in steps {
            let share = if total > 0.0 { s.ms / total } else { 0.0 };
            let gmac = s.macs as f64 / 1e9;
            let rate = (s.macs > 0 && s.ms > 0.0).then(|| 2.0 * gmac / (s.ms / 1e3));
            let gflops = rate.map_or("-".into(), |g| format!("{g:.1}"));
            let of_peak = match (rate, p.fma_peak_gflops) {
                (Some(g), Some(peak)) if peak > 0.0 => format!("{:.0}%", 100.0 * g / peak),
                _ => "-".into(),
            };
            let kernel = if s.kernel == s.step { "" } else { &s.kernel };
            println!(
                "{:<w$}  {:<kw$}  {:>9.3}  {:>5.1}%  {:>8.4}  {:>7}  {:>7}",
                s.step,
                kernel,
                s.ms,
                100.0 * share,
                gmac,
                gflops,
                of_peak
            );
        }
        if let Some(peak) = p.fma_peak_gflops {
            if let Some(bound) = coarsen_train::bench::peak_bound_ms(steps, peak) {
                let gmac: f64 = steps.iter().map(|s| s.macs as f64 / 1e9).sum();
                println!(
                    "roof: {gmac:.2} GMAC need at least {bound:.1} ms at this machine's FMA peak \
                     ({peak:.1} GFLOP/s on {} thread(s), measured in this run) on kernels that \
                     perform every multiply-add; the steps' sum is {total:.1} ms, {:.0}% of the \
                     peak's rate (Winograd steps multiply less than they count, and may pass 100%)",
                    r.threads,
                    100.0 * bound / total.max(1e-12)
                );
            }
        }
    }
}

fn bench(args: &BenchArgs, isa: Isa, threads: usize, quiet: bool, pinned: bool) -> Result<()> {
    if args.model.is_empty() {
        // (clap's `requires` does not see an absent --model here: checked by hand.)
        for (flag, given) in [
            ("--profile", args.profile),
            ("--pattern", args.pattern.is_some()),
            ("--sparsity", args.sparsity.is_some()),
        ] {
            if given {
                bail!("{flag} goes with --model (an end-to-end network benchmark)");
            }
        }
    }
    if let Some(dir) = &args.serve {
        return serve(args, dir, isa, pinned);
    }
    if args.training {
        return training(args, threads, quiet);
    }
    if !args.model.is_empty() {
        return models(args, isa, threads, quiet);
    }
    let peak = measure_peak(isa, threads, quiet);
    println!(
        "machine: {} on {threads} thread(s), measured FMA peak {peak:.1} GFLOP/s; dense baseline: faer",
        isa.as_str()
    );
    let jobs = jobs(args)?;
    let bar = progress::bar(jobs.len() as u64, "bench", quiet);
    let mut records: Vec<Record> = Vec::with_capacity(jobs.len());
    let mut dense_cache: Option<((usize, usize, usize), Plan)> = None;
    for job in &jobs {
        let c = &job.case;
        bar.set_message(format!(
            "{} {} {}x{}x{}",
            c.label, job.format, c.rows, c.cols, c.n
        ));
        let key = (c.rows, c.cols, c.n);
        if dense_cache.as_ref().is_none_or(|(k, _)| *k != key) {
            dense_cache = Some((key, tuned_dense(c.rows, c.cols, c.n, args.seed)?));
        }
        let dense = &dense_cache.as_ref().map(|(_, p)| p).context("dense plan")?;
        let sparse = Plan::with_isa(&job.packed, isa)?;
        records.push(measure(
            c,
            &job.format,
            &job.packed,
            dense,
            &sparse,
            args.budget,
        )?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    print!("{}", table(&records, peak));
    if let Some(path) = &args.json {
        let list: Vec<_> = records
            .iter()
            .map(|r| {
                json!({
                    "format": r.format,
                    "shape": r.shape,
                    "density": r.density,
                    "dense_ms": r.dense_ms,
                    "sparse_ms": r.sparse_ms,
                    "speedup": r.speedup,
                    "ideal": r.ideal,
                    "fraction_of_ideal": r.fraction_of_ideal,
                    "label": r.label,
                    "dense_gflops": r.dense_gflops,
                    "sparse_gflops": r.sparse_gflops,
                    "dense_fraction_of_peak": r.dense_gflops / peak,
                    "isa": isa.as_str(),
                    "threads": threads,
                    "peak_gflops": peak,
                })
            })
            .collect();
        write_json(path, &list)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The jobs: a mask file's layers, or shapes × formats with random masks.
fn jobs(args: &BenchArgs) -> Result<Vec<Job>> {
    if let Some(path) = &args.mask {
        return mask_jobs(args, path);
    }
    let formats: Vec<BenchFormat> = match &args.formats {
        None => BenchFormat::defaults(),
        Some(list) => list
            .split(',')
            .map(|f| f.trim().parse::<BenchFormat>())
            .collect::<Result<_, _>>()?,
    };
    if !(args.density > 0.0 && args.density <= 1.0) {
        bail!("--density {}: must lie in (0, 1]", args.density);
    }
    let cases = if args.shape.is_empty() {
        default_cases(args.batch)
    } else {
        args.shape
            .iter()
            .map(|s| parse_shape(s))
            .collect::<Result<Vec<_>>>()?
    };
    let mut jobs = Vec::new();
    for case in cases {
        for (i, f) in formats.iter().enumerate() {
            let seed = args.seed ^ (i as u64).wrapping_mul(0x9e37_79b9);
            jobs.push(Job {
                packed: random_packed(*f, case.rows, case.cols, args.density, seed)?,
                format: f.label(),
                case: case.clone(),
            });
        }
    }
    Ok(jobs)
}

/// `R,C,N` (also `RxCxN`).
fn parse_shape(s: &str) -> Result<Case> {
    let [rows, cols, n] = parse_sizes("--shape", s, "R,C,N")?;
    Ok(Case {
        label: format!("{rows}x{cols}x{n}"),
        rows,
        cols,
        n,
    })
}

/// Every selected layer of a mask file at its real shape, in the format its pattern runs in,
/// and as CSR beside it.
fn mask_jobs(args: &BenchArgs, path: &std::path::Path) -> Result<Vec<Job>> {
    let masks = MaskFile::read(path)?;
    let weights = args.weights.as_ref().map(WeightFile::read).transpose()?;
    let sel = selector(&args.selection)?;
    let pattern = match &masks.metadata {
        Some(m) => Some(Pattern::from_metadata(&m.pattern, &m.params)?),
        None => None,
    };
    let mut jobs = Vec::new();
    for t in masks
        .tensors()
        .iter()
        .filter(|t| sel.selects(&t.name, &t.shape))
    {
        let view = MatrixView::of(&t.shape).context("rank >= 2")?;
        let mask = Mask::from_bytes(view.rows, view.cols, t.data.clone())?;
        if mask.nnz() == 0 {
            continue;
        }
        let values: Vec<f32> = match &weights {
            Some(w) => coarsen_core::matching_values(w, t, masks.path())?.to_vec(),
            None => (0..mask.len())
                .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
                .collect(),
        };
        let meta = masks.metadata.as_ref().and_then(|m| m.layers.get(&t.name));
        let structured = meta.is_some_and(|m| m.status == coarsen_core::LayerStatus::Structured);
        let case = Case {
            label: t.name.trim_end_matches(".weight").to_string(),
            rows: view.rows,
            cols: view.cols,
            n: args.n,
        };
        // A layer whose mask does not have the structure its metadata names is an error that
        // names the file and the layer.
        let format = match (&pattern, structured) {
            (Some(p), true) => LayerFormat::of_pattern(p, meta.and_then(|m| m.col_perm.as_deref())),
            _ => LayerFormat::Csr,
        };
        let pack = || -> Result<(String, Packed)> {
            Ok((format.label(), format.pack(&mask, &values, view)?))
        };
        let (label, packed) = pack().with_context(|| {
            format!(
                "{}: layer '{}' {:?}",
                masks.path().display(),
                t.name.escape_debug(),
                t.shape
            )
        })?;
        let is_csr = label == "csr";
        jobs.push(Job {
            case: case.clone(),
            format: label,
            packed,
        });
        if !is_csr {
            jobs.push(Job {
                case,
                format: "csr".into(),
                packed: Packed::Csr(Csr::pack(&mask, &values)?),
            });
        }
    }
    if jobs.is_empty() {
        bail!(
            "{}: no non-empty layer selected ({})",
            path.display(),
            sel.describe()
        );
    }
    Ok(jobs)
}

fn table(records: &[Record], peak: f64) -> String {
    let w = records
        .iter()
        .map(|r| r.label.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut s = format!(
        "{:<w$}  {:>18}  {:>18}  {:>7}  {:>9}  {:>9}  {:>7}  {:>6}  {:>8}  {:>10}  {:>11}\n",
        "layer",
        "shape R,C,N",
        "format",
        "density",
        "dense ms",
        "sparse ms",
        "speedup",
        "ideal",
        "of ideal",
        "dense GF/s",
        "sparse GF/s"
    );
    for r in records {
        s += &format!(
            "{:<w$}  {:>18}  {:>18}  {:>7.3}  {:>9.3}  {:>9.3}  {:>6.2}x  {:>5.2}x  {:>8.2}  {:>10.1}  {:>11.1}\n",
            r.label,
            format!("{},{},{}", r.shape[0], r.shape[1], r.shape[2]),
            r.format,
            r.density,
            r.dense_ms,
            r.sparse_ms,
            r.speedup,
            r.ideal,
            r.fraction_of_ideal,
            r.dense_gflops,
            r.sparse_gflops
        );
    }
    // Per format: median speedup and fraction of ideal over the shapes.
    let mut formats: Vec<&str> = records.iter().map(|r| r.format.as_str()).collect();
    formats.sort_unstable();
    formats.dedup();
    s += "\nper format (median over shapes):\n";
    for f in formats {
        let of: Vec<&Record> = records.iter().filter(|r| r.format == f).collect();
        let med = |v: Vec<f64>| coarsen_kernels::timing::median(v);
        s += &format!(
            "  {:<18} speedup {:>5.2}x  of ideal {:>4.2}  ({} shapes)\n",
            f,
            med(of.iter().map(|r| r.speedup).collect()),
            med(of.iter().map(|r| r.fraction_of_ideal).collect()),
            of.len()
        );
    }
    let dense = coarsen_kernels::timing::median(records.iter().map(|r| r.dense_gflops).collect());
    s += &format!(
        "dense baseline: median {dense:.1} GFLOP/s = {:.0}% of the measured peak {peak:.1}\n",
        100.0 * dense / peak
    );
    s
}
