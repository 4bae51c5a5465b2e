//! Dirty-page tracking for migration.
//!
//! A page is dirty when KVM's dirty log (guest writes, `KVM_MEM_LOG_DIRTY_PAGES`)
//! or the VMM's own bitmap (writes the VMM makes through vm-memory: used
//! rings, stats buffers, ...) says so. [`sync`] reads and clears both and ORs
//! them into an [`AtomicPageBitmap`], the per-round "to send" set.
//!
//! The [`AtomicPageBitmap`] is shared: the sender thread walks it
//! ([`AtomicPageBitmap::take_runs`]) while the balloon's free-page hints clear ranges in it
//! ([`AtomicPageBitmap::clear_range`]). Every bit operation is a single atomic
//! read-modify-write on a `u64` word, so a page is claimed by the sender at
//! most once, and a hint that lands before the sender reaches a page keeps it
//! from being sent. A hint that lands just after the sender claimed a page
//! costs one needless page copy, never a lost one.

use std::sync::atomic::{AtomicU64, Ordering};

use arch::MemoryLayout;
use devices::{DirtyBitmap, GpaRange, PAGE_SHIFT, PAGE_SIZE};
use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use crate::memory::GuestRam;
use crate::vm::{Vm, VmError};

/// Errors enabling or reading dirty logs.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("turning dirty logging {} on the memslots: {source}", if *.enable { "on" } else { "off" })]
    Register {
        enable: bool,
        #[source]
        source: VmError,
    },
    #[error(
        "memslot {slot} ({gpa:#x}, {size:#x} bytes) is not logging dirty pages: enable dirty logging first"
    )]
    NotLogging { slot: u32, gpa: u64, size: u64 },
    #[error("KVM_GET_DIRTY_LOG on memslot {slot} at {gpa:#x} failed: {source}")]
    GetDirtyLog {
        slot: u32,
        gpa: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest RAM region at {gpa:#x} has no KVM memslot")]
    NoSlot { gpa: u64 },
    #[error("memslot at {gpa:#x} ({size:#x} bytes) is not a region of the dirty bitmap")]
    NotInBitmap { gpa: u64, size: u64 },
}

/// One RAM region of a [`AtomicPageBitmap`]. Each region's bits start on a word
/// boundary so that KVM's and vm-memory's per-slot bitmaps (one `u64` per 64
/// pages, bit `i` = page `i`) can be ORed in word by word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Region {
    gpa: u64,
    pages: u64,
    /// First word of this region in `AtomicPageBitmap::words`.
    first_word: usize,
}

impl Region {
    fn end_gpa(&self) -> u64 {
        self.gpa + (self.pages << PAGE_SHIFT)
    }
    fn end_word(&self) -> usize {
        self.first_word + self.pages.div_ceil(64) as usize
    }
    /// Valid bits of word `w` (absolute index) of this region.
    fn word_mask(&self, w: usize) -> u64 {
        let last = self.end_word() - 1;
        let rem = self.pages % 64;
        if w == last && rem != 0 {
            (1u64 << rem) - 1
        } else {
            u64::MAX
        }
    }
}

/// A contiguous run of set pages of an [`AtomicPageBitmap`], by
/// guest-physical address (the balloon's `PfnRun` is a run of page frame
/// numbers with their index in the balloon's own bitmap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpaRun {
    pub gpa: u64,
    pub pages: u64,
}

impl GpaRun {
    pub fn len_bytes(&self) -> u64 {
        self.pages << PAGE_SHIFT
    }
}

/// One bit per 4 KiB page of guest RAM, across all regions of the layout,
/// addressed by guest-physical address; every bit operation is one atomic
/// read-modify-write, so several threads may update it at once (see the
/// module docs). The balloon's `InflatedBitmap` is the single-owner,
/// densely indexed set of inflated pages; this one is the per-round to-send
/// set and the destination's written-pages set.
pub struct AtomicPageBitmap {
    regions: Vec<Region>,
    words: Box<[AtomicU64]>,
}

/// Bits `[lo, hi)` of a word (`0 <= lo <= hi <= 64`).
fn bit_mask(lo: u64, hi: u64) -> u64 {
    if hi <= lo {
        return 0;
    }
    let upper = if hi >= 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl AtomicPageBitmap {
    /// An all-clear bitmap over `layout`'s RAM.
    pub fn new(layout: &MemoryLayout) -> Self {
        Self::from_regions(layout.regions().iter().map(|r| (r.start, r.size)))
    }

    /// An all-clear bitmap over RAM regions given as (gpa, size in bytes).
    /// Partial pages at a region's end are not tracked.
    pub fn from_regions(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut regions = Vec::new();
        let mut words = 0usize;
        for (gpa, size) in ranges {
            let pages = size >> PAGE_SHIFT;
            regions.push(Region {
                gpa,
                pages,
                first_word: words,
            });
            words += pages.div_ceil(64) as usize;
        }
        Self {
            regions,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Pages of RAM the bitmap covers.
    pub fn pages(&self) -> u64 {
        self.regions.iter().map(|r| r.pages).sum()
    }

    /// RAM regions as (gpa, size in bytes).
    pub fn regions(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.regions.iter().map(|r| (r.gpa, r.pages << PAGE_SHIFT))
    }

    fn region_of(&self, gpa: u64) -> Option<&Region> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa < r.end_gpa())
    }

    /// Bit index of the page holding `gpa` (indices of different regions
    /// are disjoint; a few indices between regions are never used).
    pub fn index_of(&self, gpa: u64) -> Option<u64> {
        let r = self.region_of(gpa)?;
        Some(r.first_word as u64 * 64 + ((gpa - r.gpa) >> PAGE_SHIFT))
    }

    /// Guest-physical address of the page with bit index `index`.
    pub fn gpa_of(&self, index: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let first = r.first_word as u64 * 64;
            (index >= first && index < first + r.pages)
                .then(|| r.gpa + ((index - first) << PAGE_SHIFT))
        })
    }

    /// Is the page holding `gpa` set? False outside RAM.
    pub fn is_set(&self, gpa: u64) -> bool {
        self.index_of(gpa).is_some_and(|i| {
            self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
        })
    }

    /// Apply `op(word, mask, gpa of the word's bit 0)` (returning how many
    /// bits it changed) to every page wholly inside `range` and inside RAM;
    /// returns the total changed.
    fn apply(&self, range: GpaRange, mut op: impl FnMut(&AtomicU64, u64, u64) -> u64) -> u64 {
        let start = range.start;
        let end = range.end().unwrap_or(u64::MAX);
        let mut changed = 0;
        for r in &self.regions {
            if start >= r.end_gpa() || end <= r.gpa {
                continue;
            }
            // Whole pages of the range inside this region (both ends are
            // inside the region now, so nothing overflows).
            let lo = (start.max(r.gpa) - r.gpa).next_multiple_of(PAGE_SIZE) >> PAGE_SHIFT;
            let hi = (end.min(r.end_gpa()) - r.gpa) >> PAGE_SHIFT;
            if lo >= hi {
                continue;
            }
            let mut page = lo;
            while page < hi {
                let w = r.first_word + (page / 64) as usize;
                let bit = page % 64;
                let upto = (hi - page + bit).min(64);
                let base = r.gpa + ((page - bit) << PAGE_SHIFT);
                changed += op(&self.words[w], bit_mask(bit, upto), base);
                page += upto - bit;
            }
        }
        changed
    }

    /// Set every page wholly inside `range` (parts outside RAM are ignored);
    /// returns how many were newly set.
    pub fn set_range(&self, range: GpaRange) -> u64 {
        self.apply(range, |w, m, _| {
            u64::from((!w.fetch_or(m, Ordering::AcqRel) & m).count_ones())
        })
    }

    /// Clear every page wholly inside `range` (parts outside RAM are
    /// ignored); returns how many were set before. Safe to call while
    /// another thread walks the bitmap.
    pub fn clear_range(&self, range: GpaRange) -> u64 {
        self.apply(range, |w, m, _| {
            u64::from((w.fetch_and(!m, Ordering::AcqRel) & m).count_ones())
        })
    }

    /// Clear every page wholly inside `range` and return the runs of those
    /// that were set, in ascending order.
    pub fn take_range(&self, range: GpaRange) -> Vec<GpaRun> {
        let mut runs: Vec<GpaRun> = Vec::new();
        self.apply(range, |w, m, base| {
            let mut bits = w.fetch_and(!m, Ordering::AcqRel) & m;
            let taken = bits.count_ones();
            while bits != 0 {
                let tz = bits.trailing_zeros();
                let n = (bits >> tz).trailing_ones();
                bits &= !bit_mask(u64::from(tz), u64::from(tz + n));
                let gpa = base + (u64::from(tz) << PAGE_SHIFT);
                match runs.last_mut() {
                    Some(last) if last.gpa + last.len_bytes() == gpa => last.pages += u64::from(n),
                    _ => runs.push(GpaRun {
                        gpa,
                        pages: u64::from(n),
                    }),
                }
            }
            u64::from(taken)
        });
        runs
    }

    /// Set every page of RAM (the first round sends everything).
    pub fn set_all(&self) {
        for r in &self.regions {
            for w in r.first_word..r.end_word() {
                self.words[w].store(r.word_mask(w), Ordering::Release);
            }
        }
    }

    pub fn clear_all(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }

    /// Number of set pages.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| w.load(Ordering::Acquire) == 0)
    }

    /// Addresses of the set pages, in ascending order (a snapshot taken word
    /// by word as the iterator advances).
    pub fn iter_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs(u64::MAX)
            .flat_map(|run| (0..run.pages).map(move |p| run.gpa + (p << PAGE_SHIFT)))
    }

    /// Runs of set pages, each at most `max_pages` long, in ascending order;
    /// the bitmap is left as it is. Runs never cross a region boundary.
    pub fn runs(&self, max_pages: u64) -> Runs<'_> {
        Runs::new(self, max_pages, false)
    }

    /// Like [`runs`](Self::runs), but each word's bits are claimed (cleared
    /// atomically) as the walk reaches it, so concurrent [`clear_range`]
    /// calls for pages not yet reached take effect, and every set page is
    /// yielded exactly once. Bits claimed but not yet yielded when the
    /// iterator is dropped are put back.
    ///
    /// [`clear_range`]: Self::clear_range
    pub fn take_runs(&self, max_pages: u64) -> Runs<'_> {
        Runs::new(self, max_pages, true)
    }

    /// OR a per-region bitmap (bit `i` of word `i / 64` = page `i` of the
    /// region at `gpa`, the layout of KVM's dirty log and vm-memory's
    /// `AtomicBitmap`) into this one; returns how many pages of `bits` were set.
    fn or_region(&self, gpa: u64, bits: impl Iterator<Item = u64>) -> Option<u64> {
        let r = *self.regions.iter().find(|r| r.gpa == gpa)?;
        let mut set = 0;
        for (w, b) in (r.first_word..r.end_word()).zip(bits) {
            let b = b & r.word_mask(w);
            if b != 0 {
                set += u64::from(b.count_ones());
                self.words[w].fetch_or(b, Ordering::AcqRel);
            }
        }
        Some(set)
    }
}

impl std::fmt::Debug for AtomicPageBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicPageBitmap")
            .field("regions", &self.regions)
            .field("set", &self.count())
            .finish()
    }
}

/// Iterator over runs of set pages; see [`AtomicPageBitmap::runs`] and
/// [`AtomicPageBitmap::take_runs`].
pub struct Runs<'a> {
    bm: &'a AtomicPageBitmap,
    claim: bool,
    max: u64,
    region: usize,
    /// Word whose remaining bits are in `pending`.
    word: usize,
    /// Bits of `word` fetched (claimed, if `claim`) and not yet yielded.
    pending: u64,
    /// Next word of the current region to fetch.
    next_word: usize,
}

impl<'a> Runs<'a> {
    fn new(bm: &'a AtomicPageBitmap, max_pages: u64, claim: bool) -> Self {
        let next_word = bm.regions.first().map_or(0, |r| r.first_word);
        Self {
            bm,
            claim,
            max: max_pages.max(1),
            region: 0,
            word: 0,
            pending: 0,
            next_word,
        }
    }

    /// Fetch the next word of the current region, or None at its end.
    fn fetch(&mut self) -> Option<u64> {
        let r = self.bm.regions.get(self.region)?;
        if self.next_word >= r.end_word() {
            return None;
        }
        let w = self.next_word;
        let mask = r.word_mask(w);
        let bits = if self.claim {
            self.bm.words[w].fetch_and(!mask, Ordering::AcqRel) & mask
        } else {
            self.bm.words[w].load(Ordering::Acquire) & mask
        };
        self.word = w;
        self.next_word += 1;
        Some(bits)
    }

    /// Take up to `max` consecutive set bits of `pending` starting at bit
    /// `from`; returns how many.
    fn take_from(&mut self, from: u32, max: u64) -> u64 {
        let ones = u64::from((self.pending >> from).trailing_ones());
        let n = ones.min(max);
        self.pending &= !bit_mask(u64::from(from), u64::from(from) + n);
        n
    }
}

impl Iterator for Runs<'_> {
    type Item = GpaRun;

    fn next(&mut self) -> Option<GpaRun> {
        loop {
            if self.pending == 0 {
                match self.fetch() {
                    Some(bits) => self.pending = bits,
                    None => {
                        self.region += 1;
                        let r = self.bm.regions.get(self.region)?;
                        self.next_word = r.first_word;
                    }
                }
                continue;
            }
            let r = self.bm.regions[self.region];
            let tz = self.pending.trailing_zeros();
            let start = (self.word - r.first_word) as u64 * 64 + u64::from(tz);
            let mut len = self.take_from(tz, self.max);
            // Continue into the following words while the run reaches a word's end.
            let mut at_word_end = u64::from(tz) + len == 64;
            while at_word_end && len < self.max {
                let Some(bits) = self.fetch() else { break };
                self.pending = bits;
                let n = self.take_from(0, self.max - len);
                len += n;
                at_word_end = n == 64;
            }
            return Some(GpaRun {
                gpa: r.gpa + (start << PAGE_SHIFT),
                pages: len,
            });
        }
    }
}

impl Drop for Runs<'_> {
    fn drop(&mut self) {
        if self.claim && self.pending != 0 {
            self.bm.words[self.word].fetch_or(self.pending, Ordering::AcqRel);
        }
    }
}

/// What one [`sync`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Pages KVM logged (guest writes).
    pub kvm_pages: u64,
    /// Pages the VMM wrote.
    pub vmm_pages: u64,
}

/// Turn on dirty logging for every memslot of `ram` (KVM starts a fresh,
/// empty log) and clear the VMM's own bitmaps, which have been recording
/// since boot. Everything written from now on shows up in [`sync`].
pub fn start_dirty_logging(vm: &mut Vm, ram: &GuestRam) -> Result<(), DirtyError> {
    vm.register_memory(ram, true)
        .map_err(|source| DirtyError::Register {
            enable: true,
            source,
        })?;
    for region in ram.memory().iter() {
        vmm_bitmap(region).reset();
    }
    Ok(())
}

/// Turn dirty logging off again (a migration that failed or was cancelled).
pub fn stop_dirty_logging(vm: &mut Vm, ram: &GuestRam) -> Result<(), DirtyError> {
    vm.register_memory(ram, false)
        .map_err(|source| DirtyError::Register {
            enable: false,
            source,
        })
}

fn vmm_bitmap(region: &vm_memory::GuestRegionMmap<DirtyBitmap>) -> &DirtyBitmap {
    let mapping: &MmapRegion<DirtyBitmap> = region;
    mapping.bitmap()
}

/// Read and clear KVM's dirty log of every memslot and the VMM's own dirty
/// bitmap of every RAM region, and OR both into `into`. A page is dirty iff
/// it was written (by the guest or the VMM) since the previous sync (or since
/// [`start_dirty_logging`]).
pub fn sync(vm: &Vm, ram: &GuestRam, into: &AtomicPageBitmap) -> Result<SyncStats, DirtyError> {
    let mut stats = SyncStats::default();
    for region in ram.memory().iter() {
        let gpa = region.start_addr().0;
        let size = region.len();
        let slot = vm
            .slots()
            .iter()
            .find(|s| s.guest_phys_addr == gpa)
            .ok_or(DirtyError::NoSlot { gpa })?;
        if slot.flags & KVM_MEM_LOG_DIRTY_PAGES == 0 {
            return Err(DirtyError::NotLogging {
                slot: slot.slot,
                gpa,
                size: slot.memory_size,
            });
        }
        let kvm = vm
            .fd()
            .get_dirty_log(slot.slot, slot.memory_size as usize)
            .map_err(|source| DirtyError::GetDirtyLog {
                slot: slot.slot,
                gpa,
                source,
            })?;
        let not_in_bitmap = DirtyError::NotInBitmap { gpa, size };
        stats.kvm_pages += into
            .or_region(gpa, kvm.iter().copied())
            .ok_or(not_in_bitmap)?;
        let vmm = vmm_bitmap(region).get_and_reset();
        stats.vmm_pages += into
            .or_region(gpa, vmm.iter().copied())
            .ok_or(DirtyError::NotInBitmap { gpa, size })?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    fn gib8() -> AtomicPageBitmap {
        AtomicPageBitmap::new(&MemoryLayout::new(8 << 30).unwrap())
    }

    #[test]
    fn index_and_gpa_map_both_ways_across_regions() {
        let bm = gib8();
        assert_eq!(bm.pages(), (8 << 30) / PAGE_SIZE);
        assert_eq!(bm.index_of(0), Some(0));
        assert_eq!(bm.index_of(4095), Some(0));
        assert_eq!(bm.index_of(0x1000), Some(1));
        let hi = bm.index_of(0x1_0000_0000).unwrap();
        assert_eq!(hi, (3 << 30) / PAGE_SIZE);
        assert_eq!(bm.gpa_of(hi), Some(0x1_0000_0000));
        assert_eq!(bm.gpa_of(hi + 5), Some(0x1_0000_5000));
        assert_eq!(bm.index_of(0xd000_0000), None, "MMIO hole is not RAM");
        assert_eq!(bm.index_of(10 << 30), None);
        assert_eq!(bm.gpa_of(u64::MAX), None);
    }

    #[test]
    fn unaligned_region_sizes_get_word_aligned_regions() {
        // 100 pages then 3 pages: the second region starts at word 2.
        let bm = AtomicPageBitmap::from_regions([(0, 100 * PAGE_SIZE), (1 << 32, 3 * PAGE_SIZE)]);
        assert_eq!(bm.index_of(1 << 32), Some(128));
        assert_eq!(bm.gpa_of(100), None, "padding bits are no page");
        bm.set_all();
        assert_eq!(bm.count(), 103);
        let runs: Vec<_> = bm.runs(u64::MAX).collect();
        assert_eq!(
            runs,
            vec![
                GpaRun { gpa: 0, pages: 100 },
                GpaRun {
                    gpa: 1 << 32,
                    pages: 3
                }
            ]
        );
    }

    #[test]
    fn set_clear_ranges_count_changes_and_ignore_outside_ram() {
        let bm = gib8();
        assert_eq!(bm.set_range(GpaRange::new(0x1000, 0x3000)), 3);
        assert_eq!(
            bm.set_range(GpaRange::new(0x2000, 0x3000)),
            1,
            "two already set"
        );
        assert_eq!(bm.count(), 4);
        assert!(bm.is_set(0x4fff) && !bm.is_set(0x5000) && !bm.is_set(0));
        // Partial pages at either end are not touched.
        assert_eq!(bm.clear_range(GpaRange::new(0x1800, 0x2000)), 1);
        assert!(bm.is_set(0x1000) && !bm.is_set(0x2000) && bm.is_set(0x3000));
        // A range spanning the hole only affects RAM on both sides.
        let n = bm.set_range(GpaRange::new((3 << 30) - 0x2000, (1 << 30) + 0x4000));
        assert_eq!(n, 4);
        assert!(bm.is_set((3 << 30) - 0x1000) && bm.is_set(0x1_0000_1000));
        assert_eq!(bm.set_range(GpaRange::new(u64::MAX - 0xfff, 0x1000)), 0);
        assert_eq!(bm.set_range(GpaRange::new(u64::MAX - 5, 3)), 0);
        assert_eq!(bm.clear_range(GpaRange::new(u64::MAX - 5, 10)), 0);
        assert!(bm.take_range(GpaRange::new(u64::MAX - 5, 10)).is_empty());
        assert_eq!(
            bm.set_range(GpaRange::new(u64::MAX - 0xfff, u64::MAX)),
            0,
            "overflowing end"
        );
        // Large ranges across many words.
        bm.clear_all();
        assert_eq!(bm.set_range(GpaRange::new(0x7000, 1 << 20)), 256);
        assert_eq!(bm.clear_range(GpaRange::new(0, 2 << 20)), 256);
        assert!(bm.is_empty());
    }

    #[test]
    fn runs_are_split_at_max_and_cross_words() {
        let bm = AtomicPageBitmap::from_regions([(0, 1024 * PAGE_SIZE)]);
        bm.set_range(GpaRange::new(60 * PAGE_SIZE, 200 * PAGE_SIZE)); // pages 60..260
        bm.set_range(GpaRange::new(300 * PAGE_SIZE, PAGE_SIZE));
        bm.set_range(GpaRange::new(1023 * PAGE_SIZE, PAGE_SIZE));
        let runs: Vec<_> = bm.runs(128).map(|r| (r.gpa / PAGE_SIZE, r.pages)).collect();
        assert_eq!(runs, vec![(60, 128), (188, 72), (300, 1), (1023, 1)]);
        assert_eq!(bm.count(), 202, "runs() leaves the bitmap alone");
        let pages: Vec<_> = bm.iter_pages().collect();
        assert_eq!(pages.len(), 202);
        assert_eq!(pages[0], 60 * PAGE_SIZE);
        // take_runs yields the same and empties the bitmap.
        let taken: Vec<_> = bm
            .take_runs(128)
            .map(|r| (r.gpa / PAGE_SIZE, r.pages))
            .collect();
        assert_eq!(taken, runs);
        assert!(bm.is_empty());
    }

    #[test]
    fn dropping_a_take_iterator_puts_unyielded_bits_back() {
        let bm = AtomicPageBitmap::from_regions([(0, 256 * PAGE_SIZE)]);
        bm.set_range(GpaRange::new(0, 10 * PAGE_SIZE));
        bm.set_range(GpaRange::new(20 * PAGE_SIZE, 10 * PAGE_SIZE));
        let mut it = bm.take_runs(4);
        assert_eq!(it.next(), Some(GpaRun { gpa: 0, pages: 4 }));
        drop(it);
        assert_eq!(bm.count(), 16);
        assert!(!bm.is_set(0) && bm.is_set(4 * PAGE_SIZE));
    }

    #[test]
    fn clearing_ahead_of_the_walk_keeps_pages_from_being_yielded() {
        let bm = AtomicPageBitmap::from_regions([(0, 4096 * PAGE_SIZE)]);
        bm.set_all();
        let mut it = bm.take_runs(64);
        assert_eq!(it.next(), Some(GpaRun { gpa: 0, pages: 64 }));
        // A hint for pages far ahead, while the walk is underway.
        assert_eq!(
            bm.clear_range(GpaRange::new(1000 * PAGE_SIZE, 1000 * PAGE_SIZE)),
            1000
        );
        let rest: u64 = it
            .map(|r| {
                assert!(r.gpa + r.len_bytes() <= 1000 * PAGE_SIZE || r.gpa >= 2000 * PAGE_SIZE);
                r.pages
            })
            .sum();
        assert_eq!(rest, 4096 - 64 - 1000);
    }

    #[test]
    fn concurrent_clear_during_take_walk_loses_and_duplicates_nothing() {
        let bm = Arc::new(AtomicPageBitmap::new(
            &MemoryLayout::new(256 << 20).unwrap(),
        ));
        let pages = bm.pages();
        bm.set_all();
        let clearer = {
            let bm = bm.clone();
            std::thread::spawn(move || {
                // Every third 16-page block, alternately from the front and the back.
                let blocks: Vec<u64> = (0..pages / 16).filter(|b| b % 3 == 0).collect();
                let (front, back) = blocks.split_at(blocks.len() / 2);
                let order = front
                    .iter()
                    .zip(back.iter().rev())
                    .flat_map(|(a, b)| [*a, *b]);
                order
                    .map(|b| bm.clear_range(GpaRange::new(b * 16 * PAGE_SIZE, 16 * PAGE_SIZE)))
                    .sum::<u64>()
            })
        };
        let mut yielded = BTreeSet::new();
        let mut count = 0u64;
        for run in bm.take_runs(256) {
            for p in 0..run.pages {
                yielded.insert(run.gpa + p * PAGE_SIZE);
                count += 1;
            }
        }
        let hinted = clearer.join().unwrap();
        assert_eq!(yielded.len() as u64, count, "no page yielded twice");
        // A page is either claimed by the walk or cleared by a hint, never both.
        assert_eq!(
            count + hinted,
            pages,
            "every page sent or hinted, exactly once"
        );
        assert!(bm.is_empty());
    }

    #[test]
    fn take_range_returns_the_set_runs_and_clears_them() {
        let bm = gib8();
        bm.set_range(GpaRange::new(0x3000, 0x2000));
        bm.set_range(GpaRange::new(0x40000, 0x41000)); // 65 pages across a word boundary
        bm.set_range(GpaRange::new((3 << 30) - 0x1000, 0x1000));
        bm.set_range(GpaRange::new(1 << 32, 0x1000));
        let runs = bm.take_range(GpaRange::new(0x4000, 0x7fff_f000));
        assert_eq!(
            runs,
            vec![
                GpaRun {
                    gpa: 0x4000,
                    pages: 1
                },
                GpaRun {
                    gpa: 0x40000,
                    pages: 65
                }
            ]
        );
        assert!(bm.is_set(0x3000) && !bm.is_set(0x4000));
        // Adjacent in the bitmap is not adjacent in memory: the hole splits runs.
        let runs = bm.take_range(GpaRange::new(2 << 30, 4 << 30));
        assert_eq!(
            runs,
            vec![
                GpaRun {
                    gpa: (3 << 30) - 0x1000,
                    pages: 1
                },
                GpaRun {
                    gpa: 1 << 32,
                    pages: 1
                }
            ]
        );
        assert_eq!(bm.count(), 1);
    }

    #[test]
    fn or_region_masks_bits_beyond_the_region() {
        let bm = AtomicPageBitmap::from_regions([(0, 10 * PAGE_SIZE)]);
        assert_eq!(bm.or_region(0, [u64::MAX].into_iter()), Some(10));
        assert_eq!(bm.count(), 10);
        assert_eq!(bm.or_region(0x1000, [1].into_iter()), None);
    }

    #[test]
    fn sync_without_dirty_logging_is_refused() {
        let layout = MemoryLayout::new(16 << 20).unwrap();
        let ram = GuestRam::new(&layout, &crate::MemoryBackend::Anon).unwrap();
        let mut vm = Vm::new(1).unwrap();
        vm.register_memory(&ram, false).unwrap();
        let bm = AtomicPageBitmap::new(&layout);
        let e = sync(&vm, &ram, &bm).unwrap_err();
        assert!(matches!(e, DirtyError::NotLogging { slot: 0, .. }), "{e}");
    }
}
