//! Balloon counters: plain atomics, cheap to bump on the hot path and safe to
//! read from any thread (the API's metrics endpoint takes a snapshot).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

macro_rules! balloon_metrics {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Live counters of one balloon device.
        #[derive(Debug, Default)]
        pub struct BalloonMetrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// Each counter's name and its doc comment (the Prometheus `# HELP`
        /// of `GET /metrics`).
        pub const BALLOON_METRICS_HELP: &[(&str, &str)] = &[
            $((stringify!($name), concat!($($doc),*)),)*
        ];

        /// A point-in-time copy of [`BalloonMetrics`]. Deserializable
        /// (missing counters read as 0) so saved device state can carry it.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct BalloonMetricsSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl BalloonMetrics {
            pub fn snapshot(&self) -> BalloonMetricsSnapshot {
                BalloonMetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }

            /// Counters starting from `s` (a restored device's).
            pub fn from_snapshot(s: &BalloonMetricsSnapshot) -> Self {
                Self {
                    $($name: AtomicU64::new(s.$name),)*
                }
            }
        }
    };
}

balloon_metrics! {
    /// Buffers taken from the inflate queue.
    inflate_requests,
    /// Distinct valid PFNs inflated.
    inflate_pages,
    /// Buffers taken from the deflate queue.
    deflate_requests,
    /// Distinct valid PFNs deflated.
    deflate_pages,
    /// Deflates that took the balloon below the target (deflate on OOM).
    deflate_below_target,
    /// `RamDiscard::discard` calls (inflate, reporting, hinting).
    discard_calls,
    /// Bytes asked to be discarded.
    discard_bytes,
    /// Bytes the backing reported as released.
    discard_released_bytes,
    /// Syscalls the backing issued.
    discard_syscalls,
    /// Nanoseconds spent inside discard calls.
    discard_ns,
    /// Nanoseconds spent on inflate/deflate buffers, from taking one off
    /// the ring to returning it (parse, validate, merge, bitmap; inflate's
    /// discard comes after the buffers are returned, in `discard_ns`).
    pfn_buffer_ns,
    /// Failed discard calls.
    discard_errors,
    /// Stats buffers parsed.
    stats_updates,
    /// Stats buffers handed back to ask for fresh values.
    stats_requests,
    /// PFNs outside guest RAM, skipped.
    invalid_pfns,
    /// PFNs repeated inside one buffer.
    duplicate_pfns,
    /// Buffers rejected for their shape (direction, length, size).
    invalid_buffers,
    /// Malformed queues (loops, bad indexes) that made the device need a reset.
    queue_errors,
    /// Used-buffer interrupts raised.
    vring_interrupts,
    /// Used-buffer interrupts not raised because the driver set
    /// VRING_AVAIL_F_NO_INTERRUPT (Linux: the free page hint queue).
    vring_interrupts_suppressed,
    /// Configuration-change interrupts raised.
    config_interrupts,
    /// Free page hinting rounds started by the host.
    hint_rounds,
    /// 4 KiB pages hinted free under the current command id.
    hinted_pages,
    /// Hint buffers ignored (stale id, wrong direction, outside RAM).
    hints_ignored,
    /// 4 KiB pages reported free by free page reporting.
    reported_pages,
    /// Bytes discarded because of reports or hints.
    reported_discard_bytes,
    /// Chunked ranges (VIRTIO_BALLOON_F_BLIMP_SG) inflated.
    inflate_ranges,
    /// Chunked ranges deflated.
    deflate_ranges,
    /// Chunked ranges refused (shape, outside RAM, balloon state).
    invalid_ranges,
    /// Guest notifications (QueueNotify writes) of the inflate queue.
    inflate_kicks,
    /// Guest notifications of the deflate queue.
    deflate_kicks,
    /// Guest notifications of the free page (hinting) queue.
    free_page_kicks,
    /// Drains of a queue that stopped at their budget (64 buffers) and came
    /// back to it after the event loop's other work: a driver adding
    /// buffers as fast as the device serves them.
    drain_yields,
}

impl BalloonMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_copies_counters() {
        let m = BalloonMetrics::default();
        BalloonMetrics::inc(&m.inflate_requests);
        BalloonMetrics::add(&m.inflate_pages, 256);
        let s = m.snapshot();
        assert_eq!(s.inflate_requests, 1);
        assert_eq!(s.inflate_pages, 256);
        assert_eq!(s.deflate_pages, 0);
        assert_eq!(BalloonMetrics::from_snapshot(&s).snapshot(), s);
    }
}

#[cfg(test)]
mod help_tests {
    use super::*;

    #[test]
    fn every_counter_has_help() {
        let names: Vec<String> = serde_json::to_value(BalloonMetricsSnapshot::default())
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(names.len(), BALLOON_METRICS_HELP.len());
        for n in names {
            let help = BALLOON_METRICS_HELP
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, h)| h.trim());
            assert!(help.is_some_and(|h| !h.is_empty()), "{n}");
        }
    }
}
