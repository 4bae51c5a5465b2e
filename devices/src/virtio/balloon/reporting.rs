//! Free page reporting (VIRTIO_BALLOON_F_REPORTING), device side.
//!
//! The guest sends one buffer of up to 32 device-writable descriptors, each
//! a free range (2 MiB or larger on x86), kicks, and waits for it to come
//! back. The device discards each range through `RamDiscard`, unless the
//! guest uses page poisoning with a non-zero poison value (a discarded page
//! would read back as zeros, not the poison pattern).

use log::debug;

use super::device::{Balloon, drain_active};
use super::discard::discard_free_range;
use super::metrics::BalloonMetrics;
use super::queue::Drain;
use super::*;
use crate::{GpaRange, warn_limited};

/// Most ranges in one report (Linux's PAGE_REPORTING_CAPACITY).
pub const MAX_REPORT_ENTRIES: usize = 32;

impl Balloon {
    /// True when reported/hinted pages must keep their content.
    pub(super) fn poison_active(&self) -> bool {
        self.has_acked(VIRTIO_BALLOON_F_PAGE_POISON) && self.config.poison_val != 0
    }

    pub(super) fn drain_reporting_queue(&mut self, idx: usize) -> Drain {
        let poison = self.poison_active();
        let notify = self.notify_mode(QueueKind::Reporting);
        let metrics = &*self.metrics;
        drain_active(
            &mut self.active,
            idx,
            None,
            notify,
            None,
            |_, head, descs| {
                if descs.too_many || descs.n > MAX_REPORT_ENTRIES {
                    BalloonMetrics::inc(&metrics.invalid_buffers);
                    warn_limited!(
                        "balloon: reporting queue ({idx}): report {head} has more than {MAX_REPORT_ENTRIES} entries, ignored"
                    );
                } else if descs.iter().any(|d| !d.is_write_only()) {
                    BalloonMetrics::inc(&metrics.invalid_buffers);
                    warn_limited!(
                        "balloon: reporting queue ({idx}): report {head} has device-readable entries, ignored"
                    );
                } else {
                    let mut bad = 0usize;
                    for d in descs.iter() {
                        let range = GpaRange::new(d.addr().0, u64::from(d.len()));
                        let Some(run) = self.layout.run_of_range(range) else {
                            bad += 1;
                            warn_limited!(
                                "balloon: reporting queue ({idx}): {}, skipped",
                                super::ranges::not_a_run(range)
                            );
                            continue;
                        };
                        BalloonMetrics::add(&metrics.reported_pages, run.npages);
                        if !poison {
                            discard_free_range(&*self.discard, metrics, range, "reporting", idx);
                        }
                    }
                    if bad > 0 {
                        BalloonMetrics::inc(&metrics.invalid_buffers);
                    }
                    if poison {
                        debug!(
                            "balloon: reporting queue ({idx}): poison value set, report {head} not discarded"
                        );
                    }
                }
                Some(head)
            },
        )
    }
}
