use coarsen_kernels::bench::*;
use coarsen_kernels::{Isa, Plan};
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let f: BenchFormat = a[1].parse().unwrap();
    let (r, c, n): (usize, usize, usize) = (
        a[2].parse().unwrap(),
        a[3].parse().unwrap(),
        a[4].parse().unwrap(),
    );
    let isa = Isa::parse(&a[5]).unwrap();
    let reps: usize = a[6].parse().unwrap();
    let p = random_packed(f, r, c, 0.5, 1).unwrap();
    let plan = Plan::with_isa(&p, isa).unwrap();
    let x = vec![0.5f32; plan.in_dim() * n];
    let mut y = vec![0f32; plan.out_dim() * n];
    let threads: usize = a.get(7).map(|s| s.parse().unwrap()).unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        plan.forward(&x, &mut y, n).unwrap();
        let t = std::time::Instant::now();
        for _ in 0..reps {
            plan.forward(&x, &mut y, n).unwrap();
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{} {:?}: {:.2} ms, {:.1} GFLOP/s useful ({} threads)",
            f.label(),
            isa,
            s * 1e3,
            2.0 * (p.nnz() * n) as f64 / s / 1e9,
            threads
        );
    });
}
