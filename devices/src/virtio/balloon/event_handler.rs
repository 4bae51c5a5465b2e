//! The balloon's event-loop side (`event_manager::MutEventSubscriber`).
//!
//! The VMM adds the device once, `event_manager.add_subscriber(events)`
//! with `events: Arc<Mutex<BalloonEvents>>` over the shared
//! `Arc<Mutex<Balloon>>` (see [`BalloonEvents`]). [`init`](MutEventSubscriber::init)
//! registers two descriptors that live as long as the device: the control
//! eventfd and the stats timerfd. Activation runs on a vCPU thread (inside
//! the DRIVER_OK write), which has no access to the event loop, so
//! `activate()` only stores the queues and signals the control eventfd; the
//! event loop then registers the queue eventfds. A reset likewise parks the
//! old queue eventfds for the event loop to unregister. The timer is only
//! ever armed or disarmed on the event loop, so a timer readiness can never
//! be made stale behind its back (see `timer_rearmed`).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error};

use super::device::{Balloon, LateDiscards};

/// Event data of the control eventfd.
pub const DATA_CTL: u32 = 0;
/// Event data of the stats timer.
pub const DATA_STATS_TIMER: u32 = 1;
/// Event data of queue `i` is `DATA_QUEUE_BASE + i`.
pub const DATA_QUEUE_BASE: u32 = 0x100;

impl Balloon {
    /// Bring event registrations and the timer in line with the device
    /// state (after activation, reset or an interval change).
    fn sync_events(&mut self, ops: &mut EventOps) {
        for evt in self.stale_evts.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                error!("balloon: unregistering a queue eventfd failed: {e}");
            }
        }
        if let Some(active) = self.active.as_mut()
            && !active.registered
        {
            for (i, q) in active.queues.iter().enumerate() {
                let data = DATA_QUEUE_BASE + i as u32;
                if let Err(e) = ops.add(Events::with_data(&q.evt, data, EventSet::IN)) {
                    error!(
                        "balloon: registering the {} queue eventfd failed: {e}",
                        q.kind.name()
                    );
                }
            }
            active.registered = true;
            debug!("balloon: queue eventfds registered");
        }
        if std::mem::take(&mut self.timer_dirty) {
            let result = if self.stats_timer_wanted() {
                let every = Duration::from_secs(u64::from(self.stats_polling_interval()));
                self.stats_timer.reset(every, Some(every))
            } else {
                self.stats_timer.clear()
            };
            if let Err(e) = result {
                error!("balloon: setting the stats timer failed: {e}");
            }
            self.timer_rearmed = true;
        }
    }
}

impl Balloon {
    fn init_events(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.ctl_evt, DATA_CTL, EventSet::IN)) {
            error!("balloon: registering the control eventfd failed: {e}");
        }
        if let Err(e) = ops.add(Events::with_data(
            &self.stats_timer,
            DATA_STATS_TIMER,
            EventSet::IN,
        )) {
            error!("balloon: registering the stats timer failed: {e}");
        }
        // In case the device was activated before being added.
        self.sync_events(ops);
    }

    /// Handles one event; returns the discards that follow the guest's
    /// notification (see `serve_queue`).
    fn handle_event(&mut self, events: Events, ops: &mut EventOps) -> LateDiscards {
        match events.data() {
            DATA_CTL => {
                // Non-blocking; a spurious wake-up reads EAGAIN, harmless.
                let _ = self.ctl_evt.read();
                self.sync_events(ops);
            }
            DATA_STATS_TIMER => {
                if std::mem::take(&mut self.timer_rearmed) {
                    // The readiness may predate a re-arm (which resets the
                    // expiration count): reading now could block. If it is
                    // real, level-triggered epoll reports it again.
                    return LateDiscards::default();
                }
                if let Err(e) = self.stats_timer.wait() {
                    error!("balloon: reading the stats timer failed: {e}");
                    return LateDiscards::default();
                }
                // Frozen: the next tick asks (handing the buffer back
                // writes the used ring).
                if !self.frozen {
                    self.request_stats();
                }
            }
            data if data >= DATA_QUEUE_BASE => {
                let idx = (data - DATA_QUEUE_BASE) as usize;
                let evt = self
                    .active
                    .as_mut()
                    .and_then(|a| a.queues.get_mut(idx))
                    .map(|q| (q.kind, q.take_kicks()));
                let Some((kind, kicks)) = evt else {
                    // An eventfd parked by a reset; the pending control
                    // event unregisters it.
                    return LateDiscards::default();
                };
                self.count_kicks(kind, kicks);
                if self.frozen {
                    self.frozen_kicks |= 1 << idx;
                    return LateDiscards::default();
                }
                return self.serve_queue(idx);
            }
            data => error!("balloon: unexpected event data {data}"),
        }
        LateDiscards::default()
    }
}

/// What the VMM registers with the event loop: the shared device, whose
/// inflate discards (with MUST_TELL_HOST, after the guest was told its
/// buffers are used) run after the device lock is released. The guest's
/// `actual` write and next `num_pages` read, which take the device lock,
/// then do not wait for the discard, nor does the API. The event loop
/// serves nothing else (no deflate) until the discard is done, and a reset
/// or a snapshot, which may hand the pages back, waits for it at the
/// device's discard gate, taken before the device lock is released.
pub struct BalloonEvents {
    dev: Arc<Mutex<Balloon>>,
}

impl BalloonEvents {
    pub fn new(dev: Arc<Mutex<Balloon>>) -> Self {
        Self { dev }
    }

    fn lock(&self) -> MutexGuard<'_, Balloon> {
        self.dev.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl MutEventSubscriber for BalloonEvents {
    fn init(&mut self, ops: &mut EventOps) {
        self.lock().init_events(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut dev = self.lock();
        let later = dev.handle_event(events, ops);
        if later.is_empty() {
            return;
        }
        let (discard, metrics, gate) = (
            dev.discard.clone(),
            dev.metrics.clone(),
            dev.discard_gate().clone(),
        );
        let _gate = gate.lock().unwrap_or_else(PoisonError::into_inner);
        drop(dev);
        later.run(&*discard, &metrics);
    }
}
