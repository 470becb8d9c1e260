//! Developer tool: whole forward passes of an export's packed path, tuned as `coarsen bench
//! --model` tunes it, under A's engine options and under B's, interleaved pass by pass (the
//! machine's noise hits both alike); prints each side's best and median pass, and the median
//! of the rounds' ratios.
//!
//! `cargo run --release -p coarsen-infer --example ab_tuned -- EXPORT_DIR [BATCH] [ROUNDS]
//! [B_OPTIONS] [A_OPTIONS]` with options `chunk=FLOATS`, `prefix=FLOATS` (0: off),
//! `prefix_min=FLOATS`, `fuse_downsample=0|1`, `prefix_parallel=0|1` and `bf16=0|1`,
//! comma-separated (A: the defaults unless given).
use std::time::Instant;

use coarsen_infer::{export, InferOptions, InferenceNet, Path, TuneCache, Tuning};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .ok_or("usage: ab_tuned EXPORT_DIR [BATCH] [ROUNDS] [B_OPTIONS]")?;
    let batch: usize = args.get(2).map_or(Ok(64), |s| s.parse())?;
    let rounds: usize = args.get(3).map_or(Ok(15), |s| s.parse())?;
    let parse = |arg: Option<&String>| -> Result<InferOptions, Box<dyn std::error::Error>> {
        let mut o = InferOptions::default();
        for kv in arg
            .map_or("", String::as_str)
            .split(',')
            .filter(|s| !s.is_empty())
        {
            let (k, v) = kv.split_once('=').ok_or("options are key=value")?;
            match k {
                "chunk" => o.chunk_floats = v.parse()?,
                "prefix" => o.prefix_chunk_floats = v.parse()?,
                "prefix_min" => o.prefix_min_floats = v.parse()?,
                "fuse_downsample" => o.fuse_downsample = v == "1",
                "prefix_parallel" => o.prefix_parallel = v == "1",
                "bf16" => o.bf16 = v == "1",
                _ => return Err(format!("unknown option {k}").into()),
            }
        }
        Ok(o)
    };
    let ob = parse(args.get(4))?;
    let oa = parse(args.get(5))?;
    let e = export::load(std::path::Path::new(dir))?;
    let mut nets = Vec::new();
    for o in [oa, ob] {
        let mut net = InferenceNet::with_options(&e.network, &e.formats, Path::Packed, o)?;
        net.tune(batch, &mut TuneCache::in_memory(), Tuning::Measure)?;
        println!("{:?}", net.chunking(batch));
        nets.push(net);
    }
    let [c, h, w] = nets[0].input();
    let x: Vec<f32> = (0..c * h * w * batch)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut ms = [Vec::new(), Vec::new()];
    let mut out = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, net) in nets.iter().enumerate() {
            let s = Instant::now();
            out[i] = net.forward(&x, batch)?;
            ms[i].push(s.elapsed().as_secs_f64() * 1e3);
        }
    }
    let diff = out[0]
        .iter()
        .zip(&out[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // Each round's two passes ran a few milliseconds apart: their ratio cancels most of the
    // machine's slower drifts.
    let mut ratio: Vec<f64> = ms[1].iter().zip(&ms[0]).map(|(b, a)| b / a).collect();
    ratio.sort_by(f64::total_cmp);
    println!(
        "B/A per round: median {:.3}, quartiles {:.3} .. {:.3}",
        ratio[ratio.len() / 2],
        ratio[ratio.len() / 4],
        ratio[3 * ratio.len() / 4]
    );
    for (tag, m) in ["A", "B"].iter().zip(&mut ms) {
        m.sort_by(f64::total_cmp);
        println!(
            "{tag}: best {:.2} ms, median {:.2} ms",
            m[0],
            m[m.len() / 2]
        );
    }
    println!("largest difference of the logits: {diff:e}");
    Ok(())
}
