//! Page-frame allocator: one bit per 4 KiB frame of guest-physical memory
//! (bit set = free), over `[0, nframes)`.
//!
//! It serves everything the guest hands out: single frames (fill, balloon
//! inflate), naturally aligned power-of-two blocks (order 10 = 4 MiB for
//! free page hinting, order 9 = 2 MiB for free page reporting) and scans for
//! free ranges without allocating them. Freeing never touches the frame's
//! contents. The bitmap itself lives in memory the caller reserved at boot.

pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Frames per MiB.
pub const FRAMES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;

/// Why a free was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeError {
    /// The frame is beyond the bitmap.
    OutOfRange(u64),
    /// The frame (or one frame of the block) was already free.
    AlreadyFree(u64),
    /// A block's first frame is not aligned to its order.
    Misaligned(u64),
}

pub struct FrameAllocator<'a> {
    bits: &'a mut [u64],
    nframes: u64,
    free: u64,
    /// Word index where the next single-frame search starts.
    next: usize,
    /// Word index where the next block search starts.
    block_next: usize,
}

/// Number of `u64` words of bitmap needed for `nframes` frames.
pub const fn bitmap_words(nframes: u64) -> usize {
    nframes.div_ceil(64) as usize
}

impl<'a> FrameAllocator<'a> {
    /// Creates an allocator with every frame allocated (nothing free yet).
    /// `bits` must hold at least [`bitmap_words`]`(nframes)` words.
    pub fn new(bits: &'a mut [u64], nframes: u64) -> Self {
        let n = bitmap_words(nframes);
        assert!(bits.len() >= n, "bitmap too small");
        let bits = &mut bits[..n];
        bits.fill(0);
        FrameAllocator {
            bits,
            nframes,
            free: 0,
            next: 0,
            block_next: 0,
        }
    }

    pub fn nframes(&self) -> u64 {
        self.nframes
    }

    pub fn free_frames(&self) -> u64 {
        self.free
    }

    pub fn is_free(&self, pfn: u64) -> bool {
        pfn < self.nframes && self.bits[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
    }

    /// Marks `[start, end)` free (frames already free stay free). Frames
    /// beyond the bitmap are ignored.
    pub fn add_free(&mut self, start: u64, end: u64) {
        for pfn in start..end.min(self.nframes) {
            let (w, b) = ((pfn / 64) as usize, pfn % 64);
            if self.bits[w] & (1 << b) == 0 {
                self.bits[w] |= 1 << b;
                self.free += 1;
            }
        }
    }

    /// Marks `[start, end)` allocated (taken out of the pool for good).
    pub fn reserve(&mut self, start: u64, end: u64) {
        for pfn in start..end.min(self.nframes) {
            let (w, b) = ((pfn / 64) as usize, pfn % 64);
            if self.bits[w] & (1 << b) != 0 {
                self.bits[w] &= !(1 << b);
                self.free -= 1;
            }
        }
    }

    /// Allocates one frame, lowest free address first from a moving hint.
    pub fn alloc(&mut self) -> Option<u64> {
        let n = self.bits.len();
        for i in 0..n {
            let w = (self.next + i) % n;
            let word = self.bits[w];
            if word != 0 {
                let b = word.trailing_zeros() as u64;
                self.bits[w] &= !(1 << b);
                self.free -= 1;
                self.next = w;
                return Some(w as u64 * 64 + b);
            }
        }
        None
    }

    /// Allocates the lowest run of contiguous free frames (from the same
    /// moving hint as [`alloc`](Self::alloc)), at most `max` long: the
    /// chunked balloon takes its pages a run at a time. Returns the first
    /// frame and the run's length.
    pub fn alloc_run(&mut self, max: u64) -> Option<(u64, u64)> {
        let first = self.alloc()?;
        let mut n = 1;
        while n < max {
            let pfn = first + n;
            if pfn >= self.nframes {
                break;
            }
            let (w, b) = ((pfn / 64) as usize, pfn % 64);
            let word = self.bits[w];
            if b == 0 && word == u64::MAX && max - n >= 64 && pfn + 64 <= self.nframes {
                // A whole free word at once.
                self.bits[w] = 0;
                n += 64;
                continue;
            }
            if word & (1 << b) == 0 {
                break;
            }
            self.bits[w] &= !(1 << b);
            n += 1;
        }
        self.free -= n - 1;
        self.next = (((first + n) / 64) as usize).min(self.bits.len().saturating_sub(1));
        Some((first, n))
    }

    /// Returns `n` frames from `first` to the pool (see [`free`](Self::free)).
    pub fn free_run(&mut self, first: u64, n: u64) -> Result<(), FreeError> {
        for pfn in first..first.saturating_add(n) {
            self.free(pfn)?;
        }
        Ok(())
    }

    /// Returns one frame to the pool. Its contents are left as they are.
    pub fn free(&mut self, pfn: u64) -> Result<(), FreeError> {
        if pfn >= self.nframes {
            return Err(FreeError::OutOfRange(pfn));
        }
        let (w, b) = ((pfn / 64) as usize, pfn % 64);
        if self.bits[w] & (1 << b) != 0 {
            return Err(FreeError::AlreadyFree(pfn));
        }
        self.bits[w] |= 1 << b;
        self.free += 1;
        if w < self.next {
            self.next = w;
        }
        Ok(())
    }

    /// Finds a free, naturally aligned block of `1 << order` frames starting
    /// at or after `from`, without allocating it.
    pub fn find_free_block(&self, order: u32, from: u64) -> Option<u64> {
        let frames = 1u64 << order;
        let mut pfn = from.next_multiple_of(frames);
        while pfn + frames <= self.nframes {
            if self.block_is_free(pfn, order) {
                return Some(pfn);
            }
            pfn += frames;
        }
        None
    }

    fn block_is_free(&self, pfn: u64, order: u32) -> bool {
        if order >= 6 {
            let w = (pfn / 64) as usize;
            let words = 1usize << (order - 6);
            self.bits[w..w + words].iter().all(|&x| x == u64::MAX)
        } else {
            let mask = ((1u64 << (1 << order)) - 1) << (pfn % 64);
            self.bits[(pfn / 64) as usize] & mask == mask
        }
    }

    fn set_block(&mut self, pfn: u64, order: u32, free: bool) {
        if order >= 6 {
            let w = (pfn / 64) as usize;
            let words = 1usize << (order - 6);
            self.bits[w..w + words].fill(if free { u64::MAX } else { 0 });
        } else {
            let mask = ((1u64 << (1 << order)) - 1) << (pfn % 64);
            let w = &mut self.bits[(pfn / 64) as usize];
            if free {
                *w |= mask;
            } else {
                *w &= !mask;
            }
        }
    }

    /// Allocates a naturally aligned block of `1 << order` contiguous frames
    /// (order 10 = 4 MiB, as free page hinting reports them).
    pub fn alloc_block(&mut self, order: u32) -> Option<u64> {
        let frames = 1u64 << order;
        if order > 30 || frames > self.nframes {
            return None;
        }
        let nblocks = self.nframes / frames;
        let start = (self.block_next as u64 * 64 / frames) % nblocks.max(1);
        for i in 0..nblocks {
            let pfn = ((start + i) % nblocks) * frames;
            if self.block_is_free(pfn, order) {
                self.set_block(pfn, order, false);
                self.free -= frames;
                self.block_next = ((pfn + frames) / 64) as usize;
                return Some(pfn);
            }
        }
        None
    }

    /// Allocates the block of `1 << order` frames at `pfn` if it is
    /// aligned and entirely free.
    pub fn claim_block(&mut self, pfn: u64, order: u32) -> bool {
        let frames = 1u64 << order;
        if !pfn.is_multiple_of(frames)
            || pfn + frames > self.nframes
            || !self.block_is_free(pfn, order)
        {
            return false;
        }
        self.set_block(pfn, order, false);
        self.free -= frames;
        true
    }

    /// Frees a block from [`alloc_block`](Self::alloc_block) (or any block
    /// whose frames are all allocated).
    pub fn free_block(&mut self, pfn: u64, order: u32) -> Result<(), FreeError> {
        let frames = 1u64 << order;
        if !pfn.is_multiple_of(frames) {
            return Err(FreeError::Misaligned(pfn));
        }
        if pfn + frames > self.nframes {
            return Err(FreeError::OutOfRange(pfn));
        }
        if let Some(f) = (pfn..pfn + frames).find(|&f| self.is_free(f)) {
            return Err(FreeError::AlreadyFree(f));
        }
        self.set_block(pfn, order, true);
        self.free += frames;
        let w = (pfn / 64) as usize;
        if w < self.next {
            self.next = w;
        }
        Ok(())
    }

    /// Iterates over free frames in address order without allocating them.
    pub fn iter_free(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(w, &word)| {
            let mut word = word;
            core::iter::from_fn(move || {
                if word == 0 {
                    return None;
                }
                let b = word.trailing_zeros() as u64;
                word &= word - 1;
                Some(w as u64 * 64 + b)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc_with(words: usize, nframes: u64) -> (Vec<u64>, u64) {
        (vec![0xdead_beef; words], nframes)
    }

    /// An allocator of `n` frames, all free but the frames in `taken`
    /// (its bitmap is leaked: the test owns it until the process ends).
    fn all_free_but(n: u64, taken: &[u64]) -> FrameAllocator<'static> {
        let mut a = FrameAllocator::new(vec![0; bitmap_words(n)].leak(), n);
        a.add_free(0, n);
        for &f in taken {
            a.reserve(f, f + 1);
        }
        a
    }

    #[test]
    fn add_reserve_alloc_free() {
        let (mut bits, n) = alloc_with(4, 256);
        let mut a = FrameAllocator::new(&mut bits, n);
        assert_eq!(a.free_frames(), 0);
        assert_eq!(a.alloc(), None);
        a.add_free(10, 20);
        a.add_free(15, 25); // overlap counted once
        assert_eq!(a.free_frames(), 15);
        a.reserve(12, 14);
        assert_eq!(a.free_frames(), 13);
        assert_eq!(a.alloc(), Some(10));
        assert_eq!(a.alloc(), Some(11));
        assert_eq!(a.alloc(), Some(14));
        assert_eq!(a.free(11), Ok(()));
        assert_eq!(a.free(11), Err(FreeError::AlreadyFree(11)));
        assert_eq!(a.free(300), Err(FreeError::OutOfRange(300)));
        assert_eq!(a.alloc(), Some(11));
        let mut got = 3;
        while a.alloc().is_some() {
            got += 1;
        }
        assert_eq!(got, 13);
        assert_eq!(a.free_frames(), 0);
    }

    #[test]
    fn runs_are_contiguous_lowest_first_and_bounded() {
        let n = 1024;
        let mut a = all_free_but(n, &[100, 500]);
        assert_eq!(a.alloc_run(1000), Some((0, 100)));
        assert_eq!(a.alloc_run(10), Some((101, 10)));
        assert_eq!(a.alloc_run(1000), Some((111, 389)));
        assert_eq!(a.alloc_run(1000), Some((501, 523)));
        assert_eq!(a.alloc_run(1000), None);
        assert_eq!(a.free_frames(), 0);
        assert!((0..n).all(|f| !a.is_free(f)));
        assert_eq!(a.free_run(120, 200), Ok(()));
        assert_eq!(a.free_frames(), 200);
        assert_eq!(a.alloc_run(1000), Some((120, 200)));
        assert_eq!(a.free_run(1020, 8), Err(FreeError::OutOfRange(1024)));
    }

    #[test]
    fn frames_beyond_the_end_are_ignored() {
        let (mut bits, _) = alloc_with(2, 0);
        let mut a = FrameAllocator::new(&mut bits, 70);
        a.add_free(0, 1000);
        assert_eq!(a.free_frames(), 70);
        assert!(!a.is_free(70));
        assert_eq!(a.iter_free().count(), 70);
    }

    #[test]
    fn order10_blocks_are_aligned_and_contiguous() {
        let n = 4096; // 16 MiB
        let mut bits = vec![0; bitmap_words(n)];
        let mut a = FrameAllocator::new(&mut bits, n);
        a.add_free(1, n); // frame 0 taken: block 0 unusable
        let b = a.alloc_block(10).unwrap();
        assert_eq!(b % 1024, 0);
        assert_ne!(b, 0);
        assert!((b..b + 1024).all(|f| !a.is_free(f)));
        let c = a.alloc_block(10).unwrap();
        let d = a.alloc_block(10).unwrap();
        assert_eq!(a.alloc_block(10), None);
        let mut v = [b, c, d];
        v.sort();
        assert_eq!(v, [1024, 2048, 3072]);
        assert_eq!(a.free_frames(), 1023);
        assert_eq!(a.free_block(c, 10), Ok(()));
        assert_eq!(a.free_block(c, 10), Err(FreeError::AlreadyFree(c)));
        assert_eq!(a.free_block(c + 1, 10), Err(FreeError::Misaligned(c + 1)));
        assert_eq!(a.free_frames(), 2047);
        assert_eq!(a.alloc_block(10), Some(c));
    }

    #[test]
    fn small_orders_and_scans() {
        let mut bits = vec![0; 2];
        let mut a = FrameAllocator::new(&mut bits, 128);
        a.add_free(3, 128);
        assert_eq!(a.find_free_block(2, 0), Some(4));
        assert_eq!(a.find_free_block(9, 0), None);
        assert_eq!(a.find_free_block(6, 0), Some(64));
        assert_eq!(a.alloc_block(2), Some(4));
        assert_eq!(a.alloc_block(6), Some(64));
        assert_eq!(a.find_free_block(6, 0), None);
        assert_eq!(a.free_block(4, 2), Ok(()));
        assert_eq!(a.free_frames(), 125 - 64);
    }

    #[test]
    fn two_mib_ranges_found_without_allocating() {
        let mut a = all_free_but(2048, &[600]);
        assert_eq!(a.find_free_block(9, 0), Some(0));
        assert_eq!(a.find_free_block(9, 1), Some(1024));
        assert_eq!(a.find_free_block(9, 1025), Some(1536));
        assert_eq!(a.free_frames(), 2047);
        assert!(!a.claim_block(512, 9), "frame 600 is taken");
        assert!(!a.claim_block(1, 9), "misaligned");
        assert!(a.claim_block(1536, 9));
        assert!(!a.claim_block(1536, 9), "already claimed");
        assert_eq!(a.free_frames(), 2047 - 512);
        assert_eq!(a.find_free_block(9, 1025), None);
    }
}
