//! Test helpers: a driver-side split virtqueue written straight into guest
//! memory, the driver's bring-up through the virtio-mmio registers, the
//! buffers a balloon driver sends, a recording `RamDiscard` and a counting
//! `Interrupt`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::virtio::mmio::MmioTransport;
use crate::virtio::{Interrupt, VIRTIO_F_VERSION_1};
use crate::{DiscardError, DiscardOutcome, GpaRange, GuestMemory, RamDiscard};

/// A split virtqueue as the guest driver sees it.
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl DriverQueue {
    /// Rings at `base` (needs 16*size + 6+2*size + 6+8*size bytes, rounded).
    pub fn new(mem: &GuestMemory, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let q = Self {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        };
        mem.write_obj(0u16, GuestAddress(avail)).unwrap();
        mem.write_obj(0u16, GuestAddress(avail + 2)).unwrap();
        mem.write_obj(0u16, GuestAddress(used + 2)).unwrap();
        q
    }

    /// The device-side `Queue` for these rings.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Write descriptor `i` raw.
    pub fn write_desc(
        &self,
        mem: &GuestMemory,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let a = GuestAddress(self.desc + 16 * u64::from(i));
        mem.write_obj(addr, a).unwrap();
        mem.write_obj(len, a.unchecked_add(8)).unwrap();
        mem.write_obj(flags, a.unchecked_add(12)).unwrap();
        mem.write_obj(next, a.unchecked_add(14)).unwrap();
    }

    /// Add a chain of (addr, len, device_writable) buffers; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let i = (self.next_desc + k as u16) % self.size;
            let last = k + 1 == bufs.len();
            let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(mem, i, addr, len, flags, (i + 1) % self.size);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    /// Put `head` on the available ring.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Set the available index directly (hostile drivers).
    pub fn set_avail_idx(&mut self, mem: &GuestMemory, idx: u16) {
        self.avail_idx = idx;
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used element `i`: (id, len).
    pub fn used_elem(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
        let a = GuestAddress(self.used + 4 + 8 * u64::from(i % self.size));
        (
            mem.read_obj(a).unwrap(),
            mem.read_obj(a.unchecked_add(4)).unwrap(),
        )
    }
}

/// A `RamDiscard` that records every call.
#[derive(Default)]
pub struct RecordingDiscard {
    pub discards: Mutex<Vec<GpaRange>>,
    pub will_need: Mutex<Vec<GpaRange>>,
    pub fail: std::sync::atomic::AtomicBool,
    /// If set, the used-buffer interrupts raised so far are recorded at
    /// each discard (in `vring_at_discard`): what the guest knew by then.
    pub watch: Mutex<Option<std::sync::Arc<CountingIrq>>>,
    pub vring_at_discard: Mutex<Vec<u32>>,
    /// If set, each discard (once recorded) waits for a message on it.
    pub hold: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    /// The ranges of `discards` that came through `discard_free`.
    pub free: Mutex<Vec<GpaRange>>,
    /// `forget_all` calls.
    pub forgets: std::sync::atomic::AtomicU32,
}

impl RecordingDiscard {
    pub fn discarded(&self) -> Vec<GpaRange> {
        self.discards.lock().unwrap().clone()
    }
    pub fn needed(&self) -> Vec<GpaRange> {
        self.will_need.lock().unwrap().clone()
    }
}

impl RamDiscard for RecordingDiscard {
    fn discard(&self, range: GpaRange) -> Result<DiscardOutcome, DiscardError> {
        self.discards.lock().unwrap().push(range);
        if let Some(irq) = self.watch.lock().unwrap().as_ref() {
            self.vring_at_discard.lock().unwrap().push(irq.vring());
        }
        if let Some(hold) = self.hold.lock().unwrap().as_ref() {
            let _ = hold.recv();
        }
        if self.fail.load(Ordering::Relaxed) {
            return Err(DiscardError::OutOfRange(range));
        }
        Ok(DiscardOutcome {
            bytes_released: range.len,
            syscalls: 1,
        })
    }
    fn discard_free(&self, range: GpaRange) -> Result<DiscardOutcome, DiscardError> {
        self.free.lock().unwrap().push(range);
        self.discard(range)
    }
    fn will_need(&self, range: GpaRange) {
        self.will_need.lock().unwrap().push(range);
    }
    fn forget_all(&self) {
        self.forgets.fetch_add(1, Ordering::Relaxed);
    }
}

/// An `Interrupt` that counts triggers per kind.
#[derive(Default)]
pub struct CountingIrq {
    pub status: AtomicU32,
    pub vring: AtomicU32,
    pub config: AtomicU32,
}

impl CountingIrq {
    pub fn vring(&self) -> u32 {
        self.vring.load(Ordering::SeqCst)
    }
    pub fn config(&self) -> u32 {
        self.config.load(Ordering::SeqCst)
    }
}

impl Interrupt for CountingIrq {
    fn trigger(&self, status: u32) -> std::io::Result<()> {
        self.status.fetch_or(status, Ordering::SeqCst);
        if status & crate::virtio::VIRTIO_MMIO_INT_VRING != 0 {
            self.vring.fetch_add(1, Ordering::SeqCst);
        }
        if status & crate::virtio::VIRTIO_MMIO_INT_CONFIG != 0 {
            self.config.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }
    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Feature bits `bits` plus `VIRTIO_F_VERSION_1`.
pub fn features(bits: &[u32]) -> u64 {
    bits.iter()
        .fold(1u64 << VIRTIO_F_VERSION_1, |a, b| a | (1u64 << b))
}

/// An inflate/deflate buffer: `pfns` as little-endian u32s at `addr`;
/// returns its length.
pub fn write_pfns(mem: &GuestMemory, addr: u64, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    bytes.len() as u32
}

/// One statistics entry (`struct virtio_balloon_stat`: le16 tag, le64 value).
pub fn stat(tag: u16, val: u64) -> Vec<u8> {
    let mut v = tag.to_le_bytes().to_vec();
    v.extend_from_slice(&val.to_le_bytes());
    v
}

/// Write the 32-bit virtio-mmio register at `off`.
pub fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Read the 32-bit virtio-mmio register at `off`.
pub fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Probe the device the way Linux's virtio_mmio + virtio_balloon do: reset,
/// ACKNOWLEDGE and DRIVER, ack the offered features that are in `feats`,
/// FEATURES_OK, then set up every queue the device has (queue `i`'s rings
/// at `queue_base + i * 64 KiB`) and DRIVER_OK. Returns the rings.
pub fn linux_probe(
    t: &mut MmioTransport,
    mem: &GuestMemory,
    queue_base: u64,
    feats: u64,
) -> Vec<DriverQueue> {
    assert_eq!(r32(t, 0), 0x7472_6976);
    assert_eq!(r32(t, 4), 2);
    assert_eq!(r32(t, 8), 5);
    w32(t, 0x70, 0);
    w32(t, 0x70, 1);
    w32(t, 0x70, 3);
    w32(t, 0x14, 1);
    let hi = r32(t, 0x10);
    w32(t, 0x14, 0);
    let lo = r32(t, 0x10);
    let offered = (u64::from(hi) << 32) | u64::from(lo);
    let acked = offered & feats;
    w32(t, 0x24, 1);
    w32(t, 0x20, (acked >> 32) as u32);
    w32(t, 0x24, 0);
    w32(t, 0x20, acked as u32);
    w32(t, 0x70, 0xb);
    assert_eq!(r32(t, 0x70) & 8, 8, "FEATURES_OK accepted");
    let mut qs = Vec::new();
    for i in 0.. {
        w32(t, 0x30, i);
        assert_eq!(r32(t, 0x44), 0);
        let max = r32(t, 0x34);
        if max == 0 {
            break;
        }
        let q = DriverQueue::new(mem, queue_base + 0x1_0000 * u64::from(i), max as u16);
        w32(t, 0x38, max);
        for (off, addr) in [(0x80, q.desc), (0x90, q.avail), (0xa0, q.used)] {
            w32(t, off, addr as u32);
            w32(t, off + 4, (addr >> 32) as u32);
        }
        w32(t, 0x44, 1);
        qs.push(q);
    }
    w32(t, 0x70, 0xf);
    assert_eq!(r32(t, 0x70), 0xf, "DRIVER_OK accepted");
    qs
}
