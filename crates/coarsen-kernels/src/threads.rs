//! Thread pools whose workers stay on their own CPUs.
//!
//! A forward pass at small batch is a chain of parallel sections a few hundred microseconds
//! long, and the engine keeps the pool's workers spinning between them
//! (`coarsen_infer`'s spinners). Left to the scheduler, two such workers sometimes share one
//! CPU for tens of milliseconds (a woken thread is placed beside its waker, and a spinning one
//! never looks idle enough to be moved): every pass then runs at half the one-thread speed.
//! On a 2-vCPU KVM guest, ResNet-18 shuffled-block packed at batch 1 had whole turns of
//! passes slower than one thread alone (`scripts/bench-peers` turns; `/proc` showed both
//! workers preempted about once per pass); pinned, those turns are gone. DeepSparse pins
//! its pool too.
//!
//! Pinning is chosen per pool ([`Pinning`]): `auto` pins only a pool with one worker per CPU
//! the process may run on, so that two processes with smaller pools never pile onto the same
//! first CPUs; `on` pins any pool no larger than that set; `off` never pins.

use std::fmt;
use std::str::FromStr;

/// Whether a pool's workers are pinned, one per CPU, to the CPUs the process may run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pinning {
    /// Pin when the pool has exactly one worker per allowed CPU.
    #[default]
    Auto,
    /// Pin whenever the pool has at most one worker per allowed CPU.
    On,
    /// Never pin.
    Off,
}

impl Pinning {
    /// The CPUs a pool of `threads` workers is pinned to (worker `i` to element `i`), or `None`
    /// where it runs unpinned (also where the allowed CPUs cannot be read).
    pub fn cpus(self, threads: usize) -> Option<Vec<usize>> {
        let allowed = allowed_cpus();
        let pin = match self {
            Pinning::Off => false,
            Pinning::Auto => threads > 1 && threads == allowed.len(),
            Pinning::On => threads >= 1 && threads <= allowed.len(),
        };
        pin.then(|| allowed.into_iter().take(threads).collect())
    }
}

impl FromStr for Pinning {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Pinning::Auto),
            "on" => Ok(Pinning::On),
            "off" => Ok(Pinning::Off),
            _ => Err(format!("pinning must be auto, on or off, not {s:?}")),
        }
    }
}

impl fmt::Display for Pinning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pinning::Auto => "auto",
            Pinning::On => "on",
            Pinning::Off => "off",
        })
    }
}

/// The CPUs this process may run on, in increasing order (empty where they cannot be read,
/// or off Linux).
pub fn allowed_cpus() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `cpu_set_t` is plain data for which all-zero is the empty set; the call
        // writes at most `size_of::<cpu_set_t>()` bytes into it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let ok =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if ok != 0 {
            return Vec::new();
        }
        let bits = 8 * std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: `c` is below the set's size in bits.
        (0..bits)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect()
    }
    #[cfg(not(target_os = "linux"))]
    {
        Vec::new()
    }
}

/// Pins the calling thread to `cpu`; false where that failed (the thread then runs where the
/// scheduler puts it).
pub fn pin_current_thread(cpu: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return false;
        }
        // SAFETY: as in `allowed_cpus`; `cpu` is below the set's size in bits.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cpu;
        false
    }
}

/// A rayon pool of `threads` workers (at least one), pinned as `pinning` says; also returns
/// whether it was pinned.
pub fn pool(
    threads: usize,
    pinning: Pinning,
) -> Result<(rayon::ThreadPool, bool), rayon::ThreadPoolBuildError> {
    let threads = threads.max(1);
    let cpus = pinning.cpus(threads);
    let pinned = cpus.is_some();
    let pool = builder(threads, cpus).build()?;
    Ok((pool, pinned))
}

/// Makes rayon's global pool (its default size: `RAYON_NUM_THREADS`, else every allowed CPU)
/// pinned as `pinning` says; returns whether it was pinned. Fails where the global pool
/// already exists.
pub fn global(pinning: Pinning) -> Result<bool, rayon::ThreadPoolBuildError> {
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let cpus = pinning.cpus(threads);
    let pinned = cpus.is_some();
    builder(threads, cpus).build_global()?;
    Ok(pinned)
}

fn builder(threads: usize, cpus: Option<Vec<usize>>) -> rayon::ThreadPoolBuilder {
    let b = rayon::ThreadPoolBuilder::new().num_threads(threads);
    match cpus {
        Some(cpus) => b.start_handler(move |i| {
            if let Some(&c) = cpus.get(i) {
                pin_current_thread(c);
            }
        }),
        None => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_parses_and_prints() {
        for p in [Pinning::Auto, Pinning::On, Pinning::Off] {
            assert_eq!(p.to_string().parse::<Pinning>(), Ok(p));
        }
        assert!("yes".parse::<Pinning>().is_err());
    }

    #[test]
    fn auto_pins_only_a_pool_the_size_of_the_allowed_set() {
        let n = allowed_cpus().len();
        assert_eq!(Pinning::Off.cpus(n), None);
        assert_eq!(Pinning::Auto.cpus(n + 1), None);
        assert_eq!(Pinning::On.cpus(n + 1), None);
        if n >= 2 {
            assert_eq!(Pinning::Auto.cpus(n), Some(allowed_cpus()));
            assert_eq!(Pinning::Auto.cpus(n - 1), None);
            assert_eq!(Pinning::On.cpus(n - 1).map(|c| c.len()), Some(n - 1));
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn pinned_workers_run_on_their_own_cpus() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty(), "sched_getaffinity gave no CPU");
        let Ok((pool, pinned)) = pool(allowed.len(), Pinning::On) else {
            return;
        };
        assert!(pinned);
        // Each worker reports the one CPU its affinity now allows.
        let seen = pool.broadcast(|_| allowed_cpus());
        let want: Vec<Vec<usize>> = allowed.iter().map(|&c| vec![c]).collect();
        assert_eq!(seen, want);
        let Ok((pool, pinned)) = super::pool(allowed.len(), Pinning::Off) else {
            return;
        };
        assert!(!pinned);
        assert!(pool
            .broadcast(|_| allowed_cpus())
            .iter()
            .all(|s| *s == allowed));
    }
}
