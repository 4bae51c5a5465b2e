//! Threads that share one long discard of anonymous guest RAM.
//!
//! A chunked inflate hands the device a few multi-GiB ranges; freeing them
//! is the host kernel zapping and freeing every page of them, about
//! 35 ns per KiB here, on one CPU. `MADV_DONTNEED` on disjoint parts of a
//! private mapping runs in parallel (it takes `mmap_lock` for reading), so
//! a long range is cut into one part per CPU: the caller does one, the
//! workers the rest, and the call returns when all are done, exactly as a
//! single `madvise` would. Short ranges (every PFN-array batch, free page
//! reports) never reach the workers: a hand-off costs more than it saves.
//!
//! A shared (memfd, file) backing is not split this way: its punches take
//! the file's inode lock, and two threads punching one file measured slower
//! than one.

use std::sync::mpsc;

use crate::seccomp::{self, ThreadKind};

/// Ranges shorter than this are discarded by the caller alone.
pub const PARALLEL_MIN: u64 = 32 << 20;

/// At most this many threads (the caller included) share one discard.
const MAX_PARTS: usize = 4;

/// A part of a discard: the host address and length of a page-aligned
/// piece of one guest RAM mapping, and where to say how it went.
struct Job {
    addr: usize,
    len: usize,
    done: mpsc::Sender<std::io::Result<()>>,
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

/// The discard workers of one guest RAM.
pub struct DiscardWorkers {
    queues: Vec<mpsc::Sender<Job>>,
}

impl DiscardWorkers {
    /// Start one worker per CPU after the first (at most `MAX_PARTS - 1`);
    /// none on a one-CPU host. A worker that cannot be started is logged and
    /// left out: discards then run on fewer threads, never fail for it.
    pub fn start() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut queues = Vec::new();
        for i in 1..cpus.min(MAX_PARTS) {
            let (tx, rx) = mpsc::channel::<Job>();
            let spawned = std::thread::Builder::new()
                .name(format!("blimp-discard{i}"))
                .spawn(move || {
                    seccomp::enter_or_exit(ThreadKind::Discard);
                    for job in rx {
                        // SAFETY: `DiscardWorkers::madvise_dontneed` sends
                        // only parts of a range its caller vouched for, and
                        // waits for this reply before it returns.
                        let r = unsafe { dontneed(job.addr, job.len) };
                        let _ = job.done.send(r);
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
        // last one shorter); the caller takes the first.
        let piece = len.div_ceil(parts).next_multiple_of(page);
        let (done_tx, done_rx) = mpsc::channel();
        let mut sent = 0;
        let mut off = piece.min(len);
        for q in self.queues.iter().take(parts - 1) {
            if off >= len {
                break;
            }
            let n = piece.min(len - off);
            let job = Job {
                addr: addr + off,
                len: n,
                done: done_tx.clone(),
            };
            match q.send(job) {
                Ok(()) => sent += 1,
                Err(mpsc::SendError(job)) => {
                    // The worker is gone: do its piece here.
                    // SAFETY: a part of the caller's range (its contract).
                    let r = unsafe { dontneed(job.addr, job.len) };
                    let _ = done_tx.send(r);
                    sent += 1;
                }
            }
            off += n;
        }
        // SAFETY: the first piece of the caller's range, under its contract.
        let mut result = unsafe { dontneed(addr, piece.min(len)) };
        let mut calls = 1;
        // Only the jobs hold senders now: a worker that ended without
        // answering closes its job's, and `recv` fails instead of waiting.
        drop(done_tx);
        // Wait for every piece before returning: the mapping must outlive
        // them, and the discard is complete only when all are done.
        for _ in 0..sent {
            let r = done_rx
                .recv()
                .unwrap_or_else(|_| Err(std::io::Error::other("discard worker ended")));
            calls += 1;
            if result.is_ok() {
                result = r;
            }
        }
        (calls, result)
    }
}
