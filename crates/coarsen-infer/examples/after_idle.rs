//! Developer tool: forward passes right after the machine sat idle, with the pool's threads
//! spinning through a pass (A, the default) and sleeping between its parallel sections (B,
//! `spin_workers: false`), interleaved.
//!
//! `cargo run --release -p coarsen-infer --example after_idle -- EXPORT_DIR [BATCH] [PAUSE_MS] [ROUNDS]`
//!
//! Each round pauses `PAUSE_MS`, then times 8 passes of A; pauses again, then 8 of B. Prints,
//! for each of the 8 positions after the pause, the median over the rounds: on a virtual
//! machine whose idle vCPUs halt, B's first passes after a pause ran at the one-thread speed.
use coarsen_infer::{export, InferOptions, InferenceNet, Path};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .ok_or("usage: after_idle EXPORT_DIR [BATCH] [PAUSE_MS] [ROUNDS]")?;
    let batch: usize = args.get(2).map_or(Ok(1), |s| s.parse())?;
    let pause: u64 = args.get(3).map_or(Ok(200), |s| s.parse())?;
    let rounds: usize = args.get(4).map_or(Ok(20), |s| s.parse())?;
    let e = export::load(std::path::Path::new(dir))?;
    let a = InferenceNet::new(&e.network, &e.formats, Path::Dense)?;
    let off = InferOptions {
        spin_workers: false,
        ..InferOptions::default()
    };
    let b = InferenceNet::with_options(&e.network, &e.formats, Path::Dense, off)?;
    let [c, h, w] = a.input();
    let x: Vec<f32> = (0..c * h * w * batch)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    a.forward(&x, batch)?;
    b.forward(&x, batch)?;
    const PASSES: usize = 8;
    let mut times = [vec![Vec::new(); PASSES], vec![Vec::new(); PASSES]];
    for _ in 0..rounds.max(1) {
        for (net, t) in [&a, &b].into_iter().zip(times.iter_mut()) {
            std::thread::sleep(std::time::Duration::from_millis(pause));
            for slot in t.iter_mut() {
                let t0 = std::time::Instant::now();
                net.forward(&x, batch)?;
                slot.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    println!("batch {batch}, {pause} ms pause, median ms of the passes after it, by position:");
    for (tag, t) in ["A spinning", "B sleeping"].iter().zip(&mut times) {
        let line: Vec<String> = t
            .iter_mut()
            .map(|v| {
                v.sort_by(f64::total_cmp);
                format!("{:6.2}", v[v.len() / 2])
            })
            .collect();
        println!("{tag}: {}", line.join(" "));
    }
    Ok(())
}
