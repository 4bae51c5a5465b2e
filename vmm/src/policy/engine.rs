//! The automatic balloon policy's decisions (issue #18): from the guest's
//! statistics and the host's memory pressure, how large the balloon should
//! be. Pure logic: no device, no clock of its own, no I/O, so every rule is
//! tested with made-up samples; the VMM feeds it a sample per statistics
//! interval and applies what it decides.
//!
//! The rules, in the order they are checked:
//! 1. Stale statistics (the guest stopped answering): hold. A stale guest
//!    is never inflated.
//! 2. Pressure in the guest: available memory below the headroom, or any of
//!    allocation stalls, direct reclaim, swap-ins rising, major faults rising
//!    faster than [`PolicyConfig::major_faults_per_s`], or an OOM kill:
//!    deflate **at once**, by enough to bring available memory back to the
//!    headroom plus the band (at least [`PolicyConfig::pressure_step`]), then
//!    hold inflation off for [`PolicyConfig::cooldown`] (only after a
//!    deflate: pressure with an empty balloon starts no cool-down; a deflate
//!    for pressure within four cool-downs of the previous one, after an
//!    inflate in between, doubles it, up to eight times, so a slowly
//!    ramping guest is not re-inflated after each cool-down).
//! 3. Excess: available memory above headroom + band for
//!    [`PolicyConfig::settle`] (halved under host pressure): inflate by the
//!    excess, at most [`PolicyConfig::max_step`], never leaving the guest
//!    less than [`PolicyConfig::floor`].
//! 4. Otherwise hold.
//!
//! Host pressure (PSI `some avg10` above [`PolicyConfig::host_psi_high`])
//! halves the headroom (down to [`PolicyConfig::min_headroom`]) and the
//! settle time: the host reclaims sooner and the guest keeps less slack.

use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// The policy's parameters (documented defaults in [`Default`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicyConfig {
    /// The guest never has less usable memory than this (RAM − balloon).
    pub floor: u64,
    /// Available memory the guest should keep: this much…
    pub headroom: u64,
    /// …plus this fraction of guest RAM.
    pub headroom_fraction: f64,
    /// Headroom under host pressure is never below this.
    pub min_headroom: u64,
    /// How long an excess must last before the balloon inflates.
    pub settle: Duration,
    /// Largest inflate per decision.
    pub max_step: u64,
    /// Smallest deflate when the guest shows pressure.
    pub pressure_step: u64,
    /// No inflate for this long after a deflate for pressure.
    pub cooldown: Duration,
    /// Statistics older than this are stale.
    pub stale_after: Duration,
    /// Major faults per second above which they count as pressure (file
    /// reads fault too; a trickle is normal).
    pub major_faults_per_s: f64,
    /// Host PSI memory `some avg10` (percent) above which the host is under
    /// pressure.
    pub host_psi_high: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            floor: 256 * MIB,
            headroom: 192 * MIB,
            headroom_fraction: 0.08,
            min_headroom: 64 * MIB,
            settle: Duration::from_secs(10),
            max_step: 256 * MIB,
            pressure_step: 64 * MIB,
            cooldown: Duration::from_secs(30),
            stale_after: Duration::from_secs(5),
            major_faults_per_s: 50.0,
            host_psi_high: 10.0,
        }
    }
}

/// One statistics sample from the guest (bytes; counters are cumulative,
/// as virtio-balloon reports them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestSample {
    pub available: u64,
    pub swap_in: u64,
    pub major_faults: u64,
    pub alloc_stall: u64,
    pub direct_scan: u64,
    pub direct_reclaim: u64,
    pub oom_kill: u64,
}

/// Everything one decision looks at.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Inputs {
    /// Guest RAM in bytes.
    pub guest_ram: u64,
    /// The balloon's current target (bytes taken from the guest).
    pub target: u64,
    /// The latest guest sample and when it arrived (`None`: none yet).
    pub guest: Option<(Instant, GuestSample)>,
    /// Host PSI memory `some avg10`, percent (`None`: unknown).
    pub host_psi: Option<f64>,
}

/// Why the policy decided what it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    NoStatistics,
    StaleStatistics { age_ms: u64 },
    BelowHeadroom { available: u64, headroom: u64 },
    Rising { counter: &'static str, delta: u64 },
    OomKill { delta: u64 },
    Excess { available: u64, headroom: u64 },
    Settling { excess: u64, left_ms: u64 },
    CoolingDown { left_ms: u64 },
    AtFloor,
    WithinBand,
    NothingToGive,
}

/// A decision: the new target (`None`: keep it) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub new_target: Option<u64>,
    pub reason: Reason,
    /// The headroom in force (after host pressure).
    pub headroom: u64,
    /// Whether the host was under memory pressure.
    pub host_pressure: bool,
}

/// The policy's memory between decisions.
#[derive(Debug, Default)]
pub struct Policy {
    config: PolicyConfig,
    last: Option<(Instant, GuestSample)>,
    excess_since: Option<Instant>,
    cooldown_until: Option<Instant>,
    /// The last deflate for pressure and the cool-down's multiplier: a
    /// deflate for pressure within [`REPEAT_WINDOW`] cool-downs of the
    /// previous one, *after the policy inflated again in between* (it gave
    /// back too early), doubles it (up to [`MAX_COOLDOWN_FACTOR`]), so that
    /// a slowly ramping guest is not re-inflated after every cool-down.
    /// More deflates of one pressure episode (no inflate between them)
    /// keep the multiplier: one fast ramp is not a misjudgement.
    last_pressure: Option<Instant>,
    cooldown_factor: u32,
    inflated_since_pressure: bool,
}

/// See [`Policy`]'s `last_pressure`.
pub const REPEAT_WINDOW: u32 = 4;
pub const MAX_COOLDOWN_FACTOR: u32 = 8;

impl Policy {
    pub fn new(config: PolicyConfig) -> Self {
        Self {
            config,
            ..Default::default()
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// The headroom for a guest of `guest_ram` bytes, under host pressure or not.
    pub fn headroom(&self, guest_ram: u64, host_pressure: bool) -> u64 {
        let c = &self.config;
        let base = c
            .headroom
            .saturating_add((guest_ram as f64 * c.headroom_fraction) as u64);
        if host_pressure {
            (base / 2).max(c.min_headroom)
        } else {
            base
        }
    }

    /// Decide at `now`.
    pub fn decide(&mut self, now: Instant, input: &Inputs) -> Decision {
        let host_pressure = input
            .host_psi
            .is_some_and(|p| p > self.config.host_psi_high);
        let headroom = self.headroom(input.guest_ram, host_pressure);
        let decision = |new_target, reason| Decision {
            new_target,
            reason,
            headroom,
            host_pressure,
        };
        let Some((at, sample)) = input.guest else {
            return decision(None, Reason::NoStatistics);
        };
        let age = now.saturating_duration_since(at);
        if age > self.config.stale_after {
            self.excess_since = None;
            return decision(
                None,
                Reason::StaleStatistics {
                    age_ms: age.as_millis() as u64,
                },
            );
        }
        let previous = self.last.replace((at, sample)).filter(|(t, _)| *t < at);
        let band = headroom / 4;
        if let Some(reason) = self.pressure(previous, at, &sample, headroom) {
            self.excess_since = None;
            let want = (headroom + band).saturating_sub(sample.available);
            let by = want.max(self.config.pressure_step);
            let new = input.target.saturating_sub(by);
            // The cool-down follows a deflate: pressure with an empty
            // balloon (the guest's own load) does not delay reclaiming once
            // the guest frees its memory.
            if new != input.target {
                self.start_cooldown(now);
            }
            return decision((new != input.target).then_some(new), reason);
        }
        let Some(excess) = sample
            .available
            .checked_sub(headroom + band)
            .filter(|e| *e > 0)
        else {
            self.excess_since = None;
            return decision(None, Reason::WithinBand);
        };
        if let Some(until) = self.cooldown_until.filter(|u| now < *u) {
            return decision(
                None,
                Reason::CoolingDown {
                    left_ms: until.duration_since(now).as_millis() as u64,
                },
            );
        }
        let settle = if host_pressure {
            self.config.settle / 2
        } else {
            self.config.settle
        };
        let since = *self.excess_since.get_or_insert(now);
        let waited = now.saturating_duration_since(since);
        if waited < settle {
            return decision(
                None,
                Reason::Settling {
                    excess,
                    left_ms: (settle - waited).as_millis() as u64,
                },
            );
        }
        let most = input.guest_ram.saturating_sub(self.config.floor);
        if input.target >= most {
            return decision(None, Reason::AtFloor);
        }
        // Whole pages only, and never past the floor.
        let step = excess.min(self.config.max_step) & !0xfff;
        let new = (input.target + step).min(most);
        if new <= input.target {
            return decision(None, Reason::NothingToGive);
        }
        self.inflated_since_pressure = true;
        decision(
            Some(new),
            Reason::Excess {
                available: sample.available,
                headroom,
            },
        )
    }

    fn start_cooldown(&mut self, now: Instant) {
        let base = self.config.cooldown;
        let repeated = self
            .last_pressure
            .is_some_and(|t| now.saturating_duration_since(t) < base * REPEAT_WINDOW);
        self.cooldown_factor = match (repeated, self.inflated_since_pressure) {
            (false, _) => 1,
            (true, true) => (self.cooldown_factor * 2).clamp(1, MAX_COOLDOWN_FACTOR),
            (true, false) => self.cooldown_factor.max(1),
        };
        self.inflated_since_pressure = false;
        self.last_pressure = Some(now);
        self.cooldown_until = Some(now + base * self.cooldown_factor);
    }

    /// The guest's pressure signals between `previous` and `now`.
    fn pressure(
        &self,
        previous: Option<(Instant, GuestSample)>,
        at: Instant,
        s: &GuestSample,
        headroom: u64,
    ) -> Option<Reason> {
        if let Some((t, p)) = previous {
            let d = |now: u64, then: u64| now.saturating_sub(then);
            if d(s.oom_kill, p.oom_kill) > 0 {
                return Some(Reason::OomKill {
                    delta: d(s.oom_kill, p.oom_kill),
                });
            }
            for (counter, delta) in [
                ("alloc_stall", d(s.alloc_stall, p.alloc_stall)),
                ("direct_reclaim", d(s.direct_reclaim, p.direct_reclaim)),
                ("direct_scan", d(s.direct_scan, p.direct_scan)),
                ("swap_in", d(s.swap_in, p.swap_in)),
            ] {
                if delta > 0 {
                    return Some(Reason::Rising { counter, delta });
                }
            }
            let secs = at.duration_since(t).as_secs_f64().max(1e-3);
            let faults = d(s.major_faults, p.major_faults);
            if faults as f64 / secs > self.config.major_faults_per_s {
                return Some(Reason::Rising {
                    counter: "major_faults",
                    delta: faults,
                });
            }
        }
        (s.available < headroom).then_some(Reason::BelowHeadroom {
            available: s.available,
            headroom,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    struct Sim {
        policy: Policy,
        t0: Instant,
        now: Instant,
        target: u64,
        sample: GuestSample,
        psi: Option<f64>,
    }

    impl Sim {
        /// A 2 GiB guest with `used` bytes in use and no balloon.
        fn new(used: u64) -> Sim {
            let t0 = Instant::now();
            Sim {
                policy: Policy::new(PolicyConfig::default()),
                t0,
                now: t0,
                target: 0,
                sample: GuestSample {
                    available: 2 * GIB - used,
                    ..Default::default()
                },
                psi: None,
            }
        }

        /// One second passes, a fresh sample arrives (available shrinks by
        /// what the balloon took), the policy decides and its target applies.
        fn tick(&mut self) -> Decision {
            self.now += Duration::from_secs(1);
            let d = self.policy.decide(
                self.now,
                &Inputs {
                    guest_ram: 2 * GIB,
                    target: self.target,
                    guest: Some((self.now, self.sample)),
                    host_psi: self.psi,
                },
            );
            if let Some(t) = d.new_target {
                let grew = t as i64 - self.target as i64;
                self.sample.available = (self.sample.available as i64 - grew) as u64;
                self.target = t;
            }
            d
        }
    }

    #[test]
    fn an_idle_guest_is_reclaimed_gradually_down_to_the_headroom() {
        let mut s = Sim::new(300 * MIB);
        let headroom = s.policy.headroom(2 * GIB, false);
        let mut changes = 0;
        for i in 0..60 {
            let d = s.tick();
            if i < 9 {
                assert!(matches!(d.reason, Reason::Settling { .. }), "{i}: {d:?}");
            }
            if let Some(t) = d.new_target {
                changes += 1;
                assert!(t <= 2 * GIB - s.policy.config().floor);
            }
        }
        // 1748 MiB available, headroom 192 + 163.8 MiB, band a quarter of
        // it: at least 1.2 GiB goes back to the host.
        assert!(s.target >= 1229 * MIB, "reclaimed {} MiB", s.target / MIB);
        let band = headroom / 4;
        assert!(s.sample.available >= headroom && s.sample.available <= headroom + band + 4096);
        assert!(changes <= 6, "{changes} steps of at most 256 MiB");
        assert_eq!(s.tick().new_target, None, "settled: no more changes");
    }

    #[test]
    fn never_below_the_floor() {
        let mut s = Sim::new(0);
        s.policy.config.headroom = 0;
        s.policy.config.headroom_fraction = 0.0;
        for _ in 0..200 {
            s.tick();
        }
        assert_eq!(s.target, 2 * GIB - s.policy.config().floor);
        assert_eq!(s.tick().reason, Reason::AtFloor);
    }

    #[test]
    fn pressure_deflates_at_once_enough_to_restore_the_headroom_then_cools_down() {
        let mut s = Sim::new(300 * MIB);
        for _ in 0..40 {
            s.tick();
        }
        let before = s.target;
        // The guest allocates 400 MiB.
        s.sample.available -= 400 * MIB;
        let d = s.tick();
        assert!(matches!(d.reason, Reason::BelowHeadroom { .. }), "{d:?}");
        let headroom = d.headroom;
        assert!(s.sample.available >= headroom + headroom / 4 - 4096);
        assert!(s.target < before);
        // Available is back in the band; no inflate during the cool-down.
        s.sample.available += 300 * MIB;
        let d = s.tick();
        assert!(matches!(d.reason, Reason::CoolingDown { .. }), "{d:?}");
        assert_eq!(d.new_target, None);
    }

    #[test]
    fn rising_stall_counters_and_oom_kills_deflate_even_with_memory_available() {
        for (field, counter) in [
            ("alloc_stall", "alloc_stall"),
            ("direct_reclaim", "direct_reclaim"),
            ("direct_scan", "direct_scan"),
            ("swap_in", "swap_in"),
            ("major_faults", "major_faults"),
            ("oom_kill", "oom_kill"),
        ] {
            let mut s = Sim::new(300 * MIB);
            for _ in 0..30 {
                s.tick();
            }
            let before = s.target;
            assert!(before > 0);
            match field {
                "alloc_stall" => s.sample.alloc_stall += 1,
                "direct_reclaim" => s.sample.direct_reclaim += 5,
                "direct_scan" => s.sample.direct_scan += 5,
                "swap_in" => s.sample.swap_in += 4096,
                "major_faults" => s.sample.major_faults += 1000,
                _ => s.sample.oom_kill += 1,
            }
            let d = s.tick();
            match d.reason {
                Reason::Rising { counter: c, .. } => assert_eq!(c, counter),
                Reason::OomKill { delta } => assert_eq!((counter, delta), ("oom_kill", 1)),
                other => panic!("{field}: {other:?}"),
            }
            assert!(
                s.target + s.policy.config().pressure_step <= before,
                "{field}: deflated at least a step"
            );
        }
    }

    /// An idle, reclaimed guest stalls three times; `between` runs after
    /// each stall's cool-down has started (the available memory it frees
    /// is the caller's choice). Returns each cool-down's length.
    fn cool_downs_after_three_stalls(mut between: impl FnMut(&mut Sim)) -> Vec<u64> {
        let mut s = Sim::new(300 * MIB);
        for _ in 0..40 {
            s.tick();
        }
        let mut lefts = Vec::new();
        for _ in 0..3 {
            s.sample.alloc_stall += 1;
            let d = s.tick();
            assert!(matches!(d.reason, Reason::Rising { .. }), "{d:?}");
            match s.tick().reason {
                Reason::CoolingDown { left_ms } => lefts.push(left_ms),
                other => panic!("{other:?}"),
            }
            between(&mut s);
        }
        lefts
    }

    #[test]
    fn repeated_pressure_lengthens_the_cool_down() {
        let lefts = cool_downs_after_three_stalls(|s| {
            s.sample.available += 200 * MIB;
            // The policy gives memory back again after the cool-down...
            let inflated = (0..300).any(|_| s.tick().new_target.is_some());
            assert!(inflated, "no inflate after the cool-down");
            // ...and the guest needs it once more: a misjudgement.
        });
        assert!(
            lefts[1] > lefts[0] * 3 / 2 && lefts[2] > lefts[1] * 3 / 2,
            "{lefts:?}"
        );
    }

    /// A guest ramping up fast meets pressure several times in a row with
    /// no inflate in between: one episode, the cool-down stays as it was.
    #[test]
    fn pressure_of_one_episode_keeps_the_cool_down() {
        let lefts = cool_downs_after_three_stalls(|_| {});
        let base = PolicyConfig::default().cooldown.as_millis() as u64;
        assert!(lefts.iter().all(|&l| l <= base), "{lefts:?}");
    }

    /// The guest's own load with no balloon to deflate: once it frees the
    /// memory, reclaim starts after the settle time, not a cool-down.
    #[test]
    fn pressure_with_an_empty_balloon_starts_no_cool_down() {
        let mut s = Sim::new(1800 * MIB);
        let d = s.tick();
        assert!(matches!(d.reason, Reason::BelowHeadroom { .. }), "{d:?}");
        assert_eq!(d.new_target, None);
        s.sample.available += 1500 * MIB;
        let first = (1..60).find(|_| s.tick().new_target.is_some()).unwrap();
        assert!(first <= 11, "first inflate after {first} s");
    }

    #[test]
    fn a_trickle_of_major_faults_is_not_pressure() {
        let mut s = Sim::new(300 * MIB);
        for _ in 0..20 {
            s.sample.major_faults += 10;
            let d = s.tick();
            assert!(!matches!(d.reason, Reason::Rising { .. }), "{d:?}");
        }
        assert!(s.target > 0);
    }

    #[test]
    fn stale_statistics_never_inflate() {
        let mut s = Sim::new(300 * MIB);
        let at = s.now;
        for i in 1..30 {
            let now = s.t0 + Duration::from_secs(i);
            let d = s.policy.decide(
                now,
                &Inputs {
                    guest_ram: 2 * GIB,
                    target: 0,
                    guest: Some((at, s.sample)),
                    host_psi: None,
                },
            );
            assert_eq!(d.new_target, None, "{d:?}");
            if i > 5 {
                assert!(matches!(d.reason, Reason::StaleStatistics { .. }), "{d:?}");
            }
        }
        let d = s.policy.decide(
            s.now,
            &Inputs {
                guest_ram: 2 * GIB,
                target: 0,
                guest: None,
                host_psi: None,
            },
        );
        assert_eq!(d.reason, Reason::NoStatistics);
    }

    #[test]
    fn host_pressure_reclaims_sooner_and_leaves_less_headroom() {
        let calm = {
            let mut s = Sim::new(300 * MIB);
            let first = (1..60).find(|_| s.tick().new_target.is_some()).unwrap();
            for _ in 0..60 {
                s.tick();
            }
            (first, s.target)
        };
        let pressed = {
            let mut s = Sim::new(300 * MIB);
            s.psi = Some(25.0);
            let first = (1..60).find(|_| s.tick().new_target.is_some()).unwrap();
            for _ in 0..60 {
                s.tick();
            }
            (first, s.target)
        };
        assert!(pressed.0 < calm.0, "sooner: {pressed:?} vs {calm:?}");
        assert!(
            pressed.1 > calm.1,
            "more reclaimed: {pressed:?} vs {calm:?}"
        );
        let p = Policy::new(PolicyConfig {
            headroom: 64 * MIB,
            headroom_fraction: 0.0,
            ..Default::default()
        });
        assert_eq!(p.headroom(2 * GIB, true), p.config().min_headroom);
    }

    #[test]
    fn a_steady_load_does_not_flap() {
        let mut s = Sim::new(300 * MIB);
        let mut changes = 0;
        for i in 0..300 {
            // ±10 MiB of noise on what the guest uses.
            if i % 2 == 0 {
                s.sample.available += 10 * MIB;
            } else {
                s.sample.available -= 10 * MIB;
            }
            if s.tick().new_target.is_some() {
                changes += 1;
            }
        }
        assert!(changes <= 8, "{changes} target changes in 5 minutes");
    }
}
