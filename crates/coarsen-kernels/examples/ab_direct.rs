//! Developer tool: times the implicit-GEMM convolution on CIFAR VGG/ResNet layer shapes (the
//! first layer's 3 input channels, then the 3×3 layers of every stage) with
//! several input-channel blocks, interleaved pass by pass on one thread (the machine's noise
//! hits all alike), and prints the best and median GFLOP/s of each.
//!
//! `cargo run --release -p coarsen-kernels --example ab_direct -- [BATCH] [ROUNDS] [BLOCKS]`
//! with BLOCKS comma-separated (default 128,64,32); `... -- s2 [BATCH] [ROUNDS]` instead times
//! stride-2 3×3 layers on the implicit GEMM against im2col + the tiled GEMM, in
//! CPU time of the process on one thread; `... -- small [ROUNDS]` times the few-column dense
//! kernel (batch 1's deep layers) on one thread, best wall time, against the narrow kernel
//! where the columns fit one vector; `... -- blocks [BATCH] [ROUNDS] [DENSITY]` times the block
//! kernel (`BlockConv`) against the dense implicit GEMM: on one block of every row and column
//! (the same products), and on row groups of 32 that each keep DENSITY of the columns (as
//! Regroup leaves them), in useful GFLOP/s.

#[path = "common/layer.rs"]
mod layer;

use std::time::Instant;

use coarsen_core::Mask;
use coarsen_kernels::conv::{ConvDims, ConvGeometry};
use coarsen_kernels::timing::process_cpu_ms;
use coarsen_kernels::{BlockConv, DirectConv, GroupBlocks, Packed};
use rayon::prelude::*;

/// CIFAR VGG/ResNet 3×3 layers: input channels, output channels, image side.
const LAYERS: [(usize, usize, usize); 6] = [
    (3, 64, 32),
    (64, 64, 32),
    (128, 128, 16),
    (256, 256, 8),
    (512, 512, 4),
    (512, 512, 2),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("s2") {
        return strided(&args[1..]);
    }
    if args.get(1).map(String::as_str) == Some("small") {
        return few_columns(&args[1..]);
    }
    if args.get(1).map(String::as_str) == Some("blocks") {
        return blocks(&args[1..]);
    }
    let batch: usize = args.get(1).map_or(Ok(64), |s| s.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(9), |s| s.parse())?;
    let blocks: Vec<usize> = args
        .get(3)
        .map_or("128,64,32", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let g = ConvGeometry::square(3, 1, 1);
    for &(cin, cout, hw) in &LAYERS {
        let d = ConvDims::new(&[cin, batch, hw, hw], g)?;
        let n = d.n();
        let w = layer::weights(cout * cin * 9);
        let x = layer::input(cin * n);
        let Some(base) = DirectConv::new(g, cout, cin, &w)? else {
            return Err("the implicit GEMM needs AVX-512".into());
        };
        let kernels: Vec<DirectConv> = blocks
            .iter()
            .map(|&b| {
                let mut k = base.clone();
                k.set_channel_block(b);
                k
            })
            .collect();
        let threads = rayon::current_num_threads();
        // Whole output rows of whole images per thread, as the engine cuts columns.
        let per = n.div_ceil(threads).div_ceil(hw * hw) * hw * hw;
        let ranges: Vec<(usize, usize)> = (0..threads)
            .map(|t| ((t * per).min(n), ((t + 1) * per).min(n)))
            .filter(|(a, b)| a < b)
            .collect();
        let mut ys: Vec<Vec<f32>> = ranges
            .iter()
            .map(|(a, b)| vec![0.0f32; cout * (b - a)])
            .collect();
        let mut times = vec![Vec::new(); kernels.len()];
        for _ in 0..rounds {
            for (k, t) in kernels.iter().zip(&mut times) {
                let s = Instant::now();
                ranges
                    .par_iter()
                    .zip(ys.par_iter_mut())
                    .try_for_each(|(&(a, b), y)| k.forward(&x, &d, a, b, y))?;
                t.push(s.elapsed().as_secs_f64());
            }
        }
        let flop = 2.0 * (cout * cin * 9 * n) as f64 / 1e9;
        let line: Vec<String> = blocks
            .iter()
            .zip(&mut times)
            .map(|(b, t)| {
                t.sort_by(f64::total_cmp);
                format!(
                    "CB {b}: best {:.1} median {:.1}",
                    flop / t[0],
                    flop / t[t.len() / 2]
                )
            })
            .collect();
        println!(
            "[{cin}->{cout}, {hw}x{hw}, batch {batch}, {threads} thread(s)] GFLOP/s {}",
            line.join(" | ")
        );
    }
    Ok(())
}

/// Stride-2 3×3 layers (ResNet-18's downsampling convolutions): the implicit GEMM
/// against im2col + the tiled dense GEMM, interleaved, best CPU time of each.
fn strided(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let cpu_ms = || process_cpu_ms().ok_or("CPU time needs /proc/self/task (Linux)");
    use coarsen_kernels::{Dense, Packed, Plan};
    let batch: usize = args.get(1).map_or(Ok(64), |s| s.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(7), |s| s.parse())?;
    let g = ConvGeometry::square(3, 2, 1);
    for (cin, cout, hw) in [(64, 128, 32), (128, 256, 16), (256, 512, 8)] {
        let d = ConvDims::new(&[cin, batch, hw, hw], g)?;
        let n = d.n();
        let k = cin * 9;
        let w = layer::weights(cout * k);
        let x = layer::input(cin * batch * hw * hw);
        let Some(mut dc) = DirectConv::new(g, cout, cin, &w)? else {
            return Err("the implicit GEMM needs AVX-512".into());
        };
        if let Some(b) = std::env::var("AB_BLOCK").ok().and_then(|v| v.parse().ok()) {
            dc.set_channel_block(b);
        }
        let plan = Plan::new(&Packed::Dense(Dense::new(cout, k, w.clone())?))?;
        let nr = plan.tile_width().ok_or("no tiled kernel")?;
        let mut cols = vec![0.0f32; n.div_ceil(nr) * nr * k];
        let mut tmp = Vec::new();
        let mut part = vec![0.0f32; cout * n];
        let (mut y1, mut y2) = (vec![0.0f32; cout * n], vec![0.0f32; cout * n]);
        let (mut t1, mut t2) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..rounds {
            let t = cpu_ms()?;
            dc.forward(&x, &d, 0, n, &mut y1)?;
            t1 = t1.min(cpu_ms()? - t);
            // As the engine runs it: chunks of whole output rows, about 2^17 im2col values
            // each, so that a chunk's im2col is still in the cache when the GEMM reads it.
            let t = cpu_ms()?;
            let per = ((1usize << 17) / k).max(256).div_ceil(d.wo) * d.wo;
            let mut c0 = 0;
            while c0 < n {
                let c1 = (c0 + per).min(n);
                let nc = c1 - c0;
                let len = nc.div_ceil(nr) * nr * k;
                d.im2col_tiles(&x, None, c0, c1, nr, &mut cols[..len], &mut tmp)?;
                plan.forward_tiles(&cols[..len], &mut part[..cout * nc], nc)?;
                for r in 0..cout {
                    y2[r * n + c0..r * n + c1].copy_from_slice(&part[r * nc..(r + 1) * nc]);
                }
                c0 = c1;
            }
            t2 = t2.min(cpu_ms()? - t);
        }
        let diff = y1
            .iter()
            .zip(&y2)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let flop = 2.0 * (cout * k * n) as f64 / 1e6;
        println!(
            "[{cin}->{cout}, {hw}x{hw} stride 2, batch {batch}] implicit GEMM {t1:.1} ms ({:.1} GF/s) | im2col + tiled GEMM in chunks {t2:.1} ms ({:.1} GF/s) | max |diff| {diff:.1e}",
            flop / t1,
            flop / t2
        );
    }
    Ok(())
}

/// The few-column dense kernel (`Plan::forward_small_rows`) on batch 1's deep 3×3 layers
/// (`n` = 64, 16 and 4 output positions), best wall time on one thread.
fn few_columns(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    use coarsen_kernels::{Dense, Packed, Plan};
    let rounds: usize = args.get(1).map_or(Ok(20), |s| s.parse())?;
    for (rows, k, n) in [
        (256usize, 2304usize, 64usize),
        (512, 4608, 16),
        (512, 2304, 16),
        (512, 4608, 4),
    ] {
        let w = layer::weights(rows * k);
        let plan = Plan::new(&Packed::Dense(Dense::new(rows, k, w)?))?;
        let mr = plan.tile_rows().ok_or("no tiled kernel")?;
        let xt = layer::input(n.div_ceil(mr) * mr * k);
        // The narrow kernel's single tile of the same X.
        let narrow = plan.narrow_width().filter(|&nw| n <= nw);
        let xn: Vec<f32> = match narrow {
            Some(nw) => {
                let mut v = vec![0.0f32; nw * k];
                for kk in 0..k {
                    for j in 0..n {
                        v[kk * nw + j] = xt[(j / mr * k + kk) * mr + j % mr];
                    }
                }
                v
            }
            None => Vec::new(),
        };
        let mut y = vec![0.0f32; rows * n];
        let (mut best, mut best_narrow) = (f64::INFINITY, f64::INFINITY);
        // Wall time, best of many, the two kernels interleaved: a sub-millisecond call is
        // shorter than the scheduler's CPU-time accounting tick.
        for _ in 0..rounds {
            let t = Instant::now();
            plan.forward_small_rows(&xt, &mut y, n, 0, rows)?;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
            if narrow.is_some() {
                let t = Instant::now();
                plan.forward_narrow_rows(&xn, &mut y, n, 0, rows)?;
                best_narrow = best_narrow.min(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let flop = 2.0 * (rows * k * n) as f64 / 1e6;
        let mb = (rows * k * 4) as f64 / 1e6;
        let mut line = format!(
            "[{rows} x {k} weight, {n} columns] few-column {best:.3} ms: {:.1} GF/s, weights {:.1} GB/s",
            flop / best,
            mb / best
        );
        if narrow.is_some() {
            line += &format!(
                " | narrow {best_narrow:.3} ms: {:.1} GF/s, weights {:.1} GB/s",
                flop / best_narrow,
                mb / best_narrow
            );
        }
        println!("{line}");
    }
    Ok(())
}

/// The block kernel against the dense implicit GEMM (see the module docs).
fn blocks(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let batch: usize = args.get(1).map_or(Ok(64), |s| s.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(9), |s| s.parse())?;
    let density: f64 = args.get(3).map_or(Ok(0.22), |s| s.parse())?;
    let g = ConvGeometry::square(3, 1, 1);
    println!("useful GFLOP/s, best of {rounds}: dense implicit GEMM | one full block | row groups at {density}");
    // All but batch 1's 2×2 layer.
    for &(cin, cout, hw) in &LAYERS[..LAYERS.len() - 1] {
        let d = ConvDims::new(&[cin, batch, hw, hw], g)?;
        let (n, kk) = (d.n(), cin * 9);
        let w = layer::weights(cout * kk);
        let x = layer::input(cin * n);
        let Some(dense) = DirectConv::new(g, cout, cin, &w)? else {
            return Err("the implicit GEMM needs AVX-512".into());
        };
        let full = Packed::Group(GroupBlocks::pack(&Mask::ones(cout, kk), &w)?);
        let mask = layer::row_groups(cout, kk, density);
        let groups = Packed::Group(GroupBlocks::pack(&mask, &w)?);
        let (Some(bf), Some(bg)) = (
            BlockConv::new(g, cin, &full, None)?,
            BlockConv::new(g, cin, &groups, None)?,
        ) else {
            return Err("the block kernel needs AVX-512".into());
        };
        let mut y = vec![0.0f32; cout * n];
        let mut best = [f64::INFINITY; 3];
        for _ in 0..rounds {
            let s = Instant::now();
            dense.forward(&x, &d, 0, n, &mut y)?;
            best[0] = best[0].min(s.elapsed().as_secs_f64());
            let s = Instant::now();
            bf.forward(&x, &d, 0, n, &mut y)?;
            best[1] = best[1].min(s.elapsed().as_secs_f64());
            let s = Instant::now();
            bg.forward(&x, &d, 0, n, &mut y)?;
            best[2] = best[2].min(s.elapsed().as_secs_f64());
        }
        let flops = 2.0 * (cout * kk * n) as f64;
        let kept = mask.nnz() as f64 / (cout * kk) as f64;
        println!(
            "{cin:4} ch {hw:2}x{hw:<2}: {:6.1} | {:6.1} | {:6.1} (density {kept:.3})",
            flops / best[0] / 1e9,
            flops / best[1] / 1e9,
            flops * kept / best[2] / 1e9
        );
    }
    Ok(())
}
