//! Developer tool: Winograd F(2×2, 3×3) against the implicit GEMM on CIFAR layer shapes,
//! interleaved on one thread, column chunks as the engine cuts them.
//!
//! `cargo run --release -p coarsen-kernels --example ab_wino -- [BATCH] [ROUNDS] [PAIRS]`
use std::time::Instant;

use coarsen_kernels::conv::{ConvDims, ConvGeometry};
use coarsen_kernels::{DirectConv, Winograd};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let batch: usize = args.get(1).map_or(Ok(64), |s| s.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(5), |s| s.parse())?;
    let g = ConvGeometry::square(3, 1, 1);
    for (cin, cout, hw) in [
        (3, 64, 32),
        (8, 16, 32),
        (16, 32, 32),
        (32, 32, 32),
        (64, 64, 32),
        (128, 128, 16),
        (256, 256, 8),
        (512, 512, 4),
    ] {
        let d = ConvDims::new(&[cin, batch, hw, hw], g)?;
        let n = d.n();
        let w: Vec<f32> = (0..cout * cin * 9)
            .map(|i| ((i * 7919) % 1000) as f32 / 5e4 - 0.01)
            .collect();
        let x: Vec<f32> = (0..cin * n)
            .map(|i| ((i * 104_729) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let dc = DirectConv::new(g, cout, cin, &w)?.ok_or("no avx512")?;
        let wi = Winograd::new(g, cout, cin, &w)?.ok_or("no wino")?;
        // Column chunks as the engine cuts them: whole pairs of rows in whole blocks of
        // tiles, about 128 Ki floats of im2col-sized input (or PAIRS pairs of rows).
        let unit = lcm(2 * hw, Winograd::BLOCK_COLUMNS);
        let pairs: usize = match args.get(3) {
            Some(s) => s.parse()?,
            None => (131_072 / (4 * cin)).div_ceil(unit) * unit / (2 * hw),
        };
        let cols = pairs * 2 * hw;
        let mut ya = vec![0.0f32; cout * cols];
        let mut yb = vec![0.0f32; cout * cols];
        let (mut ta, mut tb) = (Vec::new(), Vec::new());
        let mut diff = 0.0f32;
        for _ in 0..rounds {
            let s = Instant::now();
            let mut c0 = 0;
            while c0 < n {
                let c1 = (c0 + cols).min(n);
                dc.forward(&x, &d, c0, c1, &mut ya[..cout * (c1 - c0)])?;
                c0 = c1;
            }
            ta.push(s.elapsed().as_secs_f64());
            let s = Instant::now();
            let mut c0 = 0;
            while c0 < n {
                let c1 = (c0 + cols).min(n);
                wi.forward_rows(&x, &d, c0, c1, 0, cout, &mut yb[..cout * (c1 - c0)])?;
                c0 = c1;
            }
            tb.push(s.elapsed().as_secs_f64());
            diff = ya
                .iter()
                .zip(&yb)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
        }
        ta.sort_by(f64::total_cmp);
        tb.sort_by(f64::total_cmp);
        let flop = 2.0 * (cout * cin * 9 * n) as f64 / 1e9;
        println!(
            "[{cin}->{cout}, {hw}x{hw}, b{batch}, {pairs} pairs/chunk] direct {:.1} ms ({:.0} GF/s) | winograd {:.1} ms ({:.0} eq. GF/s) | ratio {:.3} | max diff (last chunk) {diff:.1e}",
            ta[0] * 1e3,
            flop / ta[0],
            tb[0] * 1e3,
            flop / tb[0],
            tb[0] / ta[0]
        );
    }
    Ok(())
}

/// Least common multiple.
fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}
