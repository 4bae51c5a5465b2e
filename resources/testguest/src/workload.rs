//! Memory workloads run in ring 3 at native speed: fill, verify, touch,
//! free. Long loops call `bg` every [`CHUNK_PAGES`] pages so background
//! drivers (the balloon) keep being serviced.

use testguest::frames::FRAMES_PER_MIB;
use testguest::pattern::{Mismatch, Record, check_page, fill_page, page_base};
use testguest::ramp::{self, Pacer, RampStats, Wait, WaitStep};

use crate::clock;
use crate::events;
use crate::memory::{Memory, page_mut};

/// Pages between two background-service calls (16 MiB).
pub const CHUNK_PAGES: u64 = 4096;

/// Callback servicing background work between chunks.
pub type Background<'a> = &'a mut dyn FnMut(&mut Memory);

pub enum FillError {
    /// All 255 seed slots are in use.
    TooManySeeds,
    /// The allocator ran dry after this many pages (which stay filled).
    OutOfMemory(u64),
}

/// Fills `mib` MiB of freshly allocated frames with the pattern of `seed`.
pub fn fill(mem: &mut Memory, mib: u64, seed: u64, bg: Background) -> Result<(), FillError> {
    let slot = mem.seed_slot(seed).ok_or(FillError::TooManySeeds)?;
    let pages = mib.saturating_mul(FRAMES_PER_MIB);
    for i in 0..pages {
        if i % CHUNK_PAGES == CHUNK_PAGES - 1 {
            bg(mem);
        }
        let Some(pfn) = mem.frames.alloc() else {
            return Err(FillError::OutOfMemory(i));
        };
        fill_new_page(mem, pfn, slot, seed);
    }
    Ok(())
}

/// Fills a frame just allocated to a workload with the pattern of `seed`
/// (in seed slot `slot`) and records it as filled.
fn fill_new_page(mem: &mut Memory, pfn: u64, slot: u8, seed: u64) {
    mem.check_poison(pfn);
    let rec = Record::new(slot, 1);
    // SAFETY: the frame was just allocated to the caller.
    fill_page(
        unsafe { page_mut(pfn) },
        page_base(seed, pfn, rec.version()),
    );
    mem.set_record(pfn, rec);
}

pub struct VerifyReport {
    pub pages: u64,
    pub bad: u64,
    pub first_bad: Option<(u64, Mismatch)>,
}

/// Re-checks every filled page against its seed, frame number and version.
pub fn verify(mem: &mut Memory, bg: Background) -> VerifyReport {
    let mut r = VerifyReport {
        pages: 0,
        bad: 0,
        first_bad: None,
    };
    for pfn in 0..mem.nframes() {
        let rec = mem.record(pfn);
        if !rec.is_filled() {
            continue;
        }
        r.pages += 1;
        if r.pages.is_multiple_of(CHUNK_PAGES) {
            bg(mem);
        }
        let base = page_base(mem.seed(rec.slot()), pfn, rec.version());
        // SAFETY: filled frames stay allocated to the fill workload.
        if let Err(m) = check_page(unsafe { page_mut(pfn) }, base) {
            r.bad += 1;
            if r.first_bad.is_none() {
                r.first_bad = Some((pfn, m));
            }
        }
    }
    r
}

/// Writes one byte into each of the first `mib` MiB of free frames (they
/// stay free). Returns the MiB actually touched.
pub fn touch(mem: &mut Memory, mib: u64) -> u64 {
    let want = mib.saturating_mul(FRAMES_PER_MIB);
    let mut n = 0;
    // With poisoning on, the byte written is the poison, which keeps free
    // frames poisoned.
    let byte = mem.poison.unwrap_or(0x5a);
    for pfn in mem.frames.iter_free().take(want as usize) {
        // SAFETY: free frames are not in use by anybody; byte 0 is scribbled.
        unsafe { core::ptr::write_volatile((pfn << 12) as *mut u8, byte) };
        n += 1;
    }
    n / FRAMES_PER_MIB
}

/// Returns up to `mib` MiB of filled frames (highest first) to the free
/// pool without clearing them (but poisoned, with poisoning on). Returns the number of pages freed.
pub fn free(mem: &mut Memory, mib: u64) -> u64 {
    let want = mib.saturating_mul(FRAMES_PER_MIB);
    let mut n = 0;
    let mut pfn = mem.nframes();
    while n < want && pfn > 0 {
        pfn -= 1;
        if mem.record(pfn).is_filled() {
            mem.set_record(pfn, Record::EMPTY);
            mem.poison_page(pfn);
            // A filled frame is allocated, so this cannot fail.
            let _ = mem.frames.free(pfn);
            n += 1;
        }
    }
    n
}

/// Background page dirtier (`dirty MIB RATE`): keeps rewriting the first
/// MIB MiB of filled pages, cyclically, at RATE MiB/s. Each rewrite bumps
/// the page's version in its fill record (kept in guest memory), so
/// `verify` checks the latest contents, e.g. after a live migration.
pub struct Dirtier {
    /// Working set size in pages.
    pages: u64,
    rate_pages_per_s: u64,
    /// Next frame to look at and its index in the working set.
    cursor: u64,
    index: u64,
    last_ns: u64,
    /// Pages owed from rounding.
    carry_ns: u64,
    pub rewritten: u64,
}

/// How often the dirtier wants to run while the guest idles.
pub const DIRTY_TICK_NS: u64 = 10_000_000;

impl Dirtier {
    pub fn new(mib: u64, rate_mib_s: u64, now_ns: u64) -> Dirtier {
        Dirtier {
            pages: mib.saturating_mul(FRAMES_PER_MIB),
            rate_pages_per_s: rate_mib_s.saturating_mul(FRAMES_PER_MIB),
            cursor: 0,
            index: 0,
            last_ns: now_ns,
            carry_ns: 0,
            rewritten: 0,
        }
    }

    /// Rewrites the pages due since the last call.
    pub fn tick(&mut self, mem: &mut Memory, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.last_ns) + self.carry_ns;
        self.last_ns = now_ns;
        // Never more than one second's worth at once.
        let elapsed = elapsed.min(1_000_000_000);
        let due = (u128::from(elapsed) * u128::from(self.rate_pages_per_s) / 1_000_000_000) as u64;
        let used_ns = (due * 1_000_000_000)
            .checked_div(self.rate_pages_per_s)
            .unwrap_or(elapsed);
        self.carry_ns = elapsed - used_ns;
        for _ in 0..due {
            let Some(pfn) = self.next_page(mem) else {
                return;
            };
            let rec = mem.record(pfn).bumped();
            // SAFETY: filled frames belong to the fill workload.
            fill_page(
                unsafe { page_mut(pfn) },
                page_base(mem.seed(rec.slot()), pfn, rec.version()),
            );
            mem.set_record(pfn, rec);
            self.rewritten += 1;
        }
    }

    /// The next filled page of the working set, wrapping around.
    fn next_page(&mut self, mem: &Memory) -> Option<u64> {
        let n = mem.nframes();
        // At most two passes: to the end of the working set, then again
        // from the start.
        for _ in 0..2 {
            while self.cursor < n && self.index < self.pages {
                let pfn = self.cursor;
                self.cursor += 1;
                if mem.record(pfn).is_filled() {
                    self.index += 1;
                    return Some(pfn);
                }
            }
            self.cursor = 0;
            self.index = 0;
        }
        None
    }
}

/// What a ramp needs from the rest of the guest while it runs.
pub trait RampEnv {
    /// Background work, statistics requests answered with current values
    /// (a ramp is a long-running program: the host must see it live).
    fn service(&mut self, mem: &mut Memory);
    /// Halts until an interrupt, `deadline_ns` or a driver's own deadline,
    /// unless an event arrived after `seen`.
    fn idle(&mut self, seen: u64, deadline_ns: u64);
    /// Linux's OOM notifier: with VIRTIO_BALLOON_F_DEFLATE_ON_OOM the
    /// balloon gives pages back at once. Returns the pages freed (0 without
    /// the feature or without a balloon).
    fn oom_deflate(&mut self, mem: &mut Memory) -> u64;
    /// One direct-reclaim attempt that scanned `scanned` pages
    /// (`alloc-stalls`, `direct-scans`).
    fn note_stall(&mut self, scanned: u64);
    /// A waiting allocation got `pages` back (`direct-reclaims`).
    fn note_reclaim(&mut self, pages: u64);
    /// Whether the user asked the ramp to stop (Ctrl-C, `cycles` 0 only).
    fn interrupted(&mut self) -> bool;
}

/// `ramp MIB RATE HOLD CYCLES SEED WAIT` (see [`testguest::ramp`]).
#[derive(Debug, Clone, Copy)]
pub struct RampArgs {
    pub mib: u64,
    pub rate_mib_s: u64,
    pub hold_ns: u64,
    /// 0: until interrupted.
    pub cycles: u64,
    pub seed: u64,
    /// Bound on one wait for memory.
    pub wait_ns: u64,
}

/// Why a ramp stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RampError {
    TooManySeeds,
    /// No free frame and none in the balloon to wait for.
    OutOfMemory,
    /// No memory came back within the bound (ns waited).
    WaitTimedOut(u64),
}

impl core::fmt::Display for RampError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RampError::TooManySeeds => write!(f, "too many distinct seeds (max 255)"),
            RampError::OutOfMemory => write!(
                f,
                "out of memory, and the balloon holds no pages to wait for"
            ),
            RampError::WaitTimedOut(ns) => write!(
                f,
                "no memory came back after waiting {} ms (the balloon still holds pages)",
                ns / 1_000_000
            ),
        }
    }
}

/// How a ramp ended: its figures, its running time, and an error if an
/// allocation failed (its pages are freed either way, as when a program
/// exits).
pub struct RampOutcome {
    pub stats: RampStats,
    pub elapsed_ns: u64,
    pub interrupted: bool,
    pub error: Option<RampError>,
}

/// Runs the ramp: per cycle, allocates `mib` MiB at `rate_mib_s` MiB/s
/// (filled with the pattern, so the pages are really used), holds them for
/// `hold_ns`, frees them. An allocation that finds the allocator dry while
/// the balloon holds pages waits for memory, servicing the balloon, as
/// Linux's allocator stalls in direct reclaim: each attempt counts as an
/// allocation stall, and the wait is taken out of the pacing.
pub fn ramp(mem: &mut Memory, args: RampArgs, env: &mut dyn RampEnv) -> RampOutcome {
    let t0 = clock::now_ns();
    let mut out = RampOutcome {
        stats: RampStats::default(),
        elapsed_ns: 0,
        interrupted: false,
        error: None,
    };
    let Some(slot) = mem.seed_slot(args.seed) else {
        out.error = Some(RampError::TooManySeeds);
        out.stats.failed = true;
        return out;
    };
    while args.cycles == 0 || out.stats.cycles < args.cycles {
        let r = ramp_cycle(mem, args, slot, env, &mut out);
        free_slot(mem, slot);
        env.service(mem);
        match r {
            Ok(true) => out.stats.cycles += 1,
            Ok(false) => {
                out.interrupted = true;
                break;
            }
            Err(e) => {
                out.error = Some(e);
                out.stats.failed = true;
                break;
            }
        }
    }
    clock::disarm();
    out.elapsed_ns = clock::now_ns().saturating_sub(t0);
    out
}

/// One allocate-and-hold cycle (the caller frees). Ok(false): interrupted.
fn ramp_cycle(
    mem: &mut Memory,
    args: RampArgs,
    slot: u8,
    env: &mut dyn RampEnv,
    out: &mut RampOutcome,
) -> Result<bool, RampError> {
    let total = args.mib.saturating_mul(FRAMES_PER_MIB);
    let rate = args.rate_mib_s.saturating_mul(FRAMES_PER_MIB);
    let mut pacer = Pacer::new(total, rate, clock::now_ns());
    let mut done = 0;
    while done < total {
        if env.interrupted() {
            return Ok(false);
        }
        let allowed = pacer.allowed(clock::now_ns());
        if allowed <= done {
            if let Some(due) = pacer.due_ns(done, ramp::CHUNK_PAGES) {
                sleep_until(mem, env, due);
            }
            continue;
        }
        for _ in 0..(allowed - done).min(ramp::CHUNK_PAGES) {
            let pfn = match mem.frames.alloc() {
                Some(p) => p,
                None => wait_for_frame(mem, args.wait_ns, env, &mut pacer, &mut out.stats)?,
            };
            fill_new_page(mem, pfn, slot, args.seed);
            done += 1;
            out.stats.allocated_pages += 1;
        }
        env.service(mem);
    }
    let hold_end = clock::now_ns().saturating_add(args.hold_ns);
    while clock::now_ns() < hold_end {
        if env.interrupted() {
            return Ok(false);
        }
        sleep_until(mem, env, hold_end.min(clock::now_ns() + ramp::RETRY_NS));
    }
    Ok(true)
}

/// Services the background until `deadline_ns`, halting in between.
fn sleep_until(mem: &mut Memory, env: &mut dyn RampEnv, deadline_ns: u64) {
    loop {
        let seen = events::snapshot();
        env.service(mem);
        if clock::now_ns() >= deadline_ns {
            return;
        }
        env.idle(seen, deadline_ns);
    }
}

/// The allocator is dry: waits for a frame while the balloon holds pages
/// (a deflate ordered by the host, or deflate-on-OOM, brings them back),
/// counting a stall per attempt, for at most `limit_ns`.
fn wait_for_frame(
    mem: &mut Memory,
    limit_ns: u64,
    env: &mut dyn RampEnv,
    pacer: &mut Pacer,
    stats: &mut RampStats,
) -> Result<u64, RampError> {
    let mut wait = Wait::start(clock::now_ns(), limit_ns);
    loop {
        let seen = events::snapshot();
        let now = clock::now_ns();
        let next_ns = match wait.step(now) {
            WaitStep::GiveUp => {
                let ns = wait.elapsed(now);
                stats.wait_ended(ns);
                pacer.pause(ns);
                return Err(RampError::WaitTimedOut(ns));
            }
            WaitStep::Retry {
                new_attempts,
                next_ns,
            } => {
                for _ in 0..new_attempts {
                    env.note_stall(ramp::SCAN_BATCH_PAGES);
                    stats.stall_attempts += 1;
                }
                if new_attempts > 0 {
                    env.oom_deflate(mem);
                }
                next_ns
            }
        };
        // Answers the statistics request with the stall counted and lets a
        // deflate the host ordered give frames back.
        env.service(mem);
        if let Some(pfn) = mem.frames.alloc() {
            let ns = wait.elapsed(clock::now_ns());
            stats.wait_ended(ns);
            pacer.pause(ns);
            env.note_reclaim(mem.frames.free_frames() + 1);
            return Ok(pfn);
        }
        if mem.balloon_pages() == 0 {
            // Nothing to wait for: a real out-of-memory.
            let ns = wait.elapsed(clock::now_ns());
            stats.wait_ended(ns);
            return Err(RampError::OutOfMemory);
        }
        env.idle(seen, next_ns);
    }
}

/// Frees every page filled with seed slot `slot` (poisoned, with
/// poisoning on). Returns the pages freed.
fn free_slot(mem: &mut Memory, slot: u8) -> u64 {
    let mut n = 0;
    for pfn in 0..mem.nframes() {
        let rec = mem.record(pfn);
        if rec.is_filled() && rec.slot() == slot {
            mem.set_record(pfn, Record::EMPTY);
            mem.poison_page(pfn);
            // A filled frame is allocated, so this cannot fail.
            let _ = mem.frames.free(pfn);
            n += 1;
        }
    }
    n
}
