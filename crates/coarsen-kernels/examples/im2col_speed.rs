//! Developer tool: `ConvDims::im2col_tiles` on the shapes the engine cuts (batch 1's small
//! layers whole, batch 64's stride-2 ones in chunks), best of many calls on one thread, and
//! the rate it writes. `COARSEN_ISA=avx2` times the copy path where AVX-512 would gather.
//!
//! `cargo run --release -p coarsen-kernels --example im2col_speed -- [ROUNDS]`
use std::time::Instant;

use coarsen_kernels::conv::{ConvDims, ConvGeometry};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(200), |s| s.parse())?;
    // (channels, image side, stride, kernel side, tile width, batch, columns per call)
    for (cin, hw, s, k, nr, b, cols) in [
        (512usize, 4usize, 1usize, 3usize, 16usize, 1usize, 16usize),
        (256, 8, 2, 3, 16, 1, 16),
        (256, 8, 2, 1, 16, 1, 16),
        (128, 16, 2, 1, 48, 1, 64),
        (256, 16, 1, 3, 48, 1, 256),
        (64, 32, 2, 1, 48, 64, 2048),
        (128, 16, 2, 1, 48, 64, 1024),
        (256, 8, 2, 1, 48, 64, 512),
        (64, 32, 2, 3, 48, 64, 240),
    ] {
        let g = ConvGeometry::square(k, s, k / 2);
        let d = ConvDims::new(&[cin, b, hw, hw], g)?;
        let n = d.n().min(cols);
        let x: Vec<f32> = (0..cin * b * hw * hw).map(|i| i as f32).collect();
        let kk = d.rows();
        let mut out = vec![0.0f32; n.div_ceil(nr) * nr * kk];
        let mut tmp = Vec::new();
        let mut best = f64::INFINITY;
        for _ in 0..rounds {
            let t = Instant::now();
            d.im2col_tiles(&x, None, 0, n, nr, &mut out, &mut tmp)?;
            best = best.min(t.elapsed().as_secs_f64() * 1e6);
        }
        println!(
            "batch {b}, {cin} channels {hw}x{hw}, {k}x{k} stride {s}: {n} of {} columns, {kk} rows, tiles of {nr}: {best:.1} us, {:.2} GB/s written",
            d.n(),
            (out.len() * 4) as f64 / best / 1e3
        );
    }
    Ok(())
}
