//! When to stop pre-copying: after each round's sync, the sender compares
//! the time the dirty pages would take to send at the measured bandwidth
//! with the allowed downtime, and gives up on converging after too many
//! rounds or when the dirty set stops shrinking.

use std::time::Duration;

use devices::PAGE_SIZE;

/// Default `--downtime-ms`.
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(300);
/// Default cap on pre-copy rounds (round 1, the full copy, included).
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// Default number of rounds without a new low in dirty pages before
/// pre-copy is declared stuck.
pub const DEFAULT_STALL_ROUNDS: u32 = 5;

/// Tuning of the decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvergenceConfig {
    /// Longest acceptable pause of the guest for the final copy.
    pub downtime: Duration,
    /// Stop-and-copy after this many pre-copy rounds whatever the dirty set.
    pub max_rounds: u32,
    /// Stop-and-copy when this many rounds in a row did not bring the
    /// dirty set below its lowest size so far (the guest dirties memory as
    /// fast as it is sent).
    pub stall_rounds: u32,
    /// Bytes the final copy sends besides the pages (vCPU and device state).
    pub state_bytes: u64,
}

impl Default for ConvergenceConfig {
    fn default() -> Self {
        Self {
            downtime: DEFAULT_DOWNTIME,
            max_rounds: DEFAULT_MAX_ROUNDS,
            stall_rounds: DEFAULT_STALL_ROUNDS,
            state_bytes: 64 << 10,
        }
    }
}

/// What to do after a round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// Send the dirty pages with the guest running, then sync again.
    AnotherRound,
    /// Pause the guest, send what is dirty and the state.
    StopAndCopy {
        why: StopReason,
        /// Estimated pause at the measured bandwidth (`None`: not measured yet).
        expected_downtime: Option<Duration>,
    },
}

/// Why pre-copy ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The rest fits in the downtime budget.
    Converged,
    /// `max_rounds` reached: the downtime may exceed the budget.
    MaxRounds,
    /// The dirty set stopped shrinking: the downtime may exceed the budget.
    Stalled,
}

/// Bytes per second, or `None` when too little was sent to tell.
pub fn bandwidth(bytes: u64, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    (bytes > 0 && secs > 0.0).then(|| bytes as f64 / secs)
}

/// Time to send `bytes` at `bytes_per_sec`.
pub fn transfer_time(bytes: u64, bytes_per_sec: f64) -> Duration {
    if bytes == 0 {
        return Duration::ZERO;
    }
    if !(bytes_per_sec.is_finite() && bytes_per_sec > 0.0) {
        return Duration::MAX;
    }
    Duration::try_from_secs_f64(bytes as f64 / bytes_per_sec).unwrap_or(Duration::MAX)
}

/// Per-migration bookkeeping: the rounds so far, their throughput and the
/// dirty set's history.
#[derive(Clone, Debug)]
pub struct Convergence {
    cfg: ConvergenceConfig,
    rounds: u32,
    bytes: u64,
    elapsed: Duration,
    last_bandwidth: Option<f64>,
    lowest_dirty: Option<u64>,
    rounds_since_low: u32,
}

impl Convergence {
    pub fn new(cfg: ConvergenceConfig) -> Self {
        Self {
            cfg,
            rounds: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
            last_bandwidth: None,
            lowest_dirty: None,
            rounds_since_low: 0,
        }
    }

    /// Record a finished round: stream bytes it sent and how long it took.
    pub fn round_done(&mut self, bytes_sent: u64, elapsed: Duration) {
        self.rounds += 1;
        self.bytes += bytes_sent;
        self.elapsed += elapsed;
        // A round too small to time (a few pages, or all zero markers) keeps
        // the previous figure.
        if bytes_sent >= 1 << 20 {
            self.last_bandwidth = bandwidth(bytes_sent, elapsed).or(self.last_bandwidth);
        }
    }

    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// The bandwidth to plan with: the slower of the last sizeable round
    /// and the average so far (a link that just got slower must not be
    /// mistaken for a fast one).
    pub fn bandwidth(&self) -> Option<f64> {
        let avg = bandwidth(self.bytes, self.elapsed);
        match (self.last_bandwidth, avg) {
            (Some(l), Some(a)) => Some(l.min(a)),
            (l, a) => l.or(a),
        }
    }

    /// After the sync that follows a round: `dirty_pages` are to be sent.
    pub fn decide(&mut self, dirty_pages: u64) -> Decision {
        match self.lowest_dirty {
            Some(low) if dirty_pages >= low => self.rounds_since_low += 1,
            _ => {
                self.lowest_dirty = Some(dirty_pages);
                self.rounds_since_low = 0;
            }
        }
        let bytes = dirty_pages * PAGE_SIZE + self.cfg.state_bytes;
        let expected_downtime = self.bandwidth().map(|bw| transfer_time(bytes, bw));
        let why = if dirty_pages == 0 || expected_downtime.is_some_and(|d| d <= self.cfg.downtime) {
            Some(StopReason::Converged)
        } else if self.rounds >= self.cfg.max_rounds {
            Some(StopReason::MaxRounds)
        } else if self.rounds_since_low >= self.cfg.stall_rounds {
            Some(StopReason::Stalled)
        } else {
            None
        };
        match why {
            Some(why) => Decision::StopAndCopy {
                why,
                expected_downtime,
            },
            None => Decision::AnotherRound,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GBIT: f64 = 125_000_000.0; // bytes/s

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bandwidth_and_transfer_time() {
        assert_eq!(bandwidth(0, ms(10)), None);
        assert_eq!(bandwidth(100, Duration::ZERO), None);
        assert_eq!(bandwidth(1000, ms(500)), Some(2000.0));
        assert_eq!(transfer_time(0, 0.0), Duration::ZERO);
        assert_eq!(transfer_time(1, 0.0), Duration::MAX);
        assert_eq!(transfer_time(GBIT as u64 / 10, GBIT), ms(100));
    }

    #[test]
    fn converges_when_the_rest_fits_the_downtime() {
        let mut c = Convergence::new(ConvergenceConfig::default());
        // Round 1: 1 GiB in 8.6 s at ~1 Gbit/s.
        c.round_done(1 << 30, Duration::from_secs_f64((1u64 << 30) as f64 / GBIT));
        // 100 MiB dirty: 0.84 s > 300 ms.
        assert_eq!(c.decide(100 * MIB / PAGE_SIZE), Decision::AnotherRound);
        c.round_done(
            100 * MIB,
            Duration::from_secs_f64((100 * MIB) as f64 / GBIT),
        );
        // 20 MiB dirty: ~0.17 s.
        match c.decide(20 * MIB / PAGE_SIZE) {
            Decision::StopAndCopy {
                why: StopReason::Converged,
                expected_downtime: Some(d),
            } => assert!(d > ms(150) && d < ms(200), "{d:?}"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn nothing_dirty_stops_even_without_a_measurement() {
        let mut c = Convergence::new(ConvergenceConfig::default());
        c.round_done(4096, ms(0));
        assert_eq!(c.bandwidth(), None);
        assert!(matches!(
            c.decide(0),
            Decision::StopAndCopy {
                why: StopReason::Converged,
                ..
            }
        ));
        let mut c = Convergence::new(ConvergenceConfig::default());
        c.round_done(0, ms(1));
        assert_eq!(
            c.decide(10),
            Decision::AnotherRound,
            "unmeasured: keep going"
        );
    }

    #[test]
    fn gives_up_after_max_rounds() {
        let mut c = Convergence::new(ConvergenceConfig {
            max_rounds: 3,
            stall_rounds: 100,
            ..Default::default()
        });
        let mut dirty = 100_000;
        let mut last = Decision::AnotherRound;
        for _ in 0..3 {
            c.round_done(dirty * PAGE_SIZE, Duration::from_secs(1)); // slow link
            dirty -= 10_000;
            last = c.decide(dirty);
        }
        assert!(matches!(
            last,
            Decision::StopAndCopy {
                why: StopReason::MaxRounds,
                expected_downtime: Some(_)
            }
        ));
    }

    #[test]
    fn stalls_when_the_dirty_set_stops_shrinking() {
        let mut c = Convergence::new(ConvergenceConfig {
            stall_rounds: 2,
            ..Default::default()
        });
        c.round_done(1 << 30, Duration::from_secs(10));
        assert_eq!(c.decide(50_000), Decision::AnotherRound);
        c.round_done(200 * MIB, Duration::from_secs(2));
        assert_eq!(c.decide(52_000), Decision::AnotherRound);
        c.round_done(200 * MIB, Duration::from_secs(2));
        assert!(matches!(
            c.decide(51_000),
            Decision::StopAndCopy {
                why: StopReason::Stalled,
                ..
            }
        ));
        // A new low resets the count.
        let mut c = Convergence::new(ConvergenceConfig {
            stall_rounds: 2,
            ..Default::default()
        });
        c.round_done(1 << 30, Duration::from_secs(10));
        for d in [50_000, 52_000, 49_000, 49_500] {
            assert_eq!(c.decide(d), Decision::AnotherRound);
            c.round_done(200 * MIB, Duration::from_secs(2));
        }
    }

    #[test]
    fn planning_uses_the_slower_of_last_round_and_average() {
        let mut c = Convergence::new(ConvergenceConfig::default());
        c.round_done(1000 * MIB, Duration::from_secs(1));
        c.round_done(10 * MIB, Duration::from_secs(1)); // link slowed down
        assert_eq!(c.bandwidth(), Some((10 * MIB) as f64));
        c.round_done(100, Duration::from_secs(1)); // too small to time
        assert_eq!(c.bandwidth(), Some((10 * MIB) as f64));
        assert_eq!(c.rounds(), 3);
    }
}
