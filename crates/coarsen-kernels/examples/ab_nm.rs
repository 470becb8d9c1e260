//! Developer tool: the N:M kernel (`NmConv`, 2:4) on batch 1's layer shapes as the engine runs
//! it (input gathered once, then output rows in `2·threads` shares), best wall time with the
//! weights warm in the caches and after each thread read 256 MiB of other data (weights from
//! memory, as in a whole network's pass), in GB/s of the packed weight read.
//!
//! `cargo run --release -p coarsen-kernels --example ab_nm -- [ROUNDS]`

mod common;
#[path = "common/layer.rs"]
mod layer;

use std::time::Instant;

use coarsen_core::{Mask, MatrixView};
use coarsen_kernels::conv::{ConvDims, ConvGeometry};
use coarsen_kernels::{NmCompressed, NmConv};
use rayon::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(30), |s| s.parse())?;
    let threads = rayon::current_num_threads();
    let mut junk = common::junk();
    // (input channels, output channels, image side, stride, batch)
    for (cin, cout, hw, s, b) in [
        (128usize, 128usize, 4usize, 1usize, 1usize),
        (512, 512, 4, 1, 1),
        (512, 512, 2, 1, 1),
        (256, 512, 8, 2, 1),
        (256, 256, 8, 1, 1),
        (128, 128, 16, 1, 1),
    ] {
        let g = ConvGeometry::square(3, s, 1);
        let d = ConvDims::new(&[cin, b, hw, hw], g)?;
        let n = d.n();
        let cols = cin * 9;
        // 2:4 along input channels: channels 4q + (r + t) % 4 and 4q + (r + t + 1) % 4.
        let mask = Mask::from_fn(cout, cols, |r, c| {
            let (ch, t) = (c / 9, c % 9);
            let p = (ch % 4 + 4 - (r + t) % 4) % 4;
            p < 2
        });
        let w = layer::weights(cout * cols);
        let f = NmCompressed::pack(
            &mask,
            &w,
            MatrixView::of(&[cout, cin, 3, 3]).ok_or("view")?,
            2,
            4,
            None,
        )?;
        let k = NmConv::new(&f)?.ok_or("the N:M kernel needs AVX-512 or AVX2")?;
        let x = layer::input(cin * b * hw * hw);
        let mut xq = vec![0.0f32; k.input_len(n)];
        let parts = (2 * threads).min(cout / NmConv::ROW_ALIGN).max(1);
        let per = cout.div_ceil(parts).div_ceil(NmConv::ROW_ALIGN) * NmConv::ROW_ALIGN;
        let shares: Vec<(usize, usize)> = (0..cout.div_ceil(per))
            .map(|i| (i * per, ((i + 1) * per).min(cout)))
            .collect();
        let mut ys: Vec<Vec<f32>> = shares.iter().map(|(a, z)| vec![0.0; (z - a) * n]).collect();
        let mut gbest = f64::INFINITY;
        let (warm, cold) = common::warm_and_cold(rounds, &mut junk, || {
            let t = Instant::now();
            k.gather_input(&x, &d, &mut xq)?;
            gbest = gbest.min(t.elapsed().as_secs_f64() * 1e3);
            shares
                .par_iter()
                .zip(ys.par_iter_mut())
                .try_for_each(|(&(r0, r1), y)| k.forward_rows(&xq, n, r0, r1, y))
        })?;
        let bytes = (f.values().len() * 5) as f64 / 1e6;
        println!(
            "[{cin}->{cout}, {hw}x{hw} stride {s}, batch {b}] warm {warm:.3} ms ({:.1} GB/s) | from memory {cold:.3} ms ({:.1} GB/s) | dense weight {:.1} MB, packed {bytes:.1} MB; gathering the input {gbest:.3} ms",
            bytes / warm,
            bytes / cold,
            (cout * cols * 4) as f64 / 1e6
        );
    }
    Ok(())
}
