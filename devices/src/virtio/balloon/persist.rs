//! Saving and restoring the balloon (see [`crate::persist`]).
//!
//! What is saved: the configuration, offered and acked features, the config
//! space (target, actual, hint command id, poison value) and its generation,
//! the stats polling interval and the latest statistics, free page hinting
//! state, the inflated-page bitmap as runs of page frames, the metrics
//! counters, whether the device was active, broken (needs reset), and the
//! head of the stats buffer it was holding.
//!
//! What is not: queues (the transport saves their registers and ring
//! indices and re-activates the device, see
//! [`MmioTransport::restore`](crate::virtio::mmio::MmioTransport::restore)),
//! event-loop plumbing (eventfds, the timer: re-created and re-armed by
//! activation, so the first stats request after a restore comes one full
//! interval later), and host-side callbacks: the VMM sets the observer
//! ([`Balloon::set_observer`]) and hint sink ([`Balloon::set_hint_sink`])
//! again, and takes a new [`Balloon::metrics_handle`].
//!
//! Restoring does not discard the inflated pages again: the destination's
//! memory restore decides what backs them (pages the guest gave up are
//! zero on the source, so a zero-page-aware stream leaves them untouched).
//! [`Balloon::inflated_ranges`] lists them for a VMM that wants to.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::config::{BalloonConfig, ConfigSpace};
use super::device::{Balloon, RestoredActive};
use super::hinting::{HintState, HintingState, HintingStatus};
use super::metrics::{BalloonMetrics, BalloonMetricsSnapshot};
use super::pfn_runs::{InflatedBitmap, RamLayout};
use super::stats::{GuestStats, NUM_STAT_TAGS};
use super::{STATS_QUEUE_SIZE, VIRTIO_BALLOON_F_STATS_VQ};
use crate::persist::{Persist, PersistError, Versioned, versioned};
use crate::{GpaRange, PAGE_SIZE, RamDiscard};

const NAME: &str = BalloonState::NAME;

/// A range of guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeState {
    pub start: u64,
    pub len: u64,
}

/// Contiguous inflated page frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PfnRunState {
    pub start_pfn: u64,
    pub npages: u64,
}

/// The latest statistics the guest sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsState {
    /// Value of each known tag (index = tag), `None` if not sent.
    pub values: Vec<Option<u64>>,
    /// When they arrived, in milliseconds since the Unix epoch.
    pub updated_unix_ms: u64,
}

/// [`HintingState`] as saved state spells it (snake_case, as version 1
/// states have it; the API spells it in CamelCase).
mod saved_phase {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::HintingState::{self, *};

    const NAMES: [(HintingState, &str); 5] = [
        (Idle, "idle"),
        (Requested, "requested"),
        (Running, "running"),
        (Stopped, "stopped"),
        (Done, "done"),
    ];

    pub fn serialize<S: Serializer>(s: &HintingState, ser: S) -> Result<S::Ok, S::Error> {
        let name = NAMES
            .iter()
            .find(|(v, _)| v == s)
            .map_or("idle", |(_, n)| n);
        ser.serialize_str(name)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<HintingState, D::Error> {
        let name = String::deserialize(de)?;
        NAMES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(v, _)| *v)
            .ok_or_else(|| {
                serde::de::Error::unknown_variant(
                    &name,
                    &["idle", "requested", "running", "stopped", "done"],
                )
            })
    }
}

/// Free page hinting state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintingSaved {
    pub host_cmd_id: u32,
    pub guest_cmd_id: u32,
    #[serde(with = "saved_phase")]
    pub phase: HintingState,
    pub hinted_pages: u64,
    /// The last round id handed out; the next round uses a later one.
    pub last_id: u32,
}

/// Saved state of a [`Balloon`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    pub version: u32,
    /// The configuration the device was built with.
    pub config: BalloonConfig,
    /// Guest RAM the device covered (contiguous regions coalesced); a
    /// restore into other RAM is refused.
    pub ram: Vec<RangeState>,
    /// Offered features (a check: this build must offer the same for
    /// `config`).
    pub avail_features: u64,
    pub acked_features: u64,
    /// Config space: target, actual, hint command id, poison value.
    pub num_pages: u32,
    pub actual: u32,
    pub free_page_hint_cmd_id: u32,
    pub poison_val: u32,
    pub config_generation: u32,
    pub stats_polling_interval_s: u32,
    pub latest_stats: Option<StatsState>,
    /// Head index of the stats buffer the device holds (it hands it back
    /// to ask for fresh statistics).
    pub held_stats_head: Option<u16>,
    pub hinting: HintingSaved,
    /// Inflated pages, ascending runs of page frames.
    pub inflated: Vec<PfnRunState>,
    /// Their total (a check on `inflated`).
    pub inflated_pages: u64,
    /// The device was active (serving queues).
    pub activated: bool,
    /// The device had met a malformed queue and needs a reset.
    pub broken: bool,
    pub metrics: BalloonMetricsSnapshot,
}

versioned!(BalloonState, "balloon", 1);

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Persist for Balloon {
    type State = BalloonState;

    fn save(&self) -> Result<BalloonState, PersistError> {
        self.wait_for_discards();
        let inflated: Vec<PfnRunState> = self
            .layout
            .set_runs(&self.bitmap)
            .iter()
            .map(|r| PfnRunState {
                start_pfn: r.start_pfn,
                npages: r.npages,
            })
            .collect();
        let h = self.hint.status();
        Ok(BalloonState {
            version: BalloonState::VERSION,
            config: self.cfg,
            ram: self
                .layout
                .ranges()
                .iter()
                .map(|r| RangeState {
                    start: r.start,
                    len: r.len,
                })
                .collect(),
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            num_pages: self.config.num_pages,
            actual: self.config.actual,
            free_page_hint_cmd_id: self.config.free_page_hint_cmd_id,
            poison_val: self.config.poison_val,
            config_generation: self.config_generation,
            stats_polling_interval_s: self.stats_interval_s,
            latest_stats: self.latest_stats.as_ref().map(|s| StatsState {
                values: s.values.to_vec(),
                updated_unix_ms: unix_ms(s.updated),
            }),
            held_stats_head: self.held_stats,
            hinting: HintingSaved {
                host_cmd_id: h.host_cmd_id,
                guest_cmd_id: h.guest_cmd_id.unwrap_or(0),
                phase: h.state,
                hinted_pages: h.hinted_pages,
                last_id: self.hint.last_id(),
            },
            inflated,
            inflated_pages: self.bitmap.count(),
            activated: self.active.is_some(),
            broken: self.broken,
            metrics: self.metrics.snapshot(),
        })
    }
}

impl Balloon {
    /// Rebuild a balloon from `state` over guest RAM `ram`, releasing memory
    /// through `discard` (the same arguments as [`Balloon::new`]). The
    /// device comes back not activated; if it was active, restoring its
    /// transport with
    /// [`MmioTransport::restore`](crate::virtio::mmio::MmioTransport::restore)
    /// re-activates it with the saved queues, and it goes on serving them
    /// where the source stopped (still holding the stats buffer it held).
    ///
    /// Refused: an unknown version, RAM laid out differently from the saved
    /// device's ([`PersistError::LayoutMismatch`]), features this build
    /// would not offer for the saved configuration, and inconsistent values
    /// (inflated runs outside RAM, a stats buffer head beyond the queue, ...).
    pub fn restore(
        state: &BalloonState,
        ram: Vec<GpaRange>,
        discard: Arc<dyn RamDiscard>,
    ) -> Result<Self, PersistError> {
        state.check_version()?;
        let layout = RamLayout::new(&ram).map_err(PersistError::Balloon)?;
        let saved: Vec<GpaRange> = state
            .ram
            .iter()
            .map(|r| GpaRange::new(r.start, r.len))
            .collect();
        let now = layout.ranges();
        if saved != now {
            return Err(PersistError::LayoutMismatch { saved, now });
        }
        let b = Balloon::new(state.config, ram, discard).map_err(PersistError::Balloon)?;
        // Check everything, then apply: nothing of `state` reaches the
        // device unless all of it is acceptable.
        state.check_against(b.avail_features, &b.layout)?;
        let latest_stats = state.restored_stats()?;
        state.check_active()?;
        let bitmap = state.inflated_bitmap(&b.layout)?;
        Ok(b.apply_restored(state, latest_stats, bitmap))
    }

    /// Apply a [`BalloonState`] that [`restore`](Self::restore) checked.
    fn apply_restored(
        mut self,
        state: &BalloonState,
        latest_stats: Option<GuestStats>,
        bitmap: InflatedBitmap,
    ) -> Self {
        let h = &state.hinting;
        self.bitmap = bitmap;
        self.acked_features = state.acked_features;
        self.config = ConfigSpace {
            num_pages: state.num_pages,
            actual: state.actual,
            free_page_hint_cmd_id: state.free_page_hint_cmd_id,
            poison_val: state.poison_val,
        };
        self.config_generation = state.config_generation;
        self.stats_interval_s = state.stats_polling_interval_s;
        self.latest_stats = latest_stats;
        // The guest may have been deflating after a lowered target: no
        // warning for what it holds now or a deflate to the target.
        self.deflate_floor = self
            .config
            .num_pages
            .min(u32::try_from(self.bitmap.count()).unwrap_or(u32::MAX));
        self.hint = HintState::from_parts(
            HintingStatus {
                host_cmd_id: h.host_cmd_id,
                guest_cmd_id: (h.guest_cmd_id != 0).then_some(h.guest_cmd_id),
                state: h.phase,
                hinted_pages: h.hinted_pages,
            },
            h.last_id,
        );
        self.metrics = Arc::new(BalloonMetrics::from_snapshot(&state.metrics));
        if state.activated {
            self.pending_restore = Some(RestoredActive {
                held_stats: state.held_stats_head,
                broken: state.broken,
            });
        }
        self
    }

    /// The inflated pages as guest-physical ranges (ascending, each inside
    /// one stretch of RAM), e.g. for a VMM that wants to release them on
    /// the destination of a migration, or not send them.
    pub fn inflated_ranges(&self) -> Vec<GpaRange> {
        self.layout
            .set_runs(&self.bitmap)
            .iter()
            .map(|r| r.range())
            .collect()
    }
}

/// The checks of [`Balloon::restore`], before anything is applied.
impl BalloonState {
    /// Features, target, stats and hinting values against what this build
    /// offers (`avail_features`) for the saved configuration and `layout`.
    fn check_against(&self, avail_features: u64, layout: &RamLayout) -> Result<(), PersistError> {
        let state = self;
        let invalid = |reason: String| PersistError::invalid(NAME, reason);
        if avail_features != state.avail_features {
            return Err(invalid(format!(
                "saved offered features {:#x}, this build offers {:#x} for the same configuration",
                state.avail_features, avail_features
            )));
        }
        if state.acked_features & !state.avail_features != 0 {
            return Err(invalid(format!(
                "acked features {:#x} were never offered ({:#x})",
                state.acked_features, state.avail_features
            )));
        }
        let total = layout.total_pages();
        if u64::from(state.num_pages) > total {
            return Err(invalid(format!(
                "target of {} pages exceeds guest RAM of {total} pages",
                state.num_pages
            )));
        }
        let stats_offered = state.avail_features & (1u64 << VIRTIO_BALLOON_F_STATS_VQ) != 0;
        if state.stats_polling_interval_s > 0 && !stats_offered {
            return Err(invalid(format!(
                "stats polling interval {}s without the stats queue",
                state.stats_polling_interval_s
            )));
        }
        Ok(())
    }

    /// The held stats buffer, the broken flag and the hinting round.
    fn check_active(&self) -> Result<(), PersistError> {
        let state = self;
        let invalid = |reason: String| PersistError::invalid(NAME, reason);
        let stats_acked = state.acked_features & (1u64 << VIRTIO_BALLOON_F_STATS_VQ) != 0;
        if let Some(head) = state.held_stats_head {
            if !(state.activated && stats_acked) {
                return Err(invalid(format!(
                    "holds stats buffer {head} without an active stats queue"
                )));
            }
            if head >= STATS_QUEUE_SIZE {
                return Err(invalid(format!(
                    "held stats buffer head {head} is beyond the queue size {STATS_QUEUE_SIZE}"
                )));
            }
        }
        if state.broken && !state.activated {
            return Err(invalid("broken but not active".into()));
        }
        let h = &state.hinting;
        let round_open = matches!(h.phase, HintingState::Requested | HintingState::Running);
        if round_open && h.host_cmd_id < super::FREE_PAGE_HINT_CMD_ID_MIN {
            return Err(invalid(format!(
                "hinting round {:?} under command id {}",
                h.phase, h.host_cmd_id
            )));
        }
        Ok(())
    }

    /// The saved statistics, with their exact number of values and a
    /// representable timestamp.
    fn restored_stats(&self) -> Result<Option<GuestStats>, PersistError> {
        let invalid = |reason: String| PersistError::invalid(NAME, reason);
        let Some(s) = &self.latest_stats else {
            return Ok(None);
        };
        let values =
            <[Option<u64>; NUM_STAT_TAGS]>::try_from(s.values.as_slice()).map_err(|_| {
                invalid(format!(
                    "{} statistics values, expected {NUM_STAT_TAGS}",
                    s.values.len()
                ))
            })?;
        let updated = UNIX_EPOCH
            .checked_add(Duration::from_millis(s.updated_unix_ms))
            .ok_or_else(|| {
                invalid(format!(
                    "statistics timestamp {} ms is out of range",
                    s.updated_unix_ms
                ))
            })?;
        Ok(Some(GuestStats { values, updated }))
    }

    /// The inflated runs as a bitmap over `layout`: sorted, disjoint, in
    /// guest RAM, and as many pages as the state says.
    fn inflated_bitmap(&self, layout: &RamLayout) -> Result<InflatedBitmap, PersistError> {
        let state = self;
        let invalid = |reason: String| PersistError::invalid(NAME, reason);
        let total = layout.total_pages();
        if state.inflated.len() as u64 > total {
            return Err(invalid(format!(
                "inflated: {} runs for {total} pages of guest RAM",
                state.inflated.len()
            )));
        }
        let mut bitmap = InflatedBitmap::new(total);
        let mut prev_end = 0u64;
        for r in &state.inflated {
            if r.start_pfn < prev_end {
                return Err(invalid(format!(
                    "inflated: the run at PFN {:#x} starts before the previous one ends at {prev_end:#x} (runs must be sorted and disjoint)",
                    r.start_pfn
                )));
            }
            prev_end = r.start_pfn.saturating_add(r.npages);
            let run = r
                .start_pfn
                .checked_mul(PAGE_SIZE)
                .zip(r.npages.checked_mul(PAGE_SIZE))
                .and_then(|(start, len)| layout.run_of_range(GpaRange::new(start, len)))
                .ok_or_else(|| {
                    invalid(format!(
                        "inflated run of {} pages at PFN {:#x} is not guest RAM",
                        r.npages, r.start_pfn
                    ))
                })?;
            bitmap.update(run.bit, run.npages, true);
        }
        if bitmap.count() != state.inflated_pages {
            return Err(invalid(format!(
                "inflated runs cover {} pages (overlapping?), the state says {}",
                bitmap.count(),
                state.inflated_pages
            )));
        }
        Ok(bitmap)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    use super::super::test_utils::{
        CountingIrq, DriverQueue, RecordingDiscard, features, linux_probe, r32, stat, w32,
        write_pfns,
    };
    use super::super::*;
    use super::*;
    use crate::GuestMemory;
    use crate::persist::{from_json, to_json};
    use crate::virtio::VirtioDevice;
    use crate::virtio::mmio::{MmioTransport, MmioTransportState};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const LOW_END: u64 = 16 * MIB;
    const HIGH: u64 = 4 * GIB;
    const HIGH_PFN: u32 = (HIGH >> 12) as u32;
    const QUEUE_BASE: u64 = 0x1_0000;
    const BUF_BASE: u64 = 0x10_0000;

    fn ram() -> Vec<GpaRange> {
        vec![GpaRange::new(0, LOW_END), GpaRange::new(HIGH, 16 * MIB)]
    }

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[
            (GuestAddress(0), LOW_END as usize),
            (GuestAddress(HIGH), (16 * MIB) as usize),
        ])
        .unwrap()
    }

    /// What a migration does to guest memory: a byte-for-byte copy.
    fn copy_of(mem: &GuestMemory) -> GuestMemory {
        let dst = memory();
        for r in mem.iter() {
            let mut buf = vec![0u8; r.len() as usize];
            mem.read_slice(&mut buf, r.start_addr()).unwrap();
            dst.write_slice(&buf, r.start_addr()).unwrap();
        }
        dst
    }

    struct Side {
        mem: GuestMemory,
        balloon: Arc<Mutex<Balloon>>,
        transport: MmioTransport,
        discard: Arc<RecordingDiscard>,
        irq: Arc<CountingIrq>,
    }

    impl Side {
        fn send_pfns(&self, q: &mut DriverQueue, idx: usize, pfns: &[u32], at: u64) -> u16 {
            let len = write_pfns(&self.mem, at, pfns);
            let head = q.add_chain(&self.mem, &[(at, len, false)]);
            self.balloon.lock().unwrap().process_queue(idx);
            head
        }
    }

    fn full_config() -> BalloonConfig {
        BalloonConfig {
            stats_polling_interval_s: 5,
            free_page_hint: true,
            deflate_on_oom: true,
            ..BalloonConfig::default()
        }
    }

    const FULL_FEATURES: &[u32] = &[
        VIRTIO_BALLOON_F_MUST_TELL_HOST,
        VIRTIO_BALLOON_F_STATS_VQ,
        VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    ];

    /// A source balloon, active behind its transport, part-way through its
    /// life: inflates, a deflate, held statistics, a hinting round.
    fn busy_source() -> (Side, Vec<DriverQueue>, u16) {
        let mem = memory();
        let discard = Arc::new(RecordingDiscard::default());
        let balloon = Arc::new(Mutex::new(
            Balloon::new(full_config(), ram(), discard.clone()).unwrap(),
        ));
        let irq = Arc::new(CountingIrq::default());
        let mut transport = MmioTransport::new(balloon.clone(), mem.clone(), irq.clone()).unwrap();
        let mut q = linux_probe(&mut transport, &mem, QUEUE_BASE, features(FULL_FEATURES));
        assert_eq!(q.len(), 4);
        let src = Side {
            mem,
            balloon,
            transport,
            discard,
            irq,
        };
        let low: Vec<u32> = (10..20).collect();
        src.send_pfns(&mut q[0], 0, &low, BUF_BASE);
        src.send_pfns(
            &mut q[0],
            0,
            &[HIGH_PFN + 5, HIGH_PFN + 6, HIGH_PFN + 7],
            BUF_BASE,
        );
        src.send_pfns(&mut q[0], 0, &[100, 101, 102, 4000], BUF_BASE);
        src.send_pfns(&mut q[1], 1, &[15, 16], BUF_BASE);
        // Statistics: the device keeps the buffer.
        let mut s = stat(4, 1 << 30);
        s.extend(stat(5, 2 << 30));
        src.mem.write_slice(&s, GuestAddress(BUF_BASE)).unwrap();
        let stats_head = q[2].add_chain(&src.mem, &[(BUF_BASE, s.len() as u32, false)]);
        src.balloon.lock().unwrap().process_queue(2);
        // Host and guest move the config space.
        src.balloon.lock().unwrap().set_target_pages(40).unwrap();
        let mut t = src.transport;
        t.write(0x104, &14u32.to_le_bytes());
        // A hinting round: the guest acks id 2 and hints 4 MiB.
        let id = src.balloon.lock().unwrap().start_hinting().unwrap();
        src.mem
            .write_obj(id, GuestAddress(BUF_BASE + 0x1000))
            .unwrap();
        q[3].add_chain(&src.mem, &[(BUF_BASE + 0x1000, 4, false)]);
        q[3].add_chain(&src.mem, &[(0x40_0000, 0x40_0000, true)]);
        src.balloon.lock().unwrap().process_queue(3);
        let src = Side {
            transport: t,
            ..src
        };
        {
            let b = src.balloon.lock().unwrap();
            assert_eq!(b.inflated_pages(), 10 + 3 + 4 - 2);
            assert_eq!(b.hinting_status().state, HintingState::Running);
            assert_eq!(b.hinting_status().hinted_pages, 1024);
            assert_eq!(b.held_stats, Some(stats_head));
        }
        assert_eq!(q[0].used_idx(&src.mem), 3);
        (src, q, stats_head)
    }

    fn through_json<S: Serialize + serde::de::DeserializeOwned + Versioned>(s: &S) -> S {
        let text = serde_json::to_string(&to_json(s).unwrap()).unwrap();
        from_json(&serde_json::from_str(&text).unwrap()).unwrap()
    }

    fn restore_side(
        mem: GuestMemory,
        bs: &BalloonState,
        ts: &MmioTransportState,
    ) -> Result<Side, PersistError> {
        let discard = Arc::new(RecordingDiscard::default());
        let balloon = Arc::new(Mutex::new(Balloon::restore(bs, ram(), discard.clone())?));
        let irq = Arc::new(CountingIrq::default());
        let transport = MmioTransport::restore(balloon.clone(), mem.clone(), irq.clone(), ts)?;
        Ok(Side {
            mem,
            balloon,
            transport,
            discard,
            irq,
        })
    }

    #[test]
    fn inactive_balloon_round_trip() {
        let d = Arc::new(RecordingDiscard::default());
        let mut b = Balloon::new(full_config(), ram(), d.clone()).unwrap();
        b.set_target_pages(123).unwrap();
        b.set_stats_polling_interval(9).unwrap();
        let saved = b.save().unwrap();
        assert!(!saved.activated);
        assert_eq!(saved.ram.len(), 2);
        let back = through_json(&saved);
        assert_eq!(back, saved);
        let r = Balloon::restore(&back, ram(), d).unwrap();
        assert_eq!(r.save().unwrap(), saved);
        assert_eq!(r.target_pages(), 123);
        assert_eq!(r.stats_polling_interval(), 9);
        assert!(!r.is_activated());
    }

    #[test]
    fn active_balloon_continues_where_the_source_stopped() {
        let (src, mut q, stats_head) = busy_source();
        let bs = src.balloon.lock().unwrap().save().unwrap();
        let ts = src.transport.save().unwrap();
        assert!(bs.activated && ts.device_activated);
        assert_eq!(
            bs.inflated,
            vec![
                PfnRunState {
                    start_pfn: 10,
                    npages: 5
                },
                PfnRunState {
                    start_pfn: 17,
                    npages: 3
                },
                PfnRunState {
                    start_pfn: 100,
                    npages: 3
                },
                PfnRunState {
                    start_pfn: 4000,
                    npages: 1
                },
                PfnRunState {
                    start_pfn: u64::from(HIGH_PFN) + 5,
                    npages: 3
                },
            ]
        );
        assert_eq!(bs.held_stats_head, Some(stats_head));
        assert_eq!(ts.queues[0].ring.map(|r| r.next_used), Some(3));
        let (bs2, ts2) = (through_json(&bs), through_json(&ts));
        assert_eq!((&bs2, &ts2), (&bs, &ts));

        let dst = restore_side(copy_of(&src.mem), &bs2, &ts2).unwrap();
        drop(src);
        {
            let b = dst.balloon.lock().unwrap();
            assert!(b.is_activated(), "re-activated by the transport");
            // Saving again gives the same state.
            assert_eq!(b.save().unwrap(), bs);
            assert_eq!(b.target_pages(), 40);
            assert_eq!(b.actual_pages(), 14);
            assert!(b.is_inflated(12) && b.is_inflated(u64::from(HIGH_PFN) + 7));
            assert!(!b.is_inflated(15) && !b.is_inflated(20));
            let stats = b.latest_stats().unwrap();
            assert_eq!(stats.by_name("free_memory"), Some(1 << 30));
            assert_eq!(b.metrics().snapshot(), bs.metrics);
            assert_eq!(b.metrics().snapshot().inflate_requests, 3);
        }
        assert_eq!(dst.transport.save().unwrap(), ts);
        // No discards on restore; the queues were kicked once.
        assert!(dst.discard.discarded().is_empty());
        for evt in &dst.transport.queue_evts()[..4] {
            assert_eq!(evt.read().unwrap(), 1);
        }
        let irq_before = dst.irq.vring();

        // The next inflate buffer: used index continues at 3.
        let head = dst.send_pfns(&mut q[0], 0, &[200, 201, HIGH_PFN + 8], BUF_BASE + 0x2000);
        assert_eq!(q[0].used_idx(&dst.mem), 4);
        assert_eq!(q[0].used_elem(&dst.mem, 3), (u32::from(head), 0));
        assert_eq!(dst.irq.vring(), irq_before + 1);
        assert_eq!(
            dst.discard.discarded(),
            vec![
                GpaRange::new(200 << 12, 2 << 12),
                GpaRange::new((u64::from(HIGH_PFN) + 8) << 12, 1 << 12)
            ]
        );
        {
            let b = dst.balloon.lock().unwrap();
            assert_eq!(b.inflated_pages(), 15 + 3);
            assert!(b.is_inflated(10) && b.is_inflated(201));
            assert_eq!(b.metrics().snapshot().inflate_requests, 4);
        }
        // Deflate continues too.
        dst.send_pfns(&mut q[1], 1, &[10], BUF_BASE + 0x3000);
        assert_eq!(q[1].used_idx(&dst.mem), 2);
        assert!(!dst.balloon.lock().unwrap().is_inflated(10));

        // The stats buffer held on the source is handed back on request.
        assert_eq!(q[2].used_idx(&dst.mem), 0);
        dst.balloon.lock().unwrap().request_stats();
        assert_eq!(q[2].used_idx(&dst.mem), 1);
        assert_eq!(q[2].used_elem(&dst.mem, 0).0, u32::from(stats_head));

        // Hints are still accepted under the running round.
        q[3].add_chain(&dst.mem, &[(0x80_0000, 0x40_0000, true)]);
        dst.balloon.lock().unwrap().process_queue(3);
        assert_eq!(
            dst.balloon.lock().unwrap().hinting_status().hinted_pages,
            2048
        );
        assert_eq!(q[3].used_idx(&dst.mem), 3);
        // A new round gets a fresh id.
        assert_eq!(dst.balloon.lock().unwrap().start_hinting().unwrap(), 3);
    }

    #[test]
    fn broken_balloon_stays_broken() {
        let (src, mut q, _) = busy_source();
        // A loop in the inflate queue breaks the device.
        let mem = &src.mem;
        let head = q[0].add_chain(mem, &[(BUF_BASE, 4, false), (BUF_BASE, 4, false)]);
        q[0].write_desc(mem, head + 1, BUF_BASE, 4, 1, head);
        src.balloon.lock().unwrap().process_queue(0);
        assert!(src.balloon.lock().unwrap().needs_reset());
        let bs = through_json(&src.balloon.lock().unwrap().save().unwrap());
        let ts = through_json(&src.transport.save().unwrap());
        assert!(bs.broken);
        let mut dst = restore_side(copy_of(&src.mem), &bs, &ts).unwrap();
        assert!(dst.balloon.lock().unwrap().needs_reset());
        assert_ne!(
            r32(&mut dst.transport, 0x70)
                & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        // The guest resets the device and drives it again.
        w32(&mut dst.transport, 0x70, 0);
        assert!(!dst.balloon.lock().unwrap().is_activated());
        assert_eq!(dst.balloon.lock().unwrap().inflated_pages(), 0);
        let mem = dst.mem.clone();
        let mut q = linux_probe(
            &mut dst.transport,
            &mem,
            QUEUE_BASE,
            features(FULL_FEATURES),
        );
        dst.send_pfns(&mut q[0], 0, &[7], BUF_BASE);
        assert_eq!(q[0].used_idx(&mem), 1);
        assert!(dst.balloon.lock().unwrap().is_inflated(7));
    }

    #[test]
    fn unknown_version_refused() {
        let (src, _, _) = busy_source();
        let bs = src.balloon.lock().unwrap().save().unwrap();
        let bad = BalloonState {
            version: 2,
            ..bs.clone()
        };
        let d = Arc::new(RecordingDiscard::default());
        let e = Balloon::restore(&bad, ram(), d).unwrap_err();
        assert!(matches!(
            e,
            PersistError::UnsupportedVersion {
                what: "balloon",
                found: 2,
                supported: 1
            }
        ));
        let mut v = to_json(&bs).unwrap();
        v["version"] = serde_json::json!(7);
        assert!(matches!(
            from_json::<BalloonState>(&v),
            Err(PersistError::UnsupportedVersion { found: 7, .. })
        ));
    }

    #[test]
    fn mismatched_ram_layout_refused() {
        let (src, _, _) = busy_source();
        let bs = src.balloon.lock().unwrap().save().unwrap();
        let d: Arc<dyn RamDiscard> = Arc::new(RecordingDiscard::default());
        for other in [
            vec![GpaRange::new(0, LOW_END)],
            vec![GpaRange::new(0, LOW_END), GpaRange::new(HIGH, 32 * MIB)],
            vec![GpaRange::new(0, 32 * MIB)],
        ] {
            let e = Balloon::restore(&bs, other.clone(), d.clone()).unwrap_err();
            match e {
                PersistError::LayoutMismatch { saved, now } => {
                    assert_eq!(saved, ram());
                    assert_eq!(now, other);
                }
                e => panic!("{other:?}: {e}"),
            }
        }
        // The same RAM given as contiguous pieces is the same layout.
        let pieces = vec![
            GpaRange::new(0, 8 * MIB),
            GpaRange::new(8 * MIB, 8 * MIB),
            GpaRange::new(HIGH, 16 * MIB),
        ];
        assert!(Balloon::restore(&bs, pieces, d).is_ok());
    }

    #[test]
    fn inconsistent_state_refused() {
        let (src, _, _) = busy_source();
        let bs = src.balloon.lock().unwrap().save().unwrap();
        let d: Arc<dyn RamDiscard> = Arc::new(RecordingDiscard::default());
        assert!(bs.inflated.len() >= 2, "{:?}", bs.inflated);
        let cases: Vec<(&str, BalloonState)> = vec![
            ("run in the hole", {
                let mut s = bs.clone();
                s.inflated.push(PfnRunState {
                    start_pfn: (LOW_END >> 12) + 1,
                    npages: 1,
                });
                s
            }),
            ("run across the end", {
                let mut s = bs.clone();
                s.inflated[0].npages = u64::MAX;
                s
            }),
            ("empty run", {
                let mut s = bs.clone();
                s.inflated[0].npages = 0;
                s
            }),
            ("count", {
                let mut s = bs.clone();
                s.inflated_pages += 1;
                s
            }),
            ("overlapping runs", {
                let mut s = bs.clone();
                let r = s.inflated[0];
                s.inflated.insert(1, r);
                s.inflated_pages += r.npages;
                s
            }),
            ("unsorted runs", {
                let mut s = bs.clone();
                s.inflated.reverse();
                s
            }),
            ("more runs than pages", {
                let mut s = bs.clone();
                let total = (LOW_END + 16 * MIB) >> 12;
                s.inflated = (0..=total)
                    .map(|p| PfnRunState {
                        start_pfn: p,
                        npages: 1,
                    })
                    .collect();
                s.inflated_pages = total + 1;
                s
            }),
            ("stats head", {
                let mut s = bs.clone();
                s.held_stats_head = Some(STATS_QUEUE_SIZE);
                s
            }),
            ("stats values", {
                let mut s = bs.clone();
                s.latest_stats.as_mut().unwrap().values.pop();
                s
            }),
            ("unoffered ack", {
                let mut s = bs.clone();
                s.acked_features |= 1 << VIRTIO_BALLOON_F_REPORTING;
                s
            }),
            ("offered features", {
                let mut s = bs.clone();
                s.avail_features |= 1 << VIRTIO_BALLOON_F_REPORTING;
                s
            }),
            ("target", {
                let mut s = bs.clone();
                s.num_pages = u32::MAX;
                s
            }),
            ("broken inactive", {
                let mut s = bs.clone();
                s.activated = false;
                s.held_stats_head = None;
                s.broken = true;
                s
            }),
            ("hint id", {
                let mut s = bs.clone();
                s.hinting.host_cmd_id = 1;
                s
            }),
        ];
        // A far-future timestamp is representable, not an error.
        let mut s = bs.clone();
        s.latest_stats.as_mut().unwrap().updated_unix_ms = u64::MAX;
        assert!(Balloon::restore(&s, ram(), d.clone()).is_ok());
        for (what, s) in cases {
            let s = through_json(&s);
            match Balloon::restore(&s, ram(), d.clone()) {
                Err(PersistError::Invalid {
                    what: "balloon", ..
                }) => {}
                Err(e) => panic!("{what}: unexpected error {e}"),
                Ok(_) => panic!("{what}: accepted"),
            }
        }
    }

    #[test]
    fn invalid_queue_address_refused_without_activating() {
        let (src, _, _) = busy_source();
        let bs = src.balloon.lock().unwrap().save().unwrap();
        let ts = src.transport.save().unwrap();
        let mem = copy_of(&src.mem);
        for addr in [LOW_END, HIGH - 0x1000, u64::MAX - 0xf, 0x1_0001] {
            let mut bad = ts.clone();
            bad.queues[2].driver = addr;
            let bad = through_json(&bad);
            let d = Arc::new(RecordingDiscard::default());
            let balloon = Arc::new(Mutex::new(Balloon::restore(&bs, ram(), d).unwrap()));
            let irq = Arc::new(CountingIrq::default());
            match MmioTransport::restore(balloon.clone(), mem.clone(), irq, &bad) {
                Err(PersistError::BadQueue { index: 2, .. }) => {}
                Err(e) => panic!("{addr:#x}: unexpected error {e}"),
                Ok(_) => panic!("{addr:#x}: accepted"),
            }
            assert!(!balloon.lock().unwrap().is_activated());
        }
        // A transport state whose features disagree with the balloon's.
        let mut bad = ts.clone();
        bad.acked_features &= !(1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT);
        assert!(matches!(
            restore_side(mem.clone(), &bs, &bad),
            Err(PersistError::Invalid { .. })
        ));
        // A queue count the balloon does not agree with: the balloon's own
        // activation check refuses it.
        let mut small = bs.clone();
        small.acked_features = features(&[VIRTIO_BALLOON_F_STATS_VQ]);
        small.hinting = HintingSaved {
            host_cmd_id: 0,
            guest_cmd_id: 0,
            phase: HintingState::Idle,
            hinted_pages: 0,
            last_id: 1,
        };
        let mut bad = ts;
        bad.acked_features = small.acked_features;
        assert!(restore_side(mem, &small, &bad).is_err());
    }

    #[test]
    fn inflated_ranges_lists_the_bitmap() {
        let (src, _, _) = busy_source();
        let b = src.balloon.lock().unwrap();
        let r = b.inflated_ranges();
        assert_eq!(r.len(), 5);
        assert_eq!(r[0], GpaRange::new(10 << 12, 5 << 12));
        assert_eq!(
            r.iter().map(|g| g.len >> 12).sum::<u64>(),
            b.inflated_pages()
        );
    }

    #[test]
    fn buffer_published_before_the_save_is_served_by_the_restored_event_loop() {
        use event_manager::{EventManager, SubscriberOps};

        let (src, mut q, _) = busy_source();
        // The guest publishes an inflate buffer and kicks, but the source's
        // event loop never gets to it before the VM is paused.
        let len = write_pfns(&src.mem, BUF_BASE, &[300, 301]);
        q[0].add_chain(&src.mem, &[(BUF_BASE, len, false)]);
        let bs = through_json(&src.balloon.lock().unwrap().save().unwrap());
        let ts = through_json(&src.transport.save().unwrap());
        let dst = restore_side(copy_of(&src.mem), &bs, &ts).unwrap();
        // The VMM adds the restored balloon to its event loop as usual.
        let mut mgr = EventManager::<Arc<Mutex<BalloonEvents>>>::new().unwrap();
        mgr.add_subscriber(Arc::new(Mutex::new(BalloonEvents::new(
            dst.balloon.clone(),
        ))));
        for _ in 0..20 {
            mgr.run_with_timeout(20).unwrap();
            if q[0].used_idx(&dst.mem) == 4 {
                break;
            }
        }
        assert_eq!(q[0].used_idx(&dst.mem), 4);
        assert!(dst.balloon.lock().unwrap().is_inflated(301));
        assert_eq!(
            dst.discard.discarded(),
            vec![GpaRange::new(300 << 12, 2 << 12)]
        );
        // The stats timer runs again on the restored device.
        assert!(dst.balloon.lock().unwrap().stats_timer_wanted());
    }
}
