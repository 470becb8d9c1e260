//! Parallel sections that never put a waiting thread to sleep, for the passes whose pool
//! is held awake.
//!
//! A forward pass at small batch is a chain of parallel sections a few hundred microseconds
//! long. Run as rayon parallel iterators, the thread that runs the pass waits at the end of
//! each section for the tasks the other threads took; rayon's waiting thread yields a few
//! dozen times and then sleeps, and the last task's thread must wake it. On a virtual machine
//! whose idle vCPUs halt, that wake-up goes through the hypervisor, and while the host's core
//! runs something else it takes long: in `/proc`, the pass's thread of ResNet-18 at batch 1
//! slept several times per pass in the slowest turns of passes, and the more it slept the
//! slower the pass.
//!
//! A *team* is the pass's thread (the leader, [`leading`]) and the pool's other threads, which
//! the engine holds in spinners for the pass's length (they call [`help`] in their loop).
//! [`for_each`] called by the leader publishes its tasks; leader and helpers take tasks one
//! at a time from a shared counter (so a slow thread takes fewer), and the leader then spins,
//! never sleeps, until every helper has left the section. Called anywhere else it runs as a
//! rayon parallel iterator (or in sequence inside a team's task), so code using it runs
//! unchanged outside such passes.
//!
//! Safety of the published section: it lives on the leader's stack, so the leader returns
//! only once no helper can still reach it. A helper announces itself (`HELPERS`) before it
//! reads the published pointer and withdraws after its last task; the leader takes the
//! pointer back before it reads `HELPERS` (both sequentially consistent), so either the
//! helper sees no section or the leader sees the helper and waits for it. One thread of the
//! process leads at a time ([`leading`]), so one section at most is published.

use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

/// What the current thread is doing, for [`for_each`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Not in a team: sections run on rayon.
    Free,
    /// Runs a pass whose pool is held awake: sections are published to the team.
    Leader,
    /// Runs a task of a published section: nested sections run in sequence.
    Task,
}

thread_local! {
    static ROLE: Cell<Role> = const { Cell::new(Role::Free) };
}

/// A published section: `n` tasks of `run`, taken in order from `next`.
struct Section {
    /// The tasks (its lifetime erased: see the module's safety note).
    run: *const (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    /// The first task's panic, re-raised by the leader.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// The published section, or null.
static SECTION: AtomicPtr<Section> = AtomicPtr::new(std::ptr::null_mut());
/// Helpers that may hold a reference to the published section.
static HELPERS: AtomicUsize = AtomicUsize::new(0);

/// Sets this thread's role until dropped (also while unwinding).
struct RoleGuard(Role);

impl RoleGuard {
    fn set(role: Role) -> Self {
        RoleGuard(ROLE.replace(role))
    }
}

impl Drop for RoleGuard {
    fn drop(&mut self) {
        ROLE.set(self.0);
    }
}

/// Whether some thread of the process leads a team now.
static LEADING: AtomicBool = AtomicBool::new(false);

/// Clears [`LEADING`] when dropped (also while unwinding).
struct EndLead;

impl Drop for EndLead {
    fn drop(&mut self) {
        LEADING.store(false, Ordering::Release);
    }
}

/// Runs `pass` on this thread as a team's leader: its [`for_each`] sections are shared with
/// the threads that call [`help`] meanwhile (the caller keeps them calling it until `pass`
/// returns). One thread of the process leads at a time: where another leads already, or this
/// thread runs a task, `pass` runs with its sections on rayon.
pub fn leading<R>(pass: impl FnOnce() -> R) -> R {
    if ROLE.get() != Role::Free || LEADING.swap(true, Ordering::Acquire) {
        return pass();
    }
    let _end = EndLead;
    let _role = RoleGuard::set(Role::Leader);
    pass()
}

/// Runs tasks of the published section, if there is one; returns whether there was.
pub fn help() -> bool {
    if SECTION.load(Ordering::Relaxed).is_null() {
        return false;
    }
    HELPERS.fetch_add(1, Ordering::SeqCst);
    let p = SECTION.load(Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: announced in `HELPERS` before reading the pointer, so the section stays
        // alive until this helper withdraws below (module note).
        run_tasks(unsafe { &*p });
    }
    HELPERS.fetch_sub(1, Ordering::SeqCst);
    !p.is_null()
}

/// Takes and runs tasks of `s` until none is left.
fn run_tasks(s: &Section) {
    let _role = RoleGuard::set(Role::Task);
    // SAFETY: the closure outlives the section's publication (module note).
    let run = unsafe { &*s.run };
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= s.n {
            break;
        }
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| run(i))) {
            if let Ok(mut first) = s.panic.lock() {
                first.get_or_insert(p);
            }
        }
    }
}

/// Takes the section back and waits until no helper can reach it (also while unwinding).
struct Unpublish;

impl Drop for Unpublish {
    fn drop(&mut self) {
        SECTION.store(std::ptr::null_mut(), Ordering::SeqCst);
        while HELPERS.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
    }
}

/// Runs `f(0)`, …, `f(n - 1)` in parallel: on the team where this thread leads one, in
/// sequence inside a team's task, on rayon elsewhere. Each index runs exactly once; a panic
/// of a task is raised here once every task has ended.
pub fn for_each<F: Fn(usize) + Sync + Send>(n: usize, f: F) {
    match ROLE.get() {
        _ if n <= 1 => (0..n).for_each(f),
        Role::Task => (0..n).for_each(f),
        Role::Free => (0..n).into_par_iter().for_each(f),
        Role::Leader => {
            let run: &(dyn Fn(usize) + Sync) = &f;
            // SAFETY: only the lifetime is erased; the section is unpublished, and no helper
            // can reach it, before `f` goes out of scope (`Unpublish`).
            let run: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(run) };
            let s = Section {
                run,
                n,
                next: AtomicUsize::new(0),
                panic: Mutex::new(None),
            };
            SECTION.store(&s as *const Section as *mut Section, Ordering::SeqCst);
            {
                let _unpublish = Unpublish;
                run_tasks(&s);
            }
            let panic = s.panic.into_inner().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = panic {
                resume_unwind(p);
            }
        }
    }
}

/// The error of the lowest-numbered failing task, of tasks that run in any order.
struct FirstError<E>(Mutex<Option<(usize, E)>>);

impl<E> FirstError<E> {
    fn new() -> Self {
        FirstError(Mutex::new(None))
    }

    /// Keeps task `i`'s error if no task before it failed.
    fn note(&self, i: usize, r: Result<(), E>) {
        if let Err(e) = r {
            let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if g.as_ref().is_none_or(|(j, _)| i < *j) {
                *g = Some((i, e));
            }
        }
    }

    fn into_result(self) -> Result<(), E> {
        match self.0.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }
}

/// [`for_each`] of fallible tasks: every task runs; the first error (by index) is returned.
pub fn try_for_each<E: Send, F: Fn(usize) -> Result<(), E> + Sync + Send>(
    n: usize,
    f: F,
) -> Result<(), E> {
    let first = FirstError::new();
    for_each(n, |i| first.note(i, f(i)));
    first.into_result()
}

/// A pointer to the elements of a slice whose chunks go to different tasks.
struct Chunks<T>(*mut T);

// SAFETY: the tasks reach disjoint chunks only (`for_each_chunk_mut`), and `T: Send`.
unsafe impl<T: Send> Send for Chunks<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Chunks<T> {}

impl<T> Chunks<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

/// [`for_each`] over the chunks of `v` of `size` elements (the last one may be shorter):
/// task `i` gets chunk `i`, as `par_chunks_mut(size).enumerate()` would.
pub fn for_each_chunk_mut<T: Send, F: Fn(usize, &mut [T]) + Sync + Send>(
    v: &mut [T],
    size: usize,
    f: F,
) {
    let (len, size) = (v.len(), size.max(1));
    let p = Chunks(v.as_mut_ptr());
    for_each(len.div_ceil(size), |i| {
        let start = i * size;
        let end = (start + size).min(len);
        // SAFETY: `start < end <= len`, the chunks of different indices are disjoint, each
        // index runs once, and `v` stays borrowed until every task has ended.
        let chunk = unsafe { std::slice::from_raw_parts_mut(p.get().add(start), end - start) };
        f(i, chunk)
    })
}

/// [`for_each_chunk_mut`] of fallible tasks, as [`try_for_each`].
pub fn try_for_each_chunk_mut<T: Send, E: Send, F>(v: &mut [T], size: usize, f: F) -> Result<(), E>
where
    F: Fn(usize, &mut [T]) -> Result<(), E> + Sync + Send,
{
    let first = FirstError::new();
    for_each_chunk_mut(v, size, |i, chunk| first.note(i, f(i, chunk)));
    first.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test's team at a time: a second leader would run its sections on rayon.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// Runs `pass` as leader on one thread of a `threads` pool while the others help.
    fn team<R: Send>(threads: usize, pass: impl FnOnce() -> R + Send) -> Option<R> {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .ok()?;
        let done = AtomicBool::new(false);
        Some(pool.scope(|s| {
            for _ in 1..threads {
                let done = &done;
                s.spawn(move |_| {
                    while !done.load(Ordering::Acquire) {
                        if !help() {
                            std::hint::spin_loop();
                        }
                    }
                });
            }
            // Also when `pass` fails an assertion: the helpers must end for the scope to.
            struct Done<'a>(&'a AtomicBool);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Release);
                }
            }
            let _done = Done(&done);
            leading(pass)
        }))
    }

    #[test]
    fn every_task_runs_once_on_the_team() {
        let r = team(3, || {
            let mut total = 0;
            for n in [0, 1, 2, 3, 7, 64, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for_each(n, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                    // Nested: in sequence inside a task.
                    for_each(3, |_| {
                        hits[i].fetch_add(10, Ordering::Relaxed);
                    });
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 31),
                    "n = {n}"
                );
                total += n;
            }
            total
        });
        if let Some(total) = r {
            assert_eq!(total, 1077);
        }
    }

    #[test]
    fn helpers_take_tasks() {
        // With a task that waits until some other thread has run a task, the section ends
        // only if the helper took part.
        let r = team(2, || {
            let me = std::thread::current().id();
            let other = AtomicBool::new(false);
            for_each(64, |_| {
                if std::thread::current().id() != me {
                    other.store(true, Ordering::Relaxed);
                }
                let t0 = std::time::Instant::now();
                while !other.load(Ordering::Relaxed) && t0.elapsed().as_millis() < 2000 {
                    std::hint::spin_loop();
                }
            });
            other.load(Ordering::Relaxed)
        });
        if let Some(helped) = r {
            assert!(helped, "no helper ran a task");
        }
    }

    #[test]
    fn chunks_cover_the_slice_once_in_and_out_of_a_team() {
        for size in [1, 3, 4, 10, 11] {
            let check = || {
                let mut v = vec![0usize; 10];
                for_each_chunk_mut(&mut v, size, |i, c| {
                    assert!(c.len() == size.min(10 - i * size));
                    for (k, x) in c.iter_mut().enumerate() {
                        *x += i * size + k + 1;
                    }
                });
                assert_eq!(v, (1..=10).collect::<Vec<_>>(), "size {size}");
                let mut w = vec![0u8; 10];
                let r = try_for_each_chunk_mut(
                    &mut w,
                    size,
                    |i, _| if i > 0 { Err(i) } else { Ok(()) },
                );
                assert_eq!(r, if size >= 10 { Ok(()) } else { Err(1) });
            };
            check();
            team(2, check);
        }
    }

    #[test]
    fn outside_a_team_sections_run_on_rayon() {
        let hits: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
        for_each(100, |i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        assert_eq!(
            try_for_each(5, |i| if i >= 2 { Err(i) } else { Ok(()) }),
            Err(2)
        );
    }

    #[test]
    fn a_panicking_task_is_raised_by_the_leader_after_the_section() {
        let r = team(2, || {
            let ran = AtomicUsize::new(0);
            let caught = catch_unwind(AssertUnwindSafe(|| {
                for_each(16, |i| {
                    ran.fetch_add(1, Ordering::Relaxed);
                    if i == 5 {
                        panic!("task 5 fails");
                    }
                })
            }));
            // The team still works afterwards.
            let after = try_for_each(8, |i| if i == 6 { Err(i) } else { Ok(()) });
            (caught.is_err(), ran.load(Ordering::Relaxed), after)
        });
        if let Some((caught, ran, after)) = r {
            assert!(caught);
            assert_eq!(ran, 16, "every task ends before the panic is raised");
            assert_eq!(after, Err(6));
        }
    }
}
