//! The `ramp` workload's pure logic: pacing an allocation at a rate on the
//! guest clock, and the accounting of waits for memory (Linux's allocator
//! stalling in direct reclaim), kept here so the host unit tests check it.
//!
//! A ramp allocates `mib` MiB at `rate` MiB/s in chunks, holds them, frees
//! them, and repeats. When the allocator runs dry while the balloon holds
//! pages, the allocation waits (servicing the balloon) instead of failing;
//! each wait is counted, timed, and excluded from the pacing so the ramp
//! resumes at its rate afterwards instead of bursting to catch up.

use crate::frames::FRAMES_PER_MIB;

/// Pages allocated per step (1 MiB): the pacing granule, and how often the
/// balloon is serviced while allocating.
pub const CHUNK_PAGES: u64 = FRAMES_PER_MIB;

/// Default bound on one wait for memory before the allocation fails.
pub const DEFAULT_WAIT_S: u64 = 120;

/// While waiting, how often the allocator retries (and counts one more
/// allocation stall, as each of Linux's direct-reclaim retries does).
pub const RETRY_NS: u64 = 100_000_000;

/// Pages one direct-reclaim attempt scans (Linux SWAP_CLUSTER_MAX): what a
/// retry adds to `direct-scans`.
pub const SCAN_BATCH_PAGES: u64 = 32;

/// Seed of the ramp's fill pattern unless one is given ("RAMP").
pub const DEFAULT_SEED: u64 = 0x5241_4d50;

const NS_PER_S: u128 = 1_000_000_000;

/// Rate pacing on a clock that stops while the workload waits for memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacer {
    total_pages: u64,
    rate_pages_per_s: u64,
    start_ns: u64,
    /// Time spent waiting for memory: not part of the schedule.
    paused_ns: u64,
}

impl Pacer {
    /// `total_pages` at `rate_pages_per_s` (> 0), starting at `start_ns`.
    pub fn new(total_pages: u64, rate_pages_per_s: u64, start_ns: u64) -> Pacer {
        Pacer {
            total_pages,
            rate_pages_per_s: rate_pages_per_s.max(1),
            start_ns,
            paused_ns: 0,
        }
    }

    /// Running time of the schedule at `now_ns` (waits excluded).
    fn active_ns(&self, now_ns: u64) -> u64 {
        now_ns
            .saturating_sub(self.start_ns)
            .saturating_sub(self.paused_ns)
    }

    /// Pages the schedule allows to have been allocated by `now_ns`.
    pub fn allowed(&self, now_ns: u64) -> u64 {
        let p = u128::from(self.active_ns(now_ns)) * u128::from(self.rate_pages_per_s) / NS_PER_S;
        p.min(u128::from(self.total_pages)) as u64
    }

    /// When the schedule allows `done + want` pages (`want` capped at what
    /// is left); `None` when nothing is left.
    pub fn due_ns(&self, done: u64, want: u64) -> Option<u64> {
        let left = self.total_pages.saturating_sub(done);
        if left == 0 {
            return None;
        }
        let upto = done + want.clamp(1, left);
        let ns = (u128::from(upto) * NS_PER_S).div_ceil(u128::from(self.rate_pages_per_s));
        let ns = u64::try_from(ns).unwrap_or(u64::MAX);
        Some(
            self.start_ns
                .saturating_add(self.paused_ns)
                .saturating_add(ns),
        )
    }

    /// Takes a wait for memory out of the schedule.
    pub fn pause(&mut self, ns: u64) {
        self.paused_ns = self.paused_ns.saturating_add(ns);
    }
}

/// What a ramp reports at the end (`ramp done …` / `error: ramp: …`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RampStats {
    /// Pages allocated, over all cycles.
    pub allocated_pages: u64,
    /// Cycles completed (allocate, hold, free).
    pub cycles: u64,
    /// Waits for memory, the longest one and their total.
    pub waits: u64,
    pub longest_wait_ns: u64,
    pub stall_ns: u64,
    /// Direct-reclaim attempts counted in those waits (one when a wait
    /// starts, one per [`RETRY_NS`] after), as `alloc-stalls` counts them.
    pub stall_attempts: u64,
    /// The allocation failed (a wait hit its bound, or there was nothing to
    /// wait for).
    pub failed: bool,
}

impl RampStats {
    /// Records a finished wait of `ns` nanoseconds.
    pub fn wait_ended(&mut self, ns: u64) {
        self.waits += 1;
        self.longest_wait_ns = self.longest_wait_ns.max(ns);
        self.stall_ns = self.stall_ns.saturating_add(ns);
    }

    /// Writes the key=value figures shared by the success and the failure
    /// line: `allocated=…MiB cycles=… elapsed_ms=… waits=… longest_wait_ms=…
    /// stall_ms=… failed=0|1`.
    pub fn write_figures(
        &self,
        out: &mut impl core::fmt::Write,
        elapsed_ns: u64,
    ) -> core::fmt::Result {
        write!(
            out,
            "allocated={}MiB cycles={} elapsed_ms={} waits={} longest_wait_ms={} stall_ms={} stall_attempts={} failed={}",
            self.allocated_pages / FRAMES_PER_MIB,
            self.cycles,
            elapsed_ns / 1_000_000,
            self.waits,
            self.longest_wait_ns / 1_000_000,
            self.stall_ns / 1_000_000,
            self.stall_attempts,
            u8::from(self.failed)
        )
    }
}

/// One wait for memory in progress: when it started and how many stall
/// attempts it has counted, so the caller knows when to count the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    pub start_ns: u64,
    attempts: u64,
    limit_ns: u64,
}

/// What a wait should do at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStep {
    /// Count this many more stall attempts now (0 or more), then sleep
    /// until `next_ns` at the latest.
    Retry { new_attempts: u64, next_ns: u64 },
    /// The bound is reached: the allocation fails.
    GiveUp,
}

impl Wait {
    /// A wait starting at `now_ns`, bounded by `limit_ns`.
    pub fn start(now_ns: u64, limit_ns: u64) -> Wait {
        Wait {
            start_ns: now_ns,
            attempts: 0,
            limit_ns,
        }
    }

    /// Attempts due by `now_ns`: one at the start and one per [`RETRY_NS`].
    pub fn step(&mut self, now_ns: u64) -> WaitStep {
        let waited = now_ns.saturating_sub(self.start_ns);
        if waited >= self.limit_ns {
            return WaitStep::GiveUp;
        }
        let due = waited / RETRY_NS + 1;
        let new_attempts = due.saturating_sub(self.attempts);
        self.attempts = self.attempts.max(due);
        let next_ns = (self.start_ns + due * RETRY_NS).min(self.start_ns + self.limit_ns);
        WaitStep::Retry {
            new_attempts,
            next_ns,
        }
    }

    /// How long it has lasted at `now_ns`.
    pub fn elapsed(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.start_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn pacer_follows_the_rate() {
        // 100 MiB at 50 MiB/s from t = 5 s.
        let p = Pacer::new(100 * FRAMES_PER_MIB, 50 * FRAMES_PER_MIB, 5 * S);
        assert_eq!(p.allowed(4 * S), 0, "before the start");
        assert_eq!(p.allowed(5 * S), 0);
        assert_eq!(p.allowed(6 * S), 50 * FRAMES_PER_MIB);
        assert_eq!(p.allowed(5 * S + S / 2), 25 * FRAMES_PER_MIB);
        assert_eq!(p.allowed(7 * S), 100 * FRAMES_PER_MIB);
        assert_eq!(p.allowed(70 * S), 100 * FRAMES_PER_MIB, "capped");
        // The first MiB is due after 1/50 s; the last at 2 s.
        assert_eq!(p.due_ns(0, CHUNK_PAGES), Some(5 * S + S / 50));
        assert_eq!(
            p.due_ns(99 * FRAMES_PER_MIB, CHUNK_PAGES * 10),
            Some(7 * S),
            "a chunk past the end is capped to what is left"
        );
        assert_eq!(p.due_ns(100 * FRAMES_PER_MIB, CHUNK_PAGES), None);
    }

    #[test]
    fn pacer_excludes_waits() {
        let mut p = Pacer::new(100 * FRAMES_PER_MIB, 10 * FRAMES_PER_MIB, 0);
        assert_eq!(p.allowed(2 * S), 20 * FRAMES_PER_MIB);
        // A 3 s wait for memory: the schedule resumes where it stopped, no burst.
        p.pause(3 * S);
        assert_eq!(p.allowed(5 * S), 20 * FRAMES_PER_MIB);
        assert_eq!(p.allowed(6 * S), 30 * FRAMES_PER_MIB);
        assert_eq!(
            p.due_ns(20 * FRAMES_PER_MIB, CHUNK_PAGES),
            Some(5 * S + S / 10)
        );
    }

    #[test]
    fn pacer_odd_rates_never_overflow() {
        let p = Pacer::new(u64::MAX, u64::MAX, 0);
        assert_eq!(p.allowed(u64::MAX), u64::MAX);
        assert!(p.due_ns(0, CHUNK_PAGES).is_some());
        // A zero rate is treated as 1 page/s rather than dividing by zero.
        let p = Pacer::new(10, 0, 0);
        assert_eq!(p.allowed(3 * S), 3);
        assert_eq!(p.due_ns(3, 1), Some(4 * S));
        // Nothing to allocate: never due.
        assert_eq!(Pacer::new(0, 5, 0).due_ns(0, 1), None);
    }

    #[test]
    fn wait_counts_an_attempt_per_retry_and_gives_up_at_the_bound() {
        let mut w = Wait::start(10 * S, 2 * S);
        assert_eq!(
            w.step(10 * S),
            WaitStep::Retry {
                new_attempts: 1,
                next_ns: 10 * S + RETRY_NS
            }
        );
        assert_eq!(
            w.step(10 * S + RETRY_NS / 2),
            WaitStep::Retry {
                new_attempts: 0,
                next_ns: 10 * S + RETRY_NS
            },
            "woken early (an interrupt): no new attempt"
        );
        // Woken late (a long halt): every attempt missed is counted once.
        assert_eq!(
            w.step(10 * S + 5 * RETRY_NS),
            WaitStep::Retry {
                new_attempts: 5,
                next_ns: 10 * S + 6 * RETRY_NS
            }
        );
        assert_eq!(w.elapsed(11 * S), S);
        assert_eq!(w.step(12 * S), WaitStep::GiveUp);
        assert_eq!(w.step(13 * S), WaitStep::GiveUp);
    }

    #[test]
    fn wait_next_wake_never_passes_the_bound() {
        let mut w = Wait::start(0, RETRY_NS / 2);
        assert_eq!(
            w.step(0),
            WaitStep::Retry {
                new_attempts: 1,
                next_ns: RETRY_NS / 2
            }
        );
    }

    #[test]
    fn stats_accumulate_and_print() {
        let mut s = RampStats {
            allocated_pages: 1536 * FRAMES_PER_MIB,
            cycles: 1,
            ..Default::default()
        };
        s.wait_ended(250_000_000);
        s.wait_ended(1_500_000_000);
        s.stall_attempts = 17;
        assert_eq!(s.waits, 2);
        assert_eq!(s.longest_wait_ns, 1_500_000_000);
        assert_eq!(s.stall_ns, 1_750_000_000);
        let mut out = String::new();
        s.write_figures(&mut out, 9_876_543_210).unwrap();
        assert_eq!(
            out,
            "allocated=1536MiB cycles=1 elapsed_ms=9876 waits=2 longest_wait_ms=1500 stall_ms=1750 stall_attempts=17 failed=0"
        );
        s.failed = true;
        out.clear();
        s.write_figures(&mut out, 0).unwrap();
        assert!(out.ends_with("failed=1"), "{out}");
    }
}
