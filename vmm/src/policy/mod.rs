//! The automatic balloon policy at run time (issue #18): its state (on,
//! paused, settings, the last decision, counters), the event-loop
//! subscriber that feeds [`engine::Policy::decide`] and applies what it
//! decides, and the `BalloonSettled` tracker.
//!
//! - [`engine`]: the decisions, pure logic.
//! - [`PolicyShared`]: the state, shared with the API handler (show,
//!   configure, pause on a manual target) and migration (save, restore).
//! - [`PolicyEvents`]: the subscriber. It wakes on its own timer (the
//!   decision interval, so stale statistics are seen) and on a kick the
//!   balloon's observer gives for each statistics report and each target or
//!   `actual` change. A report becomes one [`GuestSample`]; host pressure
//!   is read from the PSI file (`some avg10`) when deciding.
//!
//! Lock order: the policy's state before the balloon's device lock (the
//! subscriber applies a target while holding its state, so a manual target
//! that paused the policy first is never overwritten); nothing takes the
//! policy's state under the device lock.

pub mod engine;
mod host;

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use api_types::policy::{PolicyDecision, PolicySettings, PolicyStatus};
use api_types::{ApiEvent, EventHub};
use devices::virtio::VirtioDevice;
use devices::virtio::balloon::{Balloon, BalloonStats, VIRTIO_BALLOON_F_STATS_VQ};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

pub use engine::{Decision, GuestSample, Inputs, Policy, PolicyConfig, Reason};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// `actual` that has not moved for this long short of the target is
/// settled (`reached: false`).
pub const SETTLE_STILL: Duration = Duration::from_secs(3);

/// What a snapshot or a migration carries of the policy.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyPersist {
    pub enabled: bool,
    pub paused: Option<String>,
    pub settings: PolicySettings,
}

/// Per-action decision counts, for `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct PolicyCounts {
    pub inflate: u64,
    pub deflate: u64,
    pub hold: u64,
    pub target_changes: u64,
    pub headroom_bytes: u64,
    pub host_psi: Option<f64>,
    pub enabled: bool,
}

struct State {
    enabled: bool,
    /// A manual target paused the policy (the request, for GET).
    paused: Option<String>,
    /// Why an enabled, unpaused policy cannot act yet (driver not up, no
    /// statistics queue).
    waiting: Option<String>,
    settings: PolicySettings,
    engine: Policy,
    /// The latest report seen (its device time stamp) and the sample made of it.
    seen: Option<SystemTime>,
    guest: Option<(Instant, GuestSample)>,
    last_decided: Option<Instant>,
    last_decision: Option<PolicyDecision>,
    /// The reason of the last published hold (holds are published only
    /// when it changes).
    last_hold: Option<String>,
    counts: PolicyCounts,
    psi_warned: bool,
    /// The timer period wanted changed: the subscriber re-arms.
    timer_dirty: bool,
}

/// The policy's state, shared by the event loop's subscriber, the API
/// handler and migration.
pub struct PolicyShared {
    state: Mutex<State>,
    /// Wakes the subscriber (configuration change, a balloon event).
    kick: EventFd,
    /// What a snapshot saves, kept apart (a leaf lock): migration reads
    /// it under the balloon's device lock, where the state's lock must not
    /// be taken (see the lock order above).
    saved: Mutex<Option<PolicyPersist>>,
    guest_bytes: u64,
    /// `--balloon floor`: the policy never goes below it either.
    balloon_floor_bytes: u64,
}

impl PolicyShared {
    pub fn new(
        enabled: bool,
        settings: PolicySettings,
        guest_bytes: u64,
        balloon_floor_bytes: u64,
    ) -> std::io::Result<Arc<Self>> {
        let engine = Policy::new(engine_config(&settings, guest_bytes, balloon_floor_bytes));
        let shared = Arc::new(Self {
            state: Mutex::new(State {
                enabled,
                paused: None,
                waiting: None,
                settings,
                engine,
                seen: None,
                guest: None,
                last_decided: None,
                last_decision: None,
                last_hold: None,
                counts: PolicyCounts::default(),
                psi_warned: false,
                timer_dirty: true,
            }),
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            saved: Mutex::new(None),
            guest_bytes,
            balloon_floor_bytes,
        });
        shared.save(&shared.lock());
        Ok(shared)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The saved copy (`None`: the policy was never on nor configured).
    pub fn saved(&self) -> Option<PolicyPersist> {
        self.saved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Refresh the saved copy after a change of `s`.
    fn save(&self, s: &State) {
        let used = s.enabled || s.settings != PolicySettings::default();
        let copy = used.then(|| PolicyPersist {
            enabled: s.enabled,
            paused: s.paused.clone(),
            settings: s.settings.clone(),
        });
        *self.saved.lock().unwrap_or_else(PoisonError::into_inner) = copy;
    }

    /// Wake the subscriber (never blocks).
    pub fn kick(&self) {
        if let Err(e) = self.kick.write(1) {
            log::warn!("balloon policy: cannot wake the event loop: {e}");
        }
    }

    /// `GET /balloon/policy`.
    pub fn status(&self) -> PolicyStatus {
        let s = self.lock();
        let paused_reason = match (&s.paused, &s.waiting) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(w)) if s.enabled => Some(w.clone()),
            _ => None,
        };
        PolicyStatus {
            enabled: s.enabled,
            paused: s.enabled && paused_reason.is_some(),
            paused_reason,
            config: s.settings.clone(),
            last_decision: s.last_decision.clone(),
            decisions: s.counts.inflate + s.counts.deflate + s.counts.hold,
            target_changes: s.counts.target_changes,
        }
    }

    pub fn counts(&self) -> PolicyCounts {
        let s = self.lock();
        PolicyCounts {
            enabled: s.enabled && s.paused.is_none(),
            ..s.counts
        }
    }

    /// Turn the policy on or off and/or replace its settings; checks
    /// everything before changing anything. `balloon` is the device, to
    /// see that the guest can give statistics and to turn them on.
    pub fn configure(
        &self,
        balloon: &Mutex<Balloon>,
        enabled: Option<bool>,
        settings: Option<PolicySettings>,
    ) -> Result<(), String> {
        let mut s = self.lock();
        let settings = settings.unwrap_or_else(|| s.settings.clone());
        settings.check(self.guest_bytes)?;
        let on = enabled.unwrap_or(s.enabled);
        if on {
            let mut b = lock_balloon(balloon);
            stats_capable(&b)?;
            if let Err(e) = b.set_stats_polling_interval(settings.stats_interval_s()) {
                return Err(format!("cannot turn balloon statistics on: {e}"));
            }
        }
        if settings != s.settings {
            s.engine = Policy::new(engine_config(
                &settings,
                self.guest_bytes,
                self.balloon_floor_bytes,
            ));
            s.settings = settings;
            s.psi_warned = false;
        }
        if enabled == Some(true) {
            s.paused = None;
        }
        if on != s.enabled {
            log::info!(
                "balloon policy: {}",
                if on { "enabled" } else { "disabled" }
            );
            s.last_hold = None;
        }
        s.enabled = on;
        s.timer_dirty = true;
        self.save(&s);
        drop(s);
        self.kick();
        Ok(())
    }

    /// A manual target (`why` names the request) pauses an enabled policy
    /// until it is enabled again.
    pub fn pause_for(&self, why: &str) {
        let mut s = self.lock();
        if s.enabled && s.paused.is_none() {
            log::info!("balloon policy: paused by {why}");
            s.paused = Some(format!(
                "paused by a manual target ({why}); PATCH /balloon/policy {{\"enabled\":true}} or `blimp balloon policy on` resumes it"
            ));
            s.timer_dirty = true;
            self.save(&s);
            drop(s);
            self.kick();
        }
    }

    /// What a snapshot or a migration saves.
    pub fn persist(&self) -> PolicyPersist {
        let s = self.lock();
        PolicyPersist {
            enabled: s.enabled,
            paused: s.paused.clone(),
            settings: s.settings.clone(),
        }
    }

    /// Take saved state (restore, migration destination).
    pub fn restore(&self, p: PolicyPersist) {
        let mut s = self.lock();
        s.engine = Policy::new(engine_config(
            &p.settings,
            self.guest_bytes,
            self.balloon_floor_bytes,
        ));
        s.enabled = p.enabled;
        s.paused = p.paused;
        s.settings = p.settings;
        s.timer_dirty = true;
        self.save(&s);
        drop(s);
        self.kick();
    }
}

/// The engine's parameters from the settings; the floor is never below the
/// balloon's own (`--balloon floor`), which every target must respect.
fn engine_config(s: &PolicySettings, guest_bytes: u64, balloon_floor: u64) -> PolicyConfig {
    let ms = Duration::from_millis;
    PolicyConfig {
        floor: (s.floor_mib * MIB).max(balloon_floor).min(guest_bytes),
        headroom: s.headroom_mib * MIB,
        headroom_fraction: s.headroom_fraction,
        min_headroom: s.min_headroom_mib * MIB,
        settle: ms(s.settle_ms),
        max_step: s.max_step_mib * MIB,
        pressure_step: s.pressure_step_mib * MIB,
        cooldown: ms(s.cooldown_ms),
        stale_after: ms(s.stale_after_ms),
        major_faults_per_s: s.major_faults_per_s,
        host_psi_high: s.host_psi_high,
    }
}

/// The guest can give statistics: the device offers the queue, and the
/// driver (when up) negotiated it.
fn stats_capable(b: &Balloon) -> Result<(), String> {
    let bit = 1u64 << VIRTIO_BALLOON_F_STATS_VQ;
    if b.avail_features() & bit == 0 {
        return Err("the balloon policy needs the guest's statistics, and this balloon was started without them (start blimp with --balloon-policy, or --balloon stats_interval=1)".into());
    }
    if b.is_activated() && b.acked_features() & bit == 0 {
        return Err("the balloon policy needs the guest's statistics, and the guest's balloon driver did not negotiate VIRTIO_BALLOON_F_STATS_VQ".into());
    }
    Ok(())
}

fn lock_balloon(b: &Mutex<Balloon>) -> MutexGuard<'_, Balloon> {
    b.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A statistics report as the engine reads it (`None`: it carries neither
/// available nor free memory).
fn sample_of(st: &BalloonStats) -> Option<GuestSample> {
    let v = |n| st.by_name(n).unwrap_or(0);
    let available = st
        .by_name("available_memory")
        .or_else(|| st.by_name("free_memory"))?;
    Some(GuestSample {
        available,
        swap_in: v("swap_in"),
        major_faults: v("major_faults"),
        alloc_stall: v("alloc_stall"),
        direct_scan: v("direct_scan"),
        direct_reclaim: v("direct_reclaim"),
        oom_kill: v("oom_kill"),
    })
}

/// How a target is applied (the API handler's checked path; the policy
/// does not pause itself).
pub type ApplyTarget = Box<dyn Fn(u64) -> Result<(), String> + Send>;

/// What the subscriber saw of the balloon in one look.
struct Look {
    target_pages: u64,
    actual_pages: u64,
    active: bool,
    stats_acked: bool,
    stats: Option<BalloonStats>,
}

/// Tracks one target change until `actual` settles.
struct Settle {
    target_pages: u64,
    actual_pages: u64,
    moved_at: Instant,
    done: bool,
}

/// The event-loop subscriber: the policy's timer and kick.
pub struct PolicyEvents {
    shared: Arc<PolicyShared>,
    balloon: Arc<Mutex<Balloon>>,
    apply: ApplyTarget,
    events: EventHub,
    timer: TimerFd,
    /// The period the timer runs at (`None`: disarmed).
    period: Option<Duration>,
    rearmed: bool,
    settle: Settle,
}

impl PolicyEvents {
    pub fn new(
        shared: Arc<PolicyShared>,
        balloon: Arc<Mutex<Balloon>>,
        apply: ApplyTarget,
        events: EventHub,
    ) -> std::io::Result<Self> {
        let timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        let (target_pages, actual_pages) = {
            let b = lock_balloon(&balloon);
            (u64::from(b.target_pages()), u64::from(b.actual_pages()))
        };
        Ok(Self {
            shared,
            balloon,
            apply,
            events,
            timer,
            period: None,
            rearmed: false,
            settle: Settle {
                target_pages,
                actual_pages,
                moved_at: Instant::now(),
                done: true,
            },
        })
    }

    fn look(&self) -> Look {
        let b = lock_balloon(&self.balloon);
        Look {
            target_pages: u64::from(b.target_pages()),
            actual_pages: u64::from(b.actual_pages()),
            active: b.is_activated(),
            stats_acked: b.acked_features() & (1u64 << VIRTIO_BALLOON_F_STATS_VQ) != 0,
            stats: b.latest_stats().copied(),
        }
    }

    /// `BalloonSettled`, once per target change.
    fn track_settle(&mut self, now: Instant, l: &Look) {
        let s = &mut self.settle;
        if l.target_pages != s.target_pages {
            *s = Settle {
                target_pages: l.target_pages,
                actual_pages: l.actual_pages,
                moved_at: now,
                done: false,
            };
        }
        if s.done {
            return;
        }
        let reached = l.actual_pages == s.target_pages;
        if l.actual_pages != s.actual_pages {
            s.actual_pages = l.actual_pages;
            s.moved_at = now;
        }
        if reached || now.saturating_duration_since(s.moved_at) >= SETTLE_STILL {
            s.done = true;
            self.events.publish(ApiEvent::BalloonSettled {
                target_mib: s.target_pages * PAGE / MIB,
                actual_mib: s.actual_pages * PAGE / MIB,
                reached,
            });
        }
    }

    /// One wake-up: settle tracking, then (when due) a decision.
    fn tick(&mut self) {
        let now = Instant::now();
        let look = self.look();
        self.track_settle(now, &look);
        let shared = self.shared.clone();
        let mut s = shared.lock();
        if s.enabled && s.paused.is_none() {
            let last_move = if self.settle.done {
                self.settle.moved_at
            } else {
                now
            };
            self.maybe_decide(&mut s, now, &look, last_move);
        }
        let want = ((s.enabled && s.paused.is_none()) || !self.settle.done)
            .then(|| Duration::from_millis(s.settings.interval_ms));
        if std::mem::take(&mut s.timer_dirty) || want != self.period {
            self.arm(want);
        }
    }

    fn arm(&mut self, period: Option<Duration>) {
        let r = match period {
            Some(p) => self.timer.reset(p, Some(p)),
            None => self.timer.clear(),
        };
        if let Err(e) = r {
            log::error!("balloon policy: setting the timer failed: {e}");
        }
        self.period = period;
        self.rearmed = true;
    }

    /// `last_move`: when the balloon last moved (now while it moves); a
    /// report from before it does not yet show what the balloon took.
    fn maybe_decide(&self, s: &mut State, now: Instant, look: &Look, last_move: Instant) {
        s.waiting = if !look.active {
            Some("waiting for the guest's balloon driver".to_string())
        } else if !look.stats_acked {
            Some("the guest's balloon driver did not negotiate VIRTIO_BALLOON_F_STATS_VQ: the policy needs its statistics".to_string())
        } else {
            None
        };
        if s.waiting.is_some() {
            return;
        }
        let fresh = look
            .stats
            .as_ref()
            .filter(|st| Some(st.updated) != s.seen)
            .and_then(|st| {
                s.seen = Some(st.updated);
                sample_of(st)
            });
        if let (Some(sample), Some(st)) = (fresh, &look.stats) {
            // When the report arrived, not when the policy first looked: a
            // policy turned on later must see an old report as old.
            let age = SystemTime::now()
                .duration_since(st.updated)
                .unwrap_or_default();
            s.guest = Some((now.checked_sub(age).unwrap_or(now), sample));
        }
        let interval = Duration::from_millis(s.settings.interval_ms);
        let due = s.last_decided.is_none_or(|t| {
            now.saturating_duration_since(t) + Duration::from_millis(50) >= interval
        });
        if fresh.is_none() && !due {
            return;
        }
        s.last_decided = Some(now);
        let before_move = s.guest.is_some_and(|(at, _)| at <= last_move);
        self.decide(s, now, look, before_move);
    }

    /// `before_move`: the sample predates the balloon's last movement: it
    /// may deflate (pressure is pressure) or report stale statistics, but
    /// not inflate, and its holds are not published (the next report
    /// decides).
    fn decide(&self, s: &mut State, now: Instant, look: &Look, before_move: bool) {
        let guest_ram = self.shared.guest_bytes;
        let target = look.target_pages * PAGE;
        let actual = look.actual_pages * PAGE;
        // What the balloon has still to take (or give back) is not yet
        // out of (or in) the guest's report.
        let guest = s.guest.map(|(at, mut g)| {
            g.available = if target >= actual {
                g.available.saturating_sub(target - actual)
            } else {
                g.available.saturating_add(actual - target)
            };
            (at, g)
        });
        let psi = host::read_psi(&s.settings.psi_path);
        let host_psi = match psi {
            Ok(p) => Some(p),
            Err(e) => {
                if !std::mem::replace(&mut s.psi_warned, true) {
                    log::warn!(
                        "balloon policy: host memory pressure unknown ({}: {e}); deciding without it",
                        s.settings.psi_path
                    );
                }
                None
            }
        };
        let d = s.engine.decide(
            now,
            &Inputs {
                guest_ram,
                target,
                guest,
                host_psi,
            },
        );
        let shrinks = d.new_target.is_some_and(|t| t < target);
        if before_move && !shrinks && !matches!(d.reason, Reason::StaleStatistics { .. }) {
            return;
        }
        let mut new_target = target;
        if let Some(t) = d.new_target {
            // The API counts in MiB: round an inflate down, a deflate down too
            // (a little more back to the guest).
            let mib = t / MIB;
            match (self.apply)(mib) {
                Ok(()) => new_target = mib * MIB,
                Err(e) => log::warn!("balloon policy: target {mib} MiB refused: {e}"),
            }
        }
        self.record(s, &d, target, new_target, guest, host_psi);
    }
}

impl PolicyEvents {
    /// Count, publish (a hold only when its reason changes) and keep the
    /// decision.
    fn record(
        &self,
        s: &mut State,
        d: &Decision,
        target: u64,
        new_target: u64,
        guest: Option<(Instant, GuestSample)>,
        host_psi: Option<f64>,
    ) {
        let guest_ram = self.shared.guest_bytes;
        let action = match new_target.cmp(&target) {
            std::cmp::Ordering::Greater => "inflate",
            std::cmp::Ordering::Less => "deflate",
            std::cmp::Ordering::Equal => "hold",
        };
        let (kind, detail) = if d.new_target.is_some() && new_target == target {
            // Less than the API's MiB to move.
            describe(&Reason::NothingToGive)
        } else {
            describe(&d.reason)
        };
        let decision = PolicyDecision {
            action: action.into(),
            reason: kind.into(),
            detail,
            old_target_mib: target / MIB,
            new_target_mib: new_target / MIB,
            available_mib: guest.map(|(_, g)| g.available / MIB),
            headroom_mib: d.headroom / MIB,
            host_psi,
            host_pressure: d.host_pressure,
            guest_ram_mib: guest_ram / MIB,
            host_available_mib: host::mem_available().map(|b| b / MIB),
        };
        match action {
            "inflate" => s.counts.inflate += 1,
            "deflate" => s.counts.deflate += 1,
            _ => s.counts.hold += 1,
        }
        s.counts.headroom_bytes = d.headroom;
        s.counts.host_psi = host_psi;
        let publish = if action == "hold" {
            let changed = s.last_hold.as_deref() != Some(kind);
            s.last_hold = Some(kind.to_string());
            changed
        } else {
            s.counts.target_changes += 1;
            s.last_hold = None;
            log::info!(
                "balloon policy: {action} {} -> {} MiB ({})",
                decision.old_target_mib,
                decision.new_target_mib,
                decision.detail
            );
            true
        };
        if publish {
            self.events
                .publish(ApiEvent::PolicyDecision(decision.clone()));
        }
        s.last_decision = Some(decision);
    }
}

/// A reason's machine-readable kind and a sentence.
fn describe(r: &Reason) -> (&'static str, String) {
    let mib = |b: &u64| b / MIB;
    match r {
        Reason::NoStatistics => ("no_statistics", "no statistics from the guest yet".into()),
        Reason::StaleStatistics { age_ms } => (
            "stale_statistics",
            format!(
                "the guest's last statistics are {age_ms} ms old: holding (never inflate on stale statistics)"
            ),
        ),
        Reason::BelowHeadroom {
            available,
            headroom,
        } => (
            "below_headroom",
            format!(
                "the guest has {} MiB available, below the headroom of {} MiB: deflating at once",
                mib(available),
                mib(headroom)
            ),
        ),
        Reason::Rising { counter, delta } => (
            "rising",
            format!("the guest's {counter} rose by {delta}: memory pressure, deflating at once"),
        ),
        Reason::OomKill { delta } => (
            "oom_kill",
            format!("the guest killed {delta} process(es) for memory: deflating at once"),
        ),
        Reason::Excess {
            available,
            headroom,
        } => (
            "excess",
            format!(
                "the guest has {} MiB available, more than the headroom of {} MiB plus the band, for the settle time: inflating",
                mib(available),
                mib(headroom)
            ),
        ),
        Reason::Settling { excess, left_ms } => (
            "settling",
            format!(
                "{} MiB more than needed; inflating if it lasts {left_ms} ms more",
                mib(excess)
            ),
        ),
        Reason::CoolingDown { left_ms } => (
            "cooling_down",
            format!("no inflate for {left_ms} ms more after a deflate for pressure"),
        ),
        Reason::AtFloor => (
            "at_floor",
            "the balloon already leaves the guest only its floor".into(),
        ),
        Reason::WithinBand => (
            "within_band",
            "the guest's available memory is within the headroom band".into(),
        ),
        Reason::NothingToGive => ("nothing_to_give", "less than a MiB to move".into()),
    }
}

const DATA_KICK: u32 = 0;
const DATA_TIMER: u32 = 1;

impl MutEventSubscriber for PolicyEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, data) in [
            (self.shared.kick.as_raw_fd(), DATA_KICK),
            (self.timer.as_raw_fd(), DATA_TIMER),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                log::error!("balloon policy: cannot watch fd {fd}: {e}");
            }
        }
        self.tick();
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            DATA_KICK => {
                // Non-blocking: a spurious wake-up reads EAGAIN.
                let _ = self.shared.kick.read();
            }
            _ => {
                if std::mem::take(&mut self.rearmed) {
                    // The readiness may predate the re-arm: reading could
                    // block; if it is real, epoll reports it again.
                } else if let Err(e) = self.timer.wait() {
                    log::error!("balloon policy: reading the timer failed: {e}");
                }
            }
        }
        self.tick();
    }
}
