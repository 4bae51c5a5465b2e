//! PFN validation and run merging for the inflate and deflate queues, and
//! the bitmap of inflated pages.
//!
//! Everything here is pure bookkeeping (no guest memory, no syscalls) so it
//! can be tested and benchmarked on its own: [`PfnBatch::process`] turns the
//! raw little-endian PFN array of one buffer into validated, deduplicated,
//! merged [`PfnRun`]s, each of which the device releases with one
//! `RamDiscard::discard` call.

use super::Error;
use crate::{GpaRange, PAGE_SHIFT, PAGE_SIZE};

/// PFNs one batch handles (Linux sends at most 256 per buffer:
/// `VIRTIO_BALLOON_ARRAY_PFNS_MAX`). Longer buffers are processed in
/// batches of this size.
pub const PFNS_PER_BATCH: usize = 256;
/// Bytes of one batch.
pub const BATCH_BYTES: usize = PFNS_PER_BATCH * 4;

/// A stretch of guest RAM with no holes: one or more contiguous regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start_pfn: u64,
    end_pfn: u64, // exclusive
    /// Index of `start_pfn`'s bit in the bitmap.
    bit_base: u64,
}

/// Guest RAM as the balloon sees it: sorted spans of 4 KiB page frames.
/// Contiguous input regions are coalesced, so a run may span several of
/// them but never a hole (such as the 32-bit MMIO gap).
#[derive(Clone, Debug)]
pub struct RamLayout {
    spans: Vec<Span>,
    total_pages: u64,
    /// First PFNs of input regions that were coalesced into the span
    /// before them (ascending): backing boundaries inside a span, where a
    /// discard must be split (see [`RamLayout::backing_runs`]).
    cuts: Vec<u64>,
}

impl RamLayout {
    /// `ram` must be non-empty, page aligned, in ascending order and
    /// non-overlapping.
    pub fn new(ram: &[GpaRange]) -> Result<Self, Error> {
        if ram.is_empty() {
            return Err(Error::NoRam);
        }
        let mut spans: Vec<Span> = Vec::with_capacity(ram.len());
        let mut cuts = Vec::new();
        let mut total = 0u64;
        for r in ram {
            let end = r.end().ok_or(Error::RamOverflow(*r))?;
            if r.start % PAGE_SIZE != 0 || r.len % PAGE_SIZE != 0 || r.len == 0 {
                return Err(Error::RamUnaligned(*r));
            }
            let (s, e) = (r.start >> PAGE_SHIFT, end >> PAGE_SHIFT);
            match spans.last_mut() {
                Some(last) if s < last.end_pfn => return Err(Error::RamUnordered(*r)),
                Some(last) if s == last.end_pfn => {
                    last.end_pfn = e;
                    cuts.push(s);
                }
                _ => spans.push(Span {
                    start_pfn: s,
                    end_pfn: e,
                    bit_base: total,
                }),
            }
            total += e - s;
        }
        Ok(Self {
            spans,
            total_pages: total,
            cuts,
        })
    }

    /// Split `run` (inside one span) at the backing boundaries it crosses
    /// (where two contiguous RAM regions meet) and call `f` for each part,
    /// in ascending order: one discard call per part.
    pub fn backing_runs(&self, run: PfnRun, mut f: impl FnMut(PfnRun)) {
        let end = run.start_pfn + run.npages;
        let mut cur = run;
        let first = self.cuts.partition_point(|&c| c <= run.start_pfn);
        for &cut in self.cuts[first..].iter().take_while(|&&c| c < end) {
            let n = cut - cur.start_pfn;
            f(PfnRun { npages: n, ..cur });
            cur = PfnRun {
                start_pfn: cut,
                npages: cur.npages - n,
                bit: cur.bit + n,
            };
        }
        f(cur);
    }

    /// 4 KiB pages of guest RAM.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Guest RAM as the balloon sees it: the given regions with contiguous
    /// ones coalesced, in ascending order.
    pub fn ranges(&self) -> Vec<GpaRange> {
        self.spans
            .iter()
            .map(|s| {
                GpaRange::new(
                    s.start_pfn << PAGE_SHIFT,
                    (s.end_pfn - s.start_pfn) << PAGE_SHIFT,
                )
            })
            .collect()
    }

    /// The pages set in `bitmap`, as runs of contiguous guest page frames
    /// (ascending; a run never crosses a hole).
    pub fn set_runs(&self, bitmap: &InflatedBitmap) -> Vec<PfnRun> {
        let mut out = Vec::new();
        for s in &self.spans {
            let end = s.bit_base + (s.end_pfn - s.start_pfn);
            bitmap.for_each_set_run(s.bit_base, end, |bit, npages| {
                out.push(PfnRun {
                    start_pfn: s.start_pfn + (bit - s.bit_base),
                    npages,
                    bit,
                })
            });
        }
        out
    }

    /// Is the whole range inside guest RAM (one span)?
    pub fn contains(&self, range: GpaRange) -> bool {
        let Some(end) = range.end() else {
            return false;
        };
        range.len > 0
            && self
                .spans
                .iter()
                .any(|s| range.start >= s.start_pfn << PAGE_SHIFT && end <= s.end_pfn << PAGE_SHIFT)
    }

    /// Bitmap index of a PFN, if it is guest RAM.
    pub fn bit_of(&self, pfn: u64) -> Option<u64> {
        let i = self.spans.partition_point(|s| s.end_pfn <= pfn);
        let s = self.spans.get(i)?;
        (pfn >= s.start_pfn).then(|| s.bit_base + (pfn - s.start_pfn))
    }

    /// Split a byte range (already known to be page aligned) into the runs
    /// of guest RAM it covers; `None` if any part of it is not RAM.
    pub fn run_of_range(&self, range: GpaRange) -> Option<PfnRun> {
        if !range.start.is_multiple_of(PAGE_SIZE) || !range.len.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        let start_pfn = range.start >> PAGE_SHIFT;
        let npages = range.len >> PAGE_SHIFT;
        let end_pfn = start_pfn.checked_add(npages)?;
        let i = self.spans.partition_point(|s| s.end_pfn <= start_pfn);
        let s = self.spans.get(i)?;
        (npages > 0 && start_pfn >= s.start_pfn && end_pfn <= s.end_pfn).then(|| PfnRun {
            start_pfn,
            npages,
            bit: s.bit_base + (start_pfn - s.start_pfn),
        })
    }
}

/// Contiguous valid pages inside one span of guest RAM, as page frame
/// numbers plus their index in the [`InflatedBitmap`].
///
/// Not the migration's `GpaRun` (`vmm/src/migration/dirty.rs`): that one is
/// a run of to-send pages by guest-physical address and carries no index
/// into a dense bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PfnRun {
    pub start_pfn: u64,
    pub npages: u64,
    /// Bitmap index of `start_pfn`.
    pub bit: u64,
}

impl PfnRun {
    /// The run as guest-physical bytes (cannot overflow: PFNs are < 2^52).
    pub fn range(&self) -> GpaRange {
        GpaRange::new(self.start_pfn << PAGE_SHIFT, self.npages << PAGE_SHIFT)
    }
}

/// What one batch contained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Distinct valid PFNs.
    pub valid: u64,
    /// PFNs outside guest RAM (holes, beyond the end), skipped.
    pub invalid: u64,
    /// Repeats of a PFN already in the batch, dropped.
    pub duplicates: u64,
    /// The first invalid PFN, for the log.
    pub first_invalid: Option<u32>,
}

/// Reusable scratch space for one batch; after the first batch the hot path
/// does not allocate.
#[derive(Debug, Default)]
pub struct PfnBatch {
    pfns: Vec<u32>,
    runs: Vec<PfnRun>,
}

impl PfnBatch {
    pub fn new() -> Self {
        Self {
            pfns: Vec::with_capacity(PFNS_PER_BATCH),
            runs: Vec::with_capacity(PFNS_PER_BATCH),
        }
    }

    /// Parse `raw` (little-endian u32 PFNs; a trailing partial PFN is
    /// ignored), sort, dedupe, validate against `layout` and merge into
    /// runs, available from [`runs`](Self::runs) afterwards.
    pub fn process(&mut self, raw: &[u8], layout: &RamLayout) -> BatchOutcome {
        self.pfns.clear();
        self.runs.clear();
        self.pfns.extend(
            raw.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        self.pfns.sort_unstable();
        let before = self.pfns.len() as u64;
        self.pfns.dedup();
        let mut out = BatchOutcome {
            duplicates: before - self.pfns.len() as u64,
            ..BatchOutcome::default()
        };

        let spans = &layout.spans;
        let mut si = 0usize;
        for &pfn32 in &self.pfns {
            let pfn = u64::from(pfn32);
            // PFNs are sorted, so the span cursor only moves forward.
            while si < spans.len() && spans[si].end_pfn <= pfn {
                si += 1;
            }
            let Some(span) = spans.get(si).filter(|s| pfn >= s.start_pfn) else {
                out.invalid += 1;
                out.first_invalid.get_or_insert(pfn32);
                continue;
            };
            out.valid += 1;
            match self.runs.last_mut() {
                // Contiguous and in the same span (a hole always breaks
                // contiguity, so the span check is belt and braces).
                Some(r)
                    if r.start_pfn + r.npages == pfn
                        && r.bit + r.npages == span.bit_base + (pfn - span.start_pfn) =>
                {
                    r.npages += 1
                }
                _ => self.runs.push(PfnRun {
                    start_pfn: pfn,
                    npages: 1,
                    bit: span.bit_base + (pfn - span.start_pfn),
                }),
            }
        }
        out
    }

    /// Runs produced by the last [`process`](Self::process).
    pub fn runs(&self) -> &[PfnRun] {
        &self.runs
    }
}

/// One bit per 4 KiB page of guest RAM: set while the page is in the balloon.
///
/// Indexed densely by [`RamLayout`]'s bit index (holes take no bits), owned
/// by the device behind its lock and kept with a running count of set bits.
/// The migration's `AtomicPageBitmap` (`vmm/src/migration/dirty.rs`) is a
/// different thing on purpose: addressed by guest-physical address, laid
/// out per region on word boundaries so KVM's dirty logs OR in word by word,
/// and updated lock-free from several threads.
#[derive(Clone, Debug)]
pub struct InflatedBitmap {
    words: Vec<u64>,
    bits: u64,
    set: u64,
}

impl InflatedBitmap {
    pub fn new(bits: u64) -> Self {
        let words = usize::try_from(bits.div_ceil(64)).unwrap_or(usize::MAX);
        Self {
            words: vec![0; words],
            bits,
            set: 0,
        }
    }

    /// Pages currently set.
    pub fn count(&self) -> u64 {
        self.set
    }

    pub fn get(&self, bit: u64) -> bool {
        bit < self.bits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Set (`value`) or clear bits `[start, start + n)`; returns how many
    /// bits changed. Out-of-range parts are ignored.
    pub fn update(&mut self, start: u64, n: u64, value: bool) -> u64 {
        let end = start.saturating_add(n).min(self.bits);
        let mut bit = start;
        let mut changed = 0;
        while bit < end {
            let w = (bit / 64) as usize;
            let lo = bit % 64;
            let hi = (end - (bit - lo)).min(64); // exclusive, within this word
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.words[w];
            let new = if value { old | mask } else { old & !mask };
            changed += u64::from((old ^ new).count_ones());
            self.words[w] = new;
            bit += hi - lo;
        }
        if value {
            self.set += changed;
        } else {
            self.set -= changed;
        }
        changed
    }

    /// Clear everything (device reset).
    pub fn clear(&mut self) {
        self.words.fill(0);
        self.set = 0;
    }

    /// Call `f(first_bit, len)` for each maximal run of set bits inside
    /// `[start, end)` (clipped to the bitmap), in ascending order.
    pub fn for_each_set_run(&self, start: u64, end: u64, mut f: impl FnMut(u64, u64)) {
        let end = end.min(self.bits);
        let mut bit = start;
        while let Some(first) = self.next_with(bit, end, true) {
            let last = self.next_with(first, end, false).unwrap_or(end);
            f(first, last - first);
            bit = last;
        }
    }

    /// The first bit in `[start, start + n)` that is set (`value`) or
    /// clear, if any (clipped to the bitmap).
    pub fn first_with(&self, start: u64, n: u64, value: bool) -> Option<u64> {
        self.next_with(start, start.saturating_add(n).min(self.bits), value)
    }

    /// The first bit in `[from, end)` whose value is `value`.
    fn next_with(&self, from: u64, end: u64, value: bool) -> Option<u64> {
        let mut bit = from;
        while bit < end {
            let lo = bit % 64;
            let word = self.words[(bit / 64) as usize];
            let word = if value { word } else { !word };
            let masked = word & (u64::MAX << lo);
            if masked != 0 {
                let found = bit - lo + u64::from(masked.trailing_zeros());
                return (found < end).then_some(found);
            }
            bit = bit - lo + 64;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const PAGES_PER_GIB: u64 = GIB / PAGE_SIZE;

    /// 0..3 GiB, then the 3–4 GiB MMIO hole, then 4..6 GiB.
    fn holey() -> RamLayout {
        RamLayout::new(&[GpaRange::new(0, 3 * GIB), GpaRange::new(4 * GIB, 2 * GIB)]).unwrap()
    }

    fn raw(pfns: &[u32]) -> Vec<u8> {
        pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
    }

    fn runs(layout: &RamLayout, pfns: &[u32]) -> (Vec<(u64, u64)>, BatchOutcome) {
        let mut b = PfnBatch::new();
        let out = b.process(&raw(pfns), layout);
        (
            b.runs().iter().map(|r| (r.start_pfn, r.npages)).collect(),
            out,
        )
    }

    #[test]
    fn layout_rejects_bad_ram() {
        assert!(matches!(RamLayout::new(&[]), Err(Error::NoRam)));
        assert!(matches!(
            RamLayout::new(&[GpaRange::new(0x800, 0x1000)]),
            Err(Error::RamUnaligned(_))
        ));
        assert!(matches!(
            RamLayout::new(&[GpaRange::new(0, 0)]),
            Err(Error::RamUnaligned(_))
        ));
        assert!(matches!(
            RamLayout::new(&[GpaRange::new(u64::MAX - 0xfff, 0x2000)]),
            Err(Error::RamOverflow(_))
        ));
        assert!(matches!(
            RamLayout::new(&[GpaRange::new(0x10000, 0x1000), GpaRange::new(0, 0x1000)]),
            Err(Error::RamUnordered(_))
        ));
        assert!(matches!(
            RamLayout::new(&[GpaRange::new(0, 0x2000), GpaRange::new(0x1000, 0x1000)]),
            Err(Error::RamUnordered(_))
        ));
    }

    #[test]
    fn layout_coalesces_contiguous_regions() {
        let l = RamLayout::new(&[
            GpaRange::new(0, GIB),
            GpaRange::new(GIB, GIB),
            GpaRange::new(4 * GIB, GIB),
        ])
        .unwrap();
        assert_eq!(l.spans.len(), 2);
        assert_eq!(l.total_pages(), 3 * PAGES_PER_GIB);
        assert_eq!(l.bit_of(4 * PAGES_PER_GIB), Some(2 * PAGES_PER_GIB));
        assert_eq!(l.bit_of(3 * PAGES_PER_GIB), None);
        assert_eq!(l.bit_of(5 * PAGES_PER_GIB), None);
    }

    #[test]
    fn contiguous_pfns_merge_into_one_run() {
        let l = holey();
        let pfns: Vec<u32> = (1000..1256).collect();
        let (r, out) = runs(&l, &pfns);
        assert_eq!(r, vec![(1000, 256)]);
        assert_eq!(out.valid, 256);
        assert_eq!(out.invalid, 0);
    }

    #[test]
    fn unsorted_and_duplicate_pfns() {
        let l = holey();
        let (r, out) = runs(&l, &[7, 5, 6, 6, 20, 5, 21, 100]);
        assert_eq!(r, vec![(5, 3), (20, 2), (100, 1)]);
        assert_eq!(out.duplicates, 2);
        assert_eq!(out.valid, 6);
    }

    #[test]
    fn mmio_hole_pfns_are_invalid_and_split_runs() {
        let l = holey();
        let hole_start = (3 * PAGES_PER_GIB) as u32;
        let ram2 = (4 * PAGES_PER_GIB) as u32;
        let pfns = [
            hole_start - 2,
            hole_start - 1,
            hole_start,
            hole_start + 1,
            ram2 - 1,
            ram2,
            ram2 + 1,
        ];
        let (r, out) = runs(&l, &pfns);
        assert_eq!(
            r,
            vec![(u64::from(hole_start) - 2, 2), (u64::from(ram2), 2)]
        );
        assert_eq!(out.invalid, 3);
        assert_eq!(out.first_invalid, Some(hole_start));
        // The second run's bitmap index follows the first span's pages.
        let mut b = PfnBatch::new();
        b.process(&raw(&[ram2]), &l);
        assert_eq!(b.runs()[0].bit, 3 * PAGES_PER_GIB);
    }

    #[test]
    fn runs_across_contiguous_regions_merge() {
        let l =
            RamLayout::new(&[GpaRange::new(0, 0x10000), GpaRange::new(0x10000, 0x10000)]).unwrap();
        let (r, _) = runs(&l, &[14, 15, 16, 17]);
        assert_eq!(r, vec![(14, 4)]);
    }

    #[test]
    fn runs_never_cross_a_hole_even_if_pfns_are_adjacent_to_it() {
        // RAM ends at PFN 16, restarts at 17: PFN 16 is a one-page hole.
        let l =
            RamLayout::new(&[GpaRange::new(0, 0x10000), GpaRange::new(0x11000, 0x1000)]).unwrap();
        let (r, out) = runs(&l, &[15, 16, 17]);
        assert_eq!(r, vec![(15, 1), (17, 1)]);
        assert_eq!(out.invalid, 1);
    }

    #[test]
    fn pfns_beyond_ram_and_huge_pfns() {
        let l = holey();
        let (r, out) = runs(&l, &[u32::MAX, u32::MAX - 1, (6 * PAGES_PER_GIB) as u32, 0]);
        assert_eq!(r, vec![(0, 1)]);
        assert_eq!(out.invalid, 3);
        // The largest PFN turns into a byte address without overflow.
        let run = PfnRun {
            start_pfn: u64::from(u32::MAX),
            npages: 1,
            bit: 0,
        };
        assert_eq!(run.range().start, u64::from(u32::MAX) << 12);
    }

    #[test]
    fn trailing_partial_pfn_is_ignored() {
        let l = holey();
        let mut bytes = raw(&[1, 2]);
        bytes.extend_from_slice(&[3, 0]);
        let mut b = PfnBatch::new();
        let out = b.process(&bytes, &l);
        assert_eq!(out.valid, 2);
    }

    #[test]
    fn run_of_range_checks_ram() {
        let l = holey();
        assert_eq!(
            l.run_of_range(GpaRange::new(0x1000, 0x4000)),
            Some(PfnRun {
                start_pfn: 1,
                npages: 4,
                bit: 1
            })
        );
        assert!(
            l.run_of_range(GpaRange::new(3 * GIB - 0x1000, 0x2000))
                .is_none()
        );
        assert!(l.run_of_range(GpaRange::new(0x800, 0x1000)).is_none());
        assert!(l.run_of_range(GpaRange::new(0, 0)).is_none());
        assert!(
            l.run_of_range(GpaRange::new(u64::MAX - 0xfff, 0x1000))
                .is_none()
        );
        assert!(l.contains(GpaRange::new(4 * GIB, GIB)));
        assert!(!l.contains(GpaRange::new(4 * GIB, 3 * GIB)));
    }

    #[test]
    fn bitmap_update_counts_changes() {
        let mut bm = InflatedBitmap::new(200);
        assert_eq!(bm.update(3, 130, true), 130);
        assert_eq!(bm.count(), 130);
        assert_eq!(bm.update(0, 10, true), 3);
        assert!(bm.get(0) && bm.get(132) && !bm.get(133));
        assert_eq!(bm.update(60, 10, false), 10);
        assert_eq!(bm.count(), 123);
        // Out of range parts are ignored.
        assert_eq!(bm.update(190, 100, true), 10);
        assert_eq!(bm.update(u64::MAX - 1, 5, true), 0);
        assert!(!bm.get(1000));
        bm.clear();
        assert_eq!(bm.count(), 0);
    }

    fn set_runs(bm: &InflatedBitmap, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        bm.for_each_set_run(start, end, |b, n| v.push((b, n)));
        v
    }

    #[test]
    fn bitmap_set_runs() {
        let mut bm = InflatedBitmap::new(300);
        assert!(set_runs(&bm, 0, 300).is_empty());
        bm.update(0, 1, true);
        bm.update(63, 2, true); // across a word boundary
        bm.update(100, 156, true); // ends on a word boundary (256)
        bm.update(299, 1, true); // the very last bit
        assert_eq!(
            set_runs(&bm, 0, 300),
            vec![(0, 1), (63, 2), (100, 156), (299, 1)]
        );
        // Clipped to the window and to the bitmap.
        assert_eq!(set_runs(&bm, 64, 120), vec![(64, 1), (100, 20)]);
        assert_eq!(set_runs(&bm, 299, u64::MAX), vec![(299, 1)]);
        assert!(set_runs(&bm, 1000, 2000).is_empty());
        bm.update(0, 300, true);
        assert_eq!(set_runs(&bm, 0, 300), vec![(0, 300)]);
        // Random pattern against a bit-by-bit reference.
        let mut bm = InflatedBitmap::new(1000);
        let mut x = 12345u64;
        for _ in 0..200 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let start = (x >> 33) % 1000;
            let n = (x >> 20) % 40;
            bm.update(start, n, (x >> 7) & 1 == 1);
        }
        let mut reference = Vec::new();
        let mut b = 0;
        while b < 1000 {
            if bm.get(b) {
                let s = b;
                while b < 1000 && bm.get(b) {
                    b += 1;
                }
                reference.push((s, b - s));
            } else {
                b += 1;
            }
        }
        assert_eq!(set_runs(&bm, 0, 1000), reference);
    }

    #[test]
    fn layout_ranges_and_pfn_runs() {
        let l = holey();
        assert_eq!(
            l.ranges(),
            vec![GpaRange::new(0, 3 * GIB), GpaRange::new(4 * GIB, 2 * GIB)]
        );
        let mut bm = InflatedBitmap::new(l.total_pages());
        // A bit run that crosses from the first span into the second
        // splits into two PFN runs on either side of the hole.
        bm.update(3 * PAGES_PER_GIB - 2, 4, true);
        bm.update(5, 1, true);
        let runs: Vec<(u64, u64)> = l
            .set_runs(&bm)
            .iter()
            .map(|r| (r.start_pfn, r.npages))
            .collect();
        assert_eq!(
            runs,
            vec![(5, 1), (3 * PAGES_PER_GIB - 2, 2), (4 * PAGES_PER_GIB, 2)]
        );
    }
}
