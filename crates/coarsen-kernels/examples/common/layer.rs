//! What the kernel examples share: deterministic weights and inputs, small and varied, the
//! mask Regroup leaves (row groups of 32, each keeping its own columns), the command line of
//! the block kernels' A/B tools and their table cells.

// Each example takes what it needs of these.
#![allow(dead_code)]

use coarsen_core::Mask;

/// `len` deterministic weights in `[-0.01, 0.01)`.
pub fn weights(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919) % 1000) as f32 / 5e4 - 0.01)
        .collect()
}

/// `len` deterministic input values in `[-1, 1)`.
pub fn input(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 104_729) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// Row groups of 32 that each keep about `density` of the `kk` columns, their own
/// pseudo-random ones (as Regroup leaves a mask).
pub fn row_groups(cout: usize, kk: usize, density: f64) -> Mask {
    Mask::from_fn(cout, kk, |r, c| {
        let h = ((r / 32) as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (c as u64 * 0xBF58_476D_1CE4_E5B9);
        (h.wrapping_mul(0x94D0_49BB_1331_11EB) >> 40) as f64 / (1u64 << 24) as f64 <= density
    })
}

/// `[BATCH] [ROUNDS] [DENSITY]`, the first three arguments of `args` (the program's command
/// line), defaulting to `batch`, 9 and 0.22.
pub fn batch_rounds_density(
    args: &[String],
    batch: usize,
) -> Result<(usize, usize, f64), Box<dyn std::error::Error>> {
    Ok((
        args.get(1).map_or(Ok(batch), |s| s.parse())?,
        args.get(2).map_or(Ok(9), |s| s.parse())?,
        args.get(3).map_or(Ok(0.22), |s| s.parse())?,
    ))
}

/// Each kernel's best and median useful GFLOP/s (`useful` GFLOP per pass, `times` its passes
/// in seconds, sorted here) as table cells.
pub fn gflops_cells(times: &mut [Vec<f64>], useful: f64) -> Vec<String> {
    times
        .iter_mut()
        .map(|t| {
            t.sort_by(f64::total_cmp);
            format!("{:6.1} / {:6.1}", useful / t[0], useful / t[t.len() / 2])
        })
        .collect()
}
