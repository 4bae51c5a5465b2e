//! Waiting: halt until an interrupt, a deadline, or (in poll mode) the next
//! poll tick.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::{clock, events};

/// Poll interval when `testguest.poll=1` (devices are not interrupt-driven).
pub const POLL_INTERVAL_NS: u64 = 10_000_000;

static POLL: AtomicBool = AtomicBool::new(false);

pub fn set_poll(on: bool) {
    POLL.store(on, Ordering::Relaxed);
}

pub fn poll_mode() -> bool {
    POLL.load(Ordering::Relaxed)
}

/// Halts until an interrupt arrives (or `deadline_ns`, or the next poll
/// tick), unless one arrived since `seen` was read from
/// [`events::snapshot`]. Callers loop: snapshot, check for work, wait.
pub fn wait(seen: u64, deadline_ns: Option<u64>) {
    let mut wake = deadline_ns;
    if poll_mode() {
        let p = clock::now_ns() + POLL_INTERVAL_NS;
        wake = Some(wake.map_or(p, |d| d.min(p)));
    }
    if let Some(w) = wake
        && !clock::arm(w)
    {
        return;
    }
    events::wait(seen);
}
