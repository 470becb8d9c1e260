//! Developer tool: the fused stride-2 block kernel (a 3×3 stride-2 convolution and the 1×1
//! stride-2 downsample of the same input, `BlockConv::fuse_strided_1x1`) on CIFAR ResNet-18's
//! three downsampling shapes, row groups of 32 that each keep DENSITY of the columns (as
//! Regroup leaves them), packed as group blocks or as shuffled blocks of 16, in `f32` and in
//! bfloat16 where the CPU has AVX-512 BF16; passes interleaved on one thread, best and median
//! useful GFLOP/s. A batch of 4 is one chunk of the engine's first steps at batch 64.
//!
//! `cargo run --release -p coarsen-kernels --example ab_fused -- [BATCH] [ROUNDS] [DENSITY]
//! [group|shuffled]`

#[path = "common/layer.rs"]
mod layer;

use std::time::Instant;

use coarsen_kernels::conv::{ConvDims, ConvGeometry};
use coarsen_kernels::{BlockConv, Epilogue, GroupBlocks, Packed, ShuffledBlocks};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (batch, rounds, density) = layer::batch_rounds_density(&args, 4)?;
    let shuffled = match args.get(4).map_or("group", String::as_str) {
        "group" => false,
        "shuffled" => true,
        f => return Err(format!("format {f}: expected group or shuffled").into()),
    };
    let (g3, g1) = (ConvGeometry::square(3, 2, 1), ConvGeometry::square(1, 2, 0));
    println!("useful GFLOP/s on one thread, best / median of {rounds}: f32 | bf16 (where the CPU has it)");
    for (cin, hw) in [(64, 32), (128, 16), (256, 8)] {
        let cout = 2 * cin;
        let d = ConvDims::new(&[cin, batch, hw, hw], g3)?;
        let n = d.n();
        let x = layer::input(cin * batch * hw * hw);
        let m3 = layer::row_groups(cout, cin * 9, density);
        let m1 = layer::row_groups(cout, cin, density);
        let (w3, w1) = (layer::weights(cout * cin * 9), layer::weights(cout * cin));
        let (p3, p1) = if shuffled {
            (
                Packed::Shuffled(ShuffledBlocks::pack(&m3, &w3, 16)?),
                Packed::Shuffled(ShuffledBlocks::pack(&m1, &w1, 16)?),
            )
        } else {
            (
                Packed::Group(GroupBlocks::pack(&m3, &w3)?),
                Packed::Group(GroupBlocks::pack(&m1, &w1)?),
            )
        };
        let (Some(a), Some(c)) = (
            BlockConv::new(g3, cin, &p3, None)?,
            BlockConv::new(g1, cin, &p1, None)?,
        ) else {
            return Err("the block kernel needs AVX2 and FMA, or AVX-512".into());
        };
        let f32k = a.fuse_strided_1x1(&c).ok_or("not fused")?;
        let mut kernels = vec![f32k.clone()];
        let mut b = f32k.clone();
        if b.set_bf16(true) {
            kernels.push(b);
        }
        let (mut y, mut z) = (vec![0.0f32; cout * n], vec![0.0f32; cout * n]);
        let e = Epilogue {
            bias: None,
            residual: None,
            relu: true,
        };
        let mut times = vec![Vec::new(); kernels.len()];
        for _ in 0..rounds {
            for (k, t) in kernels.iter().zip(&mut times) {
                let s = Instant::now();
                // SAFETY: `y` and `z` hold every row of the outputs' n columns.
                unsafe {
                    k.forward_pair_into(
                        &x,
                        &d,
                        (0, n),
                        (0, k.blocks()),
                        (y.as_mut_ptr(), n, e),
                        (z.as_mut_ptr(), n, e),
                    )?
                };
                t.push(s.elapsed().as_secs_f64());
            }
        }
        let useful = 2.0 * ((m3.nnz() + m1.nnz()) * n) as f64 / 1e9;
        let cells = layer::gflops_cells(&mut times, useful);
        println!("{cin:4} ch {hw:2}x{hw:<2}: {}", cells.join(" | "));
    }
    Ok(())
}
