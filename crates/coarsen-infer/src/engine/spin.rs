//! Keeping the pool's other threads awake through a forward pass.
//!
//! A pass is a chain of parallel sections (a layer's tiles, a Winograd transform), each a few
//! hundred microseconds at batch 1. Between two of them rayon's idle workers spin only
//! briefly (about 32 `sched_yield`s) and then sleep, so the next section must wake them. On a
//! virtual machine whose idle vCPUs halt (a KVM guest without halt polling, as the machines
//! this project is measured on), that wake-up goes through the hypervisor and takes long
//! enough that the section's owner has done most of the work alone: after a pause of 0.2 s,
//! ResNet-18's batch-1 passes ran at the one-thread speed (every layer 30–90% slower) for
//! their first five passes, and in long runs such phases came back for hundreds of passes.
//! ONNX Runtime's pool spins between sections for the same reason.
//!
//! [`spinning`] runs a pass with the pool's other threads each held in a spinner job for the
//! pass's length: a loop that helps with the pass's team sections
//! ([`coarsen_kernels::team`], whose waiting leader spins too), takes pending rayon jobs
//! (`rayon::yield_now`), and spins when there are none, so a parallel section finds them
//! awake.
//!
//! Why it cannot deadlock: a spinner returns only when the pass is done, so it must never sit
//! on top of a frame that the pass waits for. Spinners are pushed before any of the pass's
//! jobs, so an idle thread steals one (oldest first) before it can steal any of the pass's
//! work; a thread that already runs a spinner, or runs the pass itself, returns at once from
//! another one (thread-local flag); and one pass at a time spins (process-wide flag), so no
//! two passes' spinners can wait on each other. The pass's end (or unwinding) sets the flag
//! that ends them.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use coarsen_kernels::team;

/// Whether some pass of this process runs with spinners now.
static BUSY: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Whether this thread runs a pass with spinners, or a spinner: it takes no (further)
    /// spinner.
    static HELD: Cell<bool> = const { Cell::new(false) };
}

/// Sets `flag` when dropped (at the pass's end, or while it unwinds).
struct SetOnDrop<'a>(&'a AtomicBool, bool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(self.1, Ordering::Release);
    }
}

/// Runs `pass` on a thread of the current rayon pool with the pool's other threads kept
/// awake (each in a spinner that runs the pass's parallel work) until it returns. Runs it
/// plainly where `on` is false, the pool has one thread, or another pass spins now.
pub(super) fn spinning<R: Send>(on: bool, pass: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if !on || threads < 2 || HELD.get() || BUSY.swap(true, Ordering::Acquire) {
        return pass();
    }
    let _free = SetOnDrop(&BUSY, false);
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        // The pass's own thread (a worker of the pool, which `scope` runs this on) never
        // spins: a spinner it popped while waiting would sit on the pass.
        let _held = Held::take();
        {
            let done = &done;
            for _ in 1..threads {
                s.spawn(move |_| spin(done));
            }
        }
        let _end = SetOnDrop(&done, true);
        team::leading(pass)
    })
}

/// This thread's [`HELD`] flag, set until dropped (also while unwinding).
struct Held(bool);

impl Held {
    fn take() -> Self {
        Held(HELD.replace(true))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD.set(self.0);
    }
}

/// A spinner: runs pending jobs, or spins, until `done`.
fn spin(done: &AtomicBool) {
    let held = Held::take();
    if held.0 {
        return;
    }
    while !done.load(Ordering::Acquire) {
        if team::help() {
            continue;
        }
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => {}
            Some(rayon::Yield::Idle) => {
                for _ in 0..16 {
                    std::hint::spin_loop();
                }
            }
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn a_spinning_pass_returns_its_parallel_result_and_frees_the_threads() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build();
        let Ok(pool) = pool else { return };
        pool.install(|| {
            for _ in 0..50 {
                let s: u64 = spinning(true, || (0..100_000u64).into_par_iter().sum());
                assert_eq!(s, 100_000 * 99_999 / 2);
                assert!(!HELD.get());
            }
            // Nested: the inner pass runs plainly.
            let s: u64 = spinning(true, || spinning(true, || (0..10u64).into_par_iter().sum()));
            assert_eq!(s, 45);
        });
    }

    #[test]
    fn a_thread_that_runs_a_pass_or_a_spinner_takes_no_spinner() {
        // A spinner on such a thread would sit on the pass it waits for: it must return at
        // once (here `done` is never set, so one that spun would never return).
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build();
        let Ok(pool) = pool else { return };
        let (tx, rx) = std::sync::mpsc::channel();
        pool.spawn(move || {
            static NEVER: AtomicBool = AtomicBool::new(false);
            let _held = Held::take();
            spin(&NEVER);
            let _ = tx.send(HELD.get());
        });
        let held = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(
            held,
            Ok(true),
            "the spinner spun, or cleared the flag it did not set"
        );
    }

    #[test]
    fn concurrent_passes_finish() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build();
        let Ok(pool) = pool else { return };
        let sums: Vec<u64> = pool.install(|| {
            (0..8u64)
                .into_par_iter()
                .map(|k| spinning(true, || (0..10_000 * k).into_par_iter().sum::<u64>()))
                .collect()
        });
        for (k, s) in sums.into_iter().enumerate() {
            let n = 10_000 * k as u64;
            assert_eq!(s, n * n.saturating_sub(1) / 2);
        }
    }

    #[test]
    fn a_panicking_pass_ends_its_spinners() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build();
        let Ok(pool) = pool else { return };
        let r = pool.install(|| {
            std::panic::catch_unwind(|| spinning(true, || -> u32 { panic!("pass fails") }))
        });
        assert!(r.is_err());
        // Every thread gave its flag back while unwinding, and the pool still works.
        assert_eq!(pool.broadcast(|_| HELD.get()), [false, false]);
        let s: u32 = pool.install(|| spinning(true, || (0..10u32).into_par_iter().sum()));
        assert_eq!(s, 45);
    }
}
