//! The virtio-mmio transport and the balloon behind it, fed arbitrary guest
//! memory (descriptor tables, PFN arrays, stats, hint and reporting buffers)
//! and arbitrary register read/write sequences with queue notifications.
//!
//! Invariants: every discard lies inside guest RAM; the balloon's bitmap
//! count equals its `inflated_pages` accounting, and `actual` never exceeds
//! guest RAM.
#![no_main]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use devices::virtio::balloon::{Balloon, BalloonConfig};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::{Interrupt, VirtioDevice};
use devices::{DiscardError, DiscardOutcome, GpaRange, GuestMemory, RamDiscard};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM: [0, 256 KiB) and [1 MiB, 1 MiB + 256 KiB), a hole between.
const RAM: [(u64, u64); 2] = [(0, 256 << 10), (1 << 20, 256 << 10)];

struct CheckedDiscard;

impl RamDiscard for CheckedDiscard {
    fn discard(&self, range: GpaRange) -> Result<DiscardOutcome, DiscardError> {
        let end = range
            .start
            .checked_add(range.len)
            .expect("discard range overflows");
        assert!(
            RAM.iter().any(|&(s, l)| range.start >= s && end <= s + l),
            "discard outside guest RAM: {range:?}"
        );
        assert_eq!(range.start % 4096, 0, "unaligned discard {range:?}");
        Ok(DiscardOutcome {
            bytes_released: range.len,
            syscalls: 1,
        })
    }
}

#[derive(Default)]
struct Irq(AtomicU32);

impl Interrupt for Irq {
    fn trigger(&self, status: u32) -> std::io::Result<()> {
        self.0.fetch_or(status, Ordering::SeqCst);
        Ok(())
    }
    fn status(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
    fn ack(&self, bits: u32) {
        self.0.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Queue rings for the canonical setup: queue i at 0x1000 * (i + 1).
fn activate(t: &mut MmioTransport, nq: u32) {
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    w(t, 0x70, 1); // ACKNOWLEDGE
    w(t, 0x70, 3); // DRIVER
    for sel in 0..2u32 {
        let mut f = [0u8; 4];
        w(t, 0x14, sel);
        t.read(0x10, &mut f);
        w(t, 0x24, sel);
        w(t, 0x20, u32::from_le_bytes(f));
    }
    w(t, 0x70, 11); // FEATURES_OK
    for q in 0..nq {
        let base = 0x1000 * (q + 1);
        w(t, 0x30, q);
        w(t, 0x38, 16);
        w(t, 0x80, base);
        w(t, 0x84, 0);
        w(t, 0x90, base + 0x100);
        w(t, 0x94, 0);
        w(t, 0xa0, base + 0x200);
        w(t, 0xa4, 0);
        w(t, 0x44, 1);
    }
    w(t, 0x70, 15); // DRIVER_OK
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let flags = data[0];
    let cfg = BalloonConfig {
        must_tell_host: flags & 1 != 0,
        deflate_on_oom: flags & 2 != 0,
        stats_polling_interval_s: u32::from(flags & 4 != 0),
        free_page_hint: flags & 8 != 0,
        free_page_reporting: flags & 16 != 0,
        page_poison: flags & 32 != 0,
        hint_discard: flags & 64 != 0,
        initial_target_pages: u32::from(data[1]),
        sg: flags & 128 != 0,
        notify_suppression: data[1] & 1 != 0,
    };
    let ranges: Vec<GpaRange> = RAM.iter().map(|&(s, l)| GpaRange::new(s, l)).collect();
    let total_pages: u64 = RAM.iter().map(|&(_, l)| l / 4096).sum();
    let Ok(balloon) = Balloon::new(cfg, ranges, Arc::new(CheckedDiscard)) else {
        return;
    };
    let balloon = Arc::new(Mutex::new(balloon));
    let mem = GuestMemory::from_ranges(
        &RAM.iter()
            .map(|&(s, l)| (GuestAddress(s), l as usize))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let dev: Arc<Mutex<dyn VirtioDevice>> = balloon.clone();
    let Ok(mut t) = MmioTransport::new(dev, mem.clone(), Arc::new(Irq::default())) else {
        return;
    };
    // Guest memory: the first part of the input, from 0x1000 on (the rings,
    // descriptors, PFN arrays, stats and hint buffers live there).
    let split = usize::from(u16::from_le_bytes([data[2], data[3]])).min(data.len() - 4);
    let (guest, ops) = data[4..].split_at(split);
    let _ = mem.write_slice(guest, GuestAddress(0x1000));
    let nq = balloon.lock().unwrap().queue_max_sizes().len() as u32;
    if flags & 128 != 0 {
        activate(&mut t, nq);
    }
    // Operations: [kind, offset, value: 4 bytes].
    for op in ops.chunks_exact(6) {
        let off = u64::from(op[1]) * 4 % 0x200;
        let val = u32::from_le_bytes([op[2], op[3], op[4], op[5]]);
        match op[0] % 4 {
            0 => t.write(off, &val.to_le_bytes()),
            1 => {
                let mut b = [0u8; 4];
                t.read(off, &mut b);
            }
            2 => {
                let q = (val % nq.max(1)) as usize;
                balloon.lock().unwrap().process_queue(q);
            }
            _ => {
                let _ = balloon
                    .lock()
                    .unwrap()
                    .set_target_pages(val % (total_pages as u32 + 8));
            }
        }
        let b = balloon.lock().unwrap();
        let bitmap = RAM
            .iter()
            .flat_map(|&(s, l)| (s / 4096)..((s + l) / 4096))
            .filter(|&pfn| b.is_inflated(pfn))
            .count() as u64;
        assert_eq!(bitmap, b.inflated_pages(), "bitmap count != inflated_pages");
        assert!(
            u64::from(b.actual_pages()) <= total_pages,
            "actual {} > RAM",
            b.actual_pages()
        );
    }
});
