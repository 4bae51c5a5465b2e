//! End-to-end tests of the balloon over real guest memory, hand-built split
//! virtqueues and a recording `RamDiscard`.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::test_utils::{
    CountingIrq, DriverQueue, RecordingDiscard, features, linux_probe, r32, stat, w32, write_pfns,
};
use super::*;
use crate::virtio::{ActivateError, VirtioDevice};
use crate::{GpaRange, GuestMemory};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Guest RAM: [0, 16 MiB) and [4 GiB, 4 GiB + 16 MiB), a hole between.
const LOW_END: u64 = 16 * MIB;
const HIGH: u64 = 4 * GIB;
const QUEUE_BASE: u64 = 0x1_0000;
const BUF_BASE: u64 = 0x10_0000;

fn ram() -> Vec<GpaRange> {
    vec![GpaRange::new(0, LOW_END), GpaRange::new(HIGH, 16 * MIB)]
}

struct Fx {
    mem: GuestMemory,
    balloon: Balloon,
    irq: Arc<CountingIrq>,
    discard: Arc<RecordingDiscard>,
    queues: Vec<DriverQueue>,
    events: Arc<Mutex<Vec<BalloonEvent>>>,
}

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[
        (GuestAddress(0), LOW_END as usize),
        (GuestAddress(HIGH), (16 * MIB) as usize),
    ])
    .unwrap()
}

fn fixture_with(cfg: BalloonConfig, acked: u64) -> Fx {
    let mem = memory();
    let discard = Arc::new(RecordingDiscard::default());
    let mut balloon = Balloon::new(cfg, ram(), discard.clone()).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    balloon.set_observer(Box::new(move |e| ev.lock().unwrap().push(e)));
    balloon.set_acked_features(acked);
    let sizes = balloon.queue_max_sizes();
    let queues: Vec<DriverQueue> = sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| DriverQueue::new(&mem, QUEUE_BASE + 0x10000 * i as u64, s))
        .collect();
    let irq = Arc::new(CountingIrq::default());
    let evts = queues
        .iter()
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    balloon
        .activate(
            mem.clone(),
            irq.clone(),
            queues.iter().map(DriverQueue::queue).collect(),
            evts,
        )
        .unwrap();
    Fx {
        mem,
        balloon,
        irq,
        discard,
        queues,
        events,
    }
}

fn fixture() -> Fx {
    fixture_with(
        BalloonConfig::default(),
        features(&[VIRTIO_BALLOON_F_MUST_TELL_HOST]),
    )
}

fn stats_fixture() -> Fx {
    let cfg = BalloonConfig {
        stats_polling_interval_s: 1,
        ..BalloonConfig::default()
    };
    fixture_with(cfg, features(&[VIRTIO_BALLOON_F_STATS_VQ]))
}

/// Every queue: stats (2), free page (3), reporting (4), with page poison.
fn all_fixture(cfg: BalloonConfig) -> Fx {
    fixture_with(
        cfg,
        features(&[
            VIRTIO_BALLOON_F_STATS_VQ,
            VIRTIO_BALLOON_F_FREE_PAGE_HINT,
            VIRTIO_BALLOON_F_PAGE_POISON,
            VIRTIO_BALLOON_F_REPORTING,
        ]),
    )
}

impl Fx {
    /// Queue one readable PFN buffer on queue `q` and process it.
    fn send_pfns(&mut self, q: usize, pfns: &[u32]) {
        let len = write_pfns(&self.mem, BUF_BASE, pfns);
        self.queues[q].add_chain(&self.mem, &[(BUF_BASE, len, false)]);
        self.balloon.process_queue(q);
    }
    fn used(&self, q: usize) -> u16 {
        self.queues[q].used_idx(&self.mem)
    }
    /// Make the chain at `head` of queue `q` available and process it: the
    /// chain is malformed, so the device must mark itself broken.
    fn publish_expecting_reset(&mut self, q: usize, head: u16) {
        self.queues[q].publish(&self.mem, head);
        self.balloon.process_queue(q);
        assert!(self.balloon.needs_reset());
    }
    /// After processing queue `q`: its `n` buffers were refused (returned,
    /// counted as invalid, nothing discarded) and the device still works.
    fn assert_refused(&self, q: usize, n: u16) {
        assert!(self.discard.discarded().is_empty());
        assert_eq!(self.used(q), n);
        assert_eq!(
            self.balloon.metrics().snapshot().invalid_buffers,
            u64::from(n)
        );
        assert!(!self.balloon.needs_reset());
    }
}

fn pages(r: &[GpaRange]) -> Vec<(u64, u64)> {
    r.iter().map(|g| (g.start >> 12, g.len >> 12)).collect()
}

// ----- features, config, host API ----------------------------------------------

#[test]
fn offered_features_follow_config() {
    let d = Arc::new(RecordingDiscard::default());
    let b = Balloon::new(BalloonConfig::default(), ram(), d.clone()).unwrap();
    assert_eq!(
        b.avail_features(),
        features(&[VIRTIO_BALLOON_F_MUST_TELL_HOST])
    );
    assert_eq!(b.max_queues(), 2);
    assert_eq!(b.device_type(), 5);
    let cfg = BalloonConfig {
        must_tell_host: false,
        deflate_on_oom: true,
        stats_polling_interval_s: 5,
        ..BalloonConfig::default()
    };
    let b = Balloon::new(cfg, ram(), d).unwrap();
    assert_eq!(
        b.avail_features(),
        features(&[VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_F_DEFLATE_ON_OOM])
    );
    assert_eq!(b.max_queues(), 3);
}

#[test]
fn acked_features_select_queues() {
    let d = Arc::new(RecordingDiscard::default());
    let cfg = BalloonConfig {
        stats_polling_interval_s: 5,
        ..BalloonConfig::default()
    };
    let mut b = Balloon::new(cfg, ram(), d).unwrap();
    b.set_acked_features(features(&[]));
    assert_eq!(b.queue_max_sizes(), vec![256, 256]);
    b.set_acked_features(features(&[VIRTIO_BALLOON_F_STATS_VQ]));
    assert_eq!(b.queue_max_sizes(), vec![256, 256, 256]);
    // Unoffered bits are dropped.
    b.set_acked_features(features(&[VIRTIO_BALLOON_F_REPORTING]));
    assert_eq!(b.queue_max_sizes(), vec![256, 256]);
}

#[test]
fn new_rejects_bad_inputs() {
    let d = Arc::new(RecordingDiscard::default());
    let cfg = BalloonConfig {
        initial_target_pages: u32::MAX,
        ..BalloonConfig::default()
    };
    assert!(matches!(
        Balloon::new(cfg, ram(), d.clone()),
        Err(Error::TargetTooLarge { .. })
    ));
    assert!(matches!(
        Balloon::new(BalloonConfig::default(), vec![], d.clone()),
        Err(Error::NoRam)
    ));
    assert!(matches!(
        Balloon::new(
            BalloonConfig::default(),
            vec![GpaRange::new(0x10, 0x1000)],
            d
        ),
        Err(Error::RamUnaligned(_))
    ));
}

#[test]
fn target_change_raises_config_interrupt_and_event() {
    let mut fx = fixture();
    fx.balloon.set_target_pages(1000).unwrap();
    assert_eq!(fx.balloon.target_pages(), 1000);
    assert_eq!(fx.irq.config(), 1);
    assert_eq!(fx.balloon.config_generation(), 1);
    let mut d = [0u8; 4];
    fx.balloon.read_config(0, &mut d);
    assert_eq!(u32::from_le_bytes(d), 1000);
    assert!(matches!(
        fx.balloon.set_target_pages(u32::MAX),
        Err(Error::TargetTooLarge {
            target: u32::MAX,
            ..
        })
    ));
    assert_eq!(
        fx.events.lock().unwrap().as_slice(),
        &[BalloonEvent::TargetChanged { target_pages: 1000 }]
    );
}

#[test]
fn target_change_before_activation_has_no_interrupt() {
    let d = Arc::new(RecordingDiscard::default());
    let mut b = Balloon::new(BalloonConfig::default(), ram(), d).unwrap();
    b.set_target_pages(10).unwrap();
    assert_eq!(b.target_pages(), 10);
    assert_eq!(b.metrics().snapshot().config_interrupts, 0);
}

#[test]
fn guest_actual_write_emits_event() {
    let mut fx = fixture();
    fx.balloon.set_target_pages(64).unwrap();
    fx.balloon.write_config(4, &32u32.to_le_bytes());
    assert_eq!(fx.balloon.actual_pages(), 32);
    // Read-only fields stay put.
    fx.balloon.write_config(0, &1u32.to_le_bytes());
    assert_eq!(fx.balloon.target_pages(), 64);
    assert_eq!(
        fx.events.lock().unwrap().last(),
        Some(&BalloonEvent::ActualChanged {
            actual_pages: 32,
            target_pages: 64
        })
    );
    // Same value again: no event.
    let n = fx.events.lock().unwrap().len();
    fx.balloon.write_config(4, &32u32.to_le_bytes());
    assert_eq!(fx.events.lock().unwrap().len(), n);
}

/// Found by fuzz/mmio_balloon: a guest could report more pages in the
/// balloon than it has RAM, and the host passed the claim on.
#[test]
fn guest_actual_beyond_ram_is_bounded() {
    let mut fx = fixture();
    let total = fx.balloon.layout.total_pages() as u32;
    fx.balloon.write_config(4, &(total + 8000).to_le_bytes());
    assert_eq!(fx.balloon.actual_pages(), total);
    assert_eq!(
        fx.events.lock().unwrap().last(),
        Some(&BalloonEvent::ActualChanged {
            actual_pages: total,
            target_pages: 0
        })
    );
    fx.balloon.write_config(4, &u32::MAX.to_le_bytes());
    assert_eq!(fx.balloon.actual_pages(), total);
}

#[test]
fn stats_interval_requires_stats_at_boot() {
    let mut fx = fixture();
    assert!(matches!(
        fx.balloon.set_stats_polling_interval(3),
        Err(Error::StatsDisabled(3))
    ));
    let mut fx = stats_fixture();
    fx.balloon.set_stats_polling_interval(0).unwrap();
    assert_eq!(fx.balloon.stats_polling_interval(), 0);
}

#[test]
fn activate_checks_queue_count_and_readiness() {
    let mem = memory();
    let d = Arc::new(RecordingDiscard::default());
    let mut b = Balloon::new(BalloonConfig::default(), ram(), d).unwrap();
    b.set_acked_features(features(&[]));
    let q = DriverQueue::new(&mem, QUEUE_BASE, 256);
    let irq = Arc::new(CountingIrq::default());
    let err = b
        .activate(
            mem.clone(),
            irq.clone(),
            vec![q.queue()],
            vec![EventFd::new(0).unwrap()],
        )
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 2,
            got: 1
        }
    ));
    let mut not_ready = q.queue();
    virtio_queue::QueueT::set_ready(&mut not_ready, false);
    let err = b
        .activate(
            mem,
            irq,
            vec![q.queue(), not_ready],
            vec![EventFd::new(0).unwrap(), EventFd::new(0).unwrap()],
        )
        .unwrap_err();
    assert!(matches!(err, ActivateError::BadQueue { index: 1, .. }));
    assert!(!b.is_activated());
}

// ----- inflate / deflate ------------------------------------------------------------

#[test]
fn inflate_256_contiguous_pfns_is_one_discard() {
    let mut fx = fixture();
    let pfns: Vec<u32> = (0x800..0x900).collect();
    fx.send_pfns(0, &pfns);
    assert_eq!(pages(&fx.discard.discarded()), vec![(0x800, 256)]);
    assert_eq!(fx.used(0), 1);
    assert_eq!(fx.queues[0].used_elem(&fx.mem, 0), (0, 0));
    assert_eq!(fx.irq.vring(), 1);
    assert_eq!(fx.balloon.inflated_pages(), 256);
    assert!(fx.balloon.is_inflated(0x800) && !fx.balloon.is_inflated(0x900));
    let m = fx.balloon.metrics().snapshot();
    assert_eq!(m.inflate_requests, 1);
    assert_eq!(m.inflate_pages, 256);
    assert_eq!(m.discard_calls, 1);
    assert_eq!(m.discard_bytes, 256 * 4096);
    assert_eq!(m.discard_released_bytes, 256 * 4096);
}

/// With MUST_TELL_HOST the guest is told first and the discard overlaps
/// its interrupt handling; without it the guest may reuse pages as soon as
/// it has asked for their deflate, so the discard comes first.
#[test]
fn inflate_discards_after_the_interrupt_only_with_must_tell_host() {
    for (acked, vring_at_discard) in [
        (features(&[VIRTIO_BALLOON_F_MUST_TELL_HOST]), 1),
        (features(&[]), 0),
    ] {
        let mut fx = fixture_with(BalloonConfig::default(), acked);
        *fx.discard.watch.lock().unwrap() = Some(fx.irq.clone());
        fx.send_pfns(0, &(0x800..0x900).collect::<Vec<u32>>());
        assert_eq!(pages(&fx.discard.discarded()), vec![(0x800, 256)]);
        assert_eq!(
            *fx.discard.vring_at_discard.lock().unwrap(),
            vec![vring_at_discard],
            "features {acked:#x}"
        );
        assert_eq!(fx.irq.vring(), 1);
    }
}

#[test]
fn inflate_scattered_pfns_merge_into_runs() {
    let mut fx = fixture();
    // Reverse order, duplicates, three runs.
    let mut pfns: Vec<u32> = (0x100..0x110).chain(0x200..0x204).collect();
    pfns.push(0x300);
    pfns.push(0x105);
    pfns.reverse();
    fx.send_pfns(0, &pfns);
    assert_eq!(
        pages(&fx.discard.discarded()),
        vec![(0x100, 16), (0x200, 4), (0x300, 1)]
    );
    let m = fx.balloon.metrics().snapshot();
    assert_eq!(m.duplicate_pfns, 1);
    assert_eq!(m.inflate_pages, 21);
}

#[test]
fn inflate_skips_pfns_in_the_hole_and_beyond_ram() {
    let mut fx = fixture();
    let low_last = (LOW_END >> 12) as u32 - 1;
    let high_first = (HIGH >> 12) as u32;
    let pfns = [
        low_last - 1,
        low_last,
        low_last + 1,   // hole
        high_first - 1, // hole
        high_first,
        high_first + 1,
        high_first + 0x1000, // past the end of RAM
        u32::MAX,
    ];
    fx.send_pfns(0, &pfns);
    assert_eq!(
        pages(&fx.discard.discarded()),
        vec![(u64::from(low_last) - 1, 2), (u64::from(high_first), 2)]
    );
    assert_eq!(fx.balloon.metrics().snapshot().invalid_pfns, 4);
    assert_eq!(fx.used(0), 1, "the buffer is still returned");
    assert!(!fx.balloon.needs_reset());
}

#[test]
fn large_buffer_and_multi_descriptor_chain() {
    let mut fx = fixture();
    // 1024 PFNs in one descriptor: four batches, each a run.
    let pfns: Vec<u32> = (0x100..0x500).collect();
    fx.send_pfns(0, &pfns);
    let d = pages(&fx.discard.discarded());
    assert_eq!(d.iter().map(|r| r.1).sum::<u64>(), 1024);
    assert_eq!(d.len(), 4);
    // Two readable descriptors in one chain.
    let a = write_pfns(&fx.mem, BUF_BASE, &[0x600, 0x601]);
    let b = write_pfns(&fx.mem, BUF_BASE + 0x1000, &[0x700]);
    fx.queues[0].add_chain(
        &fx.mem,
        &[(BUF_BASE, a, false), (BUF_BASE + 0x1000, b, false)],
    );
    fx.balloon.process_queue(0);
    let d = pages(&fx.discard.discarded());
    assert_eq!(&d[4..], &[(0x600, 2), (0x700, 1)]);
    assert_eq!(fx.used(0), 2);
}

#[test]
fn deflate_acks_clears_bitmap_and_hints_will_need() {
    let mut fx = fixture();
    fx.send_pfns(0, &(0x800..0x900).collect::<Vec<_>>());
    fx.send_pfns(1, &(0x800..0x880).collect::<Vec<_>>());
    assert_eq!(fx.used(1), 1);
    assert_eq!(fx.balloon.inflated_pages(), 128);
    assert_eq!(pages(&fx.discard.needed()), vec![(0x800, 128)]);
    // Deflate discards nothing.
    assert_eq!(fx.discard.discarded().len(), 1);
    let m = fx.balloon.metrics().snapshot();
    assert_eq!(m.deflate_requests, 1);
    assert_eq!(m.deflate_pages, 128);
    assert_eq!(fx.irq.vring(), 2);
}

#[test]
fn deflate_below_target_is_counted() {
    let cfg = BalloonConfig {
        deflate_on_oom: true,
        initial_target_pages: 256,
        ..BalloonConfig::default()
    };
    let mut fx = fixture_with(cfg, features(&[VIRTIO_BALLOON_F_DEFLATE_ON_OOM]));
    fx.send_pfns(0, &(0x800..0x900).collect::<Vec<_>>());
    fx.send_pfns(1, &(0x800..0x810).collect::<Vec<_>>());
    assert_eq!(fx.used(1), 1, "deflate beyond the target is accepted");
    assert_eq!(fx.balloon.metrics().snapshot().deflate_below_target, 1);
}

/// Issue #16: the target goes 256 -> 64 -> 200 faster than the guest
/// follows; the guest deflates to the 64 it read: that follows a lowered
/// target and is not an unsolicited deflate. Once it is back at 200, a
/// deflate below 200 is.
#[test]
fn deflate_after_a_lowered_target_is_not_unsolicited() {
    let cfg = BalloonConfig {
        initial_target_pages: 256,
        ..BalloonConfig::default()
    };
    let mut fx = fixture_with(cfg, features(&[VIRTIO_BALLOON_F_MUST_TELL_HOST]));
    let below = |fx: &Fx| fx.balloon.metrics().snapshot().deflate_below_target;
    fx.send_pfns(0, &(0x800..0x900).collect::<Vec<_>>());
    fx.balloon.set_target_pages(64).unwrap();
    fx.balloon.set_target_pages(200).unwrap();
    // Deflate in two steps down to 64 while the target is already 200.
    fx.send_pfns(1, &(0x840..0x8c0).collect::<Vec<_>>());
    fx.send_pfns(1, &(0x8c0..0x900).collect::<Vec<_>>());
    assert_eq!(fx.balloon.inflated_pages(), 64);
    assert_eq!(below(&fx), 0, "a deflate to a target the guest read");
    // It reads 200 and inflates back: caught up.
    fx.send_pfns(0, &(0x900..0x988).collect::<Vec<_>>());
    assert_eq!(fx.balloon.inflated_pages(), 200);
    assert_eq!(below(&fx), 0);
    // Now a deflate below 200 with no target change is unsolicited.
    fx.send_pfns(1, &(0x900..0x910).collect::<Vec<_>>());
    assert_eq!(below(&fx), 1, "an unsolicited deflate is still counted");
    // A lowered target makes a deflate down to it fine again...
    fx.balloon.set_target_pages(100).unwrap();
    fx.send_pfns(1, &(0x910..0x94c).collect::<Vec<_>>());
    assert_eq!(fx.balloon.inflated_pages(), 124);
    assert_eq!(below(&fx), 1);
    fx.send_pfns(1, &(0x94c..0x964).collect::<Vec<_>>());
    assert_eq!(fx.balloon.inflated_pages(), 100);
    assert_eq!(below(&fx), 1);
    // ...but not below it.
    fx.send_pfns(1, &(0x964..0x965).collect::<Vec<_>>());
    assert_eq!(below(&fx), 2);
}

#[test]
fn discard_failure_is_counted_not_fatal() {
    let mut fx = fixture();
    fx.discard
        .fail
        .store(true, std::sync::atomic::Ordering::Relaxed);
    fx.send_pfns(0, &[1, 2, 3]);
    assert_eq!(fx.used(0), 1);
    assert_eq!(fx.balloon.metrics().snapshot().discard_errors, 1);
    assert!(!fx.balloon.needs_reset());
}

#[test]
fn several_buffers_in_one_kick_one_interrupt() {
    let mut fx = fixture();
    for i in 0..4u64 {
        let len = write_pfns(&fx.mem, BUF_BASE + i * 0x1000, &[0x100 + i as u32]);
        fx.queues[0].add_chain(&fx.mem, &[(BUF_BASE + i * 0x1000, len, false)]);
    }
    fx.balloon.process_queue(0);
    assert_eq!(fx.used(0), 4);
    assert_eq!(fx.irq.vring(), 1);
    assert_eq!(fx.discard.discarded().len(), 4);
}

/// A driver that set VRING_AVAIL_F_NO_INTERRUPT on a queue (Linux, on
/// its free page hint queue) gets no used-buffer interrupt for it; the
/// buffers are used all the same, and clearing the flag brings them back.
#[test]
fn no_interrupt_flag_suppresses_used_buffer_interrupts() {
    let mut fx = fixture();
    let avail = fx.queues[0].avail;
    fx.mem.write_obj(1u16.to_le(), GuestAddress(avail)).unwrap();
    for i in 0..2u64 {
        let len = write_pfns(&fx.mem, BUF_BASE + i * 0x1000, &[0x100 + i as u32]);
        fx.queues[0].add_chain(&fx.mem, &[(BUF_BASE + i * 0x1000, len, false)]);
        fx.balloon.process_queue(0);
    }
    assert_eq!(fx.used(0), 2);
    assert_eq!(fx.irq.vring(), 0, "the driver asked for no interrupt");
    assert_eq!(
        fx.balloon.metrics().snapshot().vring_interrupts_suppressed,
        2
    );
    fx.mem.write_obj(0u16, GuestAddress(avail)).unwrap();
    let len = write_pfns(&fx.mem, BUF_BASE + 0x2000, &[0x102]);
    fx.queues[0].add_chain(&fx.mem, &[(BUF_BASE + 0x2000, len, false)]);
    fx.balloon.process_queue(0);
    assert_eq!(fx.used(0), 3);
    assert_eq!(fx.irq.vring(), 1);
}

// ----- stats ---------------------------------------------------------------------------

fn send_stats(fx: &mut Fx, addr: u64, bytes: &[u8]) {
    fx.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    fx.queues[2].add_chain(&fx.mem, &[(addr, bytes.len() as u32, false)]);
    fx.balloon.process_queue(2);
}

#[test]
fn stats_are_parsed_held_and_returned_on_request() {
    let mut fx = stats_fixture();
    let mut buf = stat(4, 100 << 20);
    buf.extend(stat(5, 1 << 30));
    buf.extend(stat(99, 5)); // unknown tag
    send_stats(&mut fx, BUF_BASE, &buf);
    let s = fx.balloon.latest_stats().expect("stats");
    assert_eq!(s.by_name("free_memory"), Some(100 << 20));
    assert_eq!(s.by_name("total_memory"), Some(1 << 30));
    assert_eq!(s.iter().count(), 2);
    // Held, not returned.
    assert_eq!(fx.used(2), 0);
    fx.balloon.request_stats();
    assert_eq!(fx.used(2), 1);
    assert_eq!(fx.irq.vring(), 1);
    // Nothing held now: a second request does nothing.
    fx.balloon.request_stats();
    assert_eq!(fx.used(2), 1);
    // The guest refills.
    send_stats(&mut fx, BUF_BASE, &stat(4, 7));
    assert_eq!(fx.balloon.latest_stats().unwrap().get(4), Some(7));
    assert_eq!(fx.balloon.latest_stats().unwrap().get(5), None);
    let m = fx.balloon.metrics().snapshot();
    assert_eq!(m.stats_updates, 2);
    assert_eq!(m.stats_requests, 1);
}

#[test]
fn truncated_stats_entry_is_ignored() {
    let mut fx = stats_fixture();
    let mut buf = stat(0, 11);
    buf.extend(&stat(1, 22)[..5]);
    send_stats(&mut fx, BUF_BASE, &buf);
    let s = fx.balloon.latest_stats().unwrap();
    assert_eq!(s.get(0), Some(11));
    assert_eq!(s.get(1), None);
    assert!(!fx.balloon.needs_reset());
}

#[test]
fn second_stats_buffer_returns_the_first() {
    let mut fx = stats_fixture();
    send_stats(&mut fx, BUF_BASE, &stat(0, 1));
    send_stats(&mut fx, BUF_BASE + 0x100, &stat(0, 2));
    assert_eq!(fx.used(2), 1);
    assert_eq!(fx.queues[2].used_elem(&fx.mem, 0).0, 0);
    assert_eq!(fx.balloon.latest_stats().unwrap().get(0), Some(2));
}

#[test]
fn writable_stats_buffer_is_ignored_but_held() {
    let mut fx = stats_fixture();
    fx.mem
        .write_slice(&stat(0, 1), GuestAddress(BUF_BASE))
        .unwrap();
    fx.queues[2].add_chain(&fx.mem, &[(BUF_BASE, 10, true)]);
    fx.balloon.process_queue(2);
    assert!(fx.balloon.latest_stats().is_none());
    assert_eq!(fx.balloon.metrics().snapshot().invalid_buffers, 1);
    fx.balloon.request_stats();
    assert_eq!(fx.used(2), 1);
}

// ----- hostile guests ---------------------------------------------------------------

#[test]
fn writable_inflate_buffer_is_rejected() {
    let mut fx = fixture();
    let len = write_pfns(&fx.mem, BUF_BASE, &[1, 2, 3]);
    fx.queues[0].add_chain(&fx.mem, &[(BUF_BASE, len, true)]);
    fx.balloon.process_queue(0);
    fx.assert_refused(0, 1);
}

#[test]
fn odd_and_zero_length_buffers_are_rejected() {
    let mut fx = fixture();
    write_pfns(&fx.mem, BUF_BASE, &[1, 2, 3]);
    fx.queues[0].add_chain(&fx.mem, &[(BUF_BASE, 6, false)]);
    fx.queues[0].add_chain(&fx.mem, &[(BUF_BASE, 0, false)]);
    fx.balloon.process_queue(0);
    fx.assert_refused(0, 2);
}

#[test]
fn oversized_and_out_of_memory_buffers_are_rejected() {
    let mut fx = fixture();
    // Larger than the bound.
    fx.queues[0].add_chain(&fx.mem, &[(BUF_BASE, 1 << 20, false)]);
    // In the hole between the RAM regions.
    fx.queues[0].add_chain(&fx.mem, &[(3 * GIB, 1024, false)]);
    // Wrapping around the address space.
    fx.queues[0].add_chain(&fx.mem, &[(u64::MAX - 3, 8, false)]);
    fx.balloon.process_queue(0);
    fx.assert_refused(0, 3);
}

#[test]
fn descriptor_loop_breaks_the_device() {
    let mut fx = fixture();
    let len = write_pfns(&fx.mem, BUF_BASE, &[1]);
    let next = VRING_DESC_F_NEXT as u16;
    fx.queues[0].write_desc(&fx.mem, 0, BUF_BASE, len, next, 1);
    fx.queues[0].write_desc(&fx.mem, 1, BUF_BASE, len, next, 0);
    fx.publish_expecting_reset(0, 0);
    assert!(fx.discard.discarded().is_empty());
    assert_eq!(fx.irq.config(), 1);
    assert_eq!(fx.balloon.metrics().snapshot().queue_errors, 1);
    // Further kicks are ignored until reset.
    fx.send_pfns(0, &[5]);
    assert!(fx.discard.discarded().is_empty());
    assert!(fx.balloon.reset());
    assert!(!fx.balloon.needs_reset());
}

#[test]
fn chain_longer_than_queue_breaks_the_device() {
    let mut fx = fixture();
    let len = write_pfns(&fx.mem, BUF_BASE, &[1]);
    let next = VRING_DESC_F_NEXT as u16;
    // 256 descriptors all chained, the last pointing back to the first.
    for i in 0..256u16 {
        fx.queues[0].write_desc(&fx.mem, i, BUF_BASE, len, next, (i + 1) % 256);
    }
    fx.publish_expecting_reset(0, 0);
}

#[test]
fn next_index_out_of_range_breaks_the_device() {
    let mut fx = fixture();
    let len = write_pfns(&fx.mem, BUF_BASE, &[1]);
    fx.queues[0].write_desc(&fx.mem, 0, BUF_BASE, len, VRING_DESC_F_NEXT as u16, 300);
    fx.publish_expecting_reset(0, 0);
}

#[test]
fn head_index_out_of_range_breaks_the_device() {
    let mut fx = fixture();
    fx.publish_expecting_reset(0, 999);
}

#[test]
fn avail_index_too_far_ahead_breaks_the_device() {
    let mut fx = fixture();
    fx.queues[0].set_avail_idx(&fx.mem, 300);
    fx.balloon.process_queue(0);
    assert!(fx.balloon.needs_reset());
}

#[test]
fn too_many_descriptors_in_a_chain_are_rejected() {
    let mut fx = fixture();
    let len = write_pfns(&fx.mem, BUF_BASE, &[1]);
    let bufs: Vec<(u64, u32, bool)> = (0..40).map(|_| (BUF_BASE, len, false)).collect();
    fx.queues[0].add_chain(&fx.mem, &bufs);
    fx.balloon.process_queue(0);
    assert!(fx.discard.discarded().is_empty());
    assert_eq!(fx.used(0), 1);
    assert!(!fx.balloon.needs_reset());
}

#[test]
fn reset_clears_device_state() {
    let mut fx = fixture();
    fx.send_pfns(0, &[1, 2]);
    fx.balloon.write_config(4, &2u32.to_le_bytes());
    assert!(fx.balloon.reset());
    assert!(!fx.balloon.is_activated());
    assert_eq!(fx.balloon.inflated_pages(), 0);
    assert_eq!(fx.balloon.actual_pages(), 0);
    assert_eq!(fx.balloon.acked_features(), 0);
    // The backing forgets what it kept of the inflated pages (hugetlb:
    // which 4 KiB pages of a huge page the balloon held).
    assert_eq!(
        fx.discard
            .forgets
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Queue processing after reset is a no-op.
    fx.balloon.process_queue(0);
}

// ----- transport + event loop, end to end ----------------------------------------------

mod event_loop {
    use super::*;
    use crate::virtio::mmio::MmioTransport;
    use event_manager::{EventManager, SubscriberOps};
    use std::time::{Duration, Instant};

    type Mgr = EventManager<Arc<Mutex<BalloonEvents>>>;

    struct World {
        mem: GuestMemory,
        balloon: Arc<Mutex<Balloon>>,
        transport: MmioTransport,
        mgr: Mgr,
        discard: Arc<RecordingDiscard>,
        irq: Arc<CountingIrq>,
    }

    fn world(cfg: BalloonConfig) -> World {
        let mem = memory();
        let discard = Arc::new(RecordingDiscard::default());
        let balloon = Arc::new(Mutex::new(
            Balloon::new(cfg, ram(), discard.clone()).unwrap(),
        ));
        let mut mgr = Mgr::new().unwrap();
        mgr.add_subscriber(Arc::new(Mutex::new(BalloonEvents::new(balloon.clone()))));
        let irq = Arc::new(CountingIrq::default());
        let transport = MmioTransport::new(balloon.clone(), mem.clone(), irq.clone()).unwrap();
        World {
            mem,
            balloon,
            transport,
            mgr,
            discard,
            irq,
        }
    }

    fn run_until(mgr: &mut Mgr, mut done: impl FnMut() -> bool, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            mgr.run_with_timeout(50).unwrap();
            if done() {
                return true;
            }
        }
        false
    }

    #[test]
    fn kick_via_ioeventfd_is_served_by_the_event_loop() {
        let mut w = world(BalloonConfig::default());
        let mut qs = linux_probe(&mut w.transport, &w.mem, QUEUE_BASE, u64::MAX);
        assert_eq!(qs.len(), 2);
        assert!(w.balloon.lock().unwrap().is_activated());
        // The activation is finished by the event loop.
        w.mgr.run_with_timeout(10).unwrap();
        let len = write_pfns(&w.mem, BUF_BASE, &(0x10..0x20).collect::<Vec<_>>());
        qs[0].add_chain(&w.mem, &[(BUF_BASE, len, false)]);
        // What KVM does on a QueueNotify write with datamatch 0.
        w.transport.queue_evts()[0].write(1).unwrap();
        let d = w.discard.clone();
        assert!(run_until(
            &mut w.mgr,
            || !d.discarded().is_empty(),
            Duration::from_secs(2)
        ));
        assert_eq!(pages(&w.discard.discarded()), vec![(0x10, 16)]);
        assert_eq!(qs[0].used_idx(&w.mem), 1);
        assert_eq!(r32(&mut w.transport, 0x60) & 1, 1, "used-buffer interrupt");
        w32(&mut w.transport, 0x64, 1);
        assert_eq!(r32(&mut w.transport, 0x60), 0);

        // A QueueNotify write that reaches the transport works too.
        qs[1].add_chain(&w.mem, &[(BUF_BASE, len, false)]);
        w32(&mut w.transport, 0x50, 1);
        let m = w.balloon.lock().unwrap().metrics_handle();
        assert!(run_until(
            &mut w.mgr,
            || m.snapshot().deflate_requests == 1,
            Duration::from_secs(2)
        ));

        // Reset, then the old queue eventfds are unregistered: a kick is not served.
        w32(&mut w.transport, 0x70, 0);
        w.mgr.run_with_timeout(10).unwrap();
        qs[0].add_chain(&w.mem, &[(BUF_BASE, len, false)]);
        w.transport.queue_evts()[0].write(1).unwrap();
        w.mgr.run_with_timeout(50).unwrap();
        assert_eq!(w.discard.discarded().len(), 1);

        // And the device can be brought up again.
        let mut qs = linux_probe(&mut w.transport, &w.mem, QUEUE_BASE, u64::MAX);
        w.mgr.run_with_timeout(10).unwrap();
        qs[0].add_chain(&w.mem, &[(BUF_BASE, len, false)]);
        w.transport.queue_evts()[0].write(1).unwrap();
        let d = w.discard.clone();
        assert!(run_until(
            &mut w.mgr,
            || d.discarded().len() == 2,
            Duration::from_secs(2)
        ));
    }

    /// Frozen (a migration's final round): a kick is not served (nothing
    /// discarded, no used-ring write), the target and the stats interval
    /// are refused; thawed, the kick is served without another from the
    /// guest, and the guest's kick count is not inflated by it.
    #[test]
    fn a_frozen_device_serves_nothing_until_thawed() {
        let mut w = world(BalloonConfig {
            stats_polling_interval_s: 1,
            ..BalloonConfig::default()
        });
        let mut qs = linux_probe(&mut w.transport, &w.mem, QUEUE_BASE, u64::MAX);
        w.mgr.run_with_timeout(10).unwrap();
        w.balloon.lock().unwrap().freeze();
        assert!(matches!(
            w.balloon.lock().unwrap().set_target_pages(16),
            Err(Error::Frozen)
        ));
        assert!(matches!(
            w.balloon.lock().unwrap().set_stats_polling_interval(2),
            Err(Error::Frozen)
        ));
        let len = write_pfns(&w.mem, BUF_BASE, &(0x10..0x20).collect::<Vec<_>>());
        qs[0].add_chain(&w.mem, &[(BUF_BASE, len, false)]);
        w.transport.queue_evts()[0].write(1).unwrap();
        for _ in 0..5 {
            w.mgr.run_with_timeout(20).unwrap();
        }
        assert!(w.discard.discarded().is_empty(), "served while frozen");
        assert_eq!(qs[0].used_idx(&w.mem), 0, "used ring written while frozen");
        w.balloon.lock().unwrap().thaw();
        let d = w.discard.clone();
        assert!(run_until(
            &mut w.mgr,
            || !d.discarded().is_empty(),
            Duration::from_secs(2)
        ));
        assert_eq!(qs[0].used_idx(&w.mem), 1);
        let b = w.balloon.lock().unwrap();
        assert_eq!(b.metrics().snapshot().inflate_kicks, 1);
        drop(b);
        w.balloon.lock().unwrap().set_target_pages(16).unwrap();
    }

    /// The event loop returns the inflate buffer and raises the interrupt,
    /// then discards with the device lock released: the guest's `actual`
    /// write (and the API) are not held up by the discard. A reset, after
    /// which the guest may reuse the pages, waits until it is done.
    #[test]
    fn inflate_discard_runs_outside_the_device_lock_and_a_reset_waits_for_it() {
        let mut w = world(BalloonConfig::default());
        let (release, hold) = std::sync::mpsc::channel::<()>();
        *w.discard.hold.lock().unwrap() = Some(hold);
        let mut qs = linux_probe(&mut w.transport, &w.mem, QUEUE_BASE, u64::MAX);
        w.mgr.run_with_timeout(10).unwrap();
        let len = write_pfns(&w.mem, BUF_BASE, &(0x800..0x900).collect::<Vec<_>>());
        qs[0].add_chain(&w.mem, &[(BUF_BASE, len, false)]);
        w.transport.queue_evts()[0].write(1).unwrap();
        let mut mgr = w.mgr;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let event_loop = std::thread::spawn(move || {
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                mgr.run_with_timeout(10).unwrap();
            }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while w.discard.discarded().is_empty() {
            assert!(Instant::now() < deadline, "no discard started");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The discard is in progress (held): the buffer is back, the
        // interrupt raised, and the guest's register accesses go through.
        assert!(
            w.balloon.try_lock().is_ok(),
            "the device lock is held during the discard"
        );
        assert_eq!(qs[0].used_idx(&w.mem), 1);
        assert_eq!(r32(&mut w.transport, 0x60) & 1, 1);
        w32(&mut w.transport, 0x104, 256);
        assert_eq!(r32(&mut w.transport, 0x104), 256);
        // A reset (the vCPU writing Status 0) waits for the discard.
        let reset_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (mut t, done) = (w.transport, reset_done.clone());
        let resetter = std::thread::spawn(move || {
            w32(&mut t, 0x70, 0);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !reset_done.load(std::sync::atomic::Ordering::SeqCst),
            "the reset went ahead of the discard"
        );
        release.send(()).unwrap();
        resetter.join().unwrap();
        assert!(reset_done.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(pages(&w.discard.discarded()), vec![(0x800, 256)]);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        event_loop.join().unwrap();
    }

    #[test]
    fn config_change_interrupt_through_the_transport() {
        let mut w = world(BalloonConfig::default());
        linux_probe(&mut w.transport, &w.mem, QUEUE_BASE, u64::MAX);
        w.balloon.lock().unwrap().set_target_pages(512).unwrap();
        assert_eq!(w.irq.config(), 1);
        assert_eq!(r32(&mut w.transport, 0x60) & 2, 2);
        assert_eq!(r32(&mut w.transport, 0x100), 512);
        assert_eq!(r32(&mut w.transport, 0xfc), 1, "config generation bumped");
        w32(&mut w.transport, 0x104, 512);
        assert_eq!(w.balloon.lock().unwrap().actual_pages(), 512);
    }

    #[test]
    fn broken_queue_shows_needs_reset_in_status() {
        let mut w = world(BalloonConfig::default());
        let mut qs = linux_probe(&mut w.transport, &w.mem, QUEUE_BASE, u64::MAX);
        w.mgr.run_with_timeout(10).unwrap();
        qs[0].set_avail_idx(&w.mem, 1000);
        w.transport.queue_evts()[0].write(1).unwrap();
        let b = w.balloon.clone();
        assert!(run_until(
            &mut w.mgr,
            || b.lock().unwrap().needs_reset(),
            Duration::from_secs(2)
        ));
        assert_eq!(r32(&mut w.transport, 0x70) & 0x40, 0x40);
        w32(&mut w.transport, 0x70, 0);
        assert_eq!(r32(&mut w.transport, 0x70), 0);
    }

    #[test]
    fn stats_timer_returns_the_buffer() {
        let cfg = BalloonConfig {
            stats_polling_interval_s: 1,
            ..BalloonConfig::default()
        };
        let mut w = world(cfg);
        let mut qs = linux_probe(&mut w.transport, &w.mem, QUEUE_BASE, u64::MAX);
        assert_eq!(qs.len(), 3);
        w.mgr.run_with_timeout(10).unwrap();
        let buf = stat(4, 1234);
        w.mem.write_slice(&buf, GuestAddress(BUF_BASE)).unwrap();
        qs[2].add_chain(&w.mem, &[(BUF_BASE, buf.len() as u32, false)]);
        w.transport.queue_evts()[2].write(1).unwrap();
        let b = w.balloon.clone();
        assert!(run_until(
            &mut w.mgr,
            || b.lock().unwrap().latest_stats().is_some(),
            Duration::from_secs(2)
        ));
        assert_eq!(qs[2].used_idx(&w.mem), 0, "held until the timer fires");
        let (mem, q) = (w.mem.clone(), &qs[2]);
        assert!(run_until(
            &mut w.mgr,
            || q.used_idx(&mem) == 1,
            Duration::from_secs(3)
        ));
        // Turning polling off disarms the timer.
        w.balloon
            .lock()
            .unwrap()
            .set_stats_polling_interval(0)
            .unwrap();
        w.mgr.run_with_timeout(10).unwrap();
        assert!(!w.balloon.lock().unwrap().stats_timer.is_armed().unwrap());
    }
}

// ----- free page reporting and hinting -------------------------------------------------

mod free_pages {
    use super::*;

    const MIB2: u64 = 2 * MIB;
    const MIB4: u64 = 4 * MIB;

    /// Records hinted ranges (`.0`) and the rounds the guest stopped (`.1`).
    #[derive(Default)]
    struct Sink(Mutex<Vec<(u32, GpaRange)>>, Mutex<Vec<u32>>);
    impl HintSink for Sink {
        fn hinted(&self, cmd_id: u32, range: GpaRange) {
            self.0.lock().unwrap().push((cmd_id, range));
        }
        fn round_stopped(&self, cmd_id: u32) {
            self.1.lock().unwrap().push(cmd_id);
        }
    }

    fn all_cfg() -> BalloonConfig {
        BalloonConfig {
            stats_polling_interval_s: 1,
            free_page_hint: true,
            free_page_reporting: true,
            page_poison: true,
            ..BalloonConfig::default()
        }
    }

    const FP: usize = 3;
    const REP: usize = 4;

    #[test]
    fn phase2_features_and_queue_sizes() {
        let fx = all_fixture(all_cfg());
        assert_eq!(fx.balloon.max_queues(), 5);
        assert_eq!(fx.balloon.queue_max_sizes(), vec![256, 256, 256, 1024, 32]);
        // Reporting alone sits right after deflate.
        let cfg = BalloonConfig {
            free_page_reporting: true,
            ..BalloonConfig::default()
        };
        let fx = fixture_with(cfg, features(&[VIRTIO_BALLOON_F_REPORTING]));
        assert_eq!(fx.balloon.queue_max_sizes(), vec![256, 256, 32]);
    }

    #[test]
    fn report_is_discarded_and_returned() {
        let mut fx = all_fixture(all_cfg());
        let bufs = [
            (0, MIB2 as u32, true),
            (MIB4, MIB2 as u32, true),
            (HIGH, MIB4 as u32, true),
        ];
        fx.queues[REP].add_chain(&fx.mem, &bufs);
        fx.balloon.process_queue(REP);
        assert_eq!(
            fx.discard.discarded(),
            vec![
                GpaRange::new(0, MIB2),
                GpaRange::new(MIB4, MIB2),
                GpaRange::new(HIGH, MIB4)
            ]
        );
        assert_eq!(fx.used(REP), 1);
        assert_eq!(fx.irq.vring(), 1);
        let m = fx.balloon.metrics().snapshot();
        assert_eq!(m.reported_pages, (MIB2 * 2 + MIB4) / 4096);
        assert_eq!(m.reported_discard_bytes, MIB2 * 2 + MIB4);
        assert_eq!(fx.balloon.inflated_pages(), 0, "reports are not inflations");
    }

    #[test]
    fn report_with_poison_value_keeps_content() {
        let mut fx = all_fixture(all_cfg());
        fx.balloon.write_config(0xc, &0xaaaa_aaaau32.to_le_bytes());
        fx.queues[REP].add_chain(&fx.mem, &[(0, MIB2 as u32, true)]);
        fx.balloon.process_queue(REP);
        assert!(fx.discard.discarded().is_empty());
        assert_eq!(fx.used(REP), 1);
        assert_eq!(fx.balloon.metrics().snapshot().reported_pages, MIB2 / 4096);
        // poison_val 0 (init_on_free) is fine to discard.
        fx.balloon.write_config(0xc, &0u32.to_le_bytes());
        fx.queues[REP].add_chain(&fx.mem, &[(0, MIB2 as u32, true)]);
        fx.balloon.process_queue(REP);
        assert_eq!(fx.discard.discarded().len(), 1);
    }

    #[test]
    fn poison_value_without_the_feature_is_ignored() {
        let cfg = BalloonConfig {
            free_page_reporting: true,
            ..BalloonConfig::default()
        };
        let mut fx = fixture_with(cfg, features(&[VIRTIO_BALLOON_F_REPORTING]));
        fx.balloon.write_config(0xc, &0xaau32.to_le_bytes());
        fx.queues[2].add_chain(&fx.mem, &[(0, MIB2 as u32, true)]);
        fx.balloon.process_queue(2);
        assert_eq!(fx.discard.discarded().len(), 1);
    }

    /// Reported pages stay the guest's, which may use them again at once:
    /// they go to the backing as free pages (`discard_free`), unlike the
    /// balloon's own.
    #[test]
    fn reported_pages_are_discarded_as_free_pages() {
        let mut fx = all_fixture(all_cfg());
        fx.queues[REP].add_chain(&fx.mem, &[(MIB2, MIB2 as u32, true)]);
        fx.balloon.process_queue(REP);
        fx.send_pfns(0, &[0x900]);
        let report = GpaRange::new(MIB2, MIB2);
        assert_eq!(*fx.discard.free.lock().unwrap(), vec![report]);
        assert_eq!(
            fx.discard.discarded(),
            vec![report, GpaRange::new(0x900 << 12, 1 << 12)]
        );
    }

    #[test]
    fn report_ranges_outside_ram_are_skipped() {
        let mut fx = all_fixture(all_cfg());
        let bufs = [
            (LOW_END - MIB, MIB2 as u32, true), // runs into the hole
            (3 * GIB, MIB2 as u32, true),       // in the hole
            (0x800, 0x1000, true),              // unaligned
            (MIB2, MIB2 as u32, true),          // fine
        ];
        fx.queues[REP].add_chain(&fx.mem, &bufs);
        fx.balloon.process_queue(REP);
        assert_eq!(fx.discard.discarded(), vec![GpaRange::new(MIB2, MIB2)]);
        assert_eq!(fx.used(REP), 1);
        assert!(!fx.balloon.needs_reset());
    }

    #[test]
    fn report_in_the_wrong_direction_is_ignored() {
        let mut fx = all_fixture(all_cfg());
        fx.queues[REP].add_chain(&fx.mem, &[(0, MIB2 as u32, false)]);
        fx.balloon.process_queue(REP);
        assert!(fx.discard.discarded().is_empty());
        assert_eq!(fx.used(REP), 1);
        assert_eq!(fx.balloon.metrics().snapshot().invalid_buffers, 1);
    }

    /// An indirect table of `n` chained 2 MiB device-writable entries at
    /// `table`, as a driver that negotiated VIRTIO_RING_F_INDIRECT_DESC
    /// would build for a report.
    fn write_indirect_report(fx: &Fx, table: u64, n: u16) {
        let next =
            VRING_DESC_F_NEXT as u16 | virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        for i in 0..n {
            let a = GuestAddress(table + 16 * u64::from(i));
            let flags = if i + 1 == n {
                next & !(VRING_DESC_F_NEXT as u16)
            } else {
                next
            };
            fx.mem.write_obj(u64::from(i) * MIB2 % LOW_END, a).unwrap();
            fx.mem
                .write_obj(MIB2 as u32, GuestAddress(a.0 + 8))
                .unwrap();
            fx.mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
            fx.mem.write_obj(i + 1, GuestAddress(a.0 + 14)).unwrap();
        }
    }

    #[test]
    fn a_report_through_an_indirect_table_breaks_the_device() {
        // The balloon never offers VIRTIO_RING_F_INDIRECT_DESC: a chain
        // whose head refers to an indirect table (here one of 40 entries,
        // more than the ring's 32) is a malformed queue, not a report.
        let mut fx = all_fixture(all_cfg());
        let table = BUF_BASE + 0x10000;
        write_indirect_report(&fx, table, 40);
        fx.queues[REP].write_desc(&fx.mem, 0, table, 40 * 16, VRING_DESC_F_INDIRECT as u16, 0);
        fx.publish_expecting_reset(REP, 0);
        assert!(fx.discard.discarded().is_empty());
        assert_eq!(fx.used(REP), 0);
    }

    #[test]
    fn an_indirect_descriptor_after_a_direct_one_breaks_the_device() {
        // The flag on the second descriptor of a chain, not its head.
        let mut fx = all_fixture(all_cfg());
        let table = BUF_BASE + 0x10000;
        write_indirect_report(&fx, table, 2);
        let w = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        fx.queues[REP].write_desc(&fx.mem, 0, 0, MIB2 as u32, w | VRING_DESC_F_NEXT as u16, 5);
        fx.queues[REP].write_desc(&fx.mem, 5, table, 2 * 16, VRING_DESC_F_INDIRECT as u16, 0);
        fx.publish_expecting_reset(REP, 0);
        assert!(fx.discard.discarded().is_empty());
    }

    #[test]
    fn an_indirect_inflate_buffer_breaks_the_device() {
        let mut fx = fixture();
        let len = write_pfns(&fx.mem, BUF_BASE, &[1, 2]);
        let table = BUF_BASE + 0x10000;
        fx.mem.write_obj(BUF_BASE, GuestAddress(table)).unwrap();
        fx.mem.write_obj(len, GuestAddress(table + 8)).unwrap();
        fx.mem.write_obj(0u16, GuestAddress(table + 12)).unwrap();
        fx.queues[0].write_desc(&fx.mem, 0, table, 16, VRING_DESC_F_INDIRECT as u16, 0);
        fx.publish_expecting_reset(0, 0);
        assert!(fx.discard.discarded().is_empty());
        assert_eq!(fx.balloon.inflated_pages(), 0);
    }

    #[test]
    fn report_chain_longer_than_the_queue_breaks_the_device() {
        let mut fx = all_fixture(all_cfg());
        // All 32 descriptors chained in a ring: a report that never ends.
        let flags = (VRING_DESC_F_NEXT | virtio_bindings::virtio_ring::VRING_DESC_F_WRITE) as u16;
        for i in 0..32u16 {
            fx.queues[REP].write_desc(&fx.mem, i, 0, MIB2 as u32, flags, (i + 1) % 32);
        }
        fx.publish_expecting_reset(REP, 0);
        assert!(fx.discard.discarded().is_empty());
    }

    /// Every queue, hinting on, and a sink that records what reaches it.
    fn fixture_with_sink() -> (Fx, Arc<Sink>) {
        let mut fx = all_fixture(all_cfg());
        let sink = Arc::new(Sink::default());
        fx.balloon.set_hint_sink(Some(sink.clone()));
        (fx, sink)
    }

    fn send_cmd(fx: &mut Fx, id: u32, writable: bool) {
        fx.mem
            .write_obj(id, GuestAddress(BUF_BASE + 0x8000))
            .unwrap();
        fx.queues[FP].add_chain(&fx.mem, &[(BUF_BASE + 0x8000, 4, writable)]);
        fx.balloon.process_queue(FP);
    }

    fn send_hint(fx: &mut Fx, addr: u64, len: u64) {
        fx.queues[FP].add_chain(&fx.mem, &[(addr, len as u32, true)]);
        fx.balloon.process_queue(FP);
    }

    fn cfg_cmd_id(fx: &Fx) -> u32 {
        let mut b = [0u8; 4];
        fx.balloon.read_config(8, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn hinting_round_reaches_the_sink() {
        let (mut fx, sink) = fixture_with_sink();
        let id = fx.balloon.start_hinting().unwrap();
        assert_eq!(id, 2);
        assert_eq!(cfg_cmd_id(&fx), 2);
        assert_eq!(fx.irq.config(), 1);
        assert_eq!(fx.balloon.hinting_status().state, HintingState::Requested);
        send_cmd(&mut fx, id, false);
        assert_eq!(fx.balloon.hinting_status().state, HintingState::Running);
        assert_eq!(fx.balloon.hinting_status().guest_cmd_id, Some(id));
        send_hint(&mut fx, MIB4, MIB4);
        send_hint(&mut fx, HIGH, MIB4);
        assert!(sink.1.lock().unwrap().is_empty(), "not stopped yet");
        send_cmd(&mut fx, FREE_PAGE_HINT_CMD_ID_STOP, false);
        assert_eq!(
            sink.1.lock().unwrap().as_slice(),
            &[id],
            "the guest's STOP wakes the sink with the round's id"
        );
        assert_eq!(
            sink.0.lock().unwrap().as_slice(),
            &[
                (2, GpaRange::new(MIB4, MIB4)),
                (2, GpaRange::new(HIGH, MIB4))
            ]
        );
        let st = fx.balloon.hinting_status();
        assert_eq!(st.state, HintingState::Stopped);
        assert_eq!(st.hinted_pages, 2 * MIB4 / 4096);
        assert!(fx.discard.discarded().is_empty(), "a sink means no discard");
        assert_eq!(fx.used(FP), 4, "every buffer is returned");
        fx.balloon.hinting_done().unwrap();
        assert_eq!(cfg_cmd_id(&fx), FREE_PAGE_HINT_CMD_ID_DONE);
        assert_eq!(fx.balloon.hinting_status().state, HintingState::Done);
        let m = fx.balloon.metrics().snapshot();
        assert_eq!(m.hint_rounds, 1);
        assert_eq!(m.hinted_pages, 2 * MIB4 / 4096);
    }

    #[test]
    fn hints_before_ack_or_under_a_stale_id_are_ignored() {
        let (mut fx, sink) = fixture_with_sink();
        // Before any round.
        send_hint(&mut fx, MIB4, MIB4);
        let old = fx.balloon.start_hinting().unwrap();
        // Before the ack.
        send_hint(&mut fx, MIB4, MIB4);
        send_cmd(&mut fx, old, false);
        let new = fx.balloon.start_hinting().unwrap();
        assert_eq!(new, old + 1);
        // The guest is still on the old round.
        send_hint(&mut fx, MIB4, MIB4);
        send_cmd(&mut fx, old, false);
        send_hint(&mut fx, MIB4, MIB4);
        assert!(sink.0.lock().unwrap().is_empty());
        send_cmd(&mut fx, new, false);
        send_hint(&mut fx, 0, MIB4);
        assert_eq!(
            sink.0.lock().unwrap().as_slice(),
            &[(new, GpaRange::new(0, MIB4))]
        );
        let m = fx.balloon.metrics().snapshot();
        assert_eq!(m.hints_ignored, 5);
        assert_eq!(fx.balloon.hinting_status().hinted_pages, MIB4 / 4096);
    }

    #[test]
    fn hinting_buffers_in_the_wrong_direction() {
        let (mut fx, sink) = fixture_with_sink();
        let id = fx.balloon.start_hinting().unwrap();
        // The ack as a writable buffer: a 4-byte "hint", not RAM-aligned.
        send_cmd(&mut fx, id, true);
        assert_eq!(fx.balloon.hinting_status().state, HintingState::Requested);
        send_cmd(&mut fx, id, false);
        // A hint as a readable buffer: not a 4-byte command.
        fx.queues[FP].add_chain(&fx.mem, &[(MIB4, MIB4 as u32, false)]);
        fx.balloon.process_queue(FP);
        // Mixed directions.
        fx.queues[FP].add_chain(&fx.mem, &[(BUF_BASE, 4, false), (MIB4, MIB4 as u32, true)]);
        fx.balloon.process_queue(FP);
        assert!(sink.0.lock().unwrap().is_empty());
        assert_eq!(fx.balloon.hinting_status().state, HintingState::Running);
        assert!(!fx.balloon.needs_reset());
        assert_eq!(fx.used(FP), 4);
        assert_eq!(fx.balloon.metrics().snapshot().invalid_buffers, 2);
    }

    #[test]
    fn hint_ranges_outside_ram_are_ignored() {
        let (mut fx, sink) = fixture_with_sink();
        let id = fx.balloon.start_hinting().unwrap();
        send_cmd(&mut fx, id, false);
        send_hint(&mut fx, 3 * GIB, MIB4);
        send_hint(&mut fx, LOW_END - MIB2, MIB4);
        assert!(sink.0.lock().unwrap().is_empty());
        assert_eq!(fx.balloon.metrics().snapshot().hints_ignored, 2);
    }

    #[test]
    fn hints_without_a_sink_are_counted_or_discarded() {
        // Count only.
        let mut fx = all_fixture(all_cfg());
        let id = fx.balloon.start_hinting().unwrap();
        send_cmd(&mut fx, id, false);
        send_hint(&mut fx, MIB4, MIB4);
        assert!(fx.discard.discarded().is_empty());
        assert_eq!(fx.balloon.hinting_status().hinted_pages, MIB4 / 4096);
        // Discard.
        let cfg = BalloonConfig {
            hint_discard: true,
            ..all_cfg()
        };
        let mut fx = all_fixture(cfg);
        let id = fx.balloon.start_hinting().unwrap();
        send_cmd(&mut fx, id, false);
        send_hint(&mut fx, MIB4, MIB4);
        assert_eq!(fx.discard.discarded(), vec![GpaRange::new(MIB4, MIB4)]);
        // As free pages: the guest keeps them (see `discard_free`).
        assert_eq!(*fx.discard.free.lock().unwrap(), fx.discard.discarded());
        assert_eq!(fx.balloon.metrics().snapshot().reported_discard_bytes, MIB4);
        // Discard, but the guest poisons free pages: keep them.
        let mut fx = all_fixture(cfg);
        fx.balloon.write_config(0xc, &0xaau32.to_le_bytes());
        let id = fx.balloon.start_hinting().unwrap();
        send_cmd(&mut fx, id, false);
        send_hint(&mut fx, MIB4, MIB4);
        assert!(fx.discard.discarded().is_empty());
    }

    #[test]
    fn hinting_api_errors() {
        let mut fx = fixture();
        assert!(matches!(
            fx.balloon.start_hinting(),
            Err(Error::HintingDisabled)
        ));
        // Offered but not negotiated.
        let mut fx = fixture_with(all_cfg(), features(&[VIRTIO_BALLOON_F_STATS_VQ]));
        assert!(matches!(
            fx.balloon.start_hinting(),
            Err(Error::HintingNotNegotiated(_))
        ));
        assert!(fx.balloon.stop_hinting().is_err());
        assert!(fx.balloon.hinting_done().is_err());
        // Not active.
        let d = Arc::new(RecordingDiscard::default());
        let mut b = Balloon::new(all_cfg(), ram(), d).unwrap();
        assert!(matches!(
            b.start_hinting(),
            Err(Error::HintingNotNegotiated(0))
        ));
    }

    #[test]
    fn cmd_id_is_read_only_and_reset_clears_hinting() {
        let mut fx = all_fixture(all_cfg());
        let id = fx.balloon.start_hinting().unwrap();
        fx.balloon.write_config(8, &7u32.to_le_bytes());
        assert_eq!(cfg_cmd_id(&fx), id);
        fx.balloon.stop_hinting().unwrap();
        assert_eq!(cfg_cmd_id(&fx), FREE_PAGE_HINT_CMD_ID_STOP);
        assert!(fx.balloon.reset());
        assert_eq!(fx.balloon.hinting_status().state, HintingState::Idle);
        assert_eq!(cfg_cmd_id(&fx), 0);
    }
}

// ----- garbage in, no panic ---------------------------------------------------------

/// Fill every ring (descriptor tables, available rings, buffers) with
/// pseudo-random bytes and let the device chew on them: it must never
/// panic, whatever it concludes.
#[test]
fn random_ring_contents_never_panic() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut totals = (0u64, 0u64, 0u64, 0u64);
    for round in 0..300 {
        let cfg = BalloonConfig {
            stats_polling_interval_s: 1,
            free_page_hint: true,
            free_page_reporting: true,
            page_poison: true,
            hint_discard: round % 2 == 0,
            ..BalloonConfig::default()
        };
        let mut fx = all_fixture(cfg);
        if round % 3 == 0 {
            let _ = fx.balloon.start_hinting();
        }
        for q in 0..fx.queues.len() {
            let (desc, size) = (fx.queues[q].desc, u64::from(fx.queues[q].size));
            // Descriptors: random, but with addresses mostly inside RAM so
            // the parsers get exercised, not just the bounds checks.
            for i in 0..size {
                let r = next();
                let addr = match r % 4 {
                    0 => r >> 8,
                    1 => BUF_BASE + (r >> 40) % 0x10000,
                    2 => HIGH + (r >> 40) % (16 * MIB),
                    _ => (r >> 20) % LOW_END,
                };
                let a = GuestAddress(desc + 16 * i);
                fx.mem.write_obj(addr, a).unwrap();
                fx.mem
                    .write_obj((next() % 0x2000) as u32, GuestAddress(a.0 + 8))
                    .unwrap();
                // Fully random flags one round in four; otherwise mostly
                // single-descriptor chains so later queues get a turn too.
                let mut flags = (next() % 8) as u16;
                if round % 4 != 0 {
                    flags &= !(VRING_DESC_F_INDIRECT as u16);
                    if next() % 8 != 0 {
                        flags &= !(VRING_DESC_F_NEXT as u16);
                    }
                }
                fx.mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
                fx.mem
                    .write_obj((next() % (size + 4)) as u16, GuestAddress(a.0 + 14))
                    .unwrap();
            }
            for i in 0..size {
                fx.mem
                    .write_obj(
                        (next() % (size + 2)) as u16,
                        GuestAddress(fx.queues[q].avail + 4 + 2 * i),
                    )
                    .unwrap();
            }
            let idx = if round % 4 == 0 {
                (next() % (size + size / 4)) as u16
            } else {
                (next() % size) as u16
            };
            fx.queues[q].set_avail_idx(&fx.mem, idx);
        }
        let junk: Vec<u8> = (0..0x10000).map(|_| next() as u8).collect();
        fx.mem.write_slice(&junk, GuestAddress(BUF_BASE)).unwrap();
        for q in 0..fx.queues.len() {
            fx.balloon.process_queue(q);
        }
        fx.balloon.request_stats();
        let m = fx.balloon.metrics().snapshot();
        totals.0 += m.inflate_requests + m.deflate_requests;
        totals.1 += m.queue_errors;
        totals.2 += m.discard_calls;
        totals.3 += m.invalid_buffers;
        // Whatever happened, the device can be reset.
        assert!(fx.balloon.reset());
    }
    eprintln!(
        "buffers {} queue errors {} discards {} invalid buffers {}",
        totals.0, totals.1, totals.2, totals.3
    );
    // The garbage exercised the parsers, not only the structural checks.
    assert!(totals.0 > 0 && totals.1 > 0 && totals.2 > 0 && totals.3 > 0);
}

#[test]
fn balloon_is_send_for_the_event_loop() {
    fn assert_send<T: Send>() {}
    assert_send::<Balloon>();
    let d = Arc::new(RecordingDiscard::default());
    let b = Arc::new(Mutex::new(
        Balloon::new(BalloonConfig::default(), ram(), d).unwrap(),
    ));
    let _as_device: Arc<Mutex<dyn VirtioDevice>> = b.clone();
    let _as_subscriber: Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>> =
        Arc::new(Mutex::new(BalloonEvents::new(b)));
}

// ----- chunked ranges (VIRTIO_BALLOON_F_BLIMP_SG) --------------------------------

mod sg {
    use super::*;

    fn sg_fixture(must_tell_host: bool) -> Fx {
        let cfg = BalloonConfig {
            sg: true,
            must_tell_host,
            ..BalloonConfig::default()
        };
        let mut bits = vec![VIRTIO_BALLOON_F_BLIMP_SG];
        if must_tell_host {
            bits.push(VIRTIO_BALLOON_F_MUST_TELL_HOST);
        }
        fixture_with(cfg, features(&bits))
    }

    impl Fx {
        /// One chain of device-writable ranges on queue `q`, processed.
        fn send_ranges(&mut self, q: usize, ranges: &[(u64, u32)]) -> u16 {
            let bufs: Vec<(u64, u32, bool)> = ranges.iter().map(|&(a, l)| (a, l, true)).collect();
            let head = self.queues[q].add_chain(&self.mem, &bufs);
            self.balloon.process_queue(q);
            head
        }
        fn metric(&self, f: impl Fn(&BalloonMetricsSnapshot) -> u64) -> u64 {
            f(&self.balloon.metrics().snapshot())
        }
    }

    #[test]
    fn the_bit_is_offered_only_with_sg_on() {
        let d = Arc::new(RecordingDiscard::default());
        let off = Balloon::new(BalloonConfig::default(), ram(), d.clone()).unwrap();
        assert_eq!(off.avail_features() & (1 << VIRTIO_BALLOON_F_BLIMP_SG), 0);
        let cfg = BalloonConfig {
            sg: true,
            ..BalloonConfig::default()
        };
        let on = Balloon::new(cfg, ram(), d).unwrap();
        assert_ne!(on.avail_features() & (1 << VIRTIO_BALLOON_F_BLIMP_SG), 0);
        assert_eq!(on.max_queues(), 2, "no queue of its own");
    }

    #[test]
    fn ranges_inflate_and_deflate_with_one_discard_each() {
        let mut fx = sg_fixture(false);
        // Two ranges in one chain, one of them in high RAM, and a second
        // buffer: 1 MiB at 2 MiB, 4 MiB at 4 GiB + 4 MiB, 64 KiB at 8 MiB.
        let head = fx.send_ranges(
            0,
            &[(2 * MIB, MIB as u32), (HIGH + 4 * MIB, 4 * MIB as u32)],
        );
        fx.send_ranges(0, &[(8 * MIB, 0x10000)]);
        assert_eq!(fx.used(0), 2);
        assert_eq!(fx.queues[0].used_elem(&fx.mem, 0), (u32::from(head), 0));
        assert_eq!(
            fx.discard.discarded(),
            vec![
                GpaRange::new(2 * MIB, MIB),
                GpaRange::new(HIGH + 4 * MIB, 4 * MIB),
                GpaRange::new(8 * MIB, 0x10000)
            ]
        );
        assert_eq!(fx.balloon.inflated_pages(), 256 + 1024 + 16);
        assert!(fx.balloon.is_inflated((HIGH + 4 * MIB) >> 12));
        assert!(!fx.balloon.is_inflated((HIGH + 8 * MIB) >> 12));
        assert_eq!(fx.metric(|m| m.inflate_ranges), 3);
        assert_eq!(fx.metric(|m| m.inflate_pages), 1296);
        assert_eq!(fx.metric(|m| m.inflate_requests), 2);
        // Deflate part of one range: the rest stays in the balloon.
        fx.send_ranges(1, &[(HIGH + 4 * MIB, 2 * MIB as u32)]);
        assert_eq!(fx.used(1), 1);
        assert_eq!(
            fx.discard.needed(),
            vec![GpaRange::new(HIGH + 4 * MIB, 2 * MIB)]
        );
        assert_eq!(fx.balloon.inflated_pages(), 1296 - 512);
        assert!(!fx.balloon.is_inflated((HIGH + 4 * MIB) >> 12));
        assert!(fx.balloon.is_inflated((HIGH + 6 * MIB) >> 12));
        assert_eq!(fx.metric(|m| m.deflate_ranges), 1);
        assert_eq!(fx.metric(|m| m.invalid_ranges), 0);
        assert!(!fx.balloon.needs_reset());
    }

    #[test]
    fn with_must_tell_host_the_discard_follows_the_used_buffer() {
        let mut fx = sg_fixture(true);
        fx.discard.watch.lock().unwrap().replace(fx.irq.clone());
        fx.send_ranges(0, &[(4 * MIB, 4 * MIB as u32)]);
        assert_eq!(
            fx.discard.discarded(),
            vec![GpaRange::new(4 * MIB, 4 * MIB)]
        );
        assert_eq!(*fx.discard.vring_at_discard.lock().unwrap(), vec![1]);
    }

    #[test]
    fn hostile_ranges_are_refused_and_the_device_survives() {
        let mut fx = sg_fixture(false);
        fx.send_ranges(0, &[(MIB, 0x4000)]); // pages 0x100..0x104 inflated
        fx.discard.discards.lock().unwrap().clear();
        let cases: &[(u64, u32)] = &[
            (MIB + 0x800 + 0x10000, 0x1000), // unaligned start
            (2 * MIB, 0x1800),               // unaligned length
            (2 * MIB, 0),                    // empty
            (LOW_END, 0x1000),               // just past low RAM (hole)
            (0xd000_0000, 0x1000),           // MMIO hole
            (LOW_END - 0x1000, 0x2000),      // spanning into the hole
            (HIGH + 16 * MIB, 0x1000),       // beyond the end of RAM
            (u64::MAX - 0xfff, 0x1000),      // overflowing
            (MIB + 0x2000, 0x4000),          // partly already inflated
        ];
        fx.send_ranges(0, cases);
        // A good range in the same chain still applies.
        fx.send_ranges(0, &[(3 * MIB, 0x1000), (MIB, 0x1000)]);
        assert_eq!(fx.discard.discarded(), vec![GpaRange::new(3 * MIB, 0x1000)]);
        assert_eq!(fx.metric(|m| m.invalid_ranges), cases.len() as u64 + 1);
        assert_eq!(fx.balloon.inflated_pages(), 5);
        // Deflates of pages not in the balloon, and a device-readable range.
        fx.send_ranges(1, &[(5 * MIB, 0x1000), (MIB, 0x8000)]);
        fx.queues[1].add_chain(&fx.mem, &[(MIB, 0x1000, false)]);
        fx.balloon.process_queue(1);
        assert!(fx.discard.needed().is_empty());
        assert_eq!(fx.metric(|m| m.invalid_ranges), cases.len() as u64 + 4);
        assert_eq!(fx.balloon.inflated_pages(), 5);
        assert_eq!((fx.used(0), fx.used(1)), (3, 2), "every buffer is returned");
        assert!(!fx.balloon.needs_reset());
        // The device still works.
        fx.send_ranges(1, &[(MIB, 0x4000)]);
        assert_eq!(fx.balloon.inflated_pages(), 1);
    }

    #[test]
    fn a_malformed_chain_needs_a_reset() {
        let mut fx = sg_fixture(false);
        // Descriptor 0 chains to itself: a loop.
        fx.queues[0].write_desc(&fx.mem, 0, MIB, 0x1000, (VRING_DESC_F_NEXT | 2) as u16, 0);
        fx.publish_expecting_reset(0, 0);
        assert_eq!(fx.balloon.inflated_pages(), 0);
        assert!(fx.discard.discarded().is_empty());
    }

    #[test]
    fn pfn_arrays_still_work_without_the_bit() {
        // Offered but not acked: buffers are PFN arrays as before.
        let cfg = BalloonConfig {
            sg: true,
            ..BalloonConfig::default()
        };
        let mut fx = fixture_with(cfg, features(&[]));
        fx.send_pfns(0, &[0x200, 0x201]);
        assert_eq!(fx.balloon.inflated_pages(), 2);
        assert_eq!(fx.metric(|m| m.inflate_ranges), 0);
    }

    /// A driver that re-adds the same buffer as soon as it is used, for
    /// ever, cannot keep a drain (and the event loop behind it) to itself:
    /// it ends after MAX_CHAINS_PER_DRAIN chains and says there may be more.
    #[test]
    fn a_driver_that_never_stops_adding_cannot_keep_the_drain() {
        use super::super::queue::{MAX_CHAINS_PER_DRAIN, Notify, drain_chains};
        let fx = fixture();
        let mut dq = DriverQueue::new(&fx.mem, QUEUE_BASE + 0x40000, 256);
        let mut q = dq.queue();
        let mem = fx.mem.clone();
        let head = dq.add_chain(&mem, &[(BUF_BASE, 4, false)]);
        let mut served = 0;
        let drain = drain_chains(&mut q, &fx.mem, None, Notify::WhileBusy, None, |h, _| {
            served += 1;
            // Without a budget this would go on for ever: fail instead.
            assert!(served <= 10 * MAX_CHAINS_PER_DRAIN, "the drain never ends");
            dq.publish(&mem, head);
            Some(h)
        });
        assert!(drain.broken.is_none());
        assert!(drain.more);
        assert_eq!(served, MAX_CHAINS_PER_DRAIN);
    }

    /// A drain stopped at its budget comes back to the queue through the
    /// queue's eventfd, after whatever else the event loop has ready; those
    /// wake-ups are not counted as the guest's kicks.
    #[test]
    fn a_drain_at_its_budget_resumes_through_the_eventfd() {
        use super::super::queue::MAX_CHAINS_PER_DRAIN;
        let mut fx = fixture();
        let n = MAX_CHAINS_PER_DRAIN + 6;
        for i in 0..n {
            // One page each, none adjacent.
            let at = BUF_BASE + 4 * i as u64;
            let len = write_pfns(&fx.mem, at, &[0x200 + 2 * i as u32]);
            fx.queues[0].add_chain(&fx.mem, &[(at, len, false)]);
        }
        fn evt(fx: &Fx) -> &super::super::device::ActiveQueue {
            &fx.balloon.active.as_ref().unwrap().queues[0]
        }
        evt(&fx).evt.write(1).unwrap(); // the guest's one kick
        let late = fx.balloon.serve_queue(0);
        late.run(&*fx.balloon.discard, &fx.balloon.metrics);
        assert_eq!(usize::from(fx.used(0)), MAX_CHAINS_PER_DRAIN);
        assert_eq!(evt(&fx).resumes, 1);
        assert_eq!(fx.balloon.metrics().snapshot().drain_yields, 1);
        // The event loop wakes again: one kick, not two.
        let q = &mut fx.balloon.active.as_mut().unwrap().queues[0];
        assert_eq!(q.take_kicks(), 1);
        assert_eq!(q.resumes, 0);
        let late = fx.balloon.serve_queue(0);
        late.run(&*fx.balloon.discard, &fx.balloon.metrics);
        assert_eq!(usize::from(fx.used(0)), n);
        assert_eq!(evt(&fx).resumes, 0, "nothing left: no wake-up");
        assert_eq!(fx.balloon.inflated_pages(), n as u64);
        assert_eq!(fx.discard.discarded().len(), n);
    }

    /// PFN arrays of scattered pages cost a discard call per page: a
    /// drain gives the event loop back once it has queued
    /// MAX_DISCARDS_PER_TURN of them (finishing the chain it is on), and
    /// serves the rest on the next turn. 64 such arrays held the API for
    /// seconds before.
    #[test]
    fn scattered_pages_give_the_event_loop_back_after_a_turn_of_discards() {
        use super::super::queue::MAX_DISCARDS_PER_TURN;
        let mut fx = fixture();
        // Every other page of guest RAM, 1024 per array: 4096 in 4 arrays
        // (MAX_DISCARDS_PER_TURN), then one more array of the same pages.
        let low = (0..LOW_END / 4096).step_by(2);
        let high = (HIGH / 4096..(HIGH + 16 * MIB) / 4096).step_by(2);
        let pages: Vec<u32> = low.chain(high).map(|p| p as u32).collect();
        assert_eq!(pages.len(), MAX_DISCARDS_PER_TURN);
        let arrays: Vec<&[u32]> = pages.chunks(1024).chain([&pages[..1024]]).collect();
        for (i, array) in arrays.iter().enumerate() {
            let at = BUF_BASE + 4096 * i as u64;
            let len = write_pfns(&fx.mem, at, array);
            fx.queues[0].add_chain(&fx.mem, &[(at, len, false)]);
        }
        fn q(fx: &mut Fx) -> &mut super::super::device::ActiveQueue {
            &mut fx.balloon.active.as_mut().unwrap().queues[0]
        }
        q(&mut fx).evt.write(1).unwrap();
        let late = fx.balloon.serve_queue(0);
        late.run(&*fx.balloon.discard, &fx.balloon.metrics);
        assert_eq!(fx.used(0), 4, "the drain stops after a turn's discards");
        assert_eq!(fx.discard.discarded().len(), MAX_DISCARDS_PER_TURN);
        assert_eq!(q(&mut fx).resumes, 1, "and comes back to the queue");
        assert_eq!(q(&mut fx).take_kicks(), 1);
        let late = fx.balloon.serve_queue(0);
        late.run(&*fx.balloon.discard, &fx.balloon.metrics);
        assert_eq!(fx.used(0), 5);
        assert_eq!(fx.balloon.inflated_pages(), MAX_DISCARDS_PER_TURN as u64);
        // The last array's pages were in the balloon already: no call.
        assert_eq!(fx.discard.discarded().len(), MAX_DISCARDS_PER_TURN);
    }

    /// Pages sent again while in the balloon are not discarded again (they
    /// were when they went in): a driver repeating the same PFNs costs no
    /// host calls. Out and back in, they are.
    #[test]
    fn pages_already_in_the_balloon_are_not_discarded_again() {
        let mut fx = fixture();
        fx.send_pfns(0, &[0x200, 0x202]);
        fx.send_pfns(0, &[0x200, 0x202]);
        fx.send_pfns(0, &[0x202]);
        assert_eq!(fx.balloon.inflated_pages(), 2);
        assert_eq!(fx.discard.discarded().len(), 2);
        // One run of which one page is new: the run is discarded.
        fx.send_pfns(0, &[0x202, 0x203]);
        assert_eq!(fx.discard.discarded().len(), 3);
        fx.send_pfns(1, &[0x200]);
        fx.send_pfns(0, &[0x200]);
        assert_eq!(fx.discard.discarded().len(), 4);
        assert_eq!(fx.balloon.inflated_pages(), 3);
    }

    /// A driver that adds a buffer just inside every poll window cannot
    /// keep the event loop polling: the drain ends within its budget.
    #[test]
    fn a_trickling_driver_cannot_keep_the_device_polling() {
        use super::super::queue::{MAX_POLLED_DRAIN, Notify, drain_chains};
        use std::time::{Duration, Instant};
        let cfg = BalloonConfig {
            free_page_hint: true,
            ..BalloonConfig::default()
        };
        let fx = fixture_with(cfg, features(&[VIRTIO_BALLOON_F_FREE_PAGE_HINT]));
        assert_eq!(
            fx.balloon.notify_mode(QueueKind::FreePage),
            Notify::Poll(super::super::device::HINT_POLL_WINDOW)
        );
        let mut dq = DriverQueue::new(&fx.mem, QUEUE_BASE + 0x40000, 256);
        let mut q = dq.queue();
        let used_ring = dq.used;
        let mem = fx.mem.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        // A buffer every millisecond for up to 2 s, against a 1 s window.
        let trickle = std::thread::spawn(move || {
            let t = Instant::now();
            let mut sent = 0u32;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed)
                && t.elapsed() < Duration::from_secs(2)
            {
                if sent.wrapping_sub(u32::from(dq.used_idx(&mem))) < 64 {
                    dq.add_chain(&mem, &[(BUF_BASE, 4, false)]);
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            sent
        });
        std::thread::sleep(Duration::from_millis(5));
        let t = Instant::now();
        let mut served = 0;
        let drain = drain_chains(
            &mut q,
            &fx.mem,
            None,
            Notify::Poll(Duration::from_secs(1)),
            None,
            |head, _| {
                served += 1;
                Some(head)
            },
        );
        let took = t.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = trickle.join().unwrap();
        assert!(drain.broken.is_none());
        assert!(served >= 1 && sent >= served);
        // The trickle alone would keep it going for 2 s.
        assert!(MAX_POLLED_DRAIN <= Duration::from_millis(100));
        assert!(
            took < Duration::from_millis(600),
            "the drain polled for {took:?}"
        );
        let flags: u16 = fx.mem.read_obj(GuestAddress(used_ring)).unwrap();
        assert_eq!(flags, 0, "notifications are on again");
    }

    #[test]
    fn notifications_are_off_only_while_the_device_serves_a_queue() {
        let mut fx = sg_fixture(false);
        let used_flags = |fx: &Fx, q: usize| -> u16 {
            fx.mem.read_obj(GuestAddress(fx.queues[q].used)).unwrap()
        };
        fx.send_ranges(0, &[(MIB, 0x1000)]);
        assert_eq!(
            used_flags(&fx, 0),
            0,
            "notifications are on again after a drain"
        );
        // The old behaviour never touches the flags.
        let cfg = BalloonConfig {
            sg: true,
            notify_suppression: false,
            ..BalloonConfig::default()
        };
        let mut fx = fixture_with(cfg, features(&[VIRTIO_BALLOON_F_BLIMP_SG]));
        fx.send_ranges(0, &[(MIB, 0x1000)]);
        assert_eq!(used_flags(&fx, 0), 0);
        assert_eq!(
            fx.balloon.notify_mode(QueueKind::FreePage),
            super::super::queue::Notify::Always
        );
    }
}
