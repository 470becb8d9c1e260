//! Honest timing: the sparse kernel and the dense baseline interleaved in the same run, repeated,
//! medians reported; and the machine's measured FMA peak.

use std::time::Instant;

use rayon::prelude::*;

use crate::simd::{run_task, Isa, Simd, SimdTask};

/// Median of a non-empty list (0 for an empty one).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// CPU time all threads of this process have used so far, in ms, from
/// `/proc/self/task/*/schedstat` (`None` where that is not readable, e.g. off Linux). Time the
/// hypervisor steals is not counted, so on a noisy virtual machine it compares two variants run
/// in one process better than wall time does; the scheduler updates it at its tick, so it is
/// meant for intervals of many milliseconds.
pub fn process_cpu_ms() -> Option<f64> {
    let dir = std::fs::read_dir("/proc/self/task").ok()?;
    let mut ns = 0u64;
    for t in dir.flatten() {
        // A thread that ended meanwhile has nothing left to count.
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Some(ns as f64 / 1e6)
}

/// Times `a` and `b` alternately, `reps` times each after one warm-up call each, and returns
/// their median times in milliseconds.
pub fn interleaved(reps: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    a();
    b();
    let (mut ta, mut tb) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for i in 0..reps.max(1) {
        // Alternate which goes first so neither always runs on a warmer cache.
        if i % 2 == 0 {
            ta.push(time_ms(&mut a));
            tb.push(time_ms(&mut b));
        } else {
            tb.push(time_ms(&mut b));
            ta.push(time_ms(&mut a));
        }
    }
    (median(ta), median(tb))
}

/// Times `f` `reps` times after one warm-up call and returns its median time in
/// milliseconds.
pub fn repeated(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median((0..reps.max(1)).map(|_| time_ms(&mut f)).collect())
}

fn time_ms(f: &mut impl FnMut()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3
}

/// Repetitions so that a run of `flops` takes about `budget_s` seconds at `gflops`, within
/// `[min, max]`.
pub fn repetitions(flops: f64, gflops: f64, budget_s: f64, min: usize, max: usize) -> usize {
    let per = flops / (gflops.max(1.0) * 1e9);
    ((budget_s / per.max(1e-9)) as usize).clamp(min, max)
}

/// The measured f32 FMA peak of this machine with `isa` on every thread of the current rayon
/// pool, in GFLOP/s: independent multiply–add chains held in registers, run for about
/// `seconds` in [`PEAK_ROUNDS`] rounds, the fastest taken: a busy neighbour on a shared host
/// can only slow a round down, and one round over the whole time took its slowdown whole
/// (bench-peers' workers, each measuring in turn, then reported peaks far apart).
pub fn peak_gflops(isa: Isa, seconds: f64) -> f64 {
    let threads = rayon::current_num_threads();
    // Calibrate the iteration count on one short run.
    let probe = 2_000_000usize;
    let t = Instant::now();
    run_task(isa, Peak { iters: probe });
    let per_iter = t.elapsed().as_secs_f64() / probe as f64;
    let round = seconds / PEAK_ROUNDS as f64;
    let iters = ((round / per_iter.max(1e-12)) as usize).max(probe);
    let mut best = f64::INFINITY;
    for _ in 0..PEAK_ROUNDS {
        let t = Instant::now();
        let sink: f32 = (0..threads)
            .into_par_iter()
            .map(|_| run_task(isa, Peak { iters }))
            .sum();
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(sink);
    }
    (threads * iters * CHAINS * isa.lanes() * 2) as f64 / best.max(1e-12) / 1e9
}

/// Rounds of [`peak_gflops`], the fastest of which it reports.
pub const PEAK_ROUNDS: usize = 5;

const CHAINS: usize = 12;

struct Peak {
    iters: usize,
}

impl SimdTask for Peak {
    type Output = f32;
    #[inline(always)]
    fn run<S: Simd>(self) -> f32 {
        // SAFETY: register-only arithmetic on the instruction set run_task compiled this for.
        unsafe {
            let mut acc = [S::zero(); CHAINS];
            let a = std::hint::black_box(S::splat(0.999_999));
            let b = std::hint::black_box(S::splat(1e-7));
            for _ in 0..self.iters {
                for x in acc.iter_mut() {
                    *x = S::fma(*x, a, b);
                }
            }
            let mut s = S::zero();
            for x in acc {
                s = S::add(s, x);
            }
            S::sum(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_repetitions() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(repetitions(1e9, 100.0, 1.0, 3, 50), 50);
        assert_eq!(repetitions(1e12, 100.0, 1.0, 3, 50), 3);
        let mut calls = (0, 0);
        let (a, b) = interleaved(4, || calls.0 += 1, || calls.1 += 1);
        assert!(a >= 0.0 && b >= 0.0);
        let _ = calls;
    }

    #[test]
    fn peak_is_positive() {
        assert!(peak_gflops(Isa::Scalar, 0.01) > 0.0);
    }
}
