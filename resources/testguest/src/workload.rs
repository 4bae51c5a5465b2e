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
