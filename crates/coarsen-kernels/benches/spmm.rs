//! divan benchmarks of `Y = W·X` for every format against the dense baseline, on shapes of the
//! `coarsen bench` table (ResNet-18 layer3/layer4 convs at batch 64 and a transformer MLP).
//! Run with `cargo bench -p coarsen-kernels`; throughput counts useful FLOPs (`2·nnz·N`).

use coarsen_kernels::bench::{default_cases, random_packed, BenchFormat, Case};
use coarsen_kernels::{Dense, Packed, Plan};
use divan::Bencher;

fn main() {
    divan::main();
}

/// The benchmarked shapes, taken from the default table.
fn shape(i: usize) -> Case {
    let wanted = [(256, 2304, 4096), (512, 4608, 1024), (768, 3072, 1024)][i];
    default_cases(64)
        .into_iter()
        .find(|c| (c.rows, c.cols, c.n) == wanted)
        .expect("shape in the default table")
}

const FORMATS: &[&str] = &[
    "dense",
    "group:32",
    "shuffled-block:16",
    "bsr:16x16",
    "channel",
    "nm:2:4",
    "csr",
];

/// Shape 0: 256×2304×4096, 1: 512×4608×1024, 2: 768×3072×1024; masks at density 0.25 (N:M 2:4).
#[divan::bench(consts = [0, 1, 2], args = FORMATS, sample_count = 10)]
fn forward<const SHAPE: usize>(bencher: Bencher, format: &str) {
    let case = shape(SHAPE);
    let packed = if format == "dense" {
        let w = vec![0.25f32; case.rows * case.cols];
        Packed::Dense(Dense::new(case.rows, case.cols, w).expect("dense"))
    } else {
        let f: BenchFormat = format.parse().expect("format");
        random_packed(f, case.rows, case.cols, 0.25, 1).expect("pack")
    };
    let plan = Plan::new(&packed).expect("plan");
    let x = vec![0.5f32; plan.in_dim() * case.n];
    let mut y = vec![0.0f32; plan.out_dim() * case.n];
    bencher
        .counter(divan::counter::ItemsCount::new(2 * packed.nnz() * case.n))
        .bench_local(|| {
            plan.forward(divan::black_box(&x), &mut y, case.n)
                .expect("forward")
        });
}
