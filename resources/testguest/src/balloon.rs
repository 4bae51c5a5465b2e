//! virtio balloon driver, behaving like Linux drivers/virtio/virtio_balloon.c
//! (6.12): same queue numbering, same batch size, same order of operations
//! (tell the host before reusing deflated pages, write `actual` after each
//! batch), same statistics protocol.
//!
//! It is cooperative: [`Balloon::service`] runs whenever the guest waits and
//! between chunks of long commands; it picks up configuration changes
//! (reported by the interrupt stub, or polled with `testguest.poll=1`),
//! moves the balloon towards `num_pages` and refills the statistics buffer.

use testguest::balloon_proto::*;
use testguest::frames::PAGE_SIZE;
use testguest::virtq::{
    Buf, Layout, MAX_QUEUE_SIZE, RawDesc, SplitQueue, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
};

use crate::apic;
use crate::clock;
use crate::events::{self, BURST_MAX, Burst, BurstQueue, DevCall};
use crate::idle;
use crate::memory::Memory;
use crate::virtio::mmio::{self, Mmio};
use testguest::cmdline::MmioDevice;
use testguest::command::HostileCase;

/// Features this driver accepts when offered. PAGE_POISON is only taken
/// while the guest poisons free pages (`poison BYTE`), as Linux does.
const DRIVER_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_BALLOON_F_MUST_TELL_HOST)
    | bit(VIRTIO_BALLOON_F_STATS_VQ)
    | bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
    | bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT)
    | bit(VIRTIO_BALLOON_F_PAGE_POISON)
    | bit(VIRTIO_BALLOON_F_REPORTING);

/// VIRTIO_BALLOON_F_BLIMP_SG is taken when offered unless the command
/// line says `testguest.sg=0` (see [`set_sg_allowed`]).
static SG_ALLOWED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(true);

/// `testguest.sg=0` turns the chunked protocol off (set once at boot).
pub fn set_sg_allowed(on: bool) {
    SG_ALLOWED.store(on, core::sync::atomic::Ordering::Relaxed);
}

/// Longest range of one chunked descriptor: 4 GiB − 4 KiB, in pages.
const MAX_RANGE_PAGES: u64 = ((1 << 32) - PAGE_SIZE) / PAGE_SIZE;

/// Linux VIRTIO_BALLOON_HINT_BLOCK_ORDER: hinted blocks are 4 MiB.
const HINT_BLOCK_ORDER: u32 = 10;
/// Linux PAGE_REPORTING_MIN_ORDER on x86 (pageblock order): 2 MiB ranges.
const REPORT_ORDER: u32 = 9;
/// Linux PAGE_REPORTING_CAPACITY: ranges per report.
const REPORT_CAPACITY: usize = 32;

/// Linux retries a failed inflate allocation after 200 ms ("Out of puff!").
const OUT_OF_PUFF_RETRY_NS: u64 = 200_000_000;
/// How long hostile sends wait for the device to return their buffer.
const HOSTILE_WAIT_NS: u64 = 1_000_000_000;
/// How long `hostile hint-outside-ram` waits for the host to start a
/// hinting round (`hostile all` waits HOSTILE_WAIT_NS only).
const HOSTILE_ROUND_WAIT_NS: u64 = 10_000_000_000;
/// A guest-physical address in the MMIO hole (below the LAPIC/IOAPIC).
const MMIO_HOLE_ADDR: u64 = 0xd000_0000;
/// How long `hostile flood` keeps the inflate ring full.
const HOSTILE_FLOOD_NS: u64 = 6_000_000_000;
/// Descriptors in `hostile report-too-long`'s report (the spec allows 32).
const HOSTILE_REPORT_LEN: usize = 40;

/// The register accesses Linux makes right after the device acknowledges
/// an inflate or deflate request: update_balloon_size() writes `actual`,
/// and while the target is not reached the next towards_target() reads
/// `num_pages`.
#[derive(Clone, Copy)]
struct AfterAck {
    actual: u32,
    read_target: bool,
}

/// What tell_host() learnt.
#[derive(Default)]
struct Told {
    /// The device returned the buffer.
    acked: bool,
    /// `num_pages`, if [`AfterAck::read_target`] asked for it.
    target: Option<u32>,
}

// Layout of the driver's data page.
const PFNS_OFFSET: u64 = 0;
const STATS_OFFSET: u64 = 0x400;
const CMD_ID_ACTIVE_OFFSET: u64 = 0x600;
const CMD_ID_STOP_OFFSET: u64 = 0x604;
const HOSTILE_OFFSET: u64 = 0x800;

pub struct Balloon {
    dev: Mmio,
    gsi: u32,
    /// Index in the interrupt tables (None in poll mode).
    irq: Option<usize>,
    /// Negotiated features and the queues (replaced by a restart).
    live: Live,
    /// Free page hinting: the command id being served (Linux
    /// cmd_id_active), hinted blocks held (in `areas.hints`), counters.
    hint_active: u32,
    hinted: usize,
    hint_rounds: u64,
    hinted_total: u64,
    areas: Areas,
    /// Identity-mapped page for PFN arrays, the stats buffer and scratch.
    data: u64,
    /// Head descriptor of the real stats buffer while the device holds it.
    stats_head: Option<u16>,
    stats_vals: [u64; NUM_STATS],
    stats_sent: u64,
    /// InterruptStatus bits not yet handled.
    pending_isr: u32,
    /// Move towards num_pages on the next service (config changed).
    adjust: bool,
    /// Don't retry inflating before this time (out of memory).
    retry_at_ns: u64,
    config_generation: u32,
    alloc_stalls: u64,
    /// Pages scanned and reclaimed by allocations that waited for memory
    /// (the `ramp` workload), as Linux's pgscan_direct / pgsteal_direct.
    direct_scans: u64,
    direct_reclaims: u64,
    /// Bursts made, requests they made, and requests a burst left
    /// in flight (stopped by a configuration change) for ring 3 to finish.
    bursts: u64,
    burst_requests: u64,
    burst_handoffs: u64,
    /// `balloon-handoff`: the next burst leaves its first request in flight.
    handoff_next: bool,
    /// The device reported DEVICE_NEEDS_RESET: nothing more is sent until
    /// `balloon` restarts it.
    broken: bool,
    /// Whether the current service() call may answer stats requests.
    answer_stats: bool,
    /// Chunked (VIRTIO_BALLOON_F_BLIMP_SG) requests made (one kick each
    /// unless suppressed) and the ranges they carried.
    sg_requests: u64,
    sg_ranges: u64,
}

#[derive(Debug)]
pub enum StartError {
    NoDevice,
    Probe(mmio::ProbeError),
    Legacy,
    FeaturesRejected,
    Queue(u16, &'static str),
    NoMemory,
    Irq(&'static str),
}

impl core::fmt::Display for StartError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StartError::NoDevice => write!(
                f,
                "no virtio balloon on the command line (virtio_mmio.device=)"
            ),
            StartError::Probe(e) => write!(f, "{e}"),
            StartError::Legacy => write!(f, "device does not offer VIRTIO_F_VERSION_1"),
            StartError::FeaturesRejected => {
                write!(f, "device rejected the features (FEATURES_OK not kept)")
            }
            StartError::Queue(i, e) => write!(f, "queue {i}: {e}"),
            StartError::NoMemory => write!(f, "out of memory for the virtqueues"),
            StartError::Irq(e) => write!(f, "interrupt routing: {e}"),
        }
    }
}

/// Sets up queue `index` (at most `MAX_QUEUE_SIZE` entries) in the two
/// frames at `area`.
fn setup_queue(dev: &Mmio, index: u16, area: u64) -> Result<SplitQueue, StartError> {
    let max = dev.queue_num_max(index);
    if max == 0 {
        return Err(StartError::Queue(index, "QueueNumMax is 0"));
    }
    let size = max.min(u32::from(MAX_QUEUE_SIZE)) as u16;
    let layout = Layout::new(size);
    debug_assert!(layout.total <= QUEUE_AREA);
    // SAFETY: the area was allocated to this queue for good.
    let q = unsafe { SplitQueue::new(area, layout) };
    dev.setup_queue(index, &q)
        .map_err(|e| StartError::Queue(index, e))?;
    Ok(q)
}

/// Bytes of one PFN array (ARRAY_PFNS_MAX le32 entries).
const BURST_ARRAY_BYTES: u64 = 4 * ARRAY_PFNS_MAX as u64;

/// Bytes reserved per queue: two frames hold any queue of up to 256 entries.
const QUEUE_AREA: u64 = 2 * PAGE_SIZE;

/// Guest memory the driver keeps for the device's whole life.
#[derive(Clone, Copy)]
struct Areas {
    /// inflate, deflate, stats, free page, reporting.
    queues: [u64; 5],
    data: u64,
    /// PFNs of hinted 4 MiB blocks held until the host says DONE.
    hints: u64,
    hints_cap: usize,
    /// BURST_MAX PFN arrays of ARRAY_PFNS_MAX entries for bursts.
    burst: u64,
}

impl Areas {
    fn alloc(mem: &mut Memory) -> Option<Areas> {
        let mut queues = [0; 5];
        for q in &mut queues {
            *q = mem.frames.alloc_block(1)? * PAGE_SIZE;
        }
        let hints_cap = (mem.nframes() >> HINT_BLOCK_ORDER) as usize + 1;
        let order = (hints_cap as u64 * 4)
            .div_ceil(PAGE_SIZE)
            .next_power_of_two()
            .trailing_zeros();
        let hints = mem.frames.alloc_block(order)? * PAGE_SIZE;
        let burst_order = (BURST_ARRAY_BYTES * BURST_MAX as u64)
            .div_ceil(PAGE_SIZE)
            .next_power_of_two()
            .trailing_zeros();
        Some(Areas {
            queues,
            data: mem.frames.alloc()? * PAGE_SIZE,
            hints,
            hints_cap,
            burst: mem.frames.alloc_block(burst_order)? * PAGE_SIZE,
        })
    }
}

/// A device after feature negotiation and queue setup: what `balloon`
/// (and a restart) sets up anew.
struct Live {
    /// Negotiated features.
    features: u64,
    inflate: SplitQueue,
    deflate: SplitQueue,
    stats: Option<SplitQueue>,
    free_page: Option<SplitQueue>,
    reporting: Option<SplitQueue>,
    /// Queue indices as Linux numbers them (no gaps for absent features).
    stats_qidx: u16,
    free_page_qidx: u16,
    reporting_qidx: u16,
}

/// Device initialisation (spec 3.1.1) up to, not including, DRIVER_OK.
fn init_device(dev: &Mmio, areas: &Areas, poison: Option<u8>) -> Result<Live, StartError> {
    let fail = |e| {
        dev.add_status(mmio::VIRTIO_CONFIG_S_FAILED);
        e
    };
    dev.reset();
    dev.add_status(mmio::VIRTIO_CONFIG_S_ACKNOWLEDGE);
    dev.add_status(mmio::VIRTIO_CONFIG_S_DRIVER);
    let offered = dev.device_features();
    if offered & bit(VIRTIO_F_VERSION_1) == 0 {
        return Err(fail(StartError::Legacy));
    }
    let mut features = offered & DRIVER_FEATURES;
    if SG_ALLOWED.load(core::sync::atomic::Ordering::Relaxed) {
        features |= offered & bit(VIRTIO_BALLOON_F_BLIMP_SG);
    }
    // Linux virtballoon_validate(): PAGE_POISON only when the guest
    // poisons; a poisoning guest whose device cannot keep poison must not
    // report free pages (they might come back zeroed).
    if poison.is_none() {
        features &= !bit(VIRTIO_BALLOON_F_PAGE_POISON);
    } else if features & bit(VIRTIO_BALLOON_F_PAGE_POISON) == 0 {
        features &= !bit(VIRTIO_BALLOON_F_REPORTING);
    }
    dev.set_driver_features(features);
    dev.add_status(mmio::VIRTIO_CONFIG_S_FEATURES_OK);
    if dev.status() & mmio::VIRTIO_CONFIG_S_FEATURES_OK == 0 {
        return Err(fail(StartError::FeaturesRejected));
    }
    // Queues in Linux's order: inflate, deflate, then stats, free page and
    // reporting for the negotiated features only (vm_find_vqs() numbers
    // the queues that exist, without gaps).
    let inflate = setup_queue(dev, 0, areas.queues[0]).map_err(fail)?;
    let deflate = setup_queue(dev, 1, areas.queues[1]).map_err(fail)?;
    let mut next = 2u16;
    let mut optional = |feature: u32, area: u64| -> Result<(Option<SplitQueue>, u16), StartError> {
        if features & bit(feature) == 0 {
            return Ok((None, u16::MAX));
        }
        let idx = next;
        next += 1;
        Ok((Some(setup_queue(dev, idx, area).map_err(fail)?), idx))
    };
    let (stats, stats_qidx) = optional(VIRTIO_BALLOON_F_STATS_VQ, areas.queues[2])?;
    let (mut free_page, free_page_qidx) =
        optional(VIRTIO_BALLOON_F_FREE_PAGE_HINT, areas.queues[3])?;
    // Linux gives the free page queue no callback, which sets
    // VRING_AVAIL_F_NO_INTERRUPT: used hints are reclaimed by polling.
    if let Some(q) = free_page.as_mut() {
        q.suppress_interrupts();
    }
    let (reporting, reporting_qidx) = optional(VIRTIO_BALLOON_F_REPORTING, areas.queues[4])?;
    if let Some(b) = poison
        && features & bit(VIRTIO_BALLOON_F_PAGE_POISON) != 0
    {
        // Linux: memset(&poison_val, PAGE_POISON, sizeof(poison_val)).
        dev.config_write32(CONFIG_POISON_VAL, u32::from(b) * 0x0101_0101);
    }
    Ok(Live {
        features,
        inflate,
        deflate,
        stats,
        free_page,
        reporting,
        stats_qidx,
        free_page_qidx,
        reporting_qidx,
    })
}

impl Balloon {
    /// Finds the first balloon among `devices`, initialises it (spec 3.1.1)
    /// and starts it like Linux `virtballoon_probe()`.
    pub fn start(
        devices: impl Iterator<Item = MmioDevice>,
        mem: &mut Memory,
        irq_index: usize,
    ) -> Result<Balloon, StartError> {
        let mut found = None;
        let mut last_err = StartError::NoDevice;
        for d in devices {
            let dev = Mmio { base: d.base };
            match dev.probe() {
                Ok(VIRTIO_ID_BALLOON) => {
                    found = Some((dev, d.irq));
                    break;
                }
                Ok(_) => {}
                Err(e) => last_err = StartError::Probe(e),
            }
        }
        let (dev, gsi) = found.ok_or(last_err)?;
        let areas = Areas::alloc(mem).ok_or(StartError::NoMemory)?;
        let live = init_device(&dev, &areas, mem.poison)?;
        let irq = if idle::poll_mode() {
            None
        } else {
            events::IRQ_ACK[irq_index].store(dev.base, core::sync::atomic::Ordering::SeqCst);
            if let Err(e) = apic::route(gsi, events::vector(irq_index), apic::Trigger::Edge) {
                dev.add_status(mmio::VIRTIO_CONFIG_S_FAILED);
                return Err(StartError::Irq(e));
            }
            Some(irq_index)
        };
        let mut b = Balloon {
            dev,
            gsi,
            irq,
            areas,
            live,
            hint_active: 0,
            hinted: 0,
            hint_rounds: 0,
            hinted_total: 0,
            data: areas.data,
            stats_head: None,
            stats_vals: [0; NUM_STATS],
            stats_sent: 0,
            pending_isr: 0,
            adjust: true,
            retry_at_ns: 0,
            config_generation: 0,
            alloc_stalls: 0,
            direct_scans: 0,
            direct_reclaims: 0,
            bursts: 0,
            burst_requests: 0,
            burst_handoffs: 0,
            handoff_next: false,
            broken: false,
            answer_stats: true,
            sg_requests: 0,
            sg_ranges: 0,
        };
        b.go_live(mem);
        Ok(b)
    }

    /// Primes the stats queue, sets DRIVER_OK and reports the current size,
    /// like the end of Linux `virtballoon_probe()`/`virtballoon_restore()`.
    fn go_live(&mut self, mem: &Memory) {
        // Like Linux init_vqs(): prime the stats queue with one buffer and
        // kick it before DRIVER_OK...
        if self.live.stats.is_some() {
            self.queue_stats(mem);
        }
        self.dev.add_status(mmio::VIRTIO_CONFIG_S_DRIVER_OK);
        // ...and kick again now that the device is live, for devices that
        // ignore notifications before DRIVER_OK (harmless otherwise).
        if self.live.stats.is_some() {
            self.dev.notify(self.live.stats_qidx);
        }
        self.config_generation = self.dev.config_generation();
        self.adjust = true;
        self.retry_at_ns = 0;
        self.update_size(mem);
    }

    /// Whether the device asked to be reset, or buffers from earlier
    /// (hostile) requests are still outstanding on the inflate queue.
    pub fn needs_restart(&self) -> bool {
        self.broken || self.live.inflate.in_flight() > 0 || self.dev.needs_reset()
    }

    /// `balloon` again: resets and re-initialises the device (e.g. after it
    /// reported DEVICE_NEEDS_RESET). Pages already in the balloon stay
    /// there, as across Linux's freeze/restore; `actual` is rewritten.
    pub fn restart(&mut self, mem: &mut Memory) -> Result<(), StartError> {
        self.live = init_device(&self.dev, &self.areas, mem.poison)?;
        self.hint_active = 0;
        self.stats_head = None;
        self.pending_isr = 0;
        self.broken = false;
        if let Some(i) = self.irq {
            events::take_isr(i);
        }
        self.go_live(mem);
        Ok(())
    }

    pub fn queue_sizes(&self) -> (u16, u16, Option<u16>) {
        (
            self.live.inflate.size(),
            self.live.deflate.size(),
            self.live.stats.as_ref().map(SplitQueue::size),
        )
    }
    pub fn has(&self, feature: u32) -> bool {
        self.live.features & bit(feature) != 0
    }
    pub fn num_pages(&self) -> u32 {
        self.dev.config_read32(CONFIG_NUM_PAGES)
    }
    pub fn actual(&self) -> u32 {
        self.dev.config_read32(CONFIG_ACTUAL)
    }

    fn collect_isr(&mut self) {
        self.pending_isr |= match self.irq {
            Some(i) => events::take_isr(i),
            None => self.dev.take_interrupt_status(),
        };
    }

    /// Earliest time the driver wants to run again without an interrupt.
    pub fn next_wake_ns(&self) -> Option<u64> {
        (self.adjust && self.retry_at_ns != 0).then_some(self.retry_at_ns)
    }

    /// Background work: statistics requests and balloon size changes.
    ///
    /// `answer_stats` is false between chunks of a long command: a stats
    /// request is then answered when the command has finished, so the host
    /// gets values that include its effect rather than a snapshot from its
    /// middle (the device keeps the last values until it asks again).
    pub fn service(&mut self, mem: &mut Memory, answer_stats: bool) {
        self.answer_stats = answer_stats;
        self.collect_isr();
        if self.broken {
            return;
        }
        if self.irq.is_none() {
            // Poll mode: a config change shows as a new generation.
            let g = self.dev.config_generation();
            if g != self.config_generation {
                self.config_generation = g;
                self.pending_isr |= mmio::VIRTIO_MMIO_INT_CONFIG;
            }
        }
        self.service_stats(mem);
        let config_changed = self.pending_isr & mmio::VIRTIO_MMIO_INT_CONFIG != 0;
        self.pending_isr = 0;
        if config_changed {
            // Linux virtballoon_changed(): queue the size update, and the
            // free page hinting work if a new command id arrived.
            self.adjust = true;
            self.retry_at_ns = 0;
            if self.live.free_page.is_some() {
                self.free_page_hint_changed(mem);
            }
        }
        if let Some(q) = self.live.free_page.as_mut() {
            // Hinted buffers the device has finished with need no action.
            while q.pop_used().is_some() {}
        }
        if self.adjust && clock::now_ns() >= self.retry_at_ns {
            self.move_towards_target(mem);
        }
    }

    /// Linux update_balloon_size_func(): one batch at a time, `actual`
    /// written after each, `num_pages` read again while the target is not
    /// reached.
    fn move_towards_target(&mut self, mem: &mut Memory) {
        let mut target = self.num_pages();
        loop {
            let diff = towards_target(target, mem.balloon_pages());
            if diff == 0 {
                self.adjust = false;
                self.retry_at_ns = 0;
                return;
            }
            if self.has(VIRTIO_BALLOON_F_BLIMP_SG) {
                let (got, next) = if diff > 0 {
                    self.sg_fill(mem, diff.unsigned_abs())
                } else {
                    self.sg_leak(mem, diff.unsigned_abs(), false)
                };
                if self.broken {
                    return;
                }
                if diff > 0 && got < diff.unsigned_abs() {
                    // Out of puff, as in fill().
                    self.alloc_stalls += 1;
                    self.retry_at_ns = clock::now_ns() + OUT_OF_PUFF_RETRY_NS;
                    return;
                }
                if got == 0 {
                    self.adjust = false;
                    return;
                }
                target = next.unwrap_or_else(|| self.num_pages());
                self.collect_isr();
                self.service_stats(mem);
                continue;
            }
            if let Some(next) = self.burst(mem, target) {
                if self.broken {
                    return;
                }
                match next {
                    Some(t) => target = t,
                    None => {
                        self.adjust = false;
                        self.retry_at_ns = 0;
                        return;
                    }
                }
                self.collect_isr();
                self.service_stats(mem);
                continue;
            }
            let want = diff.unsigned_abs().min(ARRAY_PFNS_MAX as u64);
            let (got, next) = if diff > 0 {
                self.fill(mem, want, diff.unsigned_abs())
            } else {
                self.leak(mem, want, diff.unsigned_abs())
            };
            if self.broken {
                return;
            }
            if diff > 0 && got < want {
                // "Out of puff": retry later, like Linux's msleep(200).
                self.alloc_stalls += 1;
                self.retry_at_ns = clock::now_ns() + OUT_OF_PUFF_RETRY_NS;
                return;
            }
            target = match next {
                Some(t) => t,
                // Linux queues the work again only while a difference
                // remains; a later config change brings it back.
                None if got >= diff.unsigned_abs() => {
                    self.adjust = false;
                    self.retry_at_ns = 0;
                    return;
                }
                None => self.num_pages(),
            };
            // Keep statistics flowing during long inflations.
            self.collect_isr();
            self.service_stats(mem);
        }
    }

    /// Several batches in one trip to ring 0, as Linux's work function
    /// makes its batches one after another in kernel mode: for a difference
    /// of more than one batch, takes the frames (inflate) or balloon pages
    /// (deflate) of up to BURST_MAX batches as fill_balloon() and
    /// leak_balloon() would, writes their PFN arrays and descriptors, and
    /// lets an [`events::Burst`] make the requests, each acknowledged before
    /// the next, with `actual` written and `num_pages` read in between as
    /// Linux does. Afterwards takes back what was not sent and finishes a
    /// request left in flight.
    ///
    /// Returns None if it does not apply (poll mode, a difference of one
    /// batch, the queue busy, not even one full batch of frames), else what
    /// move_towards_target() goes on with: `num_pages` read after the last
    /// batch, or None if no difference is left.
    fn burst(&mut self, mem: &mut Memory, target: u32) -> Option<Option<u32>> {
        let irq = self.irq?;
        let start = mem.balloon_pages();
        let diff = towards_target(target, start);
        let total = diff.unsigned_abs();
        if idle::poll_mode() || total <= ARRAY_PFNS_MAX as u64 {
            return None;
        }
        let inflate = diff > 0;
        let q = if inflate {
            Queue::Inflate
        } else {
            Queue::Deflate
        };
        let area = self.areas.burst;
        let dev = self.dev;
        let (queue, qidx) = self.queue(q);
        if queue.in_flight() != 0 || !queue.size().is_power_of_two() {
            return None;
        }
        let batches = total
            .div_ceil(ARRAY_PFNS_MAX as u64)
            .min(BURST_MAX as u64)
            .min(u64::from(queue.num_free())) as usize;
        let mut burst = Burst::new(
            BurstQueue {
                avail_ring: queue.avail_ring_addr(),
                avail_idx_addr: queue.avail_idx_addr(),
                used_idx_addr: queue.used_idx_addr(),
                avail_idx: queue.avail_idx(),
                size: queue.size(),
                notify_addr: dev.reg(mmio::VIRTIO_MMIO_QUEUE_NOTIFY),
                notify_val: u32::from(qidx),
                actual_addr: dev.reg(mmio::VIRTIO_MMIO_CONFIG + CONFIG_ACTUAL),
                num_pages_addr: dev.reg(mmio::VIRTIO_MMIO_CONFIG + CONFIG_NUM_PAGES),
                irq,
            },
            target,
        );
        let array = |j: usize| area + j as u64 * BURST_ARRAY_BYTES;
        let size_of =
            |j: usize| (total - j as u64 * ARRAY_PFNS_MAX as u64).min(ARRAY_PFNS_MAX as u64);
        let mut heads = [0u16; BURST_MAX];
        let mut actuals = [0u32; BURST_MAX];
        let mut actual = start;
        for j in 0..batches {
            let n = size_of(j);
            let mut got = 0;
            while got < n {
                let pfn = if inflate {
                    mem.frames.alloc().inspect(|&p| {
                        // The allocator checks poison, as Linux does.
                        mem.check_poison(p);
                    })
                } else {
                    mem.balloon_pop()
                };
                let Some(pfn) = pfn else { break };
                write_pfn(array(j), got, pfn as u32);
                got += 1;
            }
            let head = (got == n).then(|| queue.prepare(&[Buf::readable(array(j), 4 * n as u32)]));
            let Some(Some(head)) = head else {
                // Short of frames: fill() and its "out of puff" take over.
                give_back(mem, inflate, array(j), got);
                break;
            };
            actual = if inflate { actual + n } else { actual - n };
            // Linux's next request is min(|num_pages - actual|, 256) pages
            // the same way: the burst goes on only if that is batch j + 1.
            let next = if j + 1 < batches { size_of(j + 1) } else { 0 } as u32;
            let a = actual as u32;
            let next_if = match (inflate, next == ARRAY_PFNS_MAX as u32) {
                (true, true) => (a.saturating_add(next), u32::MAX),
                (false, true) => (0, a.saturating_sub(next)),
                (true, false) => (a.saturating_add(next), a.saturating_add(next)),
                (false, false) => (a.saturating_sub(next), a.saturating_sub(next)),
            };
            heads[j] = head;
            actuals[j] = a;
            burst.push(head, a, next_if);
        }
        let planned = burst.len();
        if planned == 0 {
            return None;
        }
        if core::mem::take(&mut self.handoff_next) {
            burst.leave_first_in_flight();
        }
        let r = burst.call();
        self.bursts += 1;
        self.burst_requests += r.published as u64;
        let (queue, _) = self.queue(q);
        let added = usize::from(queue.resync_avail());
        debug_assert_eq!(added, r.published);
        // Requests never made: descriptors and pages go back.
        for j in (r.published..planned).rev() {
            queue.cancel(heads[j]);
            give_back(mem, inflate, array(j), size_of(j));
        }
        if inflate {
            // Like fill(): in the balloon once handed to the device.
            for j in 0..r.published {
                for i in 0..size_of(j) {
                    mem.balloon_push(u64::from(read_pfn(array(j), i)));
                }
            }
        }
        let mut acked = r.acked;
        let mut target = r.target;
        if r.published > acked {
            // Stopped by a configuration change with a request out: finish
            // it as tell_host() does.
            self.burst_handoffs += 1;
            if !self.wait_used(q, heads[acked], None) {
                if !inflate {
                    // Not acknowledged: not reusable (MUST_TELL_HOST).
                    give_back(mem, inflate, array(acked), size_of(acked));
                }
                return Some(None);
            }
            self.dev.config_write32(CONFIG_ACTUAL, actuals[acked]);
            acked += 1;
            if target != actuals[acked - 1] {
                target = self.num_pages();
            }
        }
        let (queue, _) = self.queue(q);
        while queue.pop_used().is_some() {}
        if !inflate {
            for j in 0..acked {
                for i in 0..size_of(j) {
                    let p = u64::from(read_pfn(array(j), i));
                    // The host may have discarded the page: poison it again.
                    mem.poison_page(p);
                    // Ballooned frames are allocated, so this cannot fail.
                    let _ = mem.frames.free(p);
                }
            }
        }
        Some((target != actuals[acked - 1]).then_some(target))
    }

    /// Writes the PFN array into the data page.
    fn write_pfns(&self, pfns: &[u32]) {
        for (i, p) in pfns.iter().enumerate() {
            // SAFETY: the data page is ours; at most 256 entries (1 KiB).
            unsafe {
                core::ptr::write_volatile(
                    (self.data + PFNS_OFFSET + 4 * i as u64) as *mut u32,
                    p.to_le(),
                )
            };
        }
    }

    /// Linux fill_balloon(): up to `want` (≤ 256) fresh frames, then
    /// tell_host(inflate), then update_balloon_size(); `diff` is what the
    /// work function still has to inflate. Returns the pages inflated and,
    /// if a difference remains, `num_pages` read again.
    fn fill(&mut self, mem: &mut Memory, want: u64, diff: u64) -> (u64, Option<u32>) {
        let mut pfns = [0u32; ARRAY_PFNS_MAX];
        let mut n = 0;
        while (n as u64) < want.min(ARRAY_PFNS_MAX as u64) {
            let pfn = match mem.frames.alloc() {
                Some(p) => p,
                // Like Linux's free page shrinker: hinted blocks held for
                // the host go back first when memory runs out.
                None if self.hinted > 0 => {
                    self.return_free_pages(mem);
                    continue;
                }
                None => break,
            };
            // The allocator checks poison on allocation, as Linux does.
            mem.check_poison(pfn);
            pfns[n] = pfn as u32;
            n += 1;
        }
        if n == 0 {
            return (0, None);
        }
        for &p in &pfns[..n] {
            mem.balloon_push(u64::from(p));
        }
        self.write_pfns(&pfns[..n]);
        let after = AfterAck {
            actual: mem.balloon_pages() as u32,
            // Out of puff: Linux sleeps before it looks at the target again.
            read_target: n as u64 == want && diff > n as u64,
        };
        let told = self.tell_host(Queue::Inflate, 4 * n as u32, Some(after));
        (n as u64, told.target)
    }

    /// Linux leak_balloon(): up to `want` (≤ 256) pages out of the
    /// balloon; the host is told (and acknowledges) before the frames go
    /// back to the allocator, as VIRTIO_BALLOON_F_MUST_TELL_HOST requires.
    /// Then update_balloon_size(), and `num_pages` again if `diff` is not
    /// done.
    fn leak(&mut self, mem: &mut Memory, want: u64, diff: u64) -> (u64, Option<u32>) {
        let mut pfns = [0u32; ARRAY_PFNS_MAX];
        let mut n = 0;
        while (n as u64) < want.min(ARRAY_PFNS_MAX as u64) {
            match mem.balloon_pop() {
                Some(pfn) => {
                    pfns[n] = pfn as u32;
                    n += 1;
                }
                None => break,
            }
        }
        if n == 0 {
            return (0, None);
        }
        self.write_pfns(&pfns[..n]);
        let after = AfterAck {
            actual: mem.balloon_pages() as u32,
            read_target: diff > n as u64,
        };
        let told = self.tell_host(Queue::Deflate, 4 * n as u32, Some(after));
        if !told.acked {
            // Not acknowledged: the pages may not be reused (MUST_TELL_HOST).
            for &p in &pfns[..n] {
                mem.balloon_push(u64::from(p));
            }
            return (0, None);
        }
        for &p in &pfns[..n] {
            // The host may have discarded the page: poison it again.
            mem.poison_page(u64::from(p));
            // Ballooned frames are allocated, so this cannot fail.
            let _ = mem.frames.free(u64::from(p));
        }
        (n as u64, told.target)
    }

    /// Chunked inflate (VIRTIO_BALLOON_F_BLIMP_SG), as the series'
    /// fill_balloon() + tell_host_sgs(): takes up to `want` frames a
    /// contiguous run at a time (the lowest free first, so the balloon
    /// list stays sorted), puts one device-writable range per run on the
    /// inflate queue until the queue is full, kicks once (unless the device
    /// suppressed notifications) and waits for all of them; again until
    /// `want` pages are in the balloon or memory runs out. Then `actual`
    /// is written and `num_pages` read. Returns the pages inflated and the
    /// target read.
    fn sg_fill(&mut self, mem: &mut Memory, want: u64) -> (u64, Option<u32>) {
        let mut total = 0u64;
        while total < want {
            let mut sent = 0;
            while total < want && self.live.inflate.num_free() > 0 {
                let Some((pfn, n)) = mem.frames.alloc_run((want - total).min(MAX_RANGE_PAGES))
                else {
                    // Like fill(): hinted blocks go back first.
                    if self.hinted > 0 {
                        self.return_free_pages(mem);
                        continue;
                    }
                    break;
                };
                if mem.poison.is_some() {
                    for p in pfn..pfn + n {
                        mem.check_poison(p);
                    }
                }
                let head = self
                    .live
                    .inflate
                    .add(&[Buf::writable(pfn * PAGE_SIZE, (n * PAGE_SIZE) as u32)]);
                if head.is_none() {
                    let _ = mem.frames.free_run(pfn, n);
                    break;
                }
                // In the balloon once handed to the device, as fill() does.
                mem.balloon_push_run(pfn, n);
                total += n;
                sent += 1;
            }
            if sent == 0 {
                break;
            }
            self.sg_requests += 1;
            self.sg_ranges += sent;
            self.kick(Queue::Inflate);
            if !self.wait_all_used(Queue::Inflate) {
                break;
            }
        }
        if total > 0 {
            self.update_size(mem);
        }
        (total, (total > 0).then(|| self.num_pages()))
    }

    /// Chunked deflate, as the series' leak_balloon() + tell_host_sgs():
    /// takes up to `want` pages off the (sorted) balloon list, each
    /// contiguous stretch as one range (or, with `single_pages`, each page
    /// as a 4 KiB range: the series' leak_balloon_sg_oom()), fills the
    /// deflate queue, kicks once and waits for the device to acknowledge
    /// all of them before the frames are reused (MUST_TELL_HOST).
    fn sg_leak(&mut self, mem: &mut Memory, want: u64, single_pages: bool) -> (u64, Option<u32>) {
        mem.sort_balloon();
        let mut total = 0u64;
        let mut ranges = [(0u64, 0u64); MAX_QUEUE_SIZE as usize];
        while total < want {
            let mut nr = 0;
            while total < want && self.live.deflate.num_free() > 0 && nr < ranges.len() {
                let Some(top) = mem.balloon_pop() else { break };
                let (mut lo, mut n) = (top, 1u64);
                while !single_pages
                    && n < MAX_RANGE_PAGES
                    && total + n < want
                    && lo > 0
                    && mem.balloon_peek() == Some(lo - 1)
                {
                    let _ = mem.balloon_pop();
                    lo -= 1;
                    n += 1;
                }
                if self
                    .live
                    .deflate
                    .add(&[Buf::writable(lo * PAGE_SIZE, (n * PAGE_SIZE) as u32)])
                    .is_none()
                {
                    mem.balloon_push_run(lo, n);
                    break;
                }
                ranges[nr] = (lo, n);
                nr += 1;
                total += n;
            }
            if nr == 0 {
                break;
            }
            self.sg_requests += 1;
            self.sg_ranges += nr as u64;
            self.kick(Queue::Deflate);
            if !self.wait_all_used(Queue::Deflate) {
                // Not acknowledged: not reusable (MUST_TELL_HOST); back on
                // the list in ascending order.
                for &(lo, n) in ranges[..nr].iter().rev() {
                    mem.balloon_push_run(lo, n);
                }
                total -= ranges[..nr].iter().map(|r| r.1).sum::<u64>();
                break;
            }
            for &(lo, n) in &ranges[..nr] {
                for p in lo..lo + n {
                    // The host may have discarded the page: poison it again.
                    mem.poison_page(p);
                }
                // Ballooned frames are allocated, so this cannot fail.
                let _ = mem.frames.free_run(lo, n);
            }
        }
        if total > 0 {
            self.update_size(mem);
        }
        (total, (total > 0).then(|| self.num_pages()))
    }

    /// Waits until the device has returned every buffer of `q` (or reports
    /// DEVICE_NEEDS_RESET: false).
    fn wait_all_used(&mut self, q: Queue) -> bool {
        self.wait_queue(q, None, |queue| {
            while queue.pop_used().is_some() {}
            queue.in_flight() == 0
        })
    }

    /// Linux update_balloon_size(): `actual` = pages in the balloon.
    fn update_size(&self, mem: &Memory) {
        self.dev
            .config_write32(CONFIG_ACTUAL, mem.balloon_pages() as u32);
    }

    fn queue(&mut self, q: Queue) -> (&mut SplitQueue, u16) {
        match q {
            Queue::Inflate => (&mut self.live.inflate, 0),
            Queue::Deflate => (&mut self.live.deflate, 1),
            Queue::Stats => (
                self.live.stats.as_mut().expect("stats queue"),
                self.live.stats_qidx,
            ),
            Queue::FreePage => (
                self.live.free_page.as_mut().expect("free page queue"),
                self.live.free_page_qidx,
            ),
            Queue::Reporting => (
                self.live.reporting.as_mut().expect("reporting queue"),
                self.live.reporting_qidx,
            ),
        }
    }

    fn kick(&mut self, q: Queue) {
        let (queue, idx) = self.queue(q);
        if !queue.notify_suppressed() {
            self.dev.notify(idx);
        }
    }

    /// Linux tell_host(): one out-buffer with the PFN array, kick, wait for
    /// the device to use it; then, if `after` says so, the register
    /// accesses Linux makes next (update_balloon_size() and the next
    /// towards_target()).
    ///
    /// With interrupts, the kick, the wait and those accesses are one trip
    /// to ring 0 (see [`events::DevCall`]); if the wait ends for another
    /// reason (a timer or serial interrupt), the rest is done from here.
    fn tell_host(&mut self, q: Queue, len: u32, after: Option<AfterAck>) -> Told {
        let seen = events::snapshot();
        let addr = self.data + PFNS_OFFSET;
        let irq_driven = self.irq.is_some() && !idle::poll_mode();
        let dev = self.dev;
        let (queue, idx) = self.queue(q);
        let before = queue.used_idx();
        let Some(head) = queue.add(&[Buf::readable(addr, len)]) else {
            // Only possible if hostile buffers were never returned.
            return Told::default();
        };
        let mut call = DevCall::new();
        if !queue.notify_suppressed() {
            call = call.write(dev.reg(mmio::VIRTIO_MMIO_QUEUE_NOTIFY), u32::from(idx));
        }
        // Only our buffer is in flight, so a moved used.idx means it is back.
        let whole = irq_driven && queue.in_flight() == 1;
        if whole {
            call = call.wait(seen).if_changed(queue.used_idx_addr(), before);
            if let Some(a) = after {
                call = call.then_write(dev.reg(mmio::VIRTIO_MMIO_CONFIG + CONFIG_ACTUAL), a.actual);
                if a.read_target {
                    call = call.then_read(dev.reg(mmio::VIRTIO_MMIO_CONFIG + CONFIG_NUM_PAGES));
                }
            }
        }
        let r = call.call();
        if !self.wait_used(q, head, None) {
            return Told::default();
        }
        let Some(a) = after else {
            return Told {
                acked: true,
                target: None,
            };
        };
        if whole && r.ran {
            return Told {
                acked: true,
                target: a.read_target.then_some(r.read),
            };
        }
        self.dev.config_write32(CONFIG_ACTUAL, a.actual);
        Told {
            acked: true,
            target: a.read_target.then(|| self.num_pages()),
        }
    }

    /// Waits until the device returns `head` on `q` (or the deadline, or
    /// the device reports DEVICE_NEEDS_RESET). Returns whether it came back.
    fn wait_used(&mut self, q: Queue, head: u16, deadline_ns: Option<u64>) -> bool {
        self.wait_queue(q, deadline_ns, |queue| {
            while let Some(u) = queue.pop_used() {
                if u.known && u.id == u32::from(head) {
                    return true;
                }
            }
            false
        })
    }

    /// Waits until `done` (given `q` each time the guest wakes) says what
    /// the caller waits for is back, or the deadline, or the device
    /// reports DEVICE_NEEDS_RESET. Returns whether `done` said so.
    fn wait_queue(
        &mut self,
        q: Queue,
        deadline_ns: Option<u64>,
        mut done: impl FnMut(&mut SplitQueue) -> bool,
    ) -> bool {
        loop {
            let seen = events::snapshot();
            let (queue, _) = self.queue(q);
            if done(queue) {
                return true;
            }
            if deadline_ns.is_some_and(|d| clock::now_ns() >= d) {
                return false;
            }
            // Keep the interrupt status for service() (config changes).
            self.collect_isr();
            // A device that sets DEVICE_NEEDS_RESET raises a configuration
            // change; Status is read only then (Linux reads no register
            // while it waits, and each read is an exit).
            if self.pending_isr & mmio::VIRTIO_MMIO_INT_CONFIG != 0 && self.dev.needs_reset() {
                self.broken = true;
                return false;
            }
            idle::wait(seen, deadline_ns);
        }
    }

    fn refresh_stats(&mut self, mem: &Memory) {
        let free = mem.frames.free_frames() * PAGE_SIZE;
        let mut total = mem.ram_bytes;
        if !self.has(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) {
            // Linux takes inflated pages out of totalram in this case.
            total = total.saturating_sub(mem.balloon_pages() * PAGE_SIZE);
        }
        let v = &mut self.stats_vals;
        *v = [0; NUM_STATS];
        v[S_MEMFREE as usize] = free;
        v[S_MEMTOT as usize] = total;
        v[S_AVAIL as usize] = free;
        v[S_ALLOC_STALL as usize] = self.alloc_stalls;
        v[S_DIRECT_SCAN as usize] = self.direct_scans;
        v[S_DIRECT_RECLAIM as usize] = self.direct_reclaims;
    }

    /// An allocation found no free memory and tries direct reclaim:
    /// counts one allocation stall that scanned `scanned` pages (Linux
    /// __alloc_pages_direct_reclaim(): allocstall, pgscan_direct).
    pub fn note_alloc_stall(&mut self, scanned: u64) {
        self.alloc_stalls += 1;
        self.direct_scans = self.direct_scans.saturating_add(scanned);
    }

    /// A waiting allocation got `pages` back (pgsteal_direct).
    pub fn note_direct_reclaim(&mut self, pages: u64) {
        self.direct_reclaims = self.direct_reclaims.saturating_add(pages);
    }

    /// Fills the stats buffer with fresh values and hands it to the device
    /// (Linux update_balloon_stats() + virtqueue_add_outbuf() + kick).
    fn queue_stats(&mut self, mem: &Memory) {
        self.refresh_stats(mem);
        let mut bytes = [0u8; STATS_BYTES];
        encode_stats(&self.stats_vals, &mut bytes);
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: the data page is ours.
            unsafe {
                core::ptr::write_volatile((self.data + STATS_OFFSET + i as u64) as *mut u8, *b)
            };
        }
        let addr = self.data + STATS_OFFSET;
        let Some(q) = self.live.stats.as_mut() else {
            return;
        };
        self.stats_head = q.add(&[Buf::readable(addr, STATS_BYTES as u32)]);
        if self.stats_head.is_some() {
            self.stats_sent += 1;
            self.kick(Queue::Stats);
        }
    }

    /// Linux stats_handle_request(): when the device returns the stats
    /// buffer, refill it and give it back.
    fn service_stats(&mut self, mem: &Memory) {
        if !self.answer_stats {
            return;
        }
        let Some(q) = self.live.stats.as_mut() else {
            return;
        };
        let mut refill = false;
        while let Some(u) = q.pop_used() {
            if u.known && Some(u.id) == self.stats_head.map(u32::from) {
                self.stats_head = None;
                refill = true;
            }
        }
        if refill {
            self.queue_stats(mem);
        }
    }

    /// `stats`: the values last sent.
    pub fn stats_line(&self, out: &mut impl core::fmt::Write) -> core::fmt::Result {
        write!(out, "stats sent {}", self.stats_sent)?;
        for (name, v) in STAT_NAMES.iter().zip(self.stats_vals.iter()) {
            write!(out, " {name} {v}")?;
        }
        Ok(())
    }

    /// `balloon-handoff`: the next burst returns to ring 3 right after its
    /// first kick, and ring 3 finishes that request, as when a
    /// configuration change arrives while a burst waits (which is rare and
    /// cannot be timed from outside).
    pub fn handoff_next_burst(&mut self) {
        self.handoff_next = true;
    }

    /// How the inflate and deflate requests were made so far, for
    /// `balloon-wait`: "R requests in B bursts, H finished in ring 3".
    pub fn burst_line(&self, out: &mut impl core::fmt::Write) -> core::fmt::Result {
        write!(
            out,
            "{} requests in {} bursts, {} finished in ring 3",
            self.burst_requests, self.bursts, self.burst_handoffs
        )?;
        if self.has(VIRTIO_BALLOON_F_BLIMP_SG) {
            write!(
                out,
                "; chunked: {} requests, {} ranges",
                self.sg_requests, self.sg_ranges
            )?;
        }
        Ok(())
    }

    /// `balloon-wait`: moves towards the target until actual == num_pages.
    pub fn wait_target(&mut self, mem: &mut Memory) -> Result<u32, &'static str> {
        self.adjust = true;
        self.retry_at_ns = 0;
        loop {
            let seen = events::snapshot();
            self.service(mem, true);
            let target = self.num_pages();
            if mem.balloon_pages() == u64::from(target) && self.actual() == target {
                return Ok(target);
            }
            if self.broken {
                return Err("device needs reset (run 'balloon' again)");
            }
            idle::wait(seen, self.next_wake_ns());
        }
    }

    /// `oom MIB`: deflate like Linux's OOM notifier
    /// (virtio_balloon_oom_notify: leak_balloon(oom_pages) and
    /// update_balloon_size), once per 256 pages.
    pub fn oom(&mut self, mem: &mut Memory, mib: u64) -> Result<u64, &'static str> {
        if !self.has(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) {
            return Err("VIRTIO_BALLOON_F_DEFLATE_ON_OOM not negotiated");
        }
        let mut want = mib.saturating_mul(1 << 20) / PAGE_SIZE;
        let mut freed = 0;
        while want > 0 {
            // leak_balloon(OOM_NR_PAGES) + update_balloon_size(); with
            // the chunked protocol one 4 KiB range per page
            // (leak_balloon_sg_oom()).
            let (n, _) = if self.has(VIRTIO_BALLOON_F_BLIMP_SG) {
                self.sg_leak(mem, want.min(OOM_NR_PAGES), true)
            } else {
                self.leak(mem, want.min(OOM_NR_PAGES), 0)
            };
            if n == 0 {
                self.update_size(mem);
                break;
            }
            freed += n;
            want -= n;
        }
        // Like Linux, the balloon is not re-inflated until the next
        // configuration change.
        self.adjust = false;
        Ok(freed)
    }

    fn write_data_u32(&self, off: u64, v: u32) {
        // SAFETY: inside the driver's data page.
        unsafe { core::ptr::write_volatile((self.data + off) as *mut u32, v.to_le()) };
    }

    fn push_hint(&mut self, pfn: u64) {
        if self.hinted < self.areas.hints_cap {
            // SAFETY: inside the hint list area (hints_cap entries).
            unsafe {
                core::ptr::write_volatile(
                    (self.areas.hints + 4 * self.hinted as u64) as *mut u32,
                    pfn as u32,
                )
            };
            self.hinted += 1;
        }
    }

    /// Linux virtballoon_changed() for FREE_PAGE_HINT: DONE gives the
    /// hinted pages back; a new id (not STOP, not the active one) starts a
    /// round.
    fn free_page_hint_changed(&mut self, mem: &mut Memory) {
        let id = self.dev.config_read32(CONFIG_FREE_PAGE_HINT_CMD_ID);
        if id == FREE_PAGE_HINT_CMD_ID_DONE {
            self.return_free_pages(mem);
        } else if id != FREE_PAGE_HINT_CMD_ID_STOP && id != self.hint_active {
            self.report_free_pages(mem, id);
        }
    }

    /// Linux return_free_pages_to_mm(): the hinted blocks become free
    /// again (their contents were left alone, so no re-poisoning).
    fn return_free_pages(&mut self, mem: &mut Memory) {
        for i in 0..self.hinted {
            // SAFETY: inside the hint list area.
            let pfn = unsafe {
                core::ptr::read_volatile((self.areas.hints + 4 * i as u64) as *const u32)
            };
            let _ = mem.frames.free_block(u64::from(pfn), HINT_BLOCK_ORDER);
        }
        self.hinted = 0;
    }

    /// Makes `id` the active hinting round and writes the command ids the
    /// driver sends back: returns the addresses of the active id and of
    /// the stop id (4 bytes each, in the data page).
    fn begin_hint_round(&mut self, id: u32) -> (u64, u64) {
        self.hint_active = id;
        self.hint_rounds += 1;
        self.write_data_u32(CMD_ID_ACTIVE_OFFSET, id);
        self.write_data_u32(CMD_ID_STOP_OFFSET, FREE_PAGE_HINT_CMD_ID_STOP);
        (
            self.data + CMD_ID_ACTIVE_OFFSET,
            self.data + CMD_ID_STOP_OFFSET,
        )
    }

    /// Adds `buf` to the free page queue, after taking back what the
    /// device used, and kicks. False without the queue or without room.
    fn send_free_page(&mut self, buf: Buf) -> bool {
        let Some(q) = self.live.free_page.as_mut() else {
            return false;
        };
        while q.pop_used().is_some() {}
        if q.add(&[buf]).is_none() {
            return false;
        }
        self.kick(Queue::FreePage);
        true
    }

    /// Linux virtio_balloon_report_free_page(): ack the command id with an
    /// out-buffer, hint free 4 MiB blocks one in-buffer per kick (always
    /// leaving a ring slot for the stop id) until none is left or the host
    /// changes the id, then send STOP. Hinted blocks stay allocated until
    /// the host writes DONE.
    fn report_free_pages(&mut self, mem: &mut Memory, id: u32) {
        let (active, stop) = self.begin_hint_round(id);
        if !self.send_free_page(Buf::readable(active, 4)) {
            return;
        }
        // Linux's cmd_id_received_cache: the id is read again only when a
        // configuration change arrives (virtballoon_changed()), not per
        // block.
        let mut received = id;
        loop {
            if self.broken {
                break;
            }
            let before = self.pending_isr;
            self.collect_isr();
            let config_changed = (self.pending_isr & !before) & mmio::VIRTIO_MMIO_INT_CONFIG != 0;
            if config_changed || self.irq.is_none() {
                // (Polling: there is no interrupt to say it changed.)
                received = self.dev.config_read32(CONFIG_FREE_PAGE_HINT_CMD_ID);
                if config_changed && self.dev.needs_reset() {
                    self.broken = true;
                    break;
                }
            }
            if received != id {
                break;
            }
            let seen = events::snapshot();
            let Some(q) = self.live.free_page.as_mut() else {
                return;
            };
            while q.pop_used().is_some() {}
            if q.num_free() <= 1 {
                // Full: like Linux (which frees the block it just took and
                // tries again), poll until the device has used some. The
                // queue raises no used interrupts; a configuration change
                // (a new id, STOP) still interrupts.
                if idle::poll_mode() {
                    idle::wait(seen, Some(clock::now_ns() + 1_000_000));
                } else {
                    core::hint::spin_loop();
                }
                continue;
            }
            let Some(pfn) = mem.frames.alloc_block(HINT_BLOCK_ORDER) else {
                break;
            };
            let len = (PAGE_SIZE << HINT_BLOCK_ORDER) as u32;
            if !self.send_free_page(Buf::writable(pfn * PAGE_SIZE, len)) {
                let _ = mem.frames.free_block(pfn, HINT_BLOCK_ORDER);
                break;
            }
            self.push_hint(pfn);
            self.hinted_total += 1;
        }
        self.send_free_page(Buf::readable(stop, 4));
    }

    /// Free page hinting counters: (rounds, blocks hinted in all, blocks
    /// held now, active id).
    pub fn hint_status(&self) -> Option<(u64, u64, usize, u32)> {
        self.live.free_page.as_ref()?;
        Some((
            self.hint_rounds,
            self.hinted_total,
            self.hinted,
            self.hint_active,
        ))
    }

    /// `report`: one free page reporting pass over all free memory, like
    /// Linux page_reporting_process_zone() + virtballoon_free_page_report():
    /// up to 32 free 2 MiB ranges per report, as device-writable buffers
    /// of one chain; kick; wait; the ranges are the guest's again after the
    /// device returns the buffer. Returns the number of ranges reported.
    pub fn report(&mut self, mem: &mut Memory) -> Result<u64, &'static str> {
        if self.live.reporting.is_none() {
            return Err("VIRTIO_BALLOON_F_REPORTING not negotiated");
        }
        let mut total = 0;
        let mut from = 0;
        loop {
            let mut blocks = [0u64; REPORT_CAPACITY];
            let mut n = 0;
            while n < REPORT_CAPACITY {
                let Some(pfn) = mem.frames.find_free_block(REPORT_ORDER, from) else {
                    break;
                };
                from = pfn + (1 << REPORT_ORDER);
                if mem.frames.claim_block(pfn, REPORT_ORDER) {
                    blocks[n] = pfn;
                    n += 1;
                }
            }
            if n == 0 {
                return Ok(total);
            }
            let len = (PAGE_SIZE << REPORT_ORDER) as u32;
            let mut bufs = [Buf::writable(0, len); REPORT_CAPACITY];
            for (b, &pfn) in bufs.iter_mut().zip(blocks.iter()).take(n) {
                b.addr = pfn * PAGE_SIZE;
            }
            let Some(q) = self.live.reporting.as_mut() else {
                return Ok(total);
            };
            let head = q.add(&bufs[..n]);
            let ok = match head {
                Some(h) => {
                    self.kick(Queue::Reporting);
                    self.wait_used(Queue::Reporting, h, None)
                }
                None => false,
            };
            // Reported ranges are free memory again (contents left alone).
            for &pfn in &blocks[..n] {
                let _ = mem.frames.free_block(pfn, REPORT_ORDER);
            }
            if !ok {
                return Err("the device did not return the report");
            }
            total += n as u64;
        }
    }

    /// A frame nobody will use again, for PFNs in hostile buffers (a
    /// misbehaving VMM might still discard it). Without free memory it is
    /// a PFN far outside RAM instead.
    fn sacrificial_pfn(&mut self, mem: &mut Memory) -> u32 {
        match mem.frames.alloc() {
            Some(p) => p as u32,
            None => u32::MAX,
        }
    }

    fn write_scratch_u32(&self, i: u64, v: u32) {
        // SAFETY: scratch area of the data page (0x800..0x1000).
        unsafe {
            core::ptr::write_volatile((self.data + HOSTILE_OFFSET + 4 * i) as *mut u32, v.to_le())
        };
    }

    /// Sends one kind of malformed input, waits up to 1 s for the device
    /// to return it, and reports whether it did.
    pub fn hostile(
        &mut self,
        mem: &mut Memory,
        case: HostileCase,
        in_all: bool,
    ) -> Result<bool, &'static str> {
        match case {
            HostileCase::HintStaleId
            | HostileCase::HintOutsideRam
            | HostileCase::HintWrongDirection => return self.hostile_hint(mem, case, in_all),
            HostileCase::ReportOutsideRam | HostileCase::ReportTooLong => {
                return self.hostile_report(mem, case);
            }
            HostileCase::SgRanges => return self.hostile_sg(mem),
            HostileCase::Flood => return self.hostile_flood(mem, false),
            HostileCase::FloodScattered => return self.hostile_flood(mem, true),
            _ => {}
        }
        let scratch = self.data + HOSTILE_OFFSET;
        let q = if case == HostileCase::StatsTruncated {
            Queue::Stats
        } else {
            Queue::Inflate
        };
        let head = match case {
            HostileCase::All => return Err("'all' is a list"),
            HostileCase::HintStaleId
            | HostileCase::HintOutsideRam
            | HostileCase::HintWrongDirection
            | HostileCase::ReportOutsideRam
            | HostileCase::ReportTooLong
            | HostileCase::SgRanges
            | HostileCase::Flood
            | HostileCase::FloodScattered => return Err("handled above"),
            HostileCase::PfnOutsideRam => {
                // Just past the end of RAM, and far beyond anything.
                self.write_scratch_u32(0, mem.nframes() as u32);
                self.write_scratch_u32(1, u32::MAX);
                self.live.inflate.add(&[Buf::readable(scratch, 8)])
            }
            HostileCase::PfnInMmioHole => {
                // Start of the hole, this device's own registers, the LAPIC.
                self.write_scratch_u32(0, 0xc0000);
                self.write_scratch_u32(1, (self.dev.base >> 12) as u32);
                self.write_scratch_u32(2, (apic::LAPIC_BASE >> 12) as u32);
                self.live.inflate.add(&[Buf::readable(scratch, 12)])
            }
            HostileCase::DescLoop => {
                let p = self.sacrificial_pfn(mem);
                self.write_scratch_u32(0, p);
                // Two descriptors pointing at each other.
                let d = |next| RawDesc {
                    addr: scratch,
                    len: 4,
                    flags: VIRTQ_DESC_F_NEXT,
                    next,
                };
                self.live.inflate.add_raw(&[d(1), d(0)])
            }
            HostileCase::ChainTooLong => {
                // Every descriptor of the queue chained, the last one still
                // flagged NEXT and pointing past the table: longer than the
                // queue can hold.
                let p = self.sacrificial_pfn(mem);
                self.write_scratch_u32(0, p);
                let n = self.live.inflate.num_free();
                let mut descs = [RawDesc {
                    addr: scratch,
                    len: 4,
                    flags: VIRTQ_DESC_F_NEXT,
                    next: 0,
                }; MAX_QUEUE_SIZE as usize];
                for (i, d) in descs.iter_mut().enumerate().take(n as usize) {
                    d.next = i as u16 + 1;
                }
                self.live.inflate.add_raw(&descs[..n as usize])
            }
            HostileCase::ZeroLen => {
                let p = self.sacrificial_pfn(mem);
                self.write_scratch_u32(0, p);
                self.live.inflate.add(&[Buf::readable(scratch, 0)])
            }
            HostileCase::OddLen => {
                let p = self.sacrificial_pfn(mem);
                self.write_scratch_u32(0, p);
                self.write_scratch_u32(1, 0);
                self.live.inflate.add(&[Buf::readable(scratch, 6)])
            }
            HostileCase::WritableInflate => {
                let p = self.sacrificial_pfn(mem);
                self.write_scratch_u32(0, p);
                self.live.inflate.add(&[Buf::writable(scratch, 4)])
            }
            HostileCase::Indirect => {
                // One PFN, described by a one-entry indirect table (at
                // scratch + 64) that the ring's descriptor refers to.
                let p = self.sacrificial_pfn(mem);
                self.write_scratch_u32(0, p);
                let table = [scratch, 4];
                for (i, w) in table.iter().enumerate() {
                    // SAFETY: scratch area of the data page (16 bytes at
                    // +64: addr, then len and flags/next as one u64).
                    unsafe {
                        core::ptr::write_volatile(
                            (scratch + 64 + 8 * i as u64) as *mut u64,
                            w.to_le(),
                        )
                    };
                }
                self.live.inflate.add_raw(&[RawDesc {
                    addr: scratch + 64,
                    len: 16,
                    flags: VIRTQ_DESC_F_INDIRECT,
                    next: 0,
                }])
            }
            HostileCase::StatsTruncated => {
                if self.live.stats.is_none() {
                    return Err("VIRTIO_BALLOON_F_STATS_VQ not negotiated");
                }
                // One and a half stat entries: 15 bytes.
                let mut bytes = [0u8; STATS_BYTES];
                encode_stats(&self.stats_vals, &mut bytes);
                for (i, b) in bytes.iter().take(15).enumerate() {
                    // SAFETY: scratch area of the data page.
                    unsafe { core::ptr::write_volatile((scratch + i as u64) as *mut u8, *b) };
                }
                self.live
                    .stats
                    .as_mut()
                    .and_then(|s| s.add(&[Buf::readable(scratch, 15)]))
            }
        };
        let Some(head) = head else {
            return Err("no free descriptors (earlier hostile buffers not returned)");
        };
        self.kick(q);
        let deadline = clock::now_ns() + HOSTILE_WAIT_NS;
        if q == Queue::Stats {
            // The device may keep the buffer until its next stats request.
            let back = self.wait_stats_buffer(mem, head, deadline);
            return Ok(back);
        }
        Ok(self.wait_used(q, head, Some(deadline)))
    }

    /// Whether `case` can be sent with the negotiated features (`hostile
    /// all` skips the others).
    pub fn hostile_supported(&self, case: HostileCase) -> bool {
        match case {
            HostileCase::StatsTruncated => self.live.stats.is_some(),
            HostileCase::HintStaleId
            | HostileCase::HintOutsideRam
            | HostileCase::HintWrongDirection => self.live.free_page.is_some(),
            HostileCase::ReportOutsideRam | HostileCase::ReportTooLong => {
                self.live.reporting.is_some()
            }
            HostileCase::SgRanges => self.has(VIRTIO_BALLOON_F_BLIMP_SG),
            _ => true,
        }
    }

    /// Adds each chain to `q`, kicks once, and waits up to HOSTILE_WAIT_NS
    /// for the device to return the last one.
    fn send_chains(&mut self, q: Queue, chains: &[&[Buf]]) -> Result<bool, &'static str> {
        let mut last = None;
        for c in chains {
            let (queue, _) = self.queue(q);
            while queue.pop_used().is_some() {}
            last = Some(
                queue
                    .add(c)
                    .ok_or("no free descriptors (earlier hostile buffers not returned)")?,
            );
        }
        let Some(head) = last else {
            return Ok(true);
        };
        self.kick(q);
        Ok(self.wait_used(q, head, Some(clock::now_ns() + HOSTILE_WAIT_NS)))
    }

    /// `hostile flood`: for HOSTILE_FLOOD_NS, the inflate ring kept full of
    /// one-PFN buffers (a frame given up for good), each re-added the
    /// moment the device uses it, faster than any device serves them: a
    /// device that serves a queue until it is empty never stops. Used-buffer
    /// interrupts are off meanwhile (their handler would let the device
    /// catch up). Prints when it starts and how many buffers the device
    /// used; then waits (HOSTILE_WAIT_NS) for the last ones.
    ///
    /// `scattered`: each buffer is instead a 64 KiB PFN array (16 pages of
    /// 1024 PFNs) of 16384 frames given up for good, no two adjacent, so
    /// that each PFN is a run of its own for the device to give back.
    fn hostile_flood(&mut self, mem: &mut Memory, scattered: bool) -> Result<bool, &'static str> {
        let case = if scattered {
            HostileCase::FloodScattered
        } else {
            HostileCase::Flood
        };
        let scratch = self.data + HOSTILE_OFFSET;
        let mut arrays = [Buf::readable(scratch, 4); SCATTERED_ARRAY_PAGES];
        let buf = if scattered {
            scattered_pfn_arrays(mem, &mut arrays)?;
            &arrays[..]
        } else {
            let p = self.sacrificial_pfn(mem);
            self.write_scratch_u32(0, p);
            &arrays[..1]
        };
        self.live.inflate.suppress_interrupts();
        while self.live.inflate.add(buf).is_some() {}
        crate::println!(
            "hostile {}: {} s of inflate buffers",
            case.name(),
            HOSTILE_FLOOD_NS / 1_000_000_000
        );
        self.kick(Queue::Inflate);
        let end = clock::now_ns() + HOSTILE_FLOOD_NS;
        let mut used = 0u64;
        while clock::now_ns() < end {
            while self.live.inflate.pop_used().is_some() {
                used += 1;
                if self.live.inflate.add(buf).is_some() {
                    self.kick(Queue::Inflate);
                }
            }
            core::hint::spin_loop();
        }
        self.live.inflate.allow_interrupts();
        crate::println!("hostile {}: the device used {used} buffers", case.name());
        Ok(self.wait_queue(
            Queue::Inflate,
            Some(clock::now_ns() + HOSTILE_WAIT_NS),
            |queue| {
                while queue.pop_used().is_some() {}
                queue.in_flight() == 0
            },
        ))
    }

    /// `hostile sg-ranges` (VIRTIO_BALLOON_F_BLIMP_SG): one inflate chain
    /// of 10 bad ranges (unaligned start, unaligned length, zero length,
    /// overflowing, past the end of RAM, in the MMIO hole on this device's
    /// registers, across the end of RAM, a device-readable descriptor, a
    /// page already in the balloon, and a range half in the balloon), then
    /// one deflate chain of 2 ranges not in the balloon. The device must
    /// refuse all 12, return both buffers and keep working; the one page
    /// inflated for the duplicate cases stays in the balloon (and is
    /// counted in `actual`). A range longer than 4 GiB − 4 KiB cannot be
    /// written: a descriptor's length is 32 bits.
    fn hostile_sg(&mut self, mem: &mut Memory) -> Result<bool, &'static str> {
        if !self.has(VIRTIO_BALLOON_F_BLIMP_SG) {
            return Err("VIRTIO_BALLOON_F_BLIMP_SG not negotiated");
        }
        // A real one-page inflate first, for the "already inflated" cases.
        let (got, _) = self.sg_fill(mem, 1);
        let inflated = mem
            .balloon_peek()
            .filter(|_| got == 1)
            .ok_or("out of memory")?;
        let page = inflated * PAGE_SIZE;
        let free = mem.frames.alloc().ok_or("out of memory")?;
        // Freed again below: never in the balloon, never sent for real.
        let _ = mem.frames.free(free);
        let free = free * PAGE_SIZE;
        let end = mem.nframes() * PAGE_SIZE;
        let w = Buf::writable;
        let inflate = [
            w(free + 0x800, 0x1000),
            w(free, 0x1800),
            w(free, 0),
            w(u64::MAX - 0xfff, 0x2000),
            w(Self::past_ram(mem, PAGE_SIZE), 0x1000),
            w(self.dev.base, 0x1000),
            w(end - PAGE_SIZE, 0x2000),
            Buf::readable(free, 0x1000),
            w(page, 0x1000),
            w(page.saturating_sub(PAGE_SIZE), 0x2000),
        ];
        let deflate = [w(free, 0x1000), w(page, 0x2000)];
        let a = self.send_chains(Queue::Inflate, &[&inflate])?;
        let b = self.send_chains(Queue::Deflate, &[&deflate])?;
        Ok(a && b)
    }

    /// First guest-physical address past RAM, rounded up to `align`.
    fn past_ram(mem: &Memory, align: u64) -> u64 {
        (mem.nframes() * PAGE_SIZE).next_multiple_of(align)
    }

    /// A 4 MiB hint block the guest still uses: the one holding the first
    /// filled page, else the one holding the driver's data page.
    fn in_use_hint_block(&self, mem: &Memory) -> u64 {
        let mask = !((1u64 << HINT_BLOCK_ORDER) - 1);
        let pfn = (0..mem.nframes())
            .find(|&p| mem.record(p).is_filled())
            .unwrap_or(self.data / PAGE_SIZE);
        (pfn & mask) * PAGE_SIZE
    }

    /// Free page hinting hostile cases (see docs/testguest.md).
    fn hostile_hint(
        &mut self,
        mem: &mut Memory,
        case: HostileCase,
        in_all: bool,
    ) -> Result<bool, &'static str> {
        if self.live.free_page.is_none() {
            return Err("VIRTIO_BALLOON_F_FREE_PAGE_HINT not negotiated");
        }
        let scratch = self.data + HOSTILE_OFFSET;
        let block = PAGE_SIZE << HINT_BLOCK_ORDER;
        let hint = |addr| Buf::writable(addr, block as u32);
        match case {
            HostileCase::HintStaleId => {
                // A command id that is not the host's, then a hint of a block
                // in use: the device must not take it (no round accepts it).
                let id = self.dev.config_read32(CONFIG_FREE_PAGE_HINT_CMD_ID);
                self.write_scratch_u32(0, id.wrapping_add(7));
                let live = self.in_use_hint_block(mem);
                self.send_chains(
                    Queue::FreePage,
                    &[&[Buf::readable(scratch, 4)], &[hint(live)]],
                )
            }
            HostileCase::HintWrongDirection => {
                // A hint range (le64 address, le32 length) in a 12-byte
                // device-readable buffer: neither a command nor a hint.
                let addr = Self::past_ram(mem, block);
                self.write_scratch_u32(0, addr as u32);
                self.write_scratch_u32(1, (addr >> 32) as u32);
                self.write_scratch_u32(2, block as u32);
                self.send_chains(Queue::FreePage, &[&[Buf::readable(scratch, 12)]])
            }
            _ => {
                // hint-outside-ram: serve the next round the host requests
                // with hints outside RAM only.
                let id = self.wait_hint_round(in_all)?;
                let (active, stop) = self.begin_hint_round(id);
                if !self.send_chains(Queue::FreePage, &[&[Buf::readable(active, 4)]])? {
                    return Ok(false);
                }
                let past = Self::past_ram(mem, block);
                let back =
                    self.send_chains(Queue::FreePage, &[&[hint(past)], &[hint(MMIO_HOLE_ADDR)]])?;
                let stopped = self.send_chains(Queue::FreePage, &[&[Buf::readable(stop, 4)]])?;
                Ok(back && stopped)
            }
        }
    }

    /// Waits for a hinting round id the driver has not served yet.
    fn wait_hint_round(&mut self, in_all: bool) -> Result<u32, &'static str> {
        let deadline = clock::now_ns()
            + if in_all {
                HOSTILE_WAIT_NS
            } else {
                HOSTILE_ROUND_WAIT_NS
            };
        let mut said = false;
        loop {
            let seen = events::snapshot();
            let id = self.dev.config_read32(CONFIG_FREE_PAGE_HINT_CMD_ID);
            if id != FREE_PAGE_HINT_CMD_ID_STOP
                && id != FREE_PAGE_HINT_CMD_ID_DONE
                && id != self.hint_active
            {
                return Ok(id);
            }
            if !said {
                crate::println!("hostile hint-outside-ram waiting for a hinting round");
                said = true;
            }
            let now = clock::now_ns();
            if now >= deadline {
                return Err("the host started no hinting round");
            }
            self.collect_isr();
            idle::wait(seen, Some(deadline.min(now + 10_000_000)));
        }
    }

    /// Free page reporting hostile cases (see docs/testguest.md).
    fn hostile_report(
        &mut self,
        mem: &mut Memory,
        case: HostileCase,
    ) -> Result<bool, &'static str> {
        if self.live.reporting.is_none() {
            return Err("VIRTIO_BALLOON_F_REPORTING not negotiated");
        }
        let range = PAGE_SIZE << REPORT_ORDER;
        let past = Self::past_ram(mem, range);
        let report = |addr| Buf::writable(addr, range as u32);
        if case == HostileCase::ReportOutsideRam {
            let bufs = [report(past), report(MMIO_HOLE_ADDR), report(1 << 40)];
            return self.send_chains(Queue::Reporting, &[&bufs]);
        }
        // report-too-long: a device-readable report (wrong direction), then
        // a chain of more than 32 ranges. The RAM range is a block the
        // guest gives up for good; the others lie past the end of RAM.
        let given_up = mem
            .frames
            .alloc_block(REPORT_ORDER)
            .map_or(past, |pfn| pfn * PAGE_SIZE);
        let readable = Buf::readable(given_up, range as u32);
        let wrong = self.send_chains(Queue::Reporting, &[&[readable]])?;
        let addr = |i: usize| {
            if i == 0 {
                given_up
            } else {
                past + i as u64 * range
            }
        };
        let free = self
            .live
            .reporting
            .as_ref()
            .map_or(0, |q| usize::from(q.num_free()));
        let long = if free > REPORT_CAPACITY {
            let n = HOSTILE_REPORT_LEN.min(free);
            let mut bufs = [report(0); HOSTILE_REPORT_LEN];
            for (i, b) in bufs.iter_mut().enumerate() {
                b.addr = addr(i);
            }
            self.send_chains(Queue::Reporting, &[&bufs[..n]])?
        } else {
            // The ring holds no more than 32: chain every free descriptor,
            // the last still flagged NEXT with `next` past the table (a
            // 33rd descriptor the device cannot have).
            let mut descs = [RawDesc {
                addr: 0,
                len: range as u32,
                flags: VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                next: 0,
            }; MAX_QUEUE_SIZE as usize];
            for (i, d) in descs.iter_mut().enumerate().take(free) {
                d.addr = addr(i);
                d.next = i as u16 + 1;
            }
            let Some(q) = self.live.reporting.as_mut() else {
                return Err("VIRTIO_BALLOON_F_REPORTING not negotiated");
            };
            let head = q
                .add_raw(&descs[..free])
                .ok_or("no free descriptors (earlier hostile buffers not returned)")?;
            self.kick(Queue::Reporting);
            self.wait_used(
                Queue::Reporting,
                head,
                Some(clock::now_ns() + HOSTILE_WAIT_NS),
            )
        };
        Ok(wrong && long)
    }

    fn wait_stats_buffer(&mut self, mem: &Memory, head: u16, deadline_ns: u64) -> bool {
        loop {
            let seen = events::snapshot();
            let Some(q) = self.live.stats.as_mut() else {
                return false;
            };
            let mut back = false;
            let mut refill = false;
            while let Some(u) = q.pop_used() {
                if u.known && u.id == u32::from(head) {
                    back = true;
                }
                if u.known && Some(u.id) == self.stats_head.map(u32::from) {
                    self.stats_head = None;
                    refill = true;
                }
            }
            if refill {
                // Never leave the device without the real stats buffer.
                self.queue_stats(mem);
            }
            if back || clock::now_ns() >= deadline_ns {
                return back;
            }
            self.collect_isr();
            idle::wait(seen, Some(deadline_ns));
        }
    }

    /// One-line description for the `balloon` command.
    pub fn describe(&self, out: &mut impl core::fmt::Write) -> core::fmt::Result {
        let (i, d, s) = self.queue_sizes();
        write!(
            out,
            "balloon started base {:#x} irq {} features {:#x} inflate {} deflate {}",
            self.dev.base, self.gsi, self.live.features, i, d
        )?;
        if let Some(s) = s {
            write!(out, " stats {s}")?;
        }
        if let Some(q) = &self.live.free_page {
            write!(out, " free-page {}", q.size())?;
        }
        if let Some(q) = &self.live.reporting {
            write!(out, " reporting {}", q.size())?;
        }
        if self.has(VIRTIO_BALLOON_F_BLIMP_SG) {
            write!(out, " sg")?;
        }
        write!(
            out,
            " {}",
            if self.irq.is_some() {
                "interrupts"
            } else {
                "polling"
            }
        )
    }
}

/// Entry `i` of the PFN array at `array`.
fn write_pfn(array: u64, i: u64, pfn: u32) {
    // SAFETY: `array` is a page the driver owns, identity mapped (one of
    // its burst arrays, i < 256, or a frame taken for a hostile flood,
    // i < 1024): the 4 bytes at 4 * i lie inside it.
    unsafe { core::ptr::write_volatile((array + 4 * i) as *mut u32, pfn.to_le()) }
}

fn read_pfn(array: u64, i: u64) -> u32 {
    // SAFETY: as write_pfn().
    u32::from_le(unsafe { core::ptr::read_volatile((array + 4 * i) as *const u32) })
}

/// Returns the first `n` pages of a burst array that was not sent: frames
/// to the allocator (inflate), pages to the balloon in the order they left
/// it (deflate).
fn give_back(mem: &mut Memory, inflate: bool, array: u64, n: u64) {
    for i in (0..n).rev() {
        let p = u64::from(read_pfn(array, i));
        if inflate {
            // Allocated above, so this cannot fail.
            let _ = mem.frames.free(p);
        } else {
            mem.balloon_push(p);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Queue {
    Inflate,
    Deflate,
    Stats,
    FreePage,
    Reporting,
}

/// Pages of one `hostile flood-scattered` PFN array (1024 PFNs each).
const SCATTERED_ARRAY_PAGES: usize = 16;

/// Fills `arrays` with the descriptors of one 64 KiB PFN array: 16 frames
/// of 1024 PFNs each, 16384 frames in all, every other one of a stretch
/// of 32768 taken from the allocator for good (none is ever used again:
/// the device may give them back to the host).
fn scattered_pfn_arrays(
    mem: &mut Memory,
    arrays: &mut [Buf; SCATTERED_ARRAY_PAGES],
) -> Result<(), &'static str> {
    for slot in arrays.iter_mut() {
        let array = mem.frames.alloc().ok_or("out of memory")? * PAGE_SIZE;
        let mut i = 0u64;
        while i < 1024 {
            let pfn = mem.frames.alloc().ok_or("out of memory")?;
            if pfn % 2 == 0 {
                write_pfn(array, i, pfn as u32);
                i += 1;
            }
        }
        *slot = Buf::readable(array, 4096);
    }
    Ok(())
}
