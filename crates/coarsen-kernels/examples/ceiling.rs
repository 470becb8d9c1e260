fn main() {
    for isa in coarsen_kernels::Isa::available() {
        for (rows, k) in [(16, 64), (16, 256), (32, 64), (32, 256)] {
            let g = coarsen_kernels::engine::blocks::micro_ceiling(isa, rows, k, 200000);
            println!("{isa:?} rows {rows} k {k}: {g:.1} GFLOP/s (1 thread)");
        }
    }
}
