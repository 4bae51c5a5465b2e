//! Guest RAM: the e820 map, the frame allocator and the per-frame fill
//! records, with their bookkeeping placed in RAM reserved at boot (right
//! after the image when it fits there).

use testguest::frames::{FRAMES_PER_MIB, FrameAllocator, PAGE_SIZE, bitmap_words};
use testguest::pattern::{MAX_SEED_SLOTS, Record};

use crate::boot::{self, E820, bp, paging};

/// Memory below 1 MiB (zero page, command line, boot tables, BIOS areas)
/// is never handed out.
const LOW_RESERVED: u64 = 1 << 20;

pub struct Memory {
    pub frames: FrameAllocator<'static>,
    /// One [`Record`] per frame (indexed by PFN).
    records: &'static mut [u32],
    /// PFNs currently given to the balloon device (a stack, `balloon_len`
    /// entries used; room for every frame).
    balloon: &'static mut [u32],
    balloon_len: usize,
    /// Total e820 RAM in bytes and number of RAM regions.
    pub ram_bytes: u64,
    pub ram_regions: usize,
    /// Fill seeds by slot (slot 0 = "not filled").
    seeds: [u64; MAX_SEED_SLOTS + 1],
    nseeds: usize,
    /// Number of frames with a fill record.
    pub filled: u64,
    /// Page poisoning (`poison BYTE`): free frames hold this byte
    /// everywhere; it is written when frames are freed and checked when
    /// they are allocated again.
    pub poison: Option<u8>,
    /// Allocated frames whose poison had changed while they were free, and
    /// the first one seen: (pfn, byte offset, byte found).
    pub poison_errors: u64,
    pub poison_first: Option<(u64, usize, u8)>,
}

impl Memory {
    /// Reads e820, reserves the bookkeeping and builds the allocator.
    pub fn init(boot_params: u64) -> Result<Memory, &'static str> {
        let mut e820 = [E820::default(); bp::E820_MAX];
        let n = boot::e820_count(boot_params);
        let (mut ram_bytes, mut ram_regions, mut top) = (0u64, 0usize, 0u64);
        for (i, slot) in e820.iter_mut().enumerate().take(n) {
            *slot = boot::e820_entry(boot_params, i);
            if slot.kind == bp::E820_RAM {
                ram_bytes += slot.size;
                ram_regions += 1;
                top = top.max(slot.end());
            }
        }
        if ram_regions == 0 {
            return Err("no RAM in e820");
        }
        // Only what the page tables map can be used.
        let limit = top.min(paging::mapped_limit(top));
        let nframes = limit / PAGE_SIZE;
        let words = bitmap_words(nframes);
        let bitmap_bytes = (words as u64 * 8).next_multiple_of(PAGE_SIZE);
        let records_bytes = (nframes * 4).next_multiple_of(PAGE_SIZE);
        let balloon_bytes = records_bytes;
        let need = bitmap_bytes + records_bytes + balloon_bytes;

        let (img_start, img_end) = boot::image_range();
        let img_end = img_end.next_multiple_of(PAGE_SIZE);
        let mut place = None;
        for e in e820[..n].iter().filter(|e| e.kind == bp::E820_RAM) {
            let mut s = e.addr.max(LOW_RESERVED).next_multiple_of(PAGE_SIZE);
            if s < img_end && s + need > img_start {
                s = img_end;
            }
            if s + need <= e.end().min(limit) {
                place = Some(s);
                break;
            }
        }
        let base = place.ok_or("no room for the frame bitmap")?;
        // SAFETY: [base, base + need) is RAM owned by nobody else (checked
        // against the image and the low MiB above) and identity-mapped.
        let (bits, records, balloon) = unsafe {
            (
                core::slice::from_raw_parts_mut(base as *mut u64, words),
                core::slice::from_raw_parts_mut(
                    (base + bitmap_bytes) as *mut u32,
                    nframes as usize,
                ),
                core::slice::from_raw_parts_mut(
                    (base + bitmap_bytes + records_bytes) as *mut u32,
                    nframes as usize,
                ),
            )
        };
        records.fill(0);
        // Written at boot, like the records (and like Linux's memmap, where
        // the balloon list lives in struct page): the host backs these pages
        // now, not page by page in the middle of an inflate.
        balloon.fill(0);
        let mut frames = FrameAllocator::new(bits, nframes);
        for e in e820[..n].iter().filter(|e| e.kind == bp::E820_RAM) {
            let s = e.addr.max(LOW_RESERVED).div_ceil(PAGE_SIZE);
            let t = e.end() / PAGE_SIZE;
            if s < t {
                frames.add_free(s, t);
            }
        }
        frames.reserve(img_start / PAGE_SIZE, img_end / PAGE_SIZE);
        frames.reserve(base / PAGE_SIZE, (base + need) / PAGE_SIZE);
        Ok(Memory {
            frames,
            records,
            balloon,
            balloon_len: 0,
            ram_bytes,
            ram_regions,
            seeds: [0; MAX_SEED_SLOTS + 1],
            nseeds: 0,
            filled: 0,
            poison: None,
            poison_errors: 0,
            poison_first: None,
        })
    }

    pub fn free_mib(&self) -> u64 {
        self.frames.free_frames() / FRAMES_PER_MIB
    }

    pub fn record(&self, pfn: u64) -> Record {
        Record(self.records[pfn as usize])
    }

    pub fn set_record(&mut self, pfn: u64, r: Record) {
        let old = core::mem::replace(&mut self.records[pfn as usize], r.0);
        match (Record(old).is_filled(), r.is_filled()) {
            (false, true) => self.filled += 1,
            (true, false) => self.filled -= 1,
            _ => {}
        }
    }

    /// Writes the poison byte over a frame that is being freed (no-op
    /// without poisoning).
    pub fn poison_page(&self, pfn: u64) {
        if let Some(b) = self.poison {
            let v = u64::from(b) * 0x0101_0101_0101_0101;
            // SAFETY: the caller is freeing this frame, nobody else uses it.
            unsafe { page_mut(pfn) }.fill(v);
        }
    }

    /// Checks a freshly allocated frame still holds the poison everywhere;
    /// counts it in `poison_errors` if not. True if the frame is fine.
    pub fn check_poison(&mut self, pfn: u64) -> bool {
        let Some(b) = self.poison else { return true };
        let v = u64::from(b) * 0x0101_0101_0101_0101;
        // SAFETY: the frame was just allocated to the caller.
        let page = unsafe { page_mut(pfn) };
        let Some(w) = page.iter().position(|&x| x != v) else {
            return true;
        };
        let bytes = page[w].to_le_bytes();
        let k = bytes.iter().position(|&x| x != b).unwrap_or(0);
        self.poison_errors += 1;
        if self.poison_first.is_none() {
            self.poison_first = Some((pfn, w * 8 + k, bytes[k]));
        }
        false
    }

    /// Turns poisoning on and poisons every free frame now. Returns the
    /// number of frames poisoned.
    pub fn enable_poison(&mut self, byte: u8) -> u64 {
        self.poison = Some(byte);
        let v = u64::from(byte) * 0x0101_0101_0101_0101;
        let mut n = 0;
        for pfn in self.frames.iter_free() {
            // SAFETY: free frames are not in use.
            unsafe { page_mut(pfn) }.fill(v);
            n += 1;
        }
        n
    }

    /// Records `pfn` as given to the balloon.
    pub fn balloon_push(&mut self, pfn: u64) {
        self.balloon[self.balloon_len] = pfn as u32;
        self.balloon_len += 1;
    }

    /// Takes the most recently ballooned PFN back.
    pub fn balloon_pop(&mut self) -> Option<u64> {
        self.balloon_len = self.balloon_len.checked_sub(1)?;
        Some(u64::from(self.balloon[self.balloon_len]))
    }

    /// Records the `n` frames from `first` as given to the balloon
    /// (ascending, so a list built from ascending runs stays sorted).
    pub fn balloon_push_run(&mut self, first: u64, n: u64) {
        for p in first..first + n {
            self.balloon_push(p);
        }
    }

    /// The most recently ballooned PFN, left in the balloon.
    pub fn balloon_peek(&self) -> Option<u64> {
        let i = self.balloon_len.checked_sub(1)?;
        Some(u64::from(self.balloon[i]))
    }

    /// Sorts the balloon list (ascending) unless it already is: the
    /// chunked deflate then finds contiguous stretches at its top.
    pub fn sort_balloon(&mut self) {
        let list = &mut self.balloon[..self.balloon_len];
        if !list.is_sorted() {
            list.sort_unstable();
        }
    }

    /// Pages currently in the balloon.
    pub fn balloon_pages(&self) -> u64 {
        self.balloon_len as u64
    }

    /// Frames below the top of RAM (the PFN limit).
    pub fn nframes(&self) -> u64 {
        self.records.len() as u64
    }

    /// Slot for `seed`, allocating one if needed.
    pub fn seed_slot(&mut self, seed: u64) -> Option<u8> {
        if let Some(i) = self.seeds[1..=self.nseeds].iter().position(|&s| s == seed) {
            return Some(i as u8 + 1);
        }
        if self.nseeds == MAX_SEED_SLOTS {
            return None;
        }
        self.nseeds += 1;
        self.seeds[self.nseeds] = seed;
        Some(self.nseeds as u8)
    }

    pub fn seed(&self, slot: u8) -> u64 {
        self.seeds[slot as usize]
    }
}

/// The 4 KiB page at `pfn`, identity-mapped.
///
/// # Safety
/// The caller must own the frame (allocated to it, or free and not in use).
pub unsafe fn page_mut(pfn: u64) -> &'static mut [u64; 512] {
    unsafe { &mut *((pfn * PAGE_SIZE) as *mut [u64; 512]) }
}
