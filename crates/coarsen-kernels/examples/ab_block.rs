//! Developer tool: the block kernel (`BlockConv`, in place) on CIFAR ResNet-18's 3×3 layer
//! shapes with row groups of 32 that each keep DENSITY of the columns (as Regroup leaves
//! them), on padded halos against masked ones (and in bfloat16 where the CPU has AVX-512
//! BF16), with and without a residual in the epilogue; interleaved pass by pass on one thread,
//! best and median useful GFLOP/s.
//!
//! `cargo run --release -p coarsen-kernels --example ab_block -- [BATCH] [ROUNDS] [DENSITY]`

#[path = "common/layer.rs"]
mod layer;

use std::time::Instant;

use coarsen_kernels::conv::{ConvDims, ConvGeometry};
use coarsen_kernels::{BlockConv, Epilogue, GroupBlocks, Packed, Residual};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (batch, rounds, density) = layer::batch_rounds_density(&args, 8)?;
    let g = ConvGeometry::square(3, 1, 1);
    println!(
        "useful GFLOP/s on one thread, best / median of {rounds}: masked | padded | bf16 \
         (where the CPU has it), then each with a residual"
    );
    for (cin, cout, hw) in [(64, 64, 32), (128, 128, 16), (256, 256, 8)] {
        let d = ConvDims::new(&[cin, batch, hw, hw], g)?;
        let (n, kk) = (d.n(), cin * 9);
        let w = layer::weights(cout * kk);
        let x = layer::input(cin * n);
        let res: Vec<f32> = (0..cout * n)
            .map(|i| ((i * 15_485_863) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let mask = layer::row_groups(cout, kk, density);
        let groups = Packed::Group(GroupBlocks::pack(&mask, &w)?);
        let Some(padded) = BlockConv::new(g, cin, &groups, None)? else {
            return Err("the block kernel needs AVX2 and FMA, or AVX-512".into());
        };
        let mut masked = padded.clone();
        masked.set_padded_halos(false);
        let mut bf16 = padded.clone();
        let mut kernels = vec![&masked, &padded];
        if bf16.set_bf16(true) {
            kernels.push(&bf16);
        }
        let mut y = vec![0.0f32; cout * n];
        let mut times = vec![Vec::new(); 2 * kernels.len()];
        for _ in 0..rounds {
            for (i, k) in kernels.iter().enumerate() {
                for (j, residual) in [
                    None,
                    Some(Residual {
                        values: &res,
                        ld: n,
                    }),
                ]
                .into_iter()
                .enumerate()
                {
                    let e = Epilogue {
                        bias: None,
                        residual,
                        relu: true,
                    };
                    let s = Instant::now();
                    // SAFETY: `y` holds every row of the output's n columns.
                    unsafe {
                        k.forward_into(&x, &d, (0, n), (0, k.blocks()), y.as_mut_ptr(), n, e)?
                    };
                    times[j * kernels.len() + i].push(s.elapsed().as_secs_f64());
                }
            }
        }
        let useful = 2.0 * (mask.nnz() * n) as f64 / 1e9;
        let cells = layer::gflops_cells(&mut times, useful);
        println!("{cin:4} ch {hw:2}x{hw:<2}: {}", cells.join(" | "));
    }
    Ok(())
}
