//! The balloon device proper: feature negotiation, config space, and what
//! each queue does with the buffers the guest puts on it.
//!
//! Threads: the transport calls the [`VirtioDevice`] methods on a vCPU
//! thread; the event loop calls the queue handlers (see
//! [`event_handler`](super::event_handler)); the API calls the host-side
//! methods (`set_target_pages`, ...). All hold the device mutex, so the
//! device itself is single-threaded.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use log::{debug, error, info};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as GuestMemoryTrait};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

use super::config::{BalloonConfig, ConfigSpace};
use super::discard::discard_all;
use super::hinting::{HintSink, HintState, HintingStatus};
use super::metrics::BalloonMetrics;
use super::pfn_runs::{BATCH_BYTES, InflatedBitmap, PfnBatch, PfnRun, RamLayout};
pub use super::queue::MAX_CHAIN_DESCS;
use super::queue::{Descs, Drain, MAX_DISCARDS_PER_TURN, Notify, drain_chains};
use super::ranges::check_range;
use super::stats::{GuestStats, MAX_STATS_BYTES, NUM_STAT_TAGS, parse_stats};

/// The driver asks for no used-buffer interrupts (avail ring flags).
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
use super::*;
use crate::virtio::{
    ActivateError, Interrupt, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
    VirtioDevice,
};
use crate::{GpaRange, GuestMemory, RamDiscard, error_limited, warn_limited};

/// Most bytes of PFNs one inflate/deflate buffer may carry (16384 PFNs;
/// Linux sends at most 1 KiB).
pub const MAX_PFN_BUFFER_BYTES: u64 = 64 * 1024;

/// How long the free page queue is polled, without notifications, after it
/// ran dry (see `Notify::Poll`): a hinting driver adds a 4 MiB block every
/// few microseconds, so it is served without a kick per block.
pub const HINT_POLL_WINDOW: std::time::Duration = std::time::Duration::from_micros(500);

/// A queue the device is serving.
pub(crate) struct ActiveQueue {
    pub(crate) kind: QueueKind,
    pub(crate) queue: Queue,
    pub(crate) evt: EventFd,
    /// Writes of the device's own to `evt` not read back yet: a drain that
    /// stopped at its budget comes back to the queue through its eventfd
    /// (after whatever else the event loop has), and these are not the
    /// guest's kicks.
    pub(crate) resumes: u64,
}

impl ActiveQueue {
    /// The guest's notifications since the last call: the eventfd counts
    /// the QueueNotify writes since it was last read, and the device's own
    /// [`resumes`](Self::resumes), which are not kicks (a spurious wake-up
    /// reads EAGAIN: none).
    pub(crate) fn take_kicks(&mut self) -> u64 {
        let n = self.evt.read().unwrap_or(0);
        let kicks = n.saturating_sub(self.resumes);
        self.resumes = self.resumes.saturating_sub(n);
        kicks
    }
}

/// State that exists between DRIVER_OK and reset.
pub(crate) struct Active {
    pub(crate) mem: GuestMemory,
    pub(crate) interrupt: Arc<dyn Interrupt>,
    pub(crate) queues: Vec<ActiveQueue>,
    /// Queue eventfds are registered with the event loop.
    pub(crate) registered: bool,
}

/// The preamble every queue handler shares: serve each chain pending on
/// queue `idx` with [`drain_chains`], `serve` getting guest memory too;
/// nothing to do before activation. Takes the `active` field alone so that
/// `serve` may borrow the rest of the device.
pub(super) fn drain_active(
    active: &mut Option<Active>,
    idx: usize,
    timer: Option<&AtomicU64>,
    notify: Notify,
    full: Option<&dyn Fn() -> bool>,
    mut serve: impl FnMut(&GuestMemory, u16, Descs) -> Option<u16>,
) -> Drain {
    let Some(a) = active else {
        return Drain::default();
    };
    let mem = &a.mem;
    let q = &mut a.queues[idx].queue;
    drain_chains(q, mem, timer, notify, full, |head, descs| {
        serve(mem, head, descs)
    })
}

/// Inflated ranges that [`Balloon::serve_queue`] leaves to discard: with
/// MUST_TELL_HOST the inflate queue returns its buffers and raises the
/// interrupt first; the event loop (`BalloonEvents::process`) then runs
/// these after releasing the device lock, behind the discard gate.
#[must_use = "inflated pages stay in the guest's RAM until discarded"]
#[derive(Debug, Default)]
pub(crate) struct LateDiscards(Vec<GpaRange>);

impl LateDiscards {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Discard them, counted in `metrics`.
    pub(crate) fn run(self, discard: &dyn RamDiscard, metrics: &BalloonMetrics) {
        discard_all(discard, metrics, self.0);
    }
}

/// What a restored, previously active balloon carries into the activation
/// the restored transport performs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RestoredActive {
    pub(crate) held_stats: Option<u16>,
    pub(crate) broken: bool,
}

/// The virtio balloon.
pub struct Balloon {
    pub(super) cfg: BalloonConfig,
    pub(super) avail_features: u64,
    pub(super) acked_features: u64,
    pub(super) layout: RamLayout,
    pub(super) bitmap: InflatedBitmap,
    pub(super) discard: Arc<dyn RamDiscard>,
    pub(super) config: ConfigSpace,
    pub(super) config_generation: u32,
    pub(super) stats_interval_s: u32,
    pub(super) latest_stats: Option<GuestStats>,
    /// Head of the stats buffer the device holds until it wants new stats.
    pub(super) held_stats: Option<u16>,
    pub(super) metrics: Arc<BalloonMetrics>,
    pub(super) observer: Option<Box<dyn FnMut(BalloonEvent) + Send>>,
    pub(super) batch: PfnBatch,
    pub(super) discard_gate: Arc<Mutex<()>>,
    pub(super) broken: bool,
    pub(super) hint: HintState,
    pub(super) hint_sink: Option<Arc<dyn HintSink>>,
    /// Answer the guest's STOP of the current round with DONE (set by
    /// `start_hinting_with`).
    pub(super) hint_ack_on_stop: bool,
    /// The lowest target the guest may still be acting on: the lowest
    /// `num_pages` set since the device last saw the bitmap at the target.
    /// A deflate down to it follows a lowered target (the guest read it
    /// before a later raise); only a deflate below it is unsolicited.
    pub(super) deflate_floor: u32,
    /// Set by [`Balloon::freeze`] until [`Balloon::thaw`]: the device
    /// writes nothing to guest memory meanwhile.
    pub(super) frozen: bool,
    /// Queues (bit per index) notified while frozen, served on thaw.
    pub(super) frozen_kicks: u32,

    // Event-loop plumbing (see event_handler.rs).
    pub(crate) ctl_evt: EventFd,
    pub(crate) stats_timer: TimerFd,
    /// The timer must be re-armed/disarmed by the event loop.
    pub(crate) timer_dirty: bool,
    /// The timer was just re-armed: a pending readiness may be stale.
    pub(crate) timer_rearmed: bool,
    pub(crate) active: Option<Active>,
    /// Queue eventfds to unregister from the event loop (after a reset).
    pub(crate) stale_evts: Vec<EventFd>,
    /// Set by `Balloon::restore` for a device saved while active: what the
    /// re-activation by the restored transport must carry over.
    pub(super) pending_restore: Option<RestoredActive>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("cfg", &self.cfg)
            .field("acked_features", &self.acked_features)
            .field("config", &self.config)
            .field("active", &self.active.is_some())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

impl Balloon {
    /// A balloon over guest RAM `ram` (regions in ascending order; 4 KiB
    /// aligned), releasing memory through `discard`.
    pub fn new(
        cfg: BalloonConfig,
        ram: Vec<GpaRange>,
        discard: Arc<dyn RamDiscard>,
    ) -> Result<Self, Error> {
        let layout = RamLayout::new(&ram)?;
        if u64::from(cfg.initial_target_pages) > layout.total_pages() {
            return Err(Error::TargetTooLarge {
                target: cfg.initial_target_pages,
                ram_pages: layout.total_pages(),
            });
        }
        let mut avail_features = bit(VIRTIO_F_VERSION_1);
        for (on, b) in [
            (cfg.must_tell_host, VIRTIO_BALLOON_F_MUST_TELL_HOST),
            (cfg.stats_polling_interval_s > 0, VIRTIO_BALLOON_F_STATS_VQ),
            (cfg.deflate_on_oom, VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
            (cfg.free_page_hint, VIRTIO_BALLOON_F_FREE_PAGE_HINT),
            (cfg.page_poison, VIRTIO_BALLOON_F_PAGE_POISON),
            (cfg.free_page_reporting, VIRTIO_BALLOON_F_REPORTING),
            (cfg.sg, VIRTIO_BALLOON_F_BLIMP_SG),
        ] {
            if on {
                avail_features |= bit(b);
            }
        }
        let io = |what| move |source| Error::Io { what, source };
        let errno = |what| {
            move |e: vmm_sys_util::errno::Error| Error::Io {
                what,
                source: std::io::Error::from_raw_os_error(e.errno()),
            }
        };
        Ok(Self {
            avail_features,
            acked_features: 0,
            bitmap: InflatedBitmap::new(layout.total_pages()),
            layout,
            discard,
            config: ConfigSpace {
                num_pages: cfg.initial_target_pages,
                ..ConfigSpace::default()
            },
            config_generation: 0,
            stats_interval_s: cfg.stats_polling_interval_s,
            latest_stats: None,
            held_stats: None,
            metrics: Arc::new(BalloonMetrics::default()),
            observer: None,
            batch: PfnBatch::new(),
            discard_gate: Arc::new(Mutex::new(())),
            broken: false,
            hint: HintState::new(),
            hint_sink: None,
            hint_ack_on_stop: false,
            deflate_floor: cfg.initial_target_pages,
            frozen: false,
            frozen_kicks: 0,
            ctl_evt: EventFd::new(EFD_NONBLOCK).map_err(io("control eventfd"))?,
            stats_timer: TimerFd::new().map_err(errno("stats timerfd"))?,
            timer_dirty: false,
            timer_rearmed: false,
            active: None,
            stale_evts: Vec::new(),
            pending_restore: None,
            cfg,
        })
    }

    // ----- host side (API) -------------------------------------------------

    /// Ask the guest to hold `pages` 4 KiB pages in the balloon; raises a
    /// configuration-change interrupt if the device is active.
    pub fn set_target_pages(&mut self, pages: u32) -> Result<(), Error> {
        if self.frozen {
            return Err(Error::Frozen);
        }
        if u64::from(pages) > self.layout.total_pages() {
            return Err(Error::TargetTooLarge {
                target: pages,
                ram_pages: self.layout.total_pages(),
            });
        }
        self.config.num_pages = pages;
        self.deflate_floor = self.deflate_floor.min(pages);
        self.config_generation = self.config_generation.wrapping_add(1);
        info!("balloon: target set to {pages} pages");
        self.signal_config();
        self.emit(BalloonEvent::TargetChanged {
            target_pages: pages,
        });
        Ok(())
    }

    /// The target (`num_pages`), in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.config.num_pages
    }

    /// What the guest last reported (`actual`), in 4 KiB pages, bounded by
    /// guest RAM: the field is the driver's to write (virtio 1.2, 5.5.6), so a
    /// hostile guest may claim more pages than it has; the host's accounting
    /// (API, events) never does. The config space keeps what was written.
    pub fn actual_pages(&self) -> u32 {
        let total = u32::try_from(self.layout.total_pages()).unwrap_or(u32::MAX);
        self.config.actual.min(total)
    }

    /// Pages the device has seen inflated and not deflated since the last
    /// reset (its own bitmap, independent of what the guest reports).
    pub fn inflated_pages(&self) -> u64 {
        self.bitmap.count()
    }

    /// The last statistics the guest sent, if any.
    pub fn latest_stats(&self) -> Option<&GuestStats> {
        self.latest_stats.as_ref()
    }

    /// Current statistics polling interval (0 = not polling).
    pub fn stats_polling_interval(&self) -> u32 {
        self.stats_interval_s
    }

    /// Change how often the device asks for statistics; 0 stops polling.
    /// Fails if statistics were off at boot (the queue was never offered).
    pub fn set_stats_polling_interval(&mut self, secs: u32) -> Result<(), Error> {
        if self.avail_features & bit(VIRTIO_BALLOON_F_STATS_VQ) == 0 {
            return Err(Error::StatsDisabled(secs));
        }
        if self.frozen {
            return Err(Error::Frozen);
        }
        self.stats_interval_s = secs;
        self.request_timer_sync();
        Ok(())
    }

    /// Stop serving the guest until [`thaw`](Self::thaw), for a migration's
    /// or snapshot's final round (vCPUs paused): it syncs the dirty log,
    /// copies memory and then captures this device, and what the device
    /// would write meanwhile (used rings, discards) would be missing from
    /// the copy or disagree with the captured state. Holding the device
    /// lock for that long instead would stall the event loop, and the API
    /// behind it, for the whole copy. Waits for deferred discards. Queue
    /// notifications meanwhile are remembered and served on thaw (or, in
    /// a migrated VM, by the destination: the captured rings hold their
    /// buffers), a stats timer tick is skipped, and the host-side changes
    /// that would not reach the destination (target, stats interval) are
    /// refused ([`Error::Frozen`]).
    pub fn freeze(&mut self) {
        self.frozen = true;
        self.wait_for_discards();
    }

    /// Serve the guest again after [`freeze`](Self::freeze): queues
    /// notified meanwhile are signalled again. Harmless when not frozen.
    pub fn thaw(&mut self) {
        if !std::mem::take(&mut self.frozen) {
            return;
        }
        let kicked = std::mem::take(&mut self.frozen_kicks);
        let Some(a) = self.active.as_mut() else {
            return;
        };
        for (idx, q) in a.queues.iter_mut().enumerate() {
            if kicked & (1 << idx) == 0 {
                continue;
            }
            // The device's own write, as `resume_later`'s: not a kick.
            match q.evt.write(1) {
                Ok(()) => q.resumes += 1,
                Err(e) => error!(
                    "balloon: signalling the {} queue on thaw failed: {e}",
                    q.kind.name()
                ),
            }
        }
    }

    /// Whether the device is frozen (see [`freeze`](Self::freeze)).
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// The device's counters.
    pub fn metrics(&self) -> &BalloonMetrics {
        &self.metrics
    }

    /// A shared handle on the counters (read without the device lock).
    pub fn metrics_handle(&self) -> Arc<BalloonMetrics> {
        self.metrics.clone()
    }

    /// Called (under the device lock, on whichever thread caused it) for
    /// each [`BalloonEvent`]; it must not lock the balloon, and should only
    /// hand the event on (a channel, say).
    pub fn set_observer(&mut self, f: Box<dyn FnMut(BalloonEvent) + Send>) {
        self.observer = Some(f);
    }

    /// The configuration the device was built with.
    pub fn config(&self) -> &BalloonConfig {
        &self.cfg
    }

    /// Is the page at `pfn` in the balloon (per the device's bitmap)?
    pub fn is_inflated(&self, pfn: u64) -> bool {
        self.layout.bit_of(pfn).is_some_and(|b| self.bitmap.get(b))
    }

    // ----- helpers ---------------------------------------------------------

    pub(super) fn emit(&mut self, ev: BalloonEvent) {
        if let Some(f) = self.observer.as_mut() {
            f(ev);
        }
    }

    pub(crate) fn has_acked(&self, b: u32) -> bool {
        self.acked_features & bit(b) != 0
    }

    pub(super) fn signal_config(&self) {
        if let Some(a) = &self.active {
            BalloonMetrics::inc(&self.metrics.config_interrupts);
            if let Err(e) = a.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG) {
                error!("balloon: config interrupt failed: {e}");
            }
        }
    }

    /// Ask the event loop to re-arm or disarm the stats timer.
    fn request_timer_sync(&mut self) {
        self.timer_dirty = true;
        if let Err(e) = self.ctl_evt.write(1) {
            error!("balloon: waking the event loop failed: {e}");
        }
    }

    /// Whether the stats timer should run now.
    pub(crate) fn stats_timer_wanted(&self) -> bool {
        self.active.is_some()
            && !self.broken
            && self.has_acked(VIRTIO_BALLOON_F_STATS_VQ)
            && self.stats_interval_s > 0
    }

    fn mark_broken(&mut self, why: &str) {
        error_limited!("balloon: {why}; device needs reset");
        BalloonMetrics::inc(&self.metrics.queue_errors);
        if !self.broken {
            self.broken = true;
            self.signal_config();
        }
    }

    /// Index of the queue of `kind`, if it exists.
    pub(crate) fn queue_index(&self, kind: QueueKind) -> Option<usize> {
        self.active
            .as_ref()?
            .queues
            .iter()
            .position(|q| q.kind == kind)
    }

    // ----- queue handlers (event loop) --------------------------------------

    /// Serve every buffer pending on queue `idx` (what a notification of
    /// that queue does), discards included. Public for tests and
    /// benchmarks; the event loop uses [`serve_queue`](Self::serve_queue)
    /// and discards after releasing the device lock (see
    /// [`BalloonEvents`](super::event_handler::BalloonEvents)).
    pub fn process_queue(&mut self, idx: usize) {
        loop {
            let resumes = self.resumes(idx);
            self.serve_queue(idx).run(&*self.discard, &self.metrics);
            if self.resumes(idx) == resumes {
                break;
            }
        }
    }

    /// Times the device came back to queue `idx` on its own (see
    /// [`ActiveQueue::resumes`]); 0 when inactive.
    fn resumes(&self, idx: usize) -> u64 {
        self.active
            .as_ref()
            .and_then(|a| a.queues.get(idx))
            .map_or(0, |q| q.resumes)
    }

    /// [`process_queue`](Self::process_queue) except for the discards that
    /// may come after the guest was told its buffers are used (inflate with
    /// MUST_TELL_HOST), which are returned. The caller must do them before
    /// anything can hand those pages back: a deflate, a reset, a snapshot
    /// (see [`discard_gate`](Self::discard_gate)).
    pub(crate) fn serve_queue(&mut self, idx: usize) -> LateDiscards {
        if self.broken {
            return LateDiscards::default();
        }
        let Some(kind) = self
            .active
            .as_ref()
            .and_then(|a| a.queues.get(idx))
            .map(|q| q.kind)
        else {
            return LateDiscards::default();
        };
        let mut inflated = Vec::new();
        let stats_before = self.metrics.stats_updates.load(Ordering::Relaxed);
        let hint_before = self.hint.status();
        let sg = self.has_acked(VIRTIO_BALLOON_F_BLIMP_SG);
        let drain = match kind {
            QueueKind::Inflate => self.drain_balloon_queue(idx, true, sg, &mut inflated),
            QueueKind::Deflate => self.drain_balloon_queue(idx, false, sg, &mut inflated),
            QueueKind::Stats => self.drain_stats_queue(idx),
            QueueKind::FreePage => self.drain_free_page_queue(idx),
            QueueKind::Reporting => self.drain_reporting_queue(idx),
        };
        // With MUST_TELL_HOST, inflated pages are discarded after the guest
        // has been told its buffers are used: the guest may not reuse them
        // before the device acknowledges their deflate, which the event
        // loop serves only after the discard (and a reset or a snapshot
        // waits for it at the discard gate). Meanwhile the guest handles
        // its interrupt, writes `actual` and makes its next request.
        // Without it the guest may reuse pages as soon as it has asked for
        // their deflate, without waiting: they are discarded first, as
        // QEMU does.
        let late = if self.has_acked(VIRTIO_BALLOON_F_MUST_TELL_HOST) {
            LateDiscards(inflated)
        } else {
            discard_all(&*self.discard, &self.metrics, inflated);
            LateDiscards::default()
        };
        self.finish_drain(idx, kind, drain);
        if self.metrics.stats_updates.load(Ordering::Relaxed) != stats_before
            && let Some(st) = self.latest_stats
        {
            self.emit(BalloonEvent::StatisticsUpdated(st));
        }
        self.emit_hinting_change(hint_before);
        late
    }

    /// Tell the observer if the hinting round's state or ids changed since
    /// `before` (hinted page counts alone do not count).
    pub(super) fn emit_hinting_change(&mut self, before: HintingStatus) {
        let now = self.hint.status();
        if (now.state, now.host_cmd_id, now.guest_cmd_id)
            != (before.state, before.host_cmd_id, before.guest_cmd_id)
        {
            self.emit(BalloonEvent::HintingChanged(now));
        }
    }

    /// Held while deferred discards run outside the device lock: taken
    /// under the device lock before it is released, so whoever holds the
    /// device lock and then takes this one waits until they are done.
    pub(crate) fn discard_gate(&self) -> &Arc<Mutex<()>> {
        &self.discard_gate
    }

    /// Waits until deferred discards are done (see `discard_gate`).
    pub(super) fn wait_for_discards(&self) {
        drop(
            self.discard_gate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
    }

    fn finish_drain(&mut self, idx: usize, kind: QueueKind, drain: Drain) {
        if drain.used {
            self.notify_used(idx);
        }
        if drain.more && drain.broken.is_none() {
            self.resume_later(idx);
        }
        if let Some(why) = drain.broken {
            self.mark_broken(&format!("{} queue ({idx}): {why}", kind.name()));
        }
        if matches!(kind, QueueKind::Inflate | QueueKind::Deflate) {
            self.check_deflate_below_target(kind);
        }
    }

    /// Come back to queue `idx` after the event loop has served whatever
    /// else is ready: signal its eventfd as a kick would.
    fn resume_later(&mut self, idx: usize) {
        let Some(q) = self.active.as_mut().and_then(|a| a.queues.get_mut(idx)) else {
            return;
        };
        match q.evt.write(1) {
            Ok(()) => {
                q.resumes += 1;
                BalloonMetrics::inc(&self.metrics.drain_yields);
            }
            // Only at the counter's limit, with a wake-up already pending.
            Err(e) => error!("balloon: resuming the {} queue failed: {e}", q.kind.name()),
        }
    }

    /// Raise a used-buffer interrupt for queue `idx` unless the driver
    /// suppressed it: VRING_AVAIL_F_NO_INTERRUPT in its avail ring's flags
    /// (virtio 1.2 2.7.7.2: the device SHOULD NOT notify then; EVENT_IDX is
    /// not offered). Linux sets it on a queue without a callback (the free
    /// page hint queue: one buffer per 4 MiB block of a hint round), and
    /// reads such a queue's used ring without an interrupt. virtio-queue's
    /// `needs_notification` (after its fence, which orders the used ring's
    /// writes before this read) does not look at the flag.
    fn notify_used(&mut self, idx: usize) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(q) = a.queues.get_mut(idx) else {
            return;
        };
        let mut needed = q.queue.needs_notification(&a.mem).unwrap_or(true);
        let flags: u16 = a
            .mem
            .read_obj(GuestAddress(q.queue.avail_ring()))
            .map(u16::from_le)
            .unwrap_or(0);
        if flags & VRING_AVAIL_F_NO_INTERRUPT != 0 {
            needed = false;
            BalloonMetrics::inc(&self.metrics.vring_interrupts_suppressed);
        }
        if needed {
            BalloonMetrics::inc(&self.metrics.vring_interrupts);
            if let Err(e) = a.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
                error!("balloon: {} queue interrupt failed: {e}", q.kind.name());
            }
        }
    }

    /// After an inflate or deflate: once the balloon holds the target (or
    /// more), the guest has caught up with every target set so far; a
    /// deflate below every target it may still be acting on (see
    /// `deflate_floor`) is unsolicited: counted, and a warning without
    /// DEFLATE_ON_OOM. A deflate that follows a lowered target is not,
    /// even when a raise came meanwhile (rapid target changes).
    fn check_deflate_below_target(&mut self, kind: QueueKind) {
        let count = self.bitmap.count();
        let target = self.config.num_pages;
        if count >= u64::from(target) {
            self.deflate_floor = target;
            return;
        }
        if kind == QueueKind::Deflate && count < u64::from(self.deflate_floor) {
            BalloonMetrics::inc(&self.metrics.deflate_below_target);
            if !self.has_acked(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) {
                warn_limited!(
                    "balloon: guest deflated below the target ({count} < {target} pages, lowest recent target {}) without DEFLATE_ON_OOM",
                    self.deflate_floor
                );
            }
        }
    }

    /// How queue `kind` treats guest notifications while it is served.
    pub(super) fn notify_mode(&self, kind: QueueKind) -> Notify {
        if !self.cfg.notify_suppression {
            return Notify::Always;
        }
        match kind {
            // The device holds the stats buffer; nothing to suppress.
            QueueKind::Stats => Notify::Always,
            QueueKind::FreePage => Notify::Poll(HINT_POLL_WINDOW),
            _ => Notify::WhileBusy,
        }
    }

    /// Count `n` guest notifications of queue `kind`.
    pub(super) fn count_kicks(&self, kind: QueueKind, n: u64) {
        let m = &self.metrics;
        match kind {
            QueueKind::Inflate => BalloonMetrics::add(&m.inflate_kicks, n),
            QueueKind::Deflate => BalloonMetrics::add(&m.deflate_kicks, n),
            QueueKind::FreePage => BalloonMetrics::add(&m.free_page_kicks, n),
            QueueKind::Stats | QueueKind::Reporting => {}
        }
    }

    /// Inflate (`inflate`) or deflate queue. Each buffer is an array of
    /// le32 PFNs or, with VIRTIO_BALLOON_F_BLIMP_SG (`sg`), a chain whose
    /// every descriptor is one guest-physical range (see `ranges.rs`).
    /// Invalid PFNs and refused ranges are logged and counted and the rest
    /// of the buffer still applies; a malformed chain makes the device need
    /// a reset (in `drain_chains`). Pages to discard are pushed to
    /// `inflated`; nothing is read from guest memory but the rings and the
    /// PFN arrays.
    fn drain_balloon_queue(
        &mut self,
        idx: usize,
        inflate: bool,
        sg: bool,
        inflated: &mut Vec<GpaRange>,
    ) -> Drain {
        let notify = self.notify_mode(if inflate {
            QueueKind::Inflate
        } else {
            QueueKind::Deflate
        });
        let metrics = &*self.metrics;
        let batch = &mut self.batch;
        let mut work = BalloonWork {
            idx,
            inflate,
            name: if inflate { "inflate" } else { "deflate" },
            layout: &self.layout,
            bitmap: &mut self.bitmap,
            discard: &*self.discard,
            metrics,
            inflated,
        };
        // How many discards this turn has queued, for `full`: a drain that
        // has queued MAX_DISCARDS_PER_TURN gives the event loop back.
        let queued = Cell::new(work.inflated.len());
        let full = || queued.get() >= MAX_DISCARDS_PER_TURN;
        drain_active(
            &mut self.active,
            idx,
            Some(&metrics.pfn_buffer_ns),
            notify,
            Some(&full),
            |mem, head, descs| {
                BalloonMetrics::inc(if inflate {
                    &metrics.inflate_requests
                } else {
                    &metrics.deflate_requests
                });
                if sg {
                    work.apply_ranges(head, &descs);
                } else {
                    work.apply_pfn_buffer(mem, head, &descs, batch);
                }
                queued.set(work.inflated.len());
                Some(head)
            },
        )
    }

    /// Stats queue: parse the buffer, keep it until new stats are wanted.
    fn drain_stats_queue(&mut self, idx: usize) -> Drain {
        let notify = self.notify_mode(QueueKind::Stats);
        let metrics = &*self.metrics;
        let mut buf = [0u8; MAX_STATS_BYTES];
        drain_active(
            &mut self.active,
            idx,
            None,
            notify,
            None,
            |mem, head, descs| {
                let mut len = 0usize;
                let mut bad = false;
                for d in descs.iter() {
                    if d.is_write_only() {
                        bad = true;
                        continue;
                    }
                    let want = (d.len() as usize).min(MAX_STATS_BYTES - len);
                    if want < d.len() as usize {
                        bad = true;
                    }
                    if want == 0 {
                        continue;
                    }
                    if let Err(e) = mem.read_slice(&mut buf[len..len + want], d.addr()) {
                        warn_limited!(
                            "balloon: stats queue ({idx}): reading {:#x}+{want}: {e}",
                            d.addr().0
                        );
                        bad = true;
                        break;
                    }
                    len += want;
                }
                if bad || descs.too_many {
                    BalloonMetrics::inc(&metrics.invalid_buffers);
                    warn_limited!(
                        "balloon: stats queue ({idx}): buffer {head} has writable, oversized or unreadable parts; ignored them"
                    );
                }
                let mut values = [None; NUM_STAT_TAGS];
                let out = parse_stats(&buf[..len], &mut values);
                if out.unknown_tags > 0 || out.truncated_bytes > 0 {
                    debug!(
                        "balloon: stats queue ({idx}): {} unknown tags, {} trailing bytes ignored",
                        out.unknown_tags, out.truncated_bytes
                    );
                }
                if out.entries > 0 {
                    self.latest_stats = Some(GuestStats {
                        values,
                        updated: SystemTime::now(),
                    });
                    BalloonMetrics::inc(&metrics.stats_updates);
                }
                // A driver that follows the spec has one buffer outstanding; if
                // it sends another, hand the old one back.
                self.held_stats.replace(head)
            },
        )
    }

    /// The stats timer fired: hand the held buffer back so the guest
    /// refills it.
    pub(crate) fn request_stats(&mut self) {
        if self.broken {
            return;
        }
        let Some(idx) = self.queue_index(QueueKind::Stats) else {
            return;
        };
        let Some(head) = self.held_stats.take() else {
            return;
        };
        let mut drain = Drain::default();
        if let Some(a) = self.active.as_mut() {
            match a.queues[idx].queue.add_used(&a.mem, head, 0) {
                Ok(()) => drain.used = true,
                Err(e) => drain.broken = Some(format!("returning buffer {head}: {e}")),
            }
        }
        BalloonMetrics::inc(&self.metrics.stats_requests);
        self.finish_drain(idx, QueueKind::Stats, drain);
    }
}

/// Shape checks for an inflate/deflate buffer: device-readable, non-empty,
/// whole PFNs, bounded, inside guest memory.
fn check_pfn_buffer(mem: &GuestMemory, descs: &Descs) -> Result<(), String> {
    if descs.too_many {
        return Err(format!("more than {MAX_CHAIN_DESCS} descriptors"));
    }
    let mut total = 0u64;
    for d in descs.iter() {
        if d.is_write_only() {
            return Err(format!(
                "descriptor at {:#x} is device-writable",
                d.addr().0
            ));
        }
        if d.len() == 0 || d.len() % 4 != 0 {
            return Err(format!(
                "length {} is not a non-zero multiple of 4",
                d.len()
            ));
        }
        total += u64::from(d.len());
        if total > MAX_PFN_BUFFER_BYTES {
            return Err(format!(
                "more than {MAX_PFN_BUFFER_BYTES} bytes of PFNs ({total})"
            ));
        }
        if !mem.check_range(d.addr(), d.len() as usize, vm_memory::Permissions::Read) {
            return Err(format!(
                "{:#x}+{:#x} is not guest memory",
                d.addr().0,
                d.len()
            ));
        }
    }
    Ok(())
}

/// What one inflate or deflate buffer works on: the device's page
/// bookkeeping, borrowed for one drain of the queue.
struct BalloonWork<'a> {
    idx: usize,
    inflate: bool,
    name: &'static str,
    layout: &'a RamLayout,
    bitmap: &'a mut InflatedBitmap,
    discard: &'a dyn RamDiscard,
    metrics: &'a BalloonMetrics,
    /// Ranges inflated by this drain, discarded by the caller.
    inflated: &'a mut Vec<GpaRange>,
}

impl BalloonWork<'_> {
    /// A buffer of guest-physical ranges (VIRTIO_BALLOON_F_BLIMP_SG): each
    /// range is checked on its own; a refused one does not stop the others.
    fn apply_ranges(&mut self, head: u16, descs: &Descs) {
        let (name, idx, m) = (self.name, self.idx, self.metrics);
        if descs.too_many {
            BalloonMetrics::inc(&m.invalid_buffers);
            warn_limited!(
                "balloon: {name} queue ({idx}): buffer {head} rejected: more than {MAX_CHAIN_DESCS} ranges"
            );
            return;
        }
        for d in descs.iter() {
            let range = GpaRange::new(d.addr().0, u64::from(d.len()));
            let writable = d.is_write_only();
            let run = match check_range(range, writable, self.inflate, self.layout, self.bitmap) {
                Ok(run) => run,
                Err(why) => {
                    BalloonMetrics::inc(&m.invalid_ranges);
                    warn_limited!("balloon: {name} queue ({idx}): buffer {head}: refused: {why}");
                    continue;
                }
            };
            BalloonMetrics::inc(if self.inflate {
                &m.inflate_ranges
            } else {
                &m.deflate_ranges
            });
            self.apply_run(run);
        }
    }

    /// A buffer of le32 PFN arrays: shape-checked as a whole, then read
    /// and applied a batch at a time.
    fn apply_pfn_buffer(
        &mut self,
        mem: &GuestMemory,
        head: u16,
        descs: &Descs,
        batch: &mut PfnBatch,
    ) {
        let (name, idx) = (self.name, self.idx);
        if let Err(why) = check_pfn_buffer(mem, descs) {
            BalloonMetrics::inc(&self.metrics.invalid_buffers);
            warn_limited!("balloon: {name} queue ({idx}): buffer {head} rejected: {why}");
            return;
        }
        let mut buf = [0u8; BATCH_BYTES];
        for d in descs.iter() {
            let mut off = 0u64;
            while off < u64::from(d.len()) {
                let n = (u64::from(d.len()) - off).min(BATCH_BYTES as u64) as usize;
                let Some(addr) = d.addr().0.checked_add(off).map(GuestAddress) else {
                    break;
                };
                if let Err(e) = mem.read_slice(&mut buf[..n], addr) {
                    // Checked above; only a concurrent hot-unplug could do this.
                    warn_limited!(
                        "balloon: {name} queue ({idx}): reading {:#x}+{n}: {e}",
                        addr.0
                    );
                    break;
                }
                self.apply_pfn_batch(&buf[..n], batch);
                off += n as u64;
            }
        }
    }

    /// Validate, merge and act on one batch of PFNs.
    fn apply_pfn_batch(&mut self, raw: &[u8], batch: &mut PfnBatch) {
        let (name, idx, m) = (self.name, self.idx, self.metrics);
        let out = batch.process(raw, self.layout);
        if out.invalid > 0 {
            BalloonMetrics::add(&m.invalid_pfns, out.invalid);
            warn_limited!(
                "balloon: {name} queue ({idx}): {} PFNs outside guest RAM skipped (first {:#x})",
                out.invalid,
                out.first_invalid.unwrap_or(0)
            );
        }
        BalloonMetrics::add(&m.duplicate_pfns, out.duplicates);
        for &run in batch.runs() {
            self.apply_run(run);
        }
    }

    /// One run of valid pages: into or out of the balloon's bitmap; an
    /// inflated run goes to the discard list, a deflated one is announced
    /// to the backing (`will_need`) per backing run.
    fn apply_run(&mut self, run: PfnRun) {
        let changed = self.bitmap.update(run.bit, run.npages, self.inflate);
        if self.inflate {
            BalloonMetrics::add(&self.metrics.inflate_pages, run.npages);
            if changed == 0 {
                // Every page is in the balloon already, and was discarded
                // when it went in: nothing to give back again (a driver
                // re-sending pages would otherwise cost a call each).
                return;
            }
            let inflated = &mut *self.inflated;
            self.layout.backing_runs(run, |r| inflated.push(r.range()));
        } else {
            BalloonMetrics::add(&self.metrics.deflate_pages, run.npages);
            let discard = self.discard;
            self.layout
                .backing_runs(run, |r| discard.will_need(r.range()));
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        queue_layout(self.acked_features)
            .into_iter()
            .map(QueueKind::max_size)
            .collect()
    }

    fn max_queues(&self) -> usize {
        queue_layout(self.avail_features).len()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        if !self.config.read(offset, data) {
            warn_limited!(
                "balloon: config read of {} bytes at {offset:#x} outside the config space",
                data.len()
            );
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let w = self.config.write(offset, data);
        if w.rejected_bytes {
            warn_limited!(
                "balloon: config write of {} bytes at {offset:#x} touches read-only or missing fields",
                data.len()
            );
        }
        if w.poison_changed {
            debug!(
                "balloon: guest set poison_val {:#x}",
                self.config.poison_val
            );
        }
        if w.actual_changed {
            if u64::from(self.config.actual) > self.layout.total_pages() {
                warn_limited!(
                    "balloon: guest reports {} pages in the balloon, more than the {} pages of RAM",
                    self.config.actual,
                    self.layout.total_pages()
                );
            }
            let ev = BalloonEvent::ActualChanged {
                actual_pages: self.actual_pages(),
                target_pages: self.config.num_pages,
            };
            self.emit(ev);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::Other("balloon is already active".into()));
        }
        let layout = queue_layout(self.acked_features);
        if queues.len() != layout.len() || queue_evts.len() != layout.len() {
            return Err(ActivateError::QueueCount {
                expected: layout.len(),
                got: queues.len().min(queue_evts.len()),
            });
        }
        if let Some(index) = queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::BadQueue {
                index,
                reason: format!("{} queue is not ready", layout[index].name()),
            });
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queues: layout
                .into_iter()
                .zip(queues)
                .zip(queue_evts)
                .map(|((kind, queue), evt)| ActiveQueue {
                    kind,
                    queue,
                    evt,
                    resumes: 0,
                })
                .collect(),
            registered: false,
        });
        self.broken = false;
        self.held_stats = None;
        if let Some(r) = self.pending_restore.take() {
            // Re-activation of a restored device: it still holds the stats
            // buffer it held on the source, and stays broken if it was.
            self.held_stats = r.held_stats;
            self.broken = r.broken;
        }
        // The event loop registers the queue eventfds and arms the timer.
        self.request_timer_sync();
        info!(
            "balloon: activated with features {:#x}",
            self.acked_features
        );
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // The guest may reuse every page after a reset.
        self.wait_for_discards();
        if let Some(a) = self.active.take()
            && a.registered
        {
            self.stale_evts.extend(a.queues.into_iter().map(|q| q.evt));
        }
        self.acked_features = 0;
        self.broken = false;
        self.held_stats = None;
        self.pending_restore = None;
        self.bitmap.clear();
        self.discard.forget_all();
        self.config.actual = 0;
        self.config.poison_val = 0;
        self.hint.reset();
        self.config.free_page_hint_cmd_id = self.hint.host_cmd_id();
        self.request_timer_sync();
        info!("balloon: reset");
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    fn config_generation(&self) -> u32 {
        self.config_generation
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        Some(self.active.as_ref().map_or(Vec::new(), |a| {
            a.queues.iter().map(|q| q.queue.state()).collect()
        }))
    }
}
