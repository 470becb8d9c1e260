use coarsen_kernels::bench::*;
use coarsen_kernels::Plan;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let density: f64 = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(0.25);
    let fmts: Vec<BenchFormat> = args
        .get(2)
        .map(|s| s.split(',').map(|f| f.parse().unwrap()).collect())
        .unwrap_or_else(BenchFormat::defaults);
    let only: Option<usize> = args.get(3).map(|s| s.parse().unwrap());
    for (i, case) in default_cases(64).iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let dense = tuned_dense(case.rows, case.cols, case.n, 0).unwrap();
        for f in &fmts {
            let p = random_packed(*f, case.rows, case.cols, density, 1).unwrap();
            let plan = Plan::new(&p).unwrap();
            let r = measure(case, &f.label(), &p, &dense, &plan, 0.3).unwrap();
            println!("{:2} {:28} {:>16} {:>18} d={:.3} dense {:7.2}ms {:6.1}GF  sparse {:7.2}ms {:6.1}GF  x{:5.2} ideal {:5.2} frac {:.2}", i, r.label, format!("{:?}", r.shape), r.format, r.density, r.dense_ms, r.dense_gflops, r.sparse_ms, r.sparse_gflops, r.speedup, r.ideal, r.fraction_of_ideal);
        }
    }
}
