fn main() {
    for isa in coarsen_kernels::Isa::available() {
        let g1 = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| coarsen_kernels::timing::peak_gflops(isa, 0.5));
        let g2 = coarsen_kernels::timing::peak_gflops(isa, 0.5);
        println!(
            "{isa:?}: 1 thread {g1:.1} GFLOP/s, {} threads {g2:.1}",
            rayon::current_num_threads()
        );
    }
}
