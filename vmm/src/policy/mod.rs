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
use devices::PAGE_SIZE;
use devices::virtio::VirtioDevice;
use devices::virtio::balloon::{Balloon, GuestStats, VIRTIO_BALLOON_F_STATS_VQ};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

pub use engine::{Decision, GuestSample, Inputs, Policy, PolicyConfig, Reason};
pub use host::check_psi_path;

const MIB: u64 = 1 << 20;
/// Reports closer together than this do not each get a decision.
pub const MIN_DECISION_GAP: Duration = Duration::from_millis(100);
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
    /// When a hold was last published.
    last_hold_at: Option<Instant>,
    counts: PolicyCounts,
    psi_warned: bool,
    /// The timer period wanted changed: the subscriber re-arms.
    timer_dirty: bool,
}

/// Why [`PolicyShared::configure`] refused a change.
#[derive(Debug, PartialEq, Eq)]
pub enum ConfigureError {
    /// The request itself is wrong (an API 400).
    Invalid(String),
    /// A migration's or snapshot's capture is under way (an API 409).
    Frozen(String),
}

impl From<String> for ConfigureError {
    fn from(msg: String) -> Self {
        ConfigureError::Invalid(msg)
    }
}

impl std::fmt::Display for ConfigureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigureError::Invalid(m) | ConfigureError::Frozen(m) => f.write_str(m),
        }
    }
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
                last_hold_at: None,
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
    ///
    /// Refused with [`ConfigureError::Frozen`] while the balloon is frozen
    /// for a migration's or snapshot's capture: the balloon's lock is held
    /// from that check to the end, so a change either comes before the
    /// freeze (and is captured) or is refused.
    pub fn configure(
        &self,
        balloon: &Mutex<Balloon>,
        enabled: Option<bool>,
        settings: Option<PolicySettings>,
    ) -> Result<(), ConfigureError> {
        let mut s = self.lock();
        let settings = settings.unwrap_or_else(|| s.settings.clone());
        settings.check(self.guest_bytes)?;
        // Only a new path: a request that leaves it alone (turning the
        // policy off, say) is not refused for what became of the old one.
        if settings.psi_path != s.settings.psi_path {
            host::check_psi_path(&settings.psi_path)?;
        }
        let on = enabled.unwrap_or(s.enabled);
        let mut b = lock_balloon(balloon);
        if b.is_frozen() {
            return Err(ConfigureError::Frozen(
                devices::virtio::balloon::Error::Frozen.to_string(),
            ));
        }
        if on {
            stats_capable(&b)?;
            if let Err(e) = b.set_stats_polling_interval(settings.stats_interval_s()) {
                return Err(format!("cannot turn balloon statistics on: {e}").into());
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
        if enabled.is_some() {
            // On resumes a paused policy; off forgets the pause.
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
        drop(b);
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
fn sample_of(st: &GuestStats) -> Option<GuestSample> {
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
    stats: Option<GuestStats>,
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
                target_mib: s.target_pages * PAGE_SIZE / MIB,
                actual_mib: s.actual_pages * PAGE_SIZE / MIB,
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
        let since = s.last_decided.map(|t| now.saturating_duration_since(t));
        let due = since.is_none_or(|d| d + Duration::from_millis(50) >= interval);
        // A report decides at once, but not more often than MIN_DECISION_GAP
        // (a guest cannot make the policy read PSI at its own rate).
        let report_due = fresh.is_some() && since.is_none_or(|d| d >= MIN_DECISION_GAP);
        if !due && !report_due {
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
        let target = look.target_pages * PAGE_SIZE;
        let actual = look.actual_pages * PAGE_SIZE;
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
                        "balloon policy: host memory pressure unknown ({e}); deciding without it"
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
        // The API counts in MiB: round an inflate down, a deflate down too
        // (a little more back to the guest).
        let new_target = d.new_target.map_or(target, |t| t / MIB * MIB);
        // The decision is published before its target is applied, so that
        // its reason comes before the BalloonChanged it causes.
        self.record(s, &d, target, new_target, guest, host_psi);
        if new_target != target
            && let Err(e) = (self.apply)(new_target / MIB)
        {
            log::warn!(
                "balloon policy: target {} MiB refused: {e}",
                new_target / MIB
            );
        }
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
            // Less than the API's MiB to move: at rest, in the band.
            (
                "within_band",
                "the guest's available memory is within a MiB of the headroom band: at rest"
                    .to_string(),
            )
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
            hold_news(s, kind, Instant::now())
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

/// Holds closer together than this are not published (unless the first
/// since a target change): a guest hovering at the band's edge would flip
/// `within_band`/`settling` every interval.
pub const HOLD_EVENT_GAP: Duration = Duration::from_secs(10);

/// Whether a hold for `kind` is news: its reason differs from the last
/// published hold's, and it is the first since a target change or the last
/// hold event is [`HOLD_EVENT_GAP`] old. Records it when it is.
fn hold_news(s: &mut State, kind: &str, now: Instant) -> bool {
    let changed = s.last_hold.as_deref() != Some(kind);
    let quiet = s.last_hold.is_none()
        || s.last_hold_at
            .is_none_or(|t| now.saturating_duration_since(t) >= HOLD_EVENT_GAP);
    if changed && quiet {
        s.last_hold = Some(kind.to_string());
        s.last_hold_at = Some(now);
        return true;
    }
    false
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<PolicyShared> {
        PolicyShared::new(true, PolicySettings::default(), 2 << 30, 64 * MIB).unwrap()
    }

    #[test]
    fn holds_are_news_when_their_reason_changes_and_not_more_often_than_the_gap() {
        let p = shared();
        let mut s = p.lock();
        let t0 = Instant::now();
        assert!(hold_news(&mut s, "settling", t0), "first hold");
        assert!(!hold_news(&mut s, "settling", t0 + Duration::from_secs(1)));
        // Flipping at the band's edge: not before the gap.
        assert!(!hold_news(
            &mut s,
            "within_band",
            t0 + Duration::from_secs(2)
        ));
        assert!(hold_news(&mut s, "within_band", t0 + HOLD_EVENT_GAP));
        // After a target change the first hold is news at once.
        s.last_hold = None;
        assert!(hold_news(
            &mut s,
            "within_band",
            t0 + HOLD_EVENT_GAP + Duration::from_secs(1)
        ));
    }

    #[test]
    fn a_report_becomes_a_sample() {
        let mut values = [None; devices::virtio::balloon::stats::NUM_STAT_TAGS];
        let tag = |n| devices::virtio::balloon::stats::stat_tag(n).unwrap() as usize;
        values[tag("free_memory")] = Some(100 * MIB);
        values[tag("alloc_stall")] = Some(3);
        let st = GuestStats {
            values,
            updated: SystemTime::now(),
        };
        let s = sample_of(&st).unwrap();
        assert_eq!((s.available, s.alloc_stall, s.oom_kill), (100 * MIB, 3, 0));
        values[tag("available_memory")] = Some(200 * MIB);
        let s = sample_of(&GuestStats { values, ..st }).unwrap();
        assert_eq!(s.available, 200 * MIB, "available preferred to free");
        let none = GuestStats {
            values: [None; devices::virtio::balloon::stats::NUM_STAT_TAGS],
            ..st
        };
        assert_eq!(sample_of(&none), None);
    }

    #[test]
    fn the_floor_is_never_below_the_balloon_floor() {
        let s = PolicySettings {
            floor_mib: 16,
            ..Default::default()
        };
        assert_eq!(engine_config(&s, 1 << 30, 64 * MIB).floor, 64 * MIB);
        assert_eq!(
            engine_config(&PolicySettings::default(), 1 << 30, 64 * MIB).floor,
            256 * MIB
        );
    }

    struct NoDiscard;

    impl devices::RamDiscard for NoDiscard {
        fn discard(
            &self,
            range: devices::GpaRange,
        ) -> Result<devices::DiscardOutcome, devices::DiscardError> {
            Err(devices::DiscardError::OutOfRange(range))
        }
    }

    /// A 64 MiB guest's balloon that discards nothing.
    fn test_balloon() -> Mutex<Balloon> {
        Mutex::new(
            Balloon::new(
                Default::default(),
                vec![devices::GpaRange::new(0, 64 * MIB)],
                Arc::new(NoDiscard),
            )
            .unwrap(),
        )
    }

    /// While the balloon is frozen for a capture, every policy change is
    /// refused as such (the API's 409), on or off, and changes nothing: a
    /// change that raced the freeze was a 400 ("cannot turn balloon
    /// statistics on"), or taken and left out of the capture.
    #[test]
    fn configure_refuses_changes_while_the_balloon_is_frozen() {
        let balloon = test_balloon();
        let p = shared();
        lock_balloon(&balloon).freeze();
        for enabled in [Some(true), Some(false), None] {
            let e = p
                .configure(&balloon, enabled, Some(PolicySettings::default()))
                .unwrap_err();
            assert!(matches!(e, ConfigureError::Frozen(_)), "{enabled:?}: {e:?}");
        }
        let settings = PolicySettings {
            max_step_mib: 64,
            ..Default::default()
        };
        assert!(matches!(
            p.configure(&balloon, None, Some(settings.clone())),
            Err(ConfigureError::Frozen(_))
        ));
        assert_eq!(p.status().config, PolicySettings::default(), "unchanged");
        lock_balloon(&balloon).thaw();
        p.configure(&balloon, Some(false), Some(settings.clone()))
            .unwrap();
        assert_eq!(p.status().config, settings);
    }

    /// `PATCH /balloon/policy {"psi_path": FIFO}` is refused, naming the
    /// path, and changes nothing; a regular file is taken.
    #[test]
    fn configure_refuses_a_psi_path_that_is_not_a_regular_file() {
        let balloon = test_balloon();
        let p = PolicyShared::new(false, PolicySettings::default(), 2 << 30, 64 * MIB).unwrap();
        let fifo = std::env::temp_dir().join(format!("blimp-policy-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let with = |path: &str| PolicySettings {
            psi_path: path.to_string(),
            ..Default::default()
        };
        let r = p.configure(&balloon, None, Some(with(fifo.to_str().unwrap())));
        std::fs::remove_file(&fifo).unwrap();
        let e = r.unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "psi_path {} is not a regular file (a FIFO): the policy reads host memory pressure from a regular file such as /proc/pressure/memory or a cgroup's memory.pressure",
                fifo.display()
            )
        );
        assert_eq!(p.status().config, PolicySettings::default(), "unchanged");
        p.configure(&balloon, None, Some(with("/proc/meminfo")))
            .unwrap();
        assert_eq!(p.status().config.psi_path, "/proc/meminfo");
    }

    #[test]
    fn pause_resume_and_saved_copy() {
        let p = shared();
        assert!(p.saved().is_some_and(|s| s.enabled && s.paused.is_none()));
        p.pause_for("PATCH /balloon target 5 MiB");
        let st = p.status();
        assert!(st.paused && st.paused_reason.unwrap().contains("PATCH /balloon"));
        assert!(p.saved().unwrap().paused.is_some());
        p.restore(PolicyPersist {
            enabled: false,
            paused: None,
            settings: PolicySettings::default(),
        });
        assert_eq!(p.saved(), None, "off with the defaults: nothing to carry");
        p.pause_for("PATCH /balloon");
        assert!(!p.status().paused, "an off policy is not paused");
    }

    #[test]
    fn every_reason_has_a_kind_from_the_contract() {
        let kinds = [
            "below_headroom",
            "rising",
            "oom_kill",
            "excess",
            "settling",
            "cooling_down",
            "at_floor",
            "within_band",
            "stale_statistics",
            "no_statistics",
            "nothing_to_give",
        ];
        for r in [
            Reason::NoStatistics,
            Reason::StaleStatistics { age_ms: 1 },
            Reason::BelowHeadroom {
                available: 1,
                headroom: 2,
            },
            Reason::Rising {
                counter: "alloc_stall",
                delta: 1,
            },
            Reason::OomKill { delta: 1 },
            Reason::Excess {
                available: 2,
                headroom: 1,
            },
            Reason::Settling {
                excess: 1,
                left_ms: 1,
            },
            Reason::CoolingDown { left_ms: 1 },
            Reason::AtFloor,
            Reason::WithinBand,
            Reason::NothingToGive,
        ] {
            let (k, detail) = describe(&r);
            assert!(kinds.contains(&k) && !detail.is_empty(), "{r:?}");
        }
    }
}
