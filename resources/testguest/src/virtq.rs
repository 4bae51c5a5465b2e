//! Driver side of a virtio split virtqueue (virtio 1.x spec 2.7), over
//! memory the caller provides (identity-mapped guest RAM in the guest, a
//! plain buffer in host tests). All ring accesses are volatile; the device
//! may write the used ring at any time.
//!
//! Descriptor bookkeeping is kept driver-side (which descriptors make up
//! each in-flight chain), so a device that scribbles on the descriptor table
//! or returns bogus ids cannot corrupt the free list. Deliberately malformed
//! chains (for the hostile tests) are built with [`SplitQueue::add_raw`].

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{Ordering, fence};

/// Largest queue this driver sets up.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// `struct virtq_desc` flags.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// The descriptor refers to a table of descriptors (only with
/// VIRTIO_RING_F_INDIRECT_DESC; `hostile indirect` sends it without).
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// `struct virtq_avail` flags: the driver does not want interrupts.
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `struct virtq_used` flags: the device does not want notifications.
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

const DESC_SIZE: u64 = 16;
const NO_DESC: u16 = u16::MAX;

/// Byte layout of one queue of `size` entries: descriptor table at 0,
/// driver (avail) ring right after it, device (used) ring at the next
/// 4-byte boundary (spec 2.7: alignments 16, 2 and 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub size: u16,
    pub avail_offset: u64,
    pub used_offset: u64,
    pub total: u64,
}

impl Layout {
    pub const fn new(size: u16) -> Layout {
        let n = size as u64;
        let avail_offset = n * DESC_SIZE;
        // flags, idx, ring[n], used_event
        let avail_len = 2 + 2 + 2 * n + 2;
        let used_offset = (avail_offset + avail_len).next_multiple_of(4);
        // flags, idx, ring[n] of {id u32, len u32}, avail_event
        let used_len = 2 + 2 + 8 * n + 2;
        Layout {
            size,
            avail_offset,
            used_offset,
            total: used_offset + used_len,
        }
    }
}

/// One buffer of a chain: guest-physical address, length, device-writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Buf {
    /// A buffer the device reads (driver to device).
    pub const fn readable(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes (VIRTQ_DESC_F_WRITE).
    pub const fn writable(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            writable: true,
        }
    }
}

/// A raw descriptor for [`SplitQueue::add_raw`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// A used-ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
    /// False if `id` did not name a chain in flight (device bug); nothing
    /// was freed then.
    pub known: bool,
}

pub struct SplitQueue {
    /// Guest-physical (= identity-mapped virtual) address of the ring memory.
    base: u64,
    layout: Layout,
    /// Driver-side "next descriptor" links: free list and in-flight chains.
    link: [u16; MAX_QUEUE_SIZE as usize],
    /// Length of the in-flight chain headed by each descriptor (0 = none).
    chain_len: [u16; MAX_QUEUE_SIZE as usize],
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
}

impl SplitQueue {
    /// Takes over `layout.total` bytes at `base` (zeroed here).
    ///
    /// # Safety
    /// `base..base+layout.total` must be memory owned by this queue for its
    /// whole life, and `1 <= layout.size <= MAX_QUEUE_SIZE`.
    pub unsafe fn new(base: u64, layout: Layout) -> SplitQueue {
        assert!(layout.size >= 1 && layout.size <= MAX_QUEUE_SIZE);
        for off in (0..layout.total).step_by(2) {
            unsafe { write_volatile((base + off) as *mut u16, 0) };
        }
        let n = layout.size;
        let mut link = [NO_DESC; MAX_QUEUE_SIZE as usize];
        for (i, l) in link.iter_mut().enumerate().take(n as usize) {
            *l = if (i as u16) + 1 < n {
                i as u16 + 1
            } else {
                NO_DESC
            };
        }
        SplitQueue {
            base,
            layout,
            link,
            chain_len: [0; MAX_QUEUE_SIZE as usize],
            free_head: 0,
            num_free: n,
            avail_idx: 0,
            last_used: 0,
        }
    }

    pub fn size(&self) -> u16 {
        self.layout.size
    }
    pub fn num_free(&self) -> u16 {
        self.num_free
    }
    /// Addresses to program into QueueDesc / QueueDriver / QueueDevice.
    pub fn desc_addr(&self) -> u64 {
        self.base
    }
    pub fn avail_addr(&self) -> u64 {
        self.base + self.layout.avail_offset
    }
    pub fn used_addr(&self) -> u64 {
        self.base + self.layout.used_offset
    }
    /// Chains handed to the device and not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.layout.size - self.num_free
    }

    fn write_desc(&mut self, i: u16, d: RawDesc) {
        let p = self.base + u64::from(i) * DESC_SIZE;
        // SAFETY: i < size; the table is ours (see new()).
        unsafe {
            write_volatile(p as *mut u64, d.addr);
            write_volatile((p + 8) as *mut u32, d.len);
            write_volatile((p + 12) as *mut u16, d.flags);
            write_volatile((p + 14) as *mut u16, d.next);
        }
    }

    fn take_descs(&mut self, n: usize, out: &mut [u16]) -> bool {
        if n == 0 || n > usize::from(self.num_free) {
            return false;
        }
        for slot in out.iter_mut().take(n) {
            let d = self.free_head;
            self.free_head = self.link[d as usize];
            *slot = d;
        }
        for w in 0..n {
            self.link[out[w] as usize] = if w + 1 < n { out[w + 1] } else { NO_DESC };
        }
        self.num_free -= n as u16;
        true
    }

    fn publish(&mut self, head: u16, n: usize) {
        self.chain_len[head as usize] = n as u16;
        let ring = self.avail_addr() + 4 + 2 * u64::from(self.avail_idx % self.layout.size);
        // SAFETY: inside the avail ring.
        unsafe { write_volatile(ring as *mut u16, head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The ring entry must be visible before the index (spec 2.7.13).
        fence(Ordering::SeqCst);
        // SAFETY: avail.idx.
        unsafe { write_volatile((self.avail_addr() + 2) as *mut u16, self.avail_idx) };
        fence(Ordering::SeqCst);
    }

    /// Adds a chain of well-formed buffers; returns its head descriptor.
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        let head = self.prepare(bufs)?;
        self.publish(head, bufs.len());
        Some(head)
    }

    /// Writes a chain of well-formed buffers into free descriptors without
    /// making it available: someone else publishes the head later (a
    /// ring-0 device call, see the balloon's bursts), after which
    /// [`resync_avail`](Self::resync_avail) catches up; or
    /// [`cancel`](Self::cancel) takes it back. Returns the head descriptor.
    pub fn prepare(&mut self, bufs: &[Buf]) -> Option<u16> {
        let mut ids = [0u16; MAX_QUEUE_SIZE as usize];
        if bufs.len() > ids.len() || !self.take_descs(bufs.len(), &mut ids) {
            return None;
        }
        for (k, b) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let mut flags = if b.writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let next = if last { 0 } else { ids[k + 1] };
            self.write_desc(
                ids[k],
                RawDesc {
                    addr: b.addr,
                    len: b.len,
                    flags,
                    next,
                },
            );
        }
        self.chain_len[ids[0] as usize] = bufs.len() as u16;
        Some(ids[0])
    }

    /// Returns a chain from [`prepare`](Self::prepare) that was never made
    /// available to the free list. Returns false (and does nothing) if
    /// `head` heads no such chain.
    pub fn cancel(&mut self, head: u16) -> bool {
        self.free_chain(head)
    }

    /// The driver's avail.idx (entries made available so far, mod 2^16).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Guest-physical address of avail.idx.
    pub fn avail_idx_addr(&self) -> u64 {
        self.avail_addr() + 2
    }

    /// Guest-physical address of avail.ring[0].
    pub fn avail_ring_addr(&self) -> u64 {
        self.avail_addr() + 4
    }

    /// Takes over the avail.idx that someone else wrote after publishing
    /// prepared chains (ring entries `avail_idx() % size` onwards); returns
    /// how many entries they added.
    pub fn resync_avail(&mut self) -> u16 {
        fence(Ordering::SeqCst);
        // SAFETY: avail.idx.
        let now = unsafe { read_volatile(self.avail_idx_addr() as *const u16) };
        let added = now.wrapping_sub(self.avail_idx);
        self.avail_idx = now;
        added
    }

    /// Adds `descs.len()` descriptors exactly as given, except that each
    /// `next` is an index into `descs` (mapped to the real descriptor
    /// numbers) unless it is >= `descs.len()`, in which case `next` is
    /// written as `queue size + (next - descs.len())`, i.e. out of range.
    /// The chain's head is `descs[0]`. The driver reclaims all of them when
    /// the device returns the head.
    pub fn add_raw(&mut self, descs: &[RawDesc]) -> Option<u16> {
        let mut ids = [0u16; MAX_QUEUE_SIZE as usize];
        if descs.len() > ids.len() || !self.take_descs(descs.len(), &mut ids) {
            return None;
        }
        for (k, d) in descs.iter().enumerate() {
            let next = if usize::from(d.next) < descs.len() {
                ids[usize::from(d.next)]
            } else {
                self.layout.size + (d.next - descs.len() as u16)
            };
            self.write_desc(ids[k], RawDesc { next, ..*d });
        }
        self.publish(ids[0], descs.len());
        Some(ids[0])
    }

    /// Whether the device returned a buffer we have not consumed.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// The device's used.idx.
    pub fn used_idx(&self) -> u16 {
        // SAFETY: used.idx.
        unsafe { read_volatile(self.used_idx_addr() as *const u16) }
    }

    /// Guest-physical address of used.idx.
    pub fn used_idx_addr(&self) -> u64 {
        self.used_addr() + 2
    }

    /// Asks the device for no used-buffer interrupts
    /// (VIRTQ_AVAIL_F_NO_INTERRUPT), as Linux does for a queue without a
    /// callback.
    pub fn suppress_interrupts(&mut self) {
        // SAFETY: avail.flags.
        unsafe { write_volatile(self.avail_addr() as *mut u16, VIRTQ_AVAIL_F_NO_INTERRUPT) };
        fence(Ordering::SeqCst);
    }

    /// Undoes [`suppress_interrupts`](Self::suppress_interrupts).
    pub fn allow_interrupts(&mut self) {
        // SAFETY: avail.flags.
        unsafe { write_volatile(self.avail_addr() as *mut u16, 0) };
        fence(Ordering::SeqCst);
    }

    /// Whether the device asked not to be notified (VIRTQ_USED_F_NO_NOTIFY).
    pub fn notify_suppressed(&self) -> bool {
        fence(Ordering::SeqCst);
        // SAFETY: used.flags.
        unsafe { read_volatile(self.used_addr() as *const u16) & VIRTQ_USED_F_NO_NOTIFY != 0 }
    }

    /// Takes the next used entry and frees its chain.
    pub fn pop_used(&mut self) -> Option<Used> {
        if !self.has_used() {
            return None;
        }
        // Read the entry only after seeing the index (spec 2.7.14).
        fence(Ordering::SeqCst);
        let e = self.used_addr() + 4 + 8 * u64::from(self.last_used % self.layout.size);
        // SAFETY: inside the used ring.
        let (id, len) = unsafe {
            (
                read_volatile(e as *const u32),
                read_volatile((e + 4) as *const u32),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        let known = id < u32::from(self.layout.size) && self.free_chain(id as u16);
        Some(Used { id, len, known })
    }

    /// Puts the chain headed by `head` back on the free list; false if no
    /// chain is headed there.
    fn free_chain(&mut self, head: u16) -> bool {
        if head >= self.layout.size || self.chain_len[head as usize] == 0 {
            return false;
        }
        let n = core::mem::replace(&mut self.chain_len[head as usize], 0);
        // Walk the driver-side links to the chain's tail, then splice the
        // chain onto the free list.
        let mut tail = head;
        for _ in 1..n {
            tail = self.link[tail as usize];
        }
        self.link[tail as usize] = self.free_head;
        self.free_head = head;
        self.num_free += n;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ring memory plus a fake device that reads avail and writes used.
    struct Mem(Vec<u64>);

    fn setup(size: u16) -> (Mem, SplitQueue) {
        let l = Layout::new(size);
        let mem = Mem(vec![0xffff_ffff_ffff_ffff; (l.total as usize).div_ceil(8)]);
        let q = unsafe { SplitQueue::new(mem.0.as_ptr() as u64, l) };
        (mem, q)
    }

    fn avail_idx(q: &SplitQueue) -> u16 {
        unsafe { read_volatile((q.avail_addr() + 2) as *const u16) }
    }
    fn avail_ring(q: &SplitQueue, i: u16) -> u16 {
        unsafe { read_volatile((q.avail_addr() + 4 + 2 * u64::from(i % q.size())) as *const u16) }
    }
    fn desc(q: &SplitQueue, i: u16) -> RawDesc {
        let p = q.desc_addr() + 16 * u64::from(i);
        unsafe {
            RawDesc {
                addr: read_volatile(p as *const u64),
                len: read_volatile((p + 8) as *const u32),
                flags: read_volatile((p + 12) as *const u16),
                next: read_volatile((p + 14) as *const u16),
            }
        }
    }
    fn device_use(q: &SplitQueue, used_idx: u16, id: u32, len: u32) {
        let e = q.used_addr() + 4 + 8 * u64::from(used_idx % q.size());
        unsafe {
            write_volatile(e as *mut u32, id);
            write_volatile((e + 4) as *mut u32, len);
            write_volatile((q.used_addr() + 2) as *mut u16, used_idx.wrapping_add(1));
        }
    }

    #[test]
    fn layout_matches_spec_alignment() {
        let l = Layout::new(256);
        assert_eq!(l.avail_offset, 4096);
        assert_eq!(l.used_offset, 4096 + 520);
        assert_eq!(l.total, 4616 + 2054);
        let l = Layout::new(1);
        assert_eq!((l.avail_offset, l.used_offset), (16, 24));
    }

    #[test]
    fn add_and_reclaim() {
        let (_m, mut q) = setup(4);
        assert_eq!(q.num_free(), 4);
        let h = q.add(&[Buf::readable(0x1000, 8)]).unwrap();
        assert_eq!(avail_idx(&q), 1);
        assert_eq!(avail_ring(&q, 0), h);
        assert_eq!(
            desc(&q, h),
            RawDesc {
                addr: 0x1000,
                len: 8,
                flags: 0,
                next: 0
            }
        );
        assert!(!q.has_used());
        device_use(&q, 0, u32::from(h), 0);
        assert_eq!(
            q.pop_used(),
            Some(Used {
                id: u32::from(h),
                len: 0,
                known: true
            })
        );
        assert_eq!(q.num_free(), 4);
        assert_eq!(q.pop_used(), None);
    }

    #[test]
    fn chains_link_and_free_whole() {
        let (_m, mut q) = setup(4);
        let bufs = [
            Buf::readable(1, 1),
            Buf::writable(2, 2),
            Buf::writable(3, 3),
        ];
        let h = q.add(&bufs).unwrap();
        assert_eq!(q.num_free(), 1);
        assert!(q.add(&bufs).is_none());
        let d0 = desc(&q, h);
        assert_eq!(d0.flags, VIRTQ_DESC_F_NEXT);
        let d1 = desc(&q, d0.next);
        assert_eq!(
            (d1.addr, d1.flags),
            (2, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE)
        );
        let d2 = desc(&q, d1.next);
        assert_eq!((d2.addr, d2.flags), (3, VIRTQ_DESC_F_WRITE));
        device_use(&q, 0, u32::from(h), 5);
        assert!(q.pop_used().unwrap().known);
        assert_eq!(q.num_free(), 4);
        // All four descriptors usable again, ring index wraps past size.
        for i in 0..10u16 {
            let h = q.add(&[Buf::readable(9, 4)]).unwrap();
            device_use(&q, 1 + i, u32::from(h), 0);
            assert!(q.pop_used().unwrap().known);
        }
        assert_eq!(q.num_free(), 4);
    }

    /// Chains prepared ahead and published by someone else (the balloon's
    /// ring-0 bursts): descriptors are written but not made available, the
    /// driver catches up with avail.idx, and unpublished ones are cancelled.
    #[test]
    fn prepared_chains_published_elsewhere() {
        let (_m, mut q) = setup(4);
        let buf = |addr| [Buf::readable(addr, 1024)];
        let a = q.prepare(&buf(0x1000)).unwrap();
        let b = q.prepare(&buf(0x2000)).unwrap();
        let c = q.prepare(&buf(0x3000)).unwrap();
        assert_eq!(q.num_free(), 1);
        assert_eq!(avail_idx(&q), 0, "nothing made available yet");
        assert_eq!(desc(&q, b).addr, 0x2000);
        // Someone publishes a and b, as the ring-0 burst does.
        for (i, h) in [a, b].into_iter().enumerate() {
            let slot = q.avail_ring_addr() + 2 * ((u64::from(q.avail_idx()) + i as u64) % 4);
            unsafe { write_volatile(slot as *mut u16, h) };
        }
        unsafe { write_volatile(q.avail_idx_addr() as *mut u16, 2) };
        assert_eq!(q.resync_avail(), 2);
        assert_eq!(q.avail_idx(), 2);
        assert_eq!((avail_ring(&q, 0), avail_ring(&q, 1)), (a, b));
        // c was never published.
        assert!(q.cancel(c));
        assert!(!q.cancel(c), "twice");
        assert_eq!(q.num_free(), 2);
        device_use(&q, 0, u32::from(a), 0);
        device_use(&q, 1, u32::from(b), 0);
        assert!(q.pop_used().unwrap().known);
        assert!(q.pop_used().unwrap().known);
        assert_eq!(q.num_free(), 4);
        // A normal add goes on from the synced index.
        let d = q.add(&buf(0x4000)).unwrap();
        assert_eq!((avail_idx(&q), avail_ring(&q, 2)), (3, d));
    }

    #[test]
    fn bogus_used_ids_are_ignored() {
        let (_m, mut q) = setup(4);
        let h = q.add(&[Buf::readable(1, 4)]).unwrap();
        device_use(&q, 0, 99, 0);
        assert_eq!(
            q.pop_used(),
            Some(Used {
                id: 99,
                len: 0,
                known: false
            })
        );
        assert_eq!(q.num_free(), 3);
        device_use(&q, 1, u32::from(h), 0);
        assert!(q.pop_used().unwrap().known);
        device_use(&q, 2, u32::from(h), 0); // returned twice
        assert!(!q.pop_used().unwrap().known);
        assert_eq!(q.num_free(), 4);
    }

    #[test]
    fn raw_chains_can_loop_or_run_off_the_table() {
        let (_m, mut q) = setup(4);
        let h = q
            .add_raw(&[
                RawDesc {
                    addr: 1,
                    len: 4,
                    flags: VIRTQ_DESC_F_NEXT,
                    next: 1,
                },
                RawDesc {
                    addr: 2,
                    len: 4,
                    flags: VIRTQ_DESC_F_NEXT,
                    next: 0,
                },
            ])
            .unwrap();
        let d0 = desc(&q, h);
        let d1 = desc(&q, d0.next);
        assert_eq!(d1.next, h, "loop back to the head");
        device_use(&q, 0, u32::from(h), 0);
        assert!(q.pop_used().unwrap().known);
        assert_eq!(q.num_free(), 4);
        let h = q
            .add_raw(&[RawDesc {
                addr: 1,
                len: 4,
                flags: VIRTQ_DESC_F_NEXT,
                next: 1,
            }])
            .unwrap();
        assert_eq!(desc(&q, h).next, 4, "out of range");
    }
}
