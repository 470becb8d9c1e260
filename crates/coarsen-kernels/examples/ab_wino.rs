//! Developer tool: the implicit GEMM against Winograd F(2×2, 3×3) and F(4×4, 3×3) on CIFAR
//! layer shapes, interleaved on the calling thread (`RAYON_NUM_THREADS` does not matter), in
//! column chunks as the engine cuts them; best time of each, and each Winograd's largest
//! difference from the implicit GEMM relative to its largest output.
//!
//! `cargo run --release -p coarsen-kernels --example ab_wino -- [BATCH] [ROUNDS] [CIN,COUT,HW] [DENSITY]`
//! (CIN,COUT,HW: that one shape instead; DENSITY below 1: a weight of whole kernels in classes
//! of 32 rows, each reading that share of the input channels, also run on the sparse Winograd
//! kernels, `Winograd::sparse_with_tile`). `AB_ONLY="F(4x4) sparse"` (a kernel's name as
//! printed) times that kernel alone beside the direct one, for `perf`.

#[path = "common/layer.rs"]
mod layer;

use std::time::Instant;

use coarsen_kernels::conv::{ConvDims, ConvGeometry};
use coarsen_kernels::{DirectConv, Winograd};

/// Runs `f` over column chunks of `cols` (the last one shorter) and returns the seconds taken.
fn chunked(
    n: usize,
    cols: usize,
    mut f: impl FnMut(usize, usize) -> Result<(), coarsen_kernels::KernelError>,
) -> Result<f64, coarsen_kernels::KernelError> {
    let s = Instant::now();
    let mut c0 = 0;
    while c0 < n {
        let c1 = (c0 + cols).min(n);
        f(c0, c1)?;
        c0 = c1;
    }
    Ok(s.elapsed().as_secs_f64())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let batch: usize = args.get(1).map_or(Ok(64), |s| s.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(5), |s| s.parse())?;
    let only: Option<Vec<usize>> = match args.get(3).filter(|s| s.as_str() != "all") {
        Some(s) => Some(s.split(',').map(str::parse).collect::<Result<_, _>>()?),
        None => None,
    };
    let density: f64 = args.get(4).map_or(Ok(1.0), |s| s.parse())?;
    let g = ConvGeometry::square(3, 1, 1);
    let shapes = match only {
        Some(o) if o.len() == 3 => vec![(o[0], o[1], o[2])],
        Some(_) => return Err("the shape is CIN,COUT,HW".into()),
        None => vec![
            (3, 64, 32),
            (16, 32, 28),
            (32, 64, 14),
            (32, 64, 16),
            (16, 32, 32),
            (64, 64, 32),
            (64, 128, 16),
            (128, 128, 16),
            (256, 256, 8),
            (512, 512, 4),
        ],
    };
    for (cin, cout, hw) in shapes {
        let d = ConvDims::new(&[cin, batch, hw, hw], g)?;
        let n = d.n();
        let mut w = layer::weights(cout * cin * 9);
        if density < 1.0 {
            // Classes of 32 rows; class `q` reads channels `c` with `(c·7 + q·13) mod cin`
            // below `density · cin`.
            let keep = ((density * cin as f64).round() as usize).max(1);
            for (i, v) in w.iter_mut().enumerate() {
                let (m, c) = (i / 9 / cin, i / 9 % cin);
                if (c * 7 + m / 32 * 13) % cin >= keep {
                    *v = 0.0;
                }
            }
        }
        let x = layer::input(cin * n);
        let dc = DirectConv::new(g, cout, cin, &w)?.ok_or("no AVX-512")?;
        let mut want = vec![0.0f32; cout * n];
        dc.forward(&x, &d, 0, n, &mut want)?;
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let mut line = format!("[{cin}->{cout}, {hw}x{hw}, b{batch}]");
        let flop = 2.0 * (cout * cin * 9 * n) as f64 / 1e9;
        let mut kernels: Vec<(String, Option<Winograd>)> = vec![("direct".into(), None)];
        for tile in [2, 4] {
            let k = Winograd::with_tile(g, cout, cin, &w, tile)?.ok_or("no Winograd")?;
            if k.accepts(&d) && k.tile() == tile {
                kernels.push((format!("F({tile}x{tile})"), Some(k)));
            }
            if density < 1.0 {
                let k = Winograd::sparse_with_tile(g, cout, cin, &w, tile)?.ok_or("no Winograd")?;
                if k.accepts(&d) && k.tile() == tile && k.is_sparse() {
                    kernels.push((format!("F({tile}x{tile}) sparse"), Some(k)));
                }
            }
        }
        // AB_ONLY=NAME: that kernel alone (for `perf`), beside the direct reference.
        if let Ok(only) = std::env::var("AB_ONLY") {
            kernels.retain(|(name, k)| k.is_none() || *name == only);
        }
        let mut best = vec![f64::INFINITY; kernels.len()];
        let mut diffs = vec![0.0f32; kernels.len()];
        for _ in 0..rounds {
            for (i, (_, k)) in kernels.iter().enumerate() {
                // Chunks as the engine cuts them: about 128 Ki floats of input, whole blocks.
                let (unit, kk) = match k {
                    Some(k) => (lcm(k.column_unit(hw, hw), k.block_columns()), 4 * cin),
                    None => (hw, 9 * cin),
                };
                let cols = (131_072 / kk).max(256).div_ceil(unit) * unit;
                let mut y = vec![0.0f32; cout * n];
                let t = chunked(n, cols, |c0, c1| {
                    let part = &mut y[cout * c0..cout * c1];
                    match k {
                        Some(k) => k.forward_rows(&x, &d, c0, c1, 0, cout, part),
                        None => dc.forward(&x, &d, c0, c1, part),
                    }
                })?;
                best[i] = best[i].min(t);
                // Chunk-major blocks: compare value by value against the same layout.
                let mut diff = 0.0f32;
                let mut c0 = 0;
                while c0 < n {
                    let c1 = (c0 + cols).min(n);
                    let nc = c1 - c0;
                    for r in 0..cout {
                        for j in 0..nc {
                            let got = y[cout * c0 + r * nc + j];
                            diff = diff.max((got - want[r * n + c0 + j]).abs());
                        }
                    }
                    c0 = c1;
                }
                diffs[i] = diff / scale;
            }
        }
        for (i, (name, _)) in kernels.iter().enumerate() {
            line += &format!(
                " | {name} {:.2} ms ({:.0} eq. GF/s, {:.2}x direct, rel. diff {:.1e})",
                best[i] * 1e3,
                flop / best[i],
                best[i] / best[0],
                diffs[i]
            );
        }
        println!("{line}");
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
