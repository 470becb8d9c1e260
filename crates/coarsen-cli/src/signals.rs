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

/// A child process starts with SIGINT and SIGTERM unblocked (it inherits the mask otherwise).
pub fn unblocked_in_child(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // pthread_sigmask, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let s = set();
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &s, std::ptr::null_mut());
            Ok(())
        })
    }
}
