//! Developer tool: times an export's network on the dense path with faer's GEMM, with coarsen's
//! kernels without Winograd F(2×2, 3×3) (implicit GEMMs), and with it (the default), interleaved in one process
//! (the machine's noise hits all alike).
//!
//! `cargo run --release -p coarsen-infer --example ab_dense -- EXPORT_DIR [BATCH] [ROUNDS]`

use std::time::Instant;

use coarsen_infer::{export, DenseKernel, InferOptions, InferenceNet, Path};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .ok_or("usage: ab_dense EXPORT_DIR [BATCH] [ROUNDS]")?;
    let batch: usize = args.get(2).map_or(Ok(64), |s| s.parse())?;
    let rounds: usize = args.get(3).map_or(Ok(15), |s| s.parse())?;
    let e = export::load(std::path::Path::new(dir))?;
    let mut faer = InferenceNet::new(&e.network, &e.formats, Path::Dense)?;
    faer.set_dense_kernel(DenseKernel::Faer);
    let options = InferOptions {
        winograd: false,
        ..InferOptions::default()
    };
    let tiled = InferenceNet::with_options(&e.network, &e.formats, Path::Dense, options)?;
    let wino = InferenceNet::new(&e.network, &e.formats, Path::Dense)?;
    let [c, h, w] = tiled.input();
    let x: Vec<f32> = (0..c * h * w * batch)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let a = faer.forward(&x, batch)?;
    let b = tiled.forward(&x, batch)?;
    let diff = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f32::max);
    let (mut ta, mut tb, mut tc) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        faer.forward(&x, batch)?;
        ta.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        tiled.forward(&x, batch)?;
        tb.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        wino.forward(&x, batch)?;
        tc.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ma, mb, mc) = (med(&mut ta), med(&mut tb), med(&mut tc));
    let gf = 2.0 * (tiled.macs_per_image() * batch) as f64 / 1e6;
    println!(
        "{dir} batch {batch}: faer {ma:.1} ms ({:.0} GF/s), coarsen {mb:.1} ms ({:.0} GF/s), with Winograd {mc:.1} ms; coarsen/faer {:.3}, with Winograd/faer {:.3}, max |diff| {diff:.2e}",
        gf / ma,
        gf / mb,
        mb / ma,
        mc / ma
    );
    Ok(())
}
