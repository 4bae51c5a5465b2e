//! Giving guest RAM back to the host: every discard the balloon makes
//! (inflated pages, free page reports, hints) goes through
//! [`discard_counted`], which counts it in the metrics.

use super::metrics::BalloonMetrics;
use crate::{GpaRange, RamDiscard, error_limited};

/// One discard call, counted in the metrics (calls, bytes, time, released
/// bytes, syscalls, errors); a failure is logged under `queue` (`idx`).
/// Returns whether it succeeded.
pub(super) fn discard_counted(
    discard: &dyn RamDiscard,
    metrics: &BalloonMetrics,
    range: GpaRange,
    queue: &str,
    idx: usize,
) -> bool {
    counted(metrics, range, queue, idx, || discard.discard(range))
}

/// `call` (a discard of `range`) counted as [`discard_counted`] says.
fn counted(
    metrics: &BalloonMetrics,
    range: GpaRange,
    queue: &str,
    idx: usize,
    call: impl FnOnce() -> Result<crate::DiscardOutcome, crate::DiscardError>,
) -> bool {
    BalloonMetrics::inc(&metrics.discard_calls);
    BalloonMetrics::add(&metrics.discard_bytes, range.len);
    let t = std::time::Instant::now();
    let result = call();
    BalloonMetrics::add(&metrics.discard_ns, t.elapsed().as_nanos() as u64);
    match result {
        Ok(o) => {
            BalloonMetrics::add(&metrics.discard_released_bytes, o.bytes_released);
            BalloonMetrics::add(&metrics.discard_syscalls, o.syscalls);
            true
        }
        Err(e) => {
            BalloonMetrics::inc(&metrics.discard_errors);
            error_limited!("balloon: {queue} queue ({idx}): {e}");
            false
        }
    }
}

/// Discards inflated `ranges` (inflate queue 0) with their metrics.
pub(crate) fn discard_all(
    discard: &dyn RamDiscard,
    metrics: &BalloonMetrics,
    ranges: Vec<GpaRange>,
) {
    for range in ranges {
        discard_counted(discard, metrics, range, "inflate", 0);
    }
}

/// Discard a free range reported or hinted by the guest, which keeps it
/// (see [`RamDiscard::discard_free`]).
pub(super) fn discard_free_range(
    discard: &dyn RamDiscard,
    metrics: &BalloonMetrics,
    range: GpaRange,
    queue: &str,
    idx: usize,
) {
    if counted(metrics, range, queue, idx, || discard.discard_free(range)) {
        BalloonMetrics::add(&metrics.reported_discard_bytes, range.len);
    }
}
