//! Threads that share one long discard of guest RAM.
//!
//! A chunked inflate hands the device a few multi-GiB ranges; freeing them
//! is the host kernel zapping and freeing every page of them, about
//! 35 ns per KiB here, on one CPU. The work is cut into one part per CPU:
//! the caller does one, the workers the rest, and the call returns when all
//! are done, exactly as a single call would. Short ranges (every PFN-array
//! batch, free page reports) never reach the workers: a hand-off costs more
//! than it saves.
//!
//! - Anonymous RAM: `MADV_DONTNEED` on disjoint parts of a private mapping
//!   runs in parallel (it takes `mmap_lock` for reading).
//! - memfd RAM: punches of one file take its inode lock, and two threads
//!   punching one file measured slower than one; so memfd RAM is striped
//!   over two files per thread (`crate::ram_stripes`) and each thread
//!   takes turns of a file no other thread is punching
//!   (`crate::punch::Shared`), through its punch helper process where
//!   there is one (`crate::punch`: then no CPU is interrupted to flush blimp's
//!   TLB while the pages go).

use std::sync::mpsc;

use crate::seccomp::{self, ThreadKind};

/// Ranges shorter than this are discarded by the caller alone.
pub const PARALLEL_MIN: u64 = 32 << 20;

/// At most this many threads (the caller included) share one discard.
const MAX_PARTS: usize = 4;

/// One part of a discard: the syscalls it made and how it went.
pub type Part = Box<dyn FnOnce() -> (u64, std::io::Result<()>) + Send>;

/// A part and where to say how it went.
struct Job {
    part: Part,
    done: mpsc::Sender<(u64, std::io::Result<()>)>,
}

/// `MADV_DONTNEED` on `[addr, addr + len)`.
///
/// # Safety
/// The range must lie inside a private anonymous mapping of guest RAM that
/// stays mapped until this returns, and the guest must have given its pages
/// up (they read zero afterwards).
pub(crate) unsafe fn dontneed(addr: usize, len: usize) -> std::io::Result<()> {
    // SAFETY: the caller's contract above; madvise touches no memory of
    // this process other than replacing those pages with zero pages.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `parts` one after another here: the syscalls made and the first
/// error (the other parts are still done).
pub fn run_here(parts: Vec<Part>) -> (u64, std::io::Result<()>) {
    let mut calls = 0;
    let mut result = Ok(());
    for part in parts {
        let (c, r) = part();
        calls += c;
        if result.is_ok() {
            result = r;
        }
    }
    (calls, result)
}

/// How many threads share a long discard on this host (the caller
/// included): one per CPU, at most `MAX_PARTS`.
pub fn host_parts() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.min(MAX_PARTS)
}

/// The discard workers of one guest RAM.
pub struct DiscardWorkers {
    queues: Vec<mpsc::Sender<Job>>,
}

impl DiscardWorkers {
    /// Start one worker per CPU after the first (at most `MAX_PARTS - 1`);
    /// none on a one-CPU host. A worker that cannot be started is logged and
    /// left out: discards then run on fewer threads, never fail for it.
    pub fn start() -> Self {
        let mut queues = Vec::new();
        for i in 1..host_parts() {
            let (tx, rx) = mpsc::channel::<Job>();
            let spawned = std::thread::Builder::new()
                .name(format!("blimp-discard{i}"))
                .spawn(move || {
                    seccomp::enter_or_exit(ThreadKind::Discard);
                    for job in rx {
                        let _ = job.done.send((job.part)());
                    }
                });
            match spawned {
                Ok(_) => queues.push(tx),
                Err(e) => log::warn!("memory: discard worker {i} not started ({e}); fewer threads"),
            }
        }
        DiscardWorkers { queues }
    }

    /// How many threads share a long discard (the caller included).
    pub fn parts(&self) -> usize {
        self.queues.len() + 1
    }

    /// Runs `parts` at once: the first here, the others on the workers (one
    /// each; here, after the first, when there are more parts than workers
    /// or a worker is gone), and returns only when every part is done.
    /// Returns the syscalls made and the first error, if any (the other
    /// parts are still done).
    pub fn run(&self, parts: Vec<Part>) -> (u64, std::io::Result<()>) {
        let mut parts = parts.into_iter();
        let Some(first) = parts.next() else {
            return (0, Ok(()));
        };
        let (done_tx, done_rx) = mpsc::channel();
        let mut sent = 0;
        let mut queues = self.queues.iter();
        let mut here = Vec::new();
        for part in parts {
            let job = Job {
                part,
                done: done_tx.clone(),
            };
            match queues.next() {
                Some(q) => match q.send(job) {
                    Ok(()) => sent += 1,
                    // The worker is gone: its part is done here.
                    Err(mpsc::SendError(job)) => here.push(job.part),
                },
                None => here.push(job.part),
            }
        }
        let (mut calls, mut result) = first();
        let (c, r) = run_here(here);
        calls += c;
        if result.is_ok() {
            result = r;
        }
        // Only the jobs hold senders now: a worker that ended without
        // answering closes its job's, and `recv` fails instead of waiting.
        drop(done_tx);
        // Wait for every part before returning: what they work on must
        // outlive them, and the discard is complete only when all are done.
        for _ in 0..sent {
            let (c, r) = done_rx
                .recv()
                .unwrap_or_else(|_| (0, Err(std::io::Error::other("discard worker ended"))));
            calls += c;
            if result.is_ok() {
                result = r;
            }
        }
        (calls, result)
    }

    /// `MADV_DONTNEED` on `[addr, addr + len)`: in `parts()` pieces on as
    /// many threads when `len` is at least [`PARALLEL_MIN`], else here.
    /// Returns the number of `madvise` calls made; the first error, if any
    /// (the other pieces are still done).
    ///
    /// # Safety
    /// As for `dontneed`: `[addr, addr + len)` is page-aligned, inside a
    /// private anonymous mapping of guest RAM that stays mapped until this
    /// returns, and given up by the guest.
    pub unsafe fn madvise_dontneed(&self, addr: usize, len: usize) -> (u64, std::io::Result<()>) {
        let page = devices::PAGE_SIZE as usize;
        let parts = if (len as u64) < PARALLEL_MIN {
            1
        } else {
            self.parts()
        };
        // Equal pieces, page-aligned, `parts` of them covering `len` (the
        // last one shorter).
        let piece = len.div_ceil(parts).next_multiple_of(page);
        let pieces = (0..len).step_by(piece).map(|off| {
            let (a, n) = (addr + off, piece.min(len - off));
            // SAFETY: a part of the caller's range, under its contract;
            // `run` returns only when this part is done.
            Box::new(move || (1u64, unsafe { dontneed(a, n) })) as Part
        });
        self.run(pieces.collect())
    }
}
