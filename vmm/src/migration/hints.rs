//! Free page hints as the sender sees them: a [`HintSource`] (the balloon,
//! or anything else that can tell which guest pages are free) and the
//! round's [`RoundHints`], which clears hinted ranges from the to-send
//! bitmap and wakes the sender when the guest ends the round. The sender
//! does not know which device gives the hints; the device does not know it
//! is being migrated.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::GpaRange;
use devices::virtio::VirtioDevice;
use devices::virtio::balloon::{Balloon, HintSink, HintingState, VIRTIO_BALLOON_F_FREE_PAGE_HINT};

use super::dirty::AtomicPageBitmap;
use super::link;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A device that hints free guest pages in rounds.
pub trait HintSource: Send + Sync {
    /// Whether the guest agreed to hint (the feature was negotiated).
    fn hints_negotiated(&self) -> bool;
    /// Register (or with `None` remove) the receiver of hinted ranges and
    /// of the guest's end of a round.
    fn set_sink(&self, sink: Option<Arc<dyn HintSink>>);
    /// Start a round; `begin` is called with its id before any hint of the
    /// round can reach the sink. Returns the id, or `None` if the device
    /// cannot hint now.
    fn start_round(&self, begin: &mut dyn FnMut(u32)) -> Option<u32>;
    /// Ask the guest to stop the round (STOP); hinted pages stay held.
    fn stop_round(&self);
    /// Hand the hints back to the guest: stop a round still open and say
    /// DONE so it frees the hinted blocks. Nothing if no round ever ran.
    fn release(&self);
}

impl HintSource for Mutex<Balloon> {
    fn hints_negotiated(&self) -> bool {
        lock(self).acked_features() & (1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT) != 0
    }

    fn set_sink(&self, sink: Option<Arc<dyn HintSink>>) {
        lock(self).set_hint_sink(sink);
    }

    fn start_round(&self, begin: &mut dyn FnMut(u32)) -> Option<u32> {
        // Under the balloon's lock: the event loop cannot deliver a hint of
        // the new round before `begin` saw its id.
        let mut b = lock(self);
        let id = b.start_hinting().ok()?;
        begin(id);
        Some(id)
    }

    fn stop_round(&self) {
        let _ = lock(self).stop_hinting();
    }

    fn release(&self) {
        let mut b = lock(self);
        if b.hinting_status().state != HintingState::Idle {
            let _ = b.stop_hinting();
            let _ = b.hinting_done();
        }
    }
}

/// The sink of one migration: clears hinted ranges from the current
/// round's bitmap and records the rounds the guest ended.
pub struct RoundHints {
    current: Mutex<Option<(u32, Arc<AtomicPageBitmap>)>>,
    /// The last round id the guest stopped (0: none yet).
    stopped: Mutex<u32>,
    stopped_cv: Condvar,
    hinted_pages: AtomicU64,
}

impl Default for RoundHints {
    fn default() -> Self {
        Self::new()
    }
}

impl RoundHints {
    pub fn new() -> Self {
        Self {
            current: Mutex::new(None),
            stopped: Mutex::new(0),
            stopped_cv: Condvar::new(),
            hinted_pages: AtomicU64::new(0),
        }
    }

    /// Hints carrying `id` clear pages of `bitmap` from now on.
    pub fn begin(&self, id: u32, bitmap: Arc<AtomicPageBitmap>) {
        *lock(&self.current) = Some((id, bitmap));
    }

    /// No round is current: hints are no longer applied.
    pub fn end(&self) {
        *lock(&self.current) = None;
    }

    /// Pages cleared by hints so far.
    pub fn hinted_pages(&self) -> u64 {
        self.hinted_pages.load(Ordering::Relaxed)
    }

    /// Wait until the guest stopped round `id`, at most `timeout`; a set
    /// `cancel` ends the wait within [`link::POLL`]. Returns whether the
    /// guest stopped the round.
    pub fn wait_stopped(&self, id: u32, timeout: Duration, cancel: &AtomicBool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut stopped = lock(&self.stopped);
        loop {
            if *stopped == id {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || cancel.load(Ordering::SeqCst) {
                return false;
            }
            let slice = (deadline - now).min(link::POLL);
            stopped = self
                .stopped_cv
                .wait_timeout(stopped, slice)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl HintSink for RoundHints {
    fn hinted(&self, cmd_id: u32, range: GpaRange) {
        if let Some((id, bitmap)) = &*lock(&self.current)
            && *id == cmd_id
        {
            let cleared = bitmap.clear_range(range);
            self.hinted_pages.fetch_add(cleared, Ordering::Relaxed);
        }
    }

    fn round_stopped(&self, cmd_id: u32) {
        *lock(&self.stopped) = cmd_id;
        self.stopped_cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hints of the current round clear exactly their pages from its
    /// bitmap; hints of another round, or with no round current, clear
    /// nothing (those pages may have been written since).
    #[test]
    fn only_the_current_rounds_hints_clear_pages() {
        let layout = arch::MemoryLayout::new(16 << 20).unwrap();
        let bitmap = Arc::new(AtomicPageBitmap::new(&layout));
        bitmap.set_all();
        let all = bitmap.count();
        let hints = RoundHints::new();
        hints.hinted(5, GpaRange::new(0, 0x4000));
        assert_eq!(bitmap.count(), all, "no round yet");
        hints.begin(5, bitmap.clone());
        hints.hinted(4, GpaRange::new(0, 0x4000));
        assert_eq!(bitmap.count(), all, "an old round's hint");
        hints.hinted(5, GpaRange::new(0x10_0000, 0x4000));
        assert_eq!(bitmap.count(), all - 4);
        assert_eq!(hints.hinted_pages(), 4);
        let left: Vec<_> = bitmap
            .take_runs(1 << 20)
            .map(|r| (r.gpa, r.pages))
            .collect();
        assert_eq!(
            left,
            vec![(0, 0x100), (0x10_4000, (16 << 20) / 4096 - 0x104)]
        );
        bitmap.set_all();
        hints.end();
        hints.hinted(5, GpaRange::new(0, 0x4000));
        assert_eq!(bitmap.count(), all, "after the round ended");
        assert_eq!(hints.hinted_pages(), 4);
    }

    #[test]
    fn a_stopped_round_wakes_the_waiter() {
        let hints = Arc::new(RoundHints::new());
        let cancel = AtomicBool::new(false);
        let h = hints.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            h.round_stopped(7);
        });
        let started = Instant::now();
        assert!(hints.wait_stopped(7, Duration::from_secs(10), &cancel));
        assert!(started.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
        // Already stopped: no wait at all.
        assert!(hints.wait_stopped(7, Duration::ZERO, &cancel));
    }

    #[test]
    fn another_round_does_not_count_and_the_timeout_holds() {
        let hints = RoundHints::new();
        let cancel = AtomicBool::new(false);
        hints.round_stopped(6);
        let started = Instant::now();
        assert!(!hints.wait_stopped(7, Duration::from_millis(120), &cancel));
        assert!(started.elapsed() >= Duration::from_millis(120));
    }

    #[test]
    fn cancel_ends_the_wait_within_the_poll_interval() {
        let hints = RoundHints::new();
        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            c.store(true, Ordering::SeqCst);
        });
        let started = Instant::now();
        assert!(!hints.wait_stopped(7, Duration::from_secs(10), &cancel));
        assert!(started.elapsed() < Duration::from_millis(30) + link::POLL * 2);
        t.join().unwrap();
    }
}
