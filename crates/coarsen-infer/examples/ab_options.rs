//! Developer tool: per-step profile of an export's dense (or packed) path under two engine
//! option sets, interleaved pass by pass.
//!
//! `cargo run --release -p coarsen-infer --example ab_options -- EXPORT_DIR [BATCH] [ROUNDS] [B_OPTIONS]`
//! with B_OPTIONS e.g. `fuse=0,chunk=262144` or `packed=1,blocks=0` (A runs the defaults;
//! `packed=1` runs both on the packed path, untuned).
use coarsen_infer::{export, InferOptions, InferenceNet, Path};
use coarsen_kernels::timing::process_cpu_ms;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cpu_ms = || process_cpu_ms().ok_or("CPU time needs /proc/self/task (Linux)");
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .ok_or("usage: ab_options EXPORT_DIR [BATCH] [ROUNDS] [B_OPTIONS]")?;
    let batch: usize = args.get(2).map_or(Ok(64), |s| s.parse())?;
    let rounds: usize = args.get(3).map_or(Ok(5), |s| s.parse())?;
    // B's options: `chunk=N`, `fuse=0|1`, `winograd=0|1`, `blocks=0|1`, `residual=0|1`, `few=N`,
    // `spin=0|1`, `prefix=FLOATS` (0: off), `prefix_min=FLOATS`,
    // `packed=0|1` for both, and `bpacked=1` for B alone (A on the dense path, B packed,
    // untuned); comma-separated.
    let mut ob = InferOptions::default();
    let mut path = Path::Dense;
    let mut path_b = None;
    for kv in args
        .get(4)
        .map_or("", String::as_str)
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let (k, v) = kv.split_once('=').ok_or("options are key=value")?;
        match k {
            "chunk" => ob.chunk_floats = v.parse()?,
            "few" => ob.few_columns = v.parse()?,
            "fuse" => ob.fuse_epilogue = v == "1",
            "winograd" => ob.winograd = v == "1",
            "blocks" => ob.block_conv = v == "1",
            "residual" => ob.fuse_residual = v == "1",
            "spin" => ob.spin_workers = v == "1",
            "prefix" => ob.prefix_chunk_floats = v.parse()?,
            "prefix_min" => ob.prefix_min_floats = v.parse()?,
            "packed" if v == "1" => path = Path::Packed,
            "bpacked" if v == "1" => path_b = Some(Path::Packed),
            "packed" => path = Path::Dense,
            _ => return Err(format!("unknown option {k}").into()),
        }
    }
    println!("A: {:?}\nB: {ob:?}", InferOptions::default());
    let e = export::load(std::path::Path::new(dir))?;
    let a = InferenceNet::new(&e.network, &e.formats, path)?;
    let b = InferenceNet::with_options(&e.network, &e.formats, path_b.unwrap_or(path), ob)?;
    let [c, h, w] = a.input();
    let x: Vec<f32> = (0..c * h * w * batch)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut pa = Vec::new();
    let mut pb = Vec::new();
    for _ in 0..rounds {
        pa.push(a.profile(&x, batch, 1)?);
        pb.push(b.profile(&x, batch, 1)?);
    }
    let best = |p: &Vec<Vec<coarsen_infer::StepTime>>, i: usize| {
        p.iter().map(|r| r[i].ms).fold(f64::INFINITY, f64::min)
    };
    if pa[0].len() != pb[0].len() {
        // Fused steps differ: each side on its own.
        for (tag, p) in [("A", &pa), ("B", &pb)] {
            for (i, s) in p[0].iter().enumerate() {
                let t = best(p, i);
                let gf = 2.0 * s.macs as f64 / 1e6 + 1e-12;
                println!(
                    "{tag} {:28} {:26} {:8.2} ms {:6.1} GF/s",
                    s.step,
                    s.kernel,
                    t,
                    gf / t
                );
            }
        }
    }
    let same_steps = pa[0].len() == pb[0].len();
    for (i, s) in pa[0].iter().enumerate().filter(|_| same_steps) {
        let (ta, tb) = (best(&pa, i), best(&pb, i));
        let gf = 2.0 * s.macs as f64 / 1e6 + 1e-12;
        println!(
            "{:20} {:22} A {:8.2} ms {:6.1} GF/s | B {:8.2} ms {:6.1} GF/s",
            s.step,
            s.kernel,
            ta,
            gf / ta,
            tb,
            gf / tb
        );
    }
    // Whole passes in CPU time of the process (the hypervisor's steal is not counted), and
    // their wall time.
    let (mut ca, mut cb) = (f64::INFINITY, f64::INFINITY);
    let (mut wa, mut wb) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (t, w) = (cpu_ms()?, std::time::Instant::now());
        a.forward(&x, batch)?;
        ca = ca.min(cpu_ms()? - t);
        wa.push(w.elapsed().as_secs_f64() * 1e3);
        let (t, w) = (cpu_ms()?, std::time::Instant::now());
        b.forward(&x, batch)?;
        cb = cb.min(cpu_ms()? - t);
        wb.push(w.elapsed().as_secs_f64() * 1e3);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("forward, best CPU time: A {ca:.1} ms, B {cb:.1} ms");
    println!(
        "forward, median wall time: A {:.1} ms, B {:.1} ms",
        median(&mut wa),
        median(&mut wb)
    );
    let tot =
        |p: &Vec<Vec<coarsen_infer::StepTime>>| (0..p[0].len()).map(|i| best(p, i)).sum::<f64>();
    println!("sum of best: A {:.1} ms, B {:.1} ms", tot(&pa), tot(&pb));
    Ok(())
}
