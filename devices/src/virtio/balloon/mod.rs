//! The virtio balloon device (virtio spec 5.5, as Linux and QEMU drive it).
//!
//! # Wiring (VMM side)
//!
//! ```ignore
//! let balloon = Arc::new(Mutex::new(Balloon::new(cfg, ram_regions, guest_ram_discard)?));
//! event_manager.add_subscriber(Arc::new(Mutex::new(BalloonEvents::new(balloon.clone()))));
//! let irq = Arc::new(IrqfdInterrupt::new(EventFd::new(EFD_NONBLOCK)?));
//! vm.register_irqfd(irq.eventfd(), gsi)?;
//! let transport = MmioTransport::new(balloon.clone(), guest_memory, irq)?;
//! for (i, evt) in transport.queue_evts().iter().enumerate() {
//!     vm.register_ioevent(evt, &IoEventAddress::Mmio(base + 0x50), i as u32)?;
//! }
//! mmio_bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW_SIZE)?;
//! // kernel cmdline: virtio_mmio.device=4K@<base>:<gsi>
//! ```
//!
//! The DRIVER_OK write (vCPU thread) activates the device; the event loop
//! then registers the queue eventfds and arms the stats timer. Host-side
//! calls (`set_target_pages`, `latest_stats`, `start_hinting`, ...) lock
//! the balloon from the API thread.
//!
//! Files, lowest first (none imports one above it):
//! * `config`: [`BalloonConfig`] and the config space layout.
//! * `pfn_runs`: RAM layout, PFN validation, run merging and the
//!   inflated-page bitmap.
//! * `ranges`: checks of one chunked (VIRTIO_BALLOON_F_BLIMP_SG) range and
//!   its split into backing runs.
//! * `stats`: the statistics parser.
//! * `metrics`: [`BalloonMetrics`].
//! * `hinting`: a free page hinting round's state machine and [`HintSink`].
//! * `queue`: chain walking and the drain loop every queue handler shares.
//! * `discard`: every discard, counted.
//! * `device`: [`Balloon`], the [`VirtioDevice`](super::VirtioDevice), and
//!   the inflate/deflate and stats queue handlers.
//! * `free_page`: the free page queue handler and the host's hinting calls.
//! * `reporting`: free page reporting.
//! * `event_handler`: its `MutEventSubscriber` side (which fd wakes what,
//!   and the inflate discards done after the device lock is released).
//! * `persist`: save/restore ([`BalloonState`]), checked before applied.
//!
//! The inflate walk, from a guest buffer to the host's discard, is traced
//! file by file in `docs/design.md`.

pub mod config;
pub mod device;
mod discard;
pub mod event_handler;
mod free_page;
pub mod hinting;
pub mod metrics;
pub mod persist;
pub mod pfn_runs;
mod queue;
pub mod ranges;
pub mod reporting;
pub mod stats;

#[cfg(test)]
mod device_tests;
#[cfg(test)]
pub(crate) mod test_utils;

pub use config::BalloonConfig;
pub use device::Balloon;
pub use event_handler::BalloonEvents;
pub use hinting::{HintSink, HintingState, HintingStatus};
pub use metrics::{BALLOON_METRICS_HELP, BalloonMetrics, BalloonMetricsSnapshot};
pub use persist::BalloonState;
pub use stats::GuestStats;

use crate::GpaRange;

/// Virtio device ID of the balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;

/// Host must be told before pages are used after a deflate.
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
/// A statistics queue is present.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// The guest may deflate when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Free page hinting queue and command id.
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
/// The guest tells the page poison value.
pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
/// Free page reporting queue.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// Blimp-experimental, not in any virtio spec: inflate and deflate buffers
/// carry guest-physical ranges (one per device-writable descriptor:
/// address = start, length = bytes) instead of le32 PFN arrays. The top of
/// the device-specific range 0–23 (0–5 are the spec's, 6–7 are proposed in
/// virtio-spec #242/#244, crosvm uses 8), so it collides with nothing
/// assigned, proposed or used elsewhere. The wire format is in README.md
/// ("Chunked balloon"). Offered only with `--balloon sg=on`.
pub const VIRTIO_BALLOON_F_BLIMP_SG: u32 = 23;

/// Free page hint command ids with a fixed meaning.
pub const FREE_PAGE_HINT_CMD_ID_STOP: u32 = 0;
pub const FREE_PAGE_HINT_CMD_ID_DONE: u32 = 1;
/// The first id a hinting round may use.
pub const FREE_PAGE_HINT_CMD_ID_MIN: u32 = 2;

/// Queue sizes.
pub const INFLATE_QUEUE_SIZE: u16 = 256;
pub const DEFLATE_QUEUE_SIZE: u16 = 256;
pub const STATS_QUEUE_SIZE: u16 = 256;
pub const FREE_PAGE_QUEUE_SIZE: u16 = 1024;
pub const REPORTING_QUEUE_SIZE: u16 = 32;

/// The role of a queue; which index it has depends on the features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueueKind {
    Inflate,
    Deflate,
    Stats,
    FreePage,
    Reporting,
}

impl QueueKind {
    pub fn name(self) -> &'static str {
        match self {
            QueueKind::Inflate => "inflate",
            QueueKind::Deflate => "deflate",
            QueueKind::Stats => "stats",
            QueueKind::FreePage => "free_page",
            QueueKind::Reporting => "reporting",
        }
    }

    pub fn max_size(self) -> u16 {
        match self {
            QueueKind::Inflate => INFLATE_QUEUE_SIZE,
            QueueKind::Deflate => DEFLATE_QUEUE_SIZE,
            QueueKind::Stats => STATS_QUEUE_SIZE,
            QueueKind::FreePage => FREE_PAGE_QUEUE_SIZE,
            QueueKind::Reporting => REPORTING_QUEUE_SIZE,
        }
    }
}

/// The queues that exist under `features`, in index order. As in Linux
/// and QEMU only negotiated queues exist and there are no gaps: inflate,
/// deflate, [stats], [free_page], [reporting].
pub fn queue_layout(features: u64) -> Vec<QueueKind> {
    let has = |bit: u32| features & (1u64 << bit) != 0;
    let mut v = vec![QueueKind::Inflate, QueueKind::Deflate];
    if has(VIRTIO_BALLOON_F_STATS_VQ) {
        v.push(QueueKind::Stats);
    }
    if has(VIRTIO_BALLOON_F_FREE_PAGE_HINT) {
        v.push(QueueKind::FreePage);
    }
    if has(VIRTIO_BALLOON_F_REPORTING) {
        v.push(QueueKind::Reporting);
    }
    v
}

/// Balloon errors; each carries the offending value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no guest RAM regions given")]
    NoRam,
    #[error("guest RAM region {0} is empty or not 4 KiB aligned")]
    RamUnaligned(GpaRange),
    #[error("guest RAM region {0} overlaps or precedes the previous one")]
    RamUnordered(GpaRange),
    #[error("guest RAM region {0} wraps around the address space")]
    RamOverflow(GpaRange),
    #[error("target of {target} pages exceeds guest RAM of {ram_pages} pages")]
    TargetTooLarge { target: u32, ram_pages: u64 },
    #[error(
        "statistics were disabled at boot (stats_polling_interval_s = 0), cannot set interval {0}s"
    )]
    StatsDisabled(u32),
    #[error("free page hinting is not enabled (free_page_hint = false)")]
    HintingDisabled,
    #[error("the driver did not negotiate free page hinting (acked features {0:#x})")]
    HintingNotNegotiated(u64),
    #[error(
        "the VM's state is being captured (the final round of a migration or snapshot): a change now would not reach the destination; retry once the job has ended, or on the destination"
    )]
    Frozen,
    #[error("creating the device's {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Something the API's `/events` stream reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
// Rare and short-lived (handed straight to the observer): boxing the
// statistics would only add an allocation per report.
#[allow(clippy::large_enum_variant)]
pub enum BalloonEvent {
    /// The host changed the target (`num_pages`).
    TargetChanged { target_pages: u32 },
    /// The guest updated `actual`.
    ActualChanged {
        actual_pages: u32,
        target_pages: u32,
    },
    /// The guest sent a statistics report (with at least one value).
    StatisticsUpdated(GuestStats),
    /// A free page hinting round changed state or command id (host
    /// start/stop/done, the guest's ack or stop); not for each hint.
    HintingChanged(HintingStatus),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(bits: &[u32]) -> u64 {
        bits.iter().fold(0, |a, b| a | (1u64 << b))
    }

    #[test]
    fn queue_indexes_follow_negotiated_features() {
        use QueueKind::*;
        assert_eq!(queue_layout(0), vec![Inflate, Deflate]);
        assert_eq!(
            queue_layout(f(&[
                VIRTIO_BALLOON_F_MUST_TELL_HOST,
                VIRTIO_BALLOON_F_DEFLATE_ON_OOM
            ])),
            vec![Inflate, Deflate]
        );
        assert_eq!(
            queue_layout(f(&[VIRTIO_BALLOON_F_STATS_VQ])),
            vec![Inflate, Deflate, Stats]
        );
        assert_eq!(
            queue_layout(f(&[VIRTIO_BALLOON_F_REPORTING])),
            vec![Inflate, Deflate, Reporting]
        );
        assert_eq!(
            queue_layout(f(&[
                VIRTIO_BALLOON_F_FREE_PAGE_HINT,
                VIRTIO_BALLOON_F_REPORTING
            ])),
            vec![Inflate, Deflate, FreePage, Reporting]
        );
        assert_eq!(
            queue_layout(f(&[
                VIRTIO_BALLOON_F_STATS_VQ,
                VIRTIO_BALLOON_F_FREE_PAGE_HINT,
                VIRTIO_BALLOON_F_REPORTING
            ])),
            vec![Inflate, Deflate, Stats, FreePage, Reporting]
        );
    }

    #[test]
    fn queue_sizes_are_powers_of_two() {
        for k in [
            QueueKind::Inflate,
            QueueKind::Deflate,
            QueueKind::Stats,
            QueueKind::FreePage,
            QueueKind::Reporting,
        ] {
            assert!(k.max_size().is_power_of_two(), "{}", k.name());
        }
        const { assert!(REPORTING_QUEUE_SIZE >= 32) };
    }
}
