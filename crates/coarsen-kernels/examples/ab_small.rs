//! Developer tool: the dense kernel for few columns (`Plan::forward_small_rows`, batch 1's
//! deepest layers on instruction sets without the narrow kernel) on batch 1's GEMM shapes as
//! the engine runs it (output rows in `2·threads` shares), best wall time with the weights
//! warm in the caches and after each thread read 256 MiB of other data (weights from memory,
//! as in a whole network's pass), in GFLOP/s and GB/s of the weight read.
//!
//! `cargo run --release -p coarsen-kernels --example ab_small -- [ROUNDS]`; `AB_SMALL_SHAPE=M,K,N`
//! times that shape alone (`RAYON_NUM_THREADS=1`: one core).

mod common;
#[path = "common/layer.rs"]
mod layer;

use coarsen_kernels::formats::Dense;
use coarsen_kernels::{Packed, Plan};
use rayon::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(30), |s| s.parse())?;
    let threads = rayon::current_num_threads();
    let mut junk = common::junk();
    // (rows, cols, columns of X): small products whose weights stay in L2, ResNet-18's
    // layer4 and layer3 and VGG-16's last stages at batch 1.
    let only: Option<Vec<usize>> = std::env::var("AB_SMALL_SHAPE")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect());
    let shapes: Vec<(usize, usize, usize)> = match only.as_deref() {
        Some(&[m, k, n]) => vec![(m, k, n)],
        _ => vec![
            (64usize, 512usize, 16usize),
            (128, 2048, 16),
            (512, 4608, 16),
            (512, 2304, 16),
            (256, 2304, 64),
            (512, 4608, 4),
            (512, 4608, 8),
        ],
    };
    for (m, k, n) in shapes {
        let w = layer::weights(m * k);
        let plan = Plan::new(&Packed::Dense(Dense::new(m, k, w.clone())?))?;
        let (Some(mr), Some(nr)) = (plan.tile_rows(), plan.tile_width()) else {
            return Err("this instruction set runs the faer kernel".into());
        };
        let x = layer::input(k * n);
        // Panels of MR columns for the panel kernel, output rows in shares of NR; tiles of NR
        // columns for the tiled kernel run as one stream of weights, shares of MR.
        let (xt, shares) = (grouped(&x, k, n, mr), row_shares(m, threads, nr));
        let (xtt, tshares) = (grouped(&x, k, n, nr), row_shares(m, threads, mr));
        let mut ys: Vec<Vec<f32>> = shares.iter().map(|(a, z)| vec![0.0; (z - a) * n]).collect();
        let mut tys: Vec<Vec<f32>> = tshares
            .iter()
            .map(|(a, z)| vec![0.0; (z - a) * n])
            .collect();
        let (warm, cold) = common::warm_and_cold(rounds, &mut junk, || {
            shares
                .par_iter()
                .zip(ys.par_iter_mut())
                .try_for_each(|(&(r0, r1), y)| plan.forward_small_rows(&xt, y, n, r0, r1))
        })?;
        let (twarm, tcold) = common::warm_and_cold(rounds, &mut junk, || {
            tshares
                .par_iter()
                .zip(tys.par_iter_mut())
                .try_for_each(|(&(r0, r1), y)| plan.forward_stream_rows(&xtt, y, n, r0, r1))
        })?;
        // Checked against a naive product.
        let mut err = 0.0f32;
        for (&(r0, r1), y) in tshares.iter().zip(&tys) {
            for r in r0..r1 {
                for c in 0..n {
                    let want: f32 = (0..k).map(|kk| w[r * k + kk] * x[kk * n + c]).sum();
                    err = err.max((y[(r - r0) * n + c] - want).abs());
                }
            }
        }
        for (&(r0, r1), y) in shares.iter().zip(&ys) {
            for r in r0..r1 {
                for c in 0..n {
                    let want: f32 = (0..k).map(|kk| w[r * k + kk] * x[kk * n + c]).sum();
                    err = err.max((y[(r - r0) * n + c] - want).abs());
                }
            }
        }
        let gflop = (2 * m * k * n) as f64 / 1e6;
        let mb = (m * k * 4) as f64 / 1e6;
        println!(
            "[{m}x{k} · {n} columns] warm {warm:.3} ms ({:.0} GFLOP/s, {:.1} GB/s) | from memory {cold:.3} ms ({:.0} GFLOP/s, {:.1} GB/s) | max error {err:.1e}",
            gflop / warm,
            mb / warm,
            gflop / cold,
            mb / cold
        );
        println!(
            "    tiles, one weight stream: warm {twarm:.3} ms ({:.0} GFLOP/s) | from memory {tcold:.3} ms ({:.0} GFLOP/s, {:.1} GB/s)",
            gflop / twarm,
            gflop / tcold,
            mb / tcold
        );
    }
    Ok(())
}

/// `X` (`k × n`, row-major) in groups of `g` columns: `out[q·k·g + kk·g + i]` = `X[kk, q·g + i]`,
/// zero past `n`.
fn grouped(x: &[f32], k: usize, n: usize, g: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n.div_ceil(g) * g * k];
    for kk in 0..k {
        for c in 0..n {
            out[(c / g) * k * g + kk * g + c % g] = x[kk * n + c];
        }
    }
    out
}

/// `m` output rows in `2·threads` shares (fewer where rows run out) starting at multiples of
/// `align`, as the engine splits them.
fn row_shares(m: usize, threads: usize, align: usize) -> Vec<(usize, usize)> {
    let parts = (2 * threads).min(m / align).max(1);
    let per = m.div_ceil(parts).div_ceil(align) * align;
    (0..m.div_ceil(per))
        .map(|i| (i * per, ((i + 1) * per).min(m)))
        .collect()
}
