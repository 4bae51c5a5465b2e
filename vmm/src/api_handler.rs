//! The VMM side of the REST API: requests arrive from the API server thread
//! over a channel and wake the event loop through an eventfd; this handler
//! answers each on the VMM thread, the only writer of VM state.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use api_types::types::{
    self, BalloonInfo, BalloonPut, HintingStarted, MigrationDestination, MigrationStarted,
    MigrationStatus, StatsPatch, VmInfo, VmState, VmmMetrics,
};
use api_types::{ApiEvent, ApiReceiver, ApiRequest, ApiResponse, EventHub};
use devices::virtio::balloon::{self, Balloon};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitReason, VmExit};
use crate::migration::convergence::DEFAULT_MAX_ROUNDS;
use crate::migration::file_dest;
use crate::migration::source::{Migration, MigrationOptions, Mode, SourceContext};
use crate::policy::{ApplyTarget, ConfigureError, PolicyShared};
use crate::vcpu::Vcpus;

const PAGES_PER_MIB: u64 = 256;

/// What the handler needs to see and change.
pub struct ApiContext {
    /// For migrations and snapshots (None when the VM cannot be migrated).
    pub migration: Option<SourceContext>,
    pub vcpus: Arc<Vcpus>,
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    /// The balloon policy's state (with the balloon).
    pub policy: Option<Arc<PolicyShared>>,
    pub exit: Arc<VmExit>,
    pub memory_bytes: u64,
    /// What a balloon target must leave the guest (bytes).
    pub balloon_floor_bytes: u64,
    pub vcpu_count: u8,
    pub started: Instant,
    pub vcpu_stats: Arc<crate::vcpu::VcpuStats>,
}

impl ApiContext {
    fn guest_size(&self) -> GuestSize {
        GuestSize {
            bytes: self.memory_bytes,
            floor_bytes: self.balloon_floor_bytes,
        }
    }
}

/// A file destination that is one of the files this VM runs from: renaming
/// the stream over it would replace the running guest's RAM, or the kernel
/// or initrd it was booted from. Compared by device and inode, so another
/// name (a hard link, a path through a symlinked directory) is caught too.
fn refuse_own_file(ctx: &SourceContext, p: &std::path::Path) -> Result<(), ApiResponse> {
    if let crate::config::MemoryBackend::File(backing) = ctx.ram.backing()
        && file_dest::same_file(p, backing)
    {
        return Err(ApiResponse::bad_request(format!(
            "{} is this VM's memory backing file (--memory-backend file=...): write the stream elsewhere",
            p.display()
        )));
    }
    for (flag, file) in &ctx.boot_files {
        if file_dest::same_file(p, file) {
            return Err(ApiResponse::bad_request(format!(
                "{} is the file this VM was booted from ({flag} {}): the stream would replace it; write it elsewhere",
                p.display(),
                file.display()
            )));
        }
    }
    Ok(())
}

/// The event-loop subscriber that drains API requests.
pub struct ApiHandler {
    wake: EventFd,
    rx: ApiReceiver,
    events: EventHub,
    ctx: ApiContext,
    /// The current or last migration/snapshot.
    job: Option<Migration>,
    /// True while balloon requests must come through here rather than
    /// [`DirectBalloon`] (a job runs, or the VM was migrated away).
    direct_off: Arc<RwLock<bool>>,
}

/// `GET` and `PATCH /balloon` answered on the API server's thread
/// (`ApiReceiver::set_direct`): they need only the device lock, which the
/// event loop does not hold while it discards a burst of inflated pages
/// (with MUST_TELL_HOST) nor between events, so they do not wait for the
/// event loop to come round to the API's eventfd. While a migration job
/// runs or after the VM was migrated they go the long way, through
/// [`ApiHandler::refuse`].
struct DirectBalloon {
    balloon: Arc<Mutex<Balloon>>,
    policy: Option<Arc<PolicyShared>>,
    memory: GuestSize,
    off: Arc<RwLock<bool>>,
}

impl DirectBalloon {
    fn handle(&self, req: &ApiRequest) -> Option<ApiResponse> {
        // Held while answering: a job cannot start (and so the VM cannot be
        // migrated away) in between.
        let off = self.off.read().unwrap_or_else(PoisonError::into_inner);
        if *off {
            return None;
        }
        match req {
            ApiRequest::GetBalloon => Some(balloon_info(&self.balloon)),
            ApiRequest::PatchBalloon(p) => Some(
                set_target(
                    &self.balloon,
                    self.memory,
                    p.target_mib,
                    manual(&self.policy, "PATCH /balloon"),
                )
                .unwrap_or_else(|e| e),
            ),
            _ => None,
        }
    }
}

fn balloon_info(b: &Mutex<Balloon>) -> ApiResponse {
    let b = lock(b);
    let cfg = b.config();
    let (target, actual) = (u64::from(b.target_pages()), u64::from(b.actual_pages()));
    ApiResponse::ok(&BalloonInfo {
        deflate_on_oom: cfg.deflate_on_oom,
        must_tell_host: cfg.must_tell_host,
        stats_polling_interval_s: b.stats_polling_interval(),
        free_page_hint: cfg.free_page_hint,
        free_page_reporting: cfg.free_page_reporting,
        page_poison: cfg.page_poison,
        target_mib: target / PAGES_PER_MIB,
        actual_mib: actual / PAGES_PER_MIB,
        target_pages: target,
        actual_pages: actual,
        amount_mib: target / PAGES_PER_MIB,
        free_page_hinting: cfg.free_page_hint,
        driver_ok: devices::virtio::VirtioDevice::is_activated(&*b),
    })
}

/// What a balloon target is checked against: the guest's RAM and the
/// floor it keeps (`--balloon floor=`).
#[derive(Clone, Copy)]
pub(crate) struct GuestSize {
    bytes: u64,
    floor_bytes: u64,
}

/// A manual target: the policy to pause (if any) and the request's name.
type Manual<'a> = Option<(&'a PolicyShared, &'a str)>;

fn manual<'a>(policy: &'a Option<Arc<PolicyShared>>, why: &'a str) -> Manual<'a> {
    policy.as_deref().map(|p| (p, why))
}

/// How the policy applies its targets: the same checks as the API's,
/// without pausing it.
pub(crate) fn policy_apply(
    b: Arc<Mutex<Balloon>>,
    memory_bytes: u64,
    floor_bytes: u64,
) -> ApplyTarget {
    let memory = GuestSize {
        bytes: memory_bytes,
        floor_bytes,
    };
    Box::new(move |mib| {
        set_target(&b, memory, mib, None)
            .map(|_| ())
            .map_err(|r| r.body.to_string())
    })
}

/// Set the balloon's target after the checks (guest size, floor); a
/// manual one first pauses the policy, so that the policy cannot
/// overwrite it.
fn set_target(
    b: &Mutex<Balloon>,
    memory: GuestSize,
    target_mib: u64,
    manual: Manual<'_>,
) -> Result<ApiResponse, ApiResponse> {
    let guest_mib = memory.bytes >> 20;
    if target_mib > guest_mib {
        return Err(ApiResponse::target_too_large(target_mib, guest_mib));
    }
    let pages = u32::try_from(target_mib * PAGES_PER_MIB)
        .map_err(|_| ApiResponse::target_too_large(target_mib, guest_mib))?;
    types::check_balloon_floor(target_mib << 20, memory.bytes, memory.floor_bytes)
        .map_err(|msg| ApiResponse::bad_request(format!("target_mib {target_mib}: {msg}")))?;
    if let Some((policy, why)) = manual {
        policy.pause_for(&format!("{why} target {target_mib} MiB"));
    }
    lock(b).set_target_pages(pages).map_err(balloon_error)?;
    Ok(ApiResponse::no_content())
}

/// Firecracker's `PUT /balloon`, after boot: a restatement of the device
/// `blimp run --balloon` configured sets the target; any other device is a
/// 400 that names the first field that differs.
fn put_balloon(
    b: &Mutex<Balloon>,
    memory: GuestSize,
    put: &BalloonPut,
    manual: Manual<'_>,
) -> Result<ApiResponse, ApiResponse> {
    {
        let dev = lock(b);
        let cfg = dev.config();
        let fields: [(&str, String, String); 4] = [
            (
                "deflate_on_oom",
                cfg.deflate_on_oom.to_string(),
                put.deflate_on_oom.to_string(),
            ),
            (
                "stats_polling_interval_s",
                dev.stats_polling_interval().to_string(),
                put.stats_polling_interval_s.to_string(),
            ),
            (
                "free_page_hinting",
                cfg.free_page_hint.to_string(),
                put.free_page_hinting.to_string(),
            ),
            (
                "free_page_reporting",
                cfg.free_page_reporting.to_string(),
                put.free_page_reporting.to_string(),
            ),
        ];
        if let Some((name, have, want)) = fields.iter().find(|(_, have, want)| have != want) {
            return Err(ApiResponse::bad_request(format!(
                "PUT /balloon cannot change the balloon device after boot: {name} is {have} on this VM, the request has {want} (a Blimp VM boots at `blimp run`, whose --balloon configures the device; like Firecracker after InstanceStart, only PATCH /balloon and PATCH /balloon/statistics change a running balloon)"
            )));
        }
    }
    set_target(b, memory, put.amount_mib, manual)
}

fn lock(b: &Mutex<Balloon>) -> MutexGuard<'_, Balloon> {
    b.lock().unwrap_or_else(|p| p.into_inner())
}

/// A BalloonChanged event for the given sizes in pages.
pub fn balloon_event(target_pages: u64, actual_pages: u64) -> ApiEvent {
    ApiEvent::BalloonChanged {
        target_mib: target_pages / PAGES_PER_MIB,
        actual_mib: actual_pages / PAGES_PER_MIB,
        target_pages,
        actual_pages,
    }
}

/// `GET /balloon/statistics` (and the `BalloonStatistics` event): sizes,
/// the device's hinting/reporting counters and the guest's last report.
pub fn stats_view(
    target_pages: u64,
    actual_pages: u64,
    m: &balloon::BalloonMetricsSnapshot,
    latest: Option<&balloon::GuestStats>,
) -> types::BalloonStats {
    types::BalloonStats {
        target_pages,
        actual_pages,
        target_mib: target_pages / PAGES_PER_MIB,
        actual_mib: actual_pages / PAGES_PER_MIB,
        guest: latest.copied(),
        hint_rounds: m.hint_rounds,
        hinted_pages: m.hinted_pages,
        reported_pages: m.reported_pages,
        discarded_bytes: m.discard_released_bytes,
    }
}

fn balloon_error(e: balloon::Error) -> ApiResponse {
    match e {
        balloon::Error::HintingDisabled => ApiResponse::feature_not_negotiated("free_page_hint"),
        balloon::Error::HintingNotNegotiated(_) => {
            ApiResponse::feature_not_negotiated("free_page_hint")
        }
        balloon::Error::Frozen => ApiResponse::conflict(balloon::Error::Frozen.to_string()),
        other => ApiResponse::bad_request(other.to_string()),
    }
}

fn policy_error(e: ConfigureError) -> ApiResponse {
    match e {
        ConfigureError::Invalid(m) => ApiResponse::bad_request(m),
        ConfigureError::Frozen(m) => ApiResponse::conflict(m),
    }
}

impl ApiHandler {
    pub fn new(wake: EventFd, rx: ApiReceiver, ctx: ApiContext) -> Self {
        let events = rx.event_hub();
        let direct_off = Arc::new(RwLock::new(false));
        if let Some(balloon) = &ctx.balloon {
            let direct = DirectBalloon {
                balloon: balloon.clone(),
                policy: ctx.policy.clone(),
                memory: ctx.guest_size(),
                off: direct_off.clone(),
            };
            if !rx.set_direct(Box::new(move |req| direct.handle(req))) {
                log::warn!("api: the channel already has a direct handler");
            }
        }
        Self {
            wake,
            rx,
            events,
            ctx,
            job: None,
            direct_off,
        }
    }

    /// Route balloon requests through here exactly while a job runs or the
    /// VM was migrated.
    fn set_direct_off(&self, off: bool) {
        let mut cur = self
            .direct_off
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *cur = off;
    }

    fn state(&self) -> VmState {
        if self.migrated() {
            VmState::Migrated
        } else if self.ctx.vcpus.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    fn balloon(&self) -> Result<&Arc<Mutex<Balloon>>, ApiResponse> {
        self.ctx
            .balloon
            .as_ref()
            .ok_or_else(ApiResponse::no_balloon)
    }

    fn policy(&self) -> Result<(&Arc<Mutex<Balloon>>, &Arc<PolicyShared>), ApiResponse> {
        let b = self.ctx.balloon.as_ref().ok_or_else(|| {
            ApiResponse::bad_request(
                "the balloon policy needs a balloon device, and the VM has none (start it with --balloon and --balloon-policy)",
            )
        })?;
        let p = self
            .ctx
            .policy
            .as_ref()
            .ok_or_else(|| ApiResponse::internal("the balloon policy is not set up"))?;
        Ok((b, p))
    }

    /// The VM was migrated away: it must never run here again.
    fn migrated(&self) -> bool {
        self.job.as_ref().is_some_and(Migration::migrated)
    }

    fn job_running(&self) -> bool {
        self.job.as_ref().is_some_and(Migration::is_running)
    }

    /// 409 for a request that would change a VM that now runs elsewhere, or
    /// race a running migration (pause/resume, hinting, another job).
    fn refuse(&self, req: &ApiRequest) -> Option<ApiResponse> {
        let changes_state = !matches!(
            req,
            ApiRequest::GetVm
                | ApiRequest::GetBalloon
                | ApiRequest::GetBalloonStats
                | ApiRequest::GetBalloonPolicy
                | ApiRequest::GetMetrics
                | ApiRequest::HintingStatus
                | ApiRequest::GetMigration
                | ApiRequest::Shutdown
        );
        if changes_state && self.migrated() {
            let dest = self
                .job
                .as_ref()
                .and_then(|j| j.status().destination)
                .unwrap_or_default();
            return Some(ApiResponse::conflict(format!(
                "the VM was migrated to {dest} and runs there now: this blimp answers only GET requests (and PUT /vm/shutdown) until it exits"
            )));
        }
        let races_migration = matches!(
            req,
            ApiRequest::PatchVm(_)
                | ApiRequest::HintingStart
                | ApiRequest::FcHintingStart(_)
                | ApiRequest::HintingStop
                | ApiRequest::HintingDone
        );
        // Changes the final round would not carry (the device refuses the
        // target and stats interval itself, atomically with its capture).
        let changes_balloon = matches!(
            req,
            ApiRequest::PatchBalloon(_)
                | ApiRequest::PutBalloon(_)
                | ApiRequest::PatchBalloonStats(_)
                | ApiRequest::PutBalloonPolicy(_)
                | ApiRequest::PatchBalloonPolicy(_)
        );
        if changes_balloon
            && self
                .ctx
                .balloon
                .as_ref()
                .is_some_and(|b| lock(b).is_frozen())
        {
            return Some(ApiResponse::conflict(balloon::Error::Frozen.to_string()));
        }
        if races_migration && self.job_running() {
            let state = self.job.as_ref().map(|j| j.status().state);
            return Some(ApiResponse::conflict(format!(
                "a migration is in progress ({state:?}): it pauses and resumes the VM and drives free page hinting itself; cancel it first (DELETE /migration)",
                state = state.unwrap_or(types::MigrationState::Idle)
            )));
        }
        None
    }

    fn handle(&mut self, req: ApiRequest) -> ApiResponse {
        let direct_off = self.job_running() || self.migrated();
        if direct_off
            != *self
                .direct_off
                .read()
                .unwrap_or_else(PoisonError::into_inner)
        {
            self.set_direct_off(direct_off);
        }
        if let Some(refused) = self.refuse(&req) {
            return refused;
        }
        let r = match req {
            ApiRequest::GetVm => Ok(ApiResponse::ok(&VmInfo {
                state: self.state(),
                memory_mib: self.ctx.memory_bytes >> 20,
                vcpus: u32::from(self.ctx.vcpu_count),
                uptime_s: self.ctx.started.elapsed().as_secs(),
                balloon: self.ctx.balloon.is_some(),
            })),
            ApiRequest::PatchVm(p) => Ok(self.set_state(p.state)),
            ApiRequest::Shutdown => {
                self.events.publish(ApiEvent::ShuttingDown {
                    reason: "shutdown requested through the API".into(),
                });
                self.ctx.exit.stop(ExitReason::Shutdown);
                Ok(ApiResponse::no_content())
            }
            ApiRequest::GetBalloon => self.balloon().map(|b| balloon_info(b)),
            ApiRequest::PatchBalloon(p) => self.balloon().and_then(|b| {
                set_target(
                    b,
                    self.ctx.guest_size(),
                    p.target_mib,
                    manual(&self.ctx.policy, "PATCH /balloon"),
                )
            }),
            ApiRequest::PutBalloon(p) => match self.balloon() {
                Ok(b) => put_balloon(
                    b,
                    self.ctx.guest_size(),
                    &p,
                    manual(&self.ctx.policy, "PUT /balloon"),
                ),
                Err(_) => Err(ApiResponse::bad_request(
                    "the VM has no balloon device, and PUT /balloon cannot add one after boot (a Blimp VM boots at `blimp run`: start it with --balloon)",
                )),
            },
            ApiRequest::GetBalloonStats => self.balloon_stats(),
            ApiRequest::PatchBalloonStats(p) => self.patch_stats(p),
            ApiRequest::GetMetrics => Ok(ApiResponse::ok(&self.metrics())),
            ApiRequest::GetBalloonPolicy
            | ApiRequest::PutBalloonPolicy(_)
            | ApiRequest::PatchBalloonPolicy(_)
            | ApiRequest::HintingStart
            | ApiRequest::FcHintingStart(_)
            | ApiRequest::HintingStatus
            | ApiRequest::HintingStop
            | ApiRequest::HintingDone => self.balloon_request(req),
            ApiRequest::PutMigration(m) => self.start_job(MigrationOptions {
                destination: m.destination,
                downtime: Duration::from_millis(m.downtime_ms),
                free_page_hints: m.free_page_hints,
                max_rounds: m.max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS),
                mode: Mode::Live,
                ack_timeout: Duration::from_millis(m.ack_timeout_ms),
                write_timeout: Duration::from_millis(m.write_timeout_ms),
                source_exit: m
                    .source_exits
                    .then(|| Duration::from_millis(m.source_exit_delay_ms)),
            }),
            ApiRequest::PutSnapshot(s) => self.start_job(MigrationOptions {
                downtime: Duration::from_secs(3600),
                max_rounds: 1,
                ..MigrationOptions::new(MigrationDestination::File(s.path), Mode::Snapshot)
            }),
            ApiRequest::GetMigration => Ok(ApiResponse::ok(
                &self
                    .job
                    .as_ref()
                    .map(Migration::status)
                    .unwrap_or_else(MigrationStatus::idle),
            )),
            ApiRequest::CancelMigration => match &self.job {
                Some(j) if j.is_running() => {
                    if j.cancel() {
                        Ok(ApiResponse::no_content())
                    } else {
                        Err(ApiResponse::conflict(
                            "too late to cancel: the destination has the whole VM and it is being handed over (or the file put in place); GET /migration says how it ends",
                        ))
                    }
                }
                _ => Err(ApiResponse::no_migration()),
            },
        };
        r.unwrap_or_else(|e| e)
    }

    /// The policy and hinting requests.
    fn balloon_request(&self, req: ApiRequest) -> Result<ApiResponse, ApiResponse> {
        match req {
            ApiRequest::GetBalloonPolicy => {
                self.policy().map(|(_, p)| ApiResponse::ok(&p.status()))
            }
            ApiRequest::PutBalloonPolicy(put) => self.policy().and_then(|(b, p)| {
                p.configure(b, Some(put.enabled), Some(put.settings))
                    .map(|_| ApiResponse::no_content())
                    .map_err(policy_error)
            }),
            ApiRequest::PatchBalloonPolicy(patch) => self.policy().and_then(|(b, p)| {
                let mut settings = p.status().config;
                patch
                    .apply(&mut settings)
                    .map_err(ConfigureError::Invalid)
                    .and_then(|_| p.configure(b, patch.enabled, Some(settings)))
                    .map(|_| ApiResponse::no_content())
                    .map_err(policy_error)
            }),
            ApiRequest::HintingStart => self.balloon().map(|b| match lock(b).start_hinting() {
                Ok(cmd_id) => ApiResponse::ok(&HintingStarted { cmd_id }),
                Err(e) => balloon_error(e),
            }),
            ApiRequest::FcHintingStart(cmd) => {
                self.balloon().map(
                    |b| match lock(b).start_hinting_with(cmd.acknowledge_on_stop) {
                        Ok(_) => ApiResponse::no_content(),
                        Err(e) => balloon_error(e),
                    },
                )
            }
            ApiRequest::HintingStatus => self.balloon().and_then(|b| {
                let b = lock(b);
                // Firecracker: 400 when hinting was not enabled at configuration.
                if !b.config().free_page_hint {
                    return Err(ApiResponse::feature_not_negotiated("free_page_hint"));
                }
                Ok(ApiResponse::ok(&types::HintingStatusReply::from(
                    b.hinting_status(),
                )))
            }),
            ApiRequest::HintingStop => self.balloon().map(|b| match lock(b).stop_hinting() {
                Ok(()) => ApiResponse::no_content(),
                Err(e) => balloon_error(e),
            }),
            ApiRequest::HintingDone => self.balloon().map(|b| match lock(b).hinting_done() {
                Ok(()) => ApiResponse::no_content(),
                Err(e) => balloon_error(e),
            }),
            other => Err(ApiResponse::internal(format!(
                "not a balloon policy or hinting request: {other:?}"
            ))),
        }
    }

    fn start_job(&mut self, opts: MigrationOptions) -> Result<ApiResponse, ApiResponse> {
        if self.job.as_ref().is_some_and(Migration::is_running) {
            return Err(ApiResponse::migration_in_progress());
        }
        let Some(ctx) = self.ctx.migration.clone() else {
            return Err(ApiResponse::internal("this VM cannot be migrated"));
        };
        // Refuse a destination that cannot be written right away (missing
        // directory; a symlink, directory, device, FIFO or socket in the
        // way); the job checks again, and writes through a temporary file.
        if let MigrationDestination::File(p) = &opts.destination {
            refuse_own_file(&ctx, p)?;
            file_dest::check(p).map_err(|e| ApiResponse::bad_request(e.to_string()))?;
        }
        let destination = opts.destination.to_string();
        // Balloon requests come through here from now on (see DirectBalloon).
        self.set_direct_off(true);
        // Reap the previous job's thread before starting a new one.
        if let Some(old) = self.job.take() {
            old.join();
        }
        self.job = Some(Migration::start(ctx, opts));
        Ok(ApiResponse::ok(&MigrationStarted { destination }))
    }

    fn set_state(&mut self, want: VmState) -> ApiResponse {
        if want == self.state() {
            return ApiResponse::already_in_state(want);
        }
        match want {
            VmState::Paused => self.ctx.vcpus.pause(),
            VmState::Running => self.ctx.vcpus.resume(),
            VmState::Migrated => {
                return ApiResponse::bad_request("state Migrated cannot be requested");
            }
        }
        self.events
            .publish(ApiEvent::VmStateChanged { state: want });
        ApiResponse::no_content()
    }

    fn balloon_stats(&self) -> Result<ApiResponse, ApiResponse> {
        let b = lock(self.balloon()?);
        let (target, actual) = (u64::from(b.target_pages()), u64::from(b.actual_pages()));
        Ok(ApiResponse::ok(&stats_view(
            target,
            actual,
            &b.metrics().snapshot(),
            b.latest_stats(),
        )))
    }

    fn patch_stats(&self, p: StatsPatch) -> Result<ApiResponse, ApiResponse> {
        let mut b = lock(self.balloon()?);
        b.set_stats_polling_interval(p.stats_polling_interval_s)
            .map_err(balloon_error)?;
        Ok(ApiResponse::no_content())
    }

    fn metrics(&self) -> VmmMetrics {
        let mut m = VmmMetrics::default();
        if let Some(b) = &self.ctx.balloon {
            let snap = lock(b).metrics().snapshot();
            if let Ok(serde_json::Value::Object(map)) = serde_json::to_value(snap) {
                for (k, v) in map {
                    if let Some(n) = v.as_u64() {
                        m.counters.insert(format!("balloon_{k}"), n);
                    }
                }
            }
            for (k, help) in balloon::BALLOON_METRICS_HELP {
                m.help
                    .insert(format!("balloon_{k}"), format!("Balloon: {}", help.trim()));
            }
        }
        if let Some(p) = &self.ctx.policy {
            policy_metrics(&mut m, &p.counts());
        }
        let st = &self.ctx.vcpu_stats;
        m.counters.insert(
            "vcpu_io_exits".into(),
            st.io_exits.load(std::sync::atomic::Ordering::Relaxed),
        );
        m.counters.insert(
            "vcpu_mmio_exits".into(),
            st.mmio_exits.load(std::sync::atomic::Ordering::Relaxed),
        );
        m.gauges.insert(
            "uptime_seconds".into(),
            self.ctx.started.elapsed().as_secs_f64(),
        );
        for (k, help) in [
            (
                "vcpu_io_exits",
                "Port I/O exits of all vCPUs handled by the VMM.",
            ),
            (
                "vcpu_mmio_exits",
                "MMIO exits of all vCPUs handled by the VMM.",
            ),
            ("uptime_seconds", "Seconds since the VM was built."),
        ] {
            m.help.insert(k.into(), help.into());
        }
        m
    }
}

/// The policy's counters and gauges for `/metrics`.
fn policy_metrics(m: &mut VmmMetrics, c: &crate::policy::PolicyCounts) {
    for (k, v, help) in [
        (
            "balloon_policy_inflate_decisions",
            c.inflate,
            "Balloon policy: decisions that inflated the balloon.",
        ),
        (
            "balloon_policy_deflate_decisions",
            c.deflate,
            "Balloon policy: decisions that deflated the balloon.",
        ),
        (
            "balloon_policy_hold_decisions",
            c.hold,
            "Balloon policy: decisions that kept the target.",
        ),
        (
            "balloon_policy_target_changes",
            c.target_changes,
            "Balloon policy: targets it set.",
        ),
    ] {
        m.counters.insert(k.into(), v);
        m.help.insert(k.into(), help.into());
    }
    let gauges = [
        (
            "balloon_policy_enabled",
            Some(if c.enabled { 1.0 } else { 0.0 }),
            "Balloon policy: 1 when on and not paused.",
        ),
        (
            "balloon_policy_headroom_bytes",
            Some(c.headroom_bytes as f64),
            "Balloon policy: the headroom in force at the last decision (after host pressure).",
        ),
        (
            "balloon_policy_host_psi",
            c.host_psi,
            "Balloon policy: host PSI memory some avg10 (percent) at the last decision; absent when unknown.",
        ),
    ];
    for (k, v, help) in gauges {
        if let Some(v) = v {
            m.gauges.insert(k.into(), v);
            m.help.insert(k.into(), help.into());
        }
    }
}

impl MutEventSubscriber for ApiHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            log::error!("api: cannot watch the wake eventfd: {e}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() != self.wake.as_raw_fd() {
            return;
        }
        let _ = self.wake.read();
        while let Some((req, responder)) = self.rx.try_recv() {
            log::debug!("api: {req:?}");
            responder.respond(self.handle(req));
        }
    }
}
