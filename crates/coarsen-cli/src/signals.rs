//! SIGINT and SIGTERM end every command cleanly.
//!
//! Both signals are blocked in every thread (the mask is set before any thread starts, and
//! threads inherit it) and taken by one thread with `sigwait`, which removes the temporary
//! files of writes in progress and exits with the conventional status 128 + signal. No signal
//! handler ever runs on a worker thread: METIS's bundled GKlib installs process-wide handlers
//! that `longjmp` into the partitioning call, and a SIGTERM landing in one of them on another
//! thread (or after the call) crashed the process. Child processes get the default mask back.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// The signals taken over.
fn set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        libc::sigaddset(&mut s, libc::SIGINT);
        libc::sigaddset(&mut s, libc::SIGTERM);
        s
    }
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts from now on) and starts
/// the thread that waits for them. Call first in `main`, before any other thread exists.
pub fn install() {
    let s = set();
    // SAFETY: changes this thread's signal mask; no other thread exists yet.
    let blocked = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut()) };
    if blocked != 0 {
        return; // the default dispositions stay: a signal ends the process as before
    }
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits on the blocked set with a valid out-pointer.
            if unsafe { libc::sigwait(&s, &mut sig) } != 0 {
                continue;
            }
            let name = if sig == libc::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            eprintln!("\ncoarsen: stopped by {name}; temporary files removed");
            coarsen_core::io::exit_removing_temporaries(128 + sig);
        });
    if spawned.is_err() {
        // No thread to take them: give the signals their default action back.
        // SAFETY: restores this thread's mask.
        unsafe {
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &s, std::ptr::null_mut());
        }
    }
}

/// A child process starts with SIGINT and SIGTERM unblocked (it inherits the mask otherwise)
/// and on the CPUs of the process's main thread: a child spawned from a pinned pool worker
/// would inherit that worker's one CPU (ONNX Runtime, timed beside coarsen by `bench --model`,
/// which runs in its pinned pool, ran its two threads on one CPU at half its speed).
pub fn unblocked_in_child(cmd: &mut Command) -> &mut Command {
    let cpus = process_cpus();
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // pthread_sigmask and sched_setaffinity, which are async-signal-safe (the CPU set was
    // read before the fork).
    unsafe {
        cmd.pre_exec(move || {
            let s = set();
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &s, std::ptr::null_mut());
            #[cfg(target_os = "linux")]
            if let Some(c) = &cpus {
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), c);
            }
            Ok(())
        })
    }
}

/// The CPUs of the process's main thread (which no pool pins), where they can be read.
#[cfg(target_os = "linux")]
fn process_cpus() -> Option<libc::cpu_set_t> {
    // SAFETY: `cpu_set_t` is plain data for which all-zero is the empty set; the call writes
    // at most `size_of::<cpu_set_t>()` bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let pid = libc::getpid();
        (libc::sched_getaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
            .then_some(set)
    }
}

/// Elsewhere children inherit the spawning thread's CPUs.
#[cfg(not(target_os = "linux"))]
fn process_cpus() -> Option<()> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The CPUs a `/proc/<pid>/status` text allows (its `Cpus_allowed_list`, e.g. `0-3,8`).
    fn allowed(status: &str) -> usize {
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim();
        list.split(',')
            .filter(|r| !r.is_empty())
            .map(|r| match r.split_once('-') {
                Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
                None => 1,
            })
            .sum()
    }

    #[test]
    fn a_child_of_a_pinned_thread_runs_on_the_process_cpus() {
        let all = coarsen_kernels::threads::allowed_cpus();
        if all.len() < 2 {
            eprintln!("one CPU: nothing to check");
            return;
        }
        let first = all[0];
        let child = std::thread::spawn(move || {
            assert!(coarsen_kernels::threads::pin_current_thread(first));
            let mine = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            assert_eq!(allowed(&mine), 1, "the spawning thread is pinned");
            let out = unblocked_in_child(&mut Command::new("cat"))
                .arg("/proc/self/status")
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(allowed(&child), all.len(), "{child}");
    }
}
