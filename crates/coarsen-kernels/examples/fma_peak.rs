//! Developer tool: this machine's single-precision FMA peak, the roof under every kernel's
//! GFLOP/s. Each thread runs independent chains of 16-lane FMAs on registers (AVX-512; 8-lane
//! ones with AVX2), more chains than the FMA units' latency × throughput, so nothing but the
//! units limits it; best of several timed rounds, on 1 thread and on `THREADS` threads at
//! once.
//!
//! `cargo run --release -p coarsen-kernels --example fma_peak -- [THREADS] [ROUNDS]`
//! (THREADS defaults to the available cores). Without AVX-512 or AVX2 it says so and stops.
use std::time::Instant;

/// FMAs per chain per timed call.
const STEPS: usize = 20_000_000 / 12;

#[cfg(target_arch = "x86_64")]
mod fma {
    use std::arch::x86_64::*;

    /// Independent accumulator chains: 12, twice the 2 units × 4 cycles (or 1 × 4) in flight.
    pub const CHAINS: usize = 12;

    /// `steps` rounds of `CHAINS` FMAs of 16 lanes; returns a value that depends on all of
    /// them (so none is dropped).
    ///
    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn run(steps: usize, seed: f32) -> f32 {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(seed * 1e-7);
        let mut acc = [_mm512_set1_ps(seed); CHAINS];
        for _ in 0..steps {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for v in acc {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    /// [`run`] on 8-lane AVX2 FMAs (`CHAINS` chains of 8 lanes).
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn run8(steps: usize, seed: f32) -> f32 {
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(seed * 1e-7);
        let mut acc = [_mm256_set1_ps(seed); CHAINS];
        for _ in 0..steps {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for v in acc {
            s = _mm256_add_ps(s, v);
        }
        let mut out = [0.0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }
}

/// GFLOP/s of `threads` threads running the chains at once (best of `rounds`), on 16-lane
/// (AVX-512) or 8-lane (AVX2) vectors.
#[cfg(target_arch = "x86_64")]
fn peak(threads: usize, rounds: usize, lanes: usize) -> f64 {
    let flops = (2 * lanes * fma::CHAINS * STEPS * threads) as f64;
    let mut best = f64::MAX;
    for r in 0..rounds {
        let t = Instant::now();
        let sum: f32 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|i| {
                    let seed = 1.0 + (r + i) as f32;
                    // SAFETY: the caller checked AVX-512F (16 lanes) or AVX2 and FMA.
                    s.spawn(move || unsafe {
                        if lanes == 16 {
                            fma::run(STEPS, seed)
                        } else {
                            fma::run8(STEPS, seed)
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(sum);
    }
    flops / best / 1e9
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: usize = args.get(1).map_or(Ok(cores), |s| s.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(5), |s| s.parse())?;
    #[cfg(target_arch = "x86_64")]
    {
        let (lanes, name) = match coarsen_kernels::Isa::detect() {
            coarsen_kernels::Isa::Avx512 => (16, "AVX-512"),
            coarsen_kernels::Isa::Avx2 => (8, "AVX2"),
            _ => (0, ""),
        };
        if lanes > 0 {
            let one = peak(1, rounds, lanes);
            let all = peak(threads.max(1), rounds, lanes);
            println!("FMA peak, {name} single precision (best of {rounds}):");
            println!("  1 thread:   {one:8.1} GFLOP/s");
            println!("  {threads} threads: {all:8.1} GFLOP/s");
            return Ok(());
        }
    }
    let _ = (threads, rounds, STEPS, Instant::now());
    println!("fma_peak measures AVX-512 or AVX2 FMAs; this CPU (or COARSEN_ISA) has neither");
    Ok(())
}
