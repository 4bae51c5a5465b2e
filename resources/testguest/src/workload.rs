//! Memory workloads run in ring 3 at native speed: fill, verify, touch,
//! free. Long loops call `bg` every [`CHUNK_PAGES`] pages so background
//! drivers (the balloon) keep being serviced.

use testguest::frames::FRAMES_PER_MIB;
use testguest::pattern::{Mismatch, Record, check_page, fill_page, page_base};

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
        mem.check_poison(pfn);
        let rec = Record::new(slot, 1);
        // SAFETY: the frame was just allocated to us.
        fill_page(
            unsafe { page_mut(pfn) },
            page_base(seed, pfn, rec.version()),
        );
        mem.set_record(pfn, rec);
    }
    Ok(())
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
