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
use testguest::virtq::{Buf, Layout, MAX_QUEUE_SIZE, RawDesc, SplitQueue, VIRTQ_DESC_F_NEXT};

use crate::apic;
use crate::clock;
use crate::events;
use crate::idle;
use crate::memory::Memory;
use crate::virtio::mmio::{self, Mmio};
use testguest::cmdline::MmioDevice;
use testguest::command::HostileCase;

/// Features this driver accepts when offered. PAGE_POISON, FREE_PAGE_HINT
/// and REPORTING are not negotiated (not implemented).
const DRIVER_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_BALLOON_F_MUST_TELL_HOST)
    | bit(VIRTIO_BALLOON_F_STATS_VQ)
    | bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);

/// Linux retries a failed inflate allocation after 200 ms ("Out of puff!").
const OUT_OF_PUFF_RETRY_NS: u64 = 200_000_000;
/// How long hostile sends wait for the device to return their buffer.
const HOSTILE_WAIT_NS: u64 = 1_000_000_000;

// Layout of the driver's data page.
const PFNS_OFFSET: u64 = 0;
const STATS_OFFSET: u64 = 0x400;
const HOSTILE_OFFSET: u64 = 0x800;

pub struct Balloon {
    dev: Mmio,
    gsi: u32,
    /// Index in the interrupt tables (None in poll mode).
    irq: Option<usize>,
    features: u64,
    inflate: SplitQueue,
    deflate: SplitQueue,
    stats: Option<SplitQueue>,
    /// Queue indices as Linux numbers them (no gaps for absent features).
    stats_qidx: u16,
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
    /// Frames given away by hostile sends (never reused).
    hostile_frames: u64,
    /// The device reported DEVICE_NEEDS_RESET: nothing more is sent until
    /// `balloon` restarts it.
    broken: bool,
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

/// Bytes reserved per queue: two frames hold any queue of up to 256 entries.
const QUEUE_AREA: u64 = 2 * PAGE_SIZE;

/// Guest memory the driver keeps for the device's whole life.
#[derive(Clone, Copy)]
struct Areas {
    queues: [u64; 3],
    data: u64,
}

impl Areas {
    fn alloc(mem: &mut Memory) -> Option<Areas> {
        let mut queues = [0; 3];
        for q in &mut queues {
            *q = mem.frames.alloc_block(1)? * PAGE_SIZE;
        }
        Some(Areas {
            queues,
            data: mem.frames.alloc()? * PAGE_SIZE,
        })
    }
}

/// A device after feature negotiation and queue setup.
struct Live {
    features: u64,
    inflate: SplitQueue,
    deflate: SplitQueue,
    stats: Option<SplitQueue>,
}

/// Device initialisation (spec 3.1.1) up to, not including, DRIVER_OK.
fn init_device(dev: &Mmio, areas: &Areas) -> Result<Live, StartError> {
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
    let features = offered & DRIVER_FEATURES;
    dev.set_driver_features(features);
    dev.add_status(mmio::VIRTIO_CONFIG_S_FEATURES_OK);
    if dev.status() & mmio::VIRTIO_CONFIG_S_FEATURES_OK == 0 {
        return Err(fail(StartError::FeaturesRejected));
    }
    // Queues in Linux's order: inflate, deflate, then stats if negotiated
    // (vm_find_vqs() skips absent queues without leaving a gap).
    let inflate = setup_queue(dev, 0, areas.queues[0]).map_err(fail)?;
    let deflate = setup_queue(dev, 1, areas.queues[1]).map_err(fail)?;
    let stats = if features & bit(VIRTIO_BALLOON_F_STATS_VQ) != 0 {
        Some(setup_queue(dev, 2, areas.queues[2]).map_err(fail)?)
    } else {
        None
    };
    Ok(Live {
        features,
        inflate,
        deflate,
        stats,
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
        let live = init_device(&dev, &areas)?;
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
            features: live.features,
            inflate: live.inflate,
            deflate: live.deflate,
            stats: live.stats,
            stats_qidx: 2,
            data: areas.data,
            stats_head: None,
            stats_vals: [0; NUM_STATS],
            stats_sent: 0,
            pending_isr: 0,
            adjust: true,
            retry_at_ns: 0,
            config_generation: 0,
            alloc_stalls: 0,
            hostile_frames: 0,
            broken: false,
        };
        b.go_live(mem);
        Ok(b)
    }

    /// Primes the stats queue, sets DRIVER_OK and reports the current size,
    /// like the end of Linux `virtballoon_probe()`/`virtballoon_restore()`.
    fn go_live(&mut self, mem: &Memory) {
        // Like Linux init_vqs(): prime the stats queue with one buffer and
        // kick it before DRIVER_OK...
        if self.stats.is_some() {
            self.queue_stats(mem);
        }
        self.dev.add_status(mmio::VIRTIO_CONFIG_S_DRIVER_OK);
        // ...and kick again now that the device is live, for devices that
        // ignore notifications before DRIVER_OK (harmless otherwise).
        if self.stats.is_some() {
            self.dev.notify(self.stats_qidx);
        }
        self.config_generation = self.dev.config_generation();
        self.adjust = true;
        self.retry_at_ns = 0;
        self.update_size(mem);
    }

    /// Whether the device asked to be reset, or buffers from earlier
    /// (hostile) requests are still outstanding on the inflate queue.
    pub fn needs_restart(&self) -> bool {
        self.broken
            || self.inflate.in_flight() > 0
            || self.dev.status() & mmio::VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }

    /// `balloon` again: resets and re-initialises the device (e.g. after it
    /// reported DEVICE_NEEDS_RESET). Pages already in the balloon stay
    /// there, as across Linux's freeze/restore; `actual` is rewritten.
    pub fn restart(&mut self, mem: &mut Memory) -> Result<(), StartError> {
        let live = init_device(&self.dev, &self.areas)?;
        self.features = live.features;
        self.inflate = live.inflate;
        self.deflate = live.deflate;
        self.stats = live.stats;
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
            self.inflate.size(),
            self.deflate.size(),
            self.stats.as_ref().map(SplitQueue::size),
        )
    }
    pub fn has(&self, feature: u32) -> bool {
        self.features & bit(feature) != 0
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
    pub fn service(&mut self, mem: &mut Memory) {
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
        if self.pending_isr & mmio::VIRTIO_MMIO_INT_CONFIG != 0 {
            // Linux virtballoon_changed(): queue the size update.
            self.adjust = true;
            self.retry_at_ns = 0;
        }
        self.pending_isr = 0;
        if self.adjust && clock::now_ns() >= self.retry_at_ns {
            self.move_towards_target(mem);
        }
    }

    /// Linux update_balloon_size_func(): one batch at a time, `actual`
    /// written after each, until the target is reached.
    fn move_towards_target(&mut self, mem: &mut Memory) {
        loop {
            let diff = towards_target(self.num_pages(), mem.balloon_pages());
            if diff == 0 {
                self.adjust = false;
                self.retry_at_ns = 0;
                return;
            }
            if diff > 0 {
                let want = (diff as u64).min(ARRAY_PFNS_MAX as u64);
                let got = self.fill(mem, want);
                self.update_size(mem);
                if self.broken {
                    return;
                }
                if got < want {
                    // "Out of puff": retry later, like Linux's msleep(200).
                    self.alloc_stalls += 1;
                    self.retry_at_ns = clock::now_ns() + OUT_OF_PUFF_RETRY_NS;
                    return;
                }
            } else {
                self.leak(mem, diff.unsigned_abs());
                self.update_size(mem);
                if self.broken {
                    return;
                }
            }
            // Keep statistics flowing during long inflations.
            self.collect_isr();
            self.service_stats(mem);
        }
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

    /// Linux fill_balloon(): up to 256 fresh frames, then tell_host(inflate).
    fn fill(&mut self, mem: &mut Memory, want: u64) -> u64 {
        let mut pfns = [0u32; ARRAY_PFNS_MAX];
        let mut n = 0;
        while (n as u64) < want.min(ARRAY_PFNS_MAX as u64) {
            match mem.frames.alloc() {
                Some(pfn) => {
                    pfns[n] = pfn as u32;
                    n += 1;
                }
                None => break,
            }
        }
        if n == 0 {
            return 0;
        }
        for &p in &pfns[..n] {
            mem.balloon_push(u64::from(p));
        }
        self.write_pfns(&pfns[..n]);
        self.tell_host(Queue::Inflate, 4 * n as u32);
        n as u64
    }

    /// Linux leak_balloon(): up to 256 pages out of the balloon; the host
    /// is told (and acknowledges) before the frames go back to the
    /// allocator, as VIRTIO_BALLOON_F_MUST_TELL_HOST requires.
    fn leak(&mut self, mem: &mut Memory, want: u64) -> u64 {
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
            return 0;
        }
        self.write_pfns(&pfns[..n]);
        if !self.tell_host(Queue::Deflate, 4 * n as u32) {
            // Not acknowledged: the pages may not be reused (MUST_TELL_HOST).
            for &p in &pfns[..n] {
                mem.balloon_push(u64::from(p));
            }
            return 0;
        }
        for &p in &pfns[..n] {
            // Ballooned frames are allocated, so this cannot fail.
            let _ = mem.frames.free(u64::from(p));
        }
        n as u64
    }

    /// Linux update_balloon_size(): `actual` = pages in the balloon.
    fn update_size(&self, mem: &Memory) {
        self.dev
            .config_write32(CONFIG_ACTUAL, mem.balloon_pages() as u32);
    }

    fn queue(&mut self, q: Queue) -> (&mut SplitQueue, u16) {
        match q {
            Queue::Inflate => (&mut self.inflate, 0),
            Queue::Deflate => (&mut self.deflate, 1),
            Queue::Stats => (self.stats.as_mut().expect("stats queue"), self.stats_qidx),
        }
    }

    fn kick(&mut self, q: Queue) {
        let (queue, idx) = self.queue(q);
        if !queue.notify_suppressed() {
            self.dev.notify(idx);
        }
    }

    /// Linux tell_host(): one out-buffer with the PFN array, kick, wait for
    /// the device to use it.
    fn tell_host(&mut self, q: Queue, len: u32) -> bool {
        let addr = self.data + PFNS_OFFSET;
        let (queue, _) = self.queue(q);
        let Some(head) = queue.add(&[Buf {
            addr,
            len,
            writable: false,
        }]) else {
            // Only possible if hostile buffers were never returned.
            return false;
        };
        self.kick(q);
        self.wait_used(q, head, None)
    }

    /// Waits until the device returns `head` on `q` (or the deadline, or
    /// the device reports DEVICE_NEEDS_RESET). Returns whether it came back.
    fn wait_used(&mut self, q: Queue, head: u16, deadline_ns: Option<u64>) -> bool {
        loop {
            let seen = events::snapshot();
            let (queue, _) = self.queue(q);
            while let Some(u) = queue.pop_used() {
                if u.known && u.id == u32::from(head) {
                    return true;
                }
            }
            if deadline_ns.is_some_and(|d| clock::now_ns() >= d) {
                return false;
            }
            if self.dev.status() & mmio::VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
                self.broken = true;
                return false;
            }
            // Keep the interrupt status for service() (config changes).
            self.collect_isr();
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
        let Some(q) = self.stats.as_mut() else { return };
        self.stats_head = q.add(&[Buf {
            addr,
            len: STATS_BYTES as u32,
            writable: false,
        }]);
        if self.stats_head.is_some() {
            self.stats_sent += 1;
            self.kick(Queue::Stats);
        }
    }

    /// Linux stats_handle_request(): when the device returns the stats
    /// buffer, refill it and give it back.
    fn service_stats(&mut self, mem: &Memory) {
        let Some(q) = self.stats.as_mut() else { return };
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

    /// `balloon-wait`: moves towards the target until actual == num_pages.
    pub fn wait_target(&mut self, mem: &mut Memory) -> Result<u32, &'static str> {
        self.adjust = true;
        self.retry_at_ns = 0;
        loop {
            let seen = events::snapshot();
            self.service(mem);
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
            let n = self.leak(mem, want.min(OOM_NR_PAGES));
            self.update_size(mem);
            if n == 0 {
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

    /// A frame nobody will use again, for PFNs in hostile buffers (a
    /// misbehaving VMM might still discard it).
    fn sacrificial_pfn(&mut self, mem: &mut Memory) -> u32 {
        match mem.frames.alloc() {
            Some(p) => {
                self.hostile_frames += 1;
                p as u32
            }
            None => 0,
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
    pub fn hostile(&mut self, mem: &mut Memory, case: HostileCase) -> Result<bool, &'static str> {
        let scratch = self.data + HOSTILE_OFFSET;
        let q = if case == HostileCase::StatsTruncated {
            Queue::Stats
        } else {
            Queue::Inflate
        };
        let head = match case {
            HostileCase::All => return Err("'all' is a list"),
            HostileCase::PfnOutsideRam => {
                // Just past the end of RAM, and far beyond anything.
                self.write_scratch_u32(0, mem.nframes() as u32);
                self.write_scratch_u32(1, u32::MAX);
                self.inflate.add(&[Buf {
                    addr: scratch,
                    len: 8,
                    writable: false,
                }])
            }
            HostileCase::PfnInMmioHole => {
                // Start of the hole, this device's own registers, the LAPIC.
                self.write_scratch_u32(0, 0xc0000);
                self.write_scratch_u32(1, (self.dev.base >> 12) as u32);
                self.write_scratch_u32(2, (apic::LAPIC_BASE >> 12) as u32);
                self.inflate.add(&[Buf {
                    addr: scratch,
                    len: 12,
                    writable: false,
                }])
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
                self.inflate.add_raw(&[d(1), d(0)])
            }
            HostileCase::ChainTooLong => {
                // Every descriptor of the queue chained, the last one still
                // flagged NEXT and pointing past the table: longer than the
                // queue can hold.
                let p = self.sacrificial_pfn(mem);
                self.write_scratch_u32(0, p);
                let n = self.inflate.num_free();
                let mut descs = [RawDesc {
                    addr: scratch,
                    len: 4,
                    flags: VIRTQ_DESC_F_NEXT,
                    next: 0,
                }; MAX_QUEUE_SIZE as usize];
                for (i, d) in descs.iter_mut().enumerate().take(n as usize) {
                    d.next = i as u16 + 1;
                }
                self.inflate.add_raw(&descs[..n as usize])
            }
            HostileCase::ZeroLen => {
                let p = self.sacrificial_pfn(mem);
                self.write_scratch_u32(0, p);
                self.inflate.add(&[Buf {
                    addr: scratch,
                    len: 0,
                    writable: false,
                }])
            }
            HostileCase::OddLen => {
                let p = self.sacrificial_pfn(mem);
                self.write_scratch_u32(0, p);
                self.write_scratch_u32(1, 0);
                self.inflate.add(&[Buf {
                    addr: scratch,
                    len: 6,
                    writable: false,
                }])
            }
            HostileCase::WritableInflate => {
                let p = self.sacrificial_pfn(mem);
                self.write_scratch_u32(0, p);
                self.inflate.add(&[Buf {
                    addr: scratch,
                    len: 4,
                    writable: true,
                }])
            }
            HostileCase::StatsTruncated => {
                if self.stats.is_none() {
                    return Err("VIRTIO_BALLOON_F_STATS_VQ not negotiated");
                }
                // One and a half stat entries: 15 bytes.
                let mut bytes = [0u8; STATS_BYTES];
                encode_stats(&self.stats_vals, &mut bytes);
                for (i, b) in bytes.iter().take(15).enumerate() {
                    // SAFETY: scratch area of the data page.
                    unsafe { core::ptr::write_volatile((scratch + i as u64) as *mut u8, *b) };
                }
                self.stats.as_mut().and_then(|s| {
                    s.add(&[Buf {
                        addr: scratch,
                        len: 15,
                        writable: false,
                    }])
                })
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

    fn wait_stats_buffer(&mut self, mem: &Memory, head: u16, deadline_ns: u64) -> bool {
        loop {
            let seen = events::snapshot();
            let Some(q) = self.stats.as_mut() else {
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
            self.dev.base, self.gsi, self.features, i, d
        )?;
        if let Some(s) = s {
            write!(out, " stats {s}")?;
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Queue {
    Inflate,
    Deflate,
    Stats,
}
