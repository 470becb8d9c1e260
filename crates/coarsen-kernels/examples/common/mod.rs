//! What the developer examples that time a kernel warm and from memory share.

use std::time::Instant;

use rayon::prelude::*;

/// Per thread of the pool, 256 MiB of other data to read between timed passes.
pub fn junk() -> Vec<Vec<f32>> {
    vec![vec![0.0f32; 64 << 20]; rayon::current_num_threads()]
}

/// The best wall time in ms of `pass` with its data warm in the caches and, in alternate
/// rounds, after each thread read (and wrote) its `junk` (the data then come from memory, as
/// in a whole network's pass): `(warm, from memory)`, `rounds` of each.
pub fn warm_and_cold<E>(
    rounds: usize,
    junk: &mut [Vec<f32>],
    mut pass: impl FnMut() -> Result<(), E>,
) -> Result<(f64, f64), E> {
    let (mut warm, mut cold) = (f64::INFINITY, f64::INFINITY);
    for round in 0..2 * rounds {
        let evict = round % 2 == 1;
        if evict {
            junk.par_iter_mut().for_each(|j| {
                let mut acc = 0.0f32;
                for v in j.iter_mut().step_by(16) {
                    acc += *v;
                    *v = acc;
                }
            });
        }
        let t = Instant::now();
        pass()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if evict {
            cold = cold.min(ms);
        } else {
            warm = warm.min(ms);
        }
    }
    Ok((warm, cold))
}
