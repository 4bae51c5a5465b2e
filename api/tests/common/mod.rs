//! A fake VMM thread answering the API channel, for tests and the bench.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use api::types::*;
use api::{ApiEvent, ApiRequest, ApiResponse, ApiServer, ApiServerHandle, EventHub, ServerConfig};

/// How the fake answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Never answers (keeps the responder until the next request).
    Hang,
    /// Drops the responder unanswered.
    Drop,
}

pub struct FakeState {
    pub mode: Mode,
    pub vm: VmState,
    pub memory_mib: u64,
    pub balloon: BalloonInfo,
    /// Pages `actual` moves toward `target` per `GET /balloon` (a fake guest).
    pub step_pages: u64,
    pub hint: HintingStatus,
    pub migration: MigrationStatus,
    pub shutdown: bool,
    pub snapshots: Vec<PathBuf>,
    pub requests: Vec<ApiRequest>,
    /// Answer for the next request instead of the normal logic.
    pub canned: Option<ApiResponse>,
}

impl Default for FakeState {
    fn default() -> Self {
        FakeState {
            mode: Mode::Normal,
            vm: VmState::Running,
            memory_mib: 1024,
            balloon: BalloonInfo {
                deflate_on_oom: true,
                stats_polling_interval_s: 1,
                free_page_hint: true,
                free_page_reporting: true,
                driver_ok: true,
                ..Default::default()
            },
            step_pages: u64::MAX,
            hint: HintingStatus {
                host_cmd_id: 0,
                guest_cmd_id: None,
                state: HintingState::Idle,
                hinted_pages: 0,
            },
            migration: MigrationStatus::idle(),
            shutdown: false,
            snapshots: Vec::new(),
            requests: Vec::new(),
            canned: None,
        }
    }
}

fn toward(actual: u64, target: u64, step: u64) -> u64 {
    if actual < target {
        actual.saturating_add(step).min(target)
    } else {
        actual.saturating_sub(step).max(target)
    }
}

fn balloon_event(b: &BalloonInfo) -> ApiEvent {
    ApiEvent::BalloonChanged {
        target_mib: b.target_mib,
        actual_mib: b.actual_mib,
        target_pages: b.target_pages,
        actual_pages: b.actual_pages,
    }
}

pub fn answer(st: &mut FakeState, hub: &EventHub, req: ApiRequest) -> ApiResponse {
    st.requests.push(req.clone());
    if let Some(c) = st.canned.take() {
        return c;
    }
    match req {
        ApiRequest::GetVm => ApiResponse::ok(&VmInfo {
            state: st.vm,
            memory_mib: st.memory_mib,
            vcpus: 2,
            uptime_s: 42,
            balloon: true,
        }),
        ApiRequest::PatchVm(p) => {
            if p.state == st.vm {
                return ApiResponse::already_in_state(st.vm);
            }
            st.vm = p.state;
            hub.publish(ApiEvent::VmStateChanged { state: st.vm });
            ApiResponse::no_content()
        }
        ApiRequest::Shutdown => {
            st.shutdown = true;
            ApiResponse::no_content()
        }
        ApiRequest::GetBalloon => {
            let b = &mut st.balloon;
            let before = b.actual_pages;
            b.actual_pages = toward(b.actual_pages, b.target_pages, st.step_pages);
            b.actual_mib = pages_to_mib(b.actual_pages);
            if b.actual_pages != before {
                hub.publish(balloon_event(b));
            }
            ApiResponse::ok(&st.balloon)
        }
        ApiRequest::PatchBalloon(p) => {
            if p.target_mib > st.memory_mib {
                return ApiResponse::target_too_large(p.target_mib, st.memory_mib);
            }
            st.balloon.target_mib = p.target_mib;
            st.balloon.target_pages = p.target_pages();
            hub.publish(balloon_event(&st.balloon));
            ApiResponse::no_content()
        }
        ApiRequest::PutBalloon(p) => {
            if p.deflate_on_oom != st.balloon.deflate_on_oom {
                return ApiResponse::bad_request(
                    "PUT /balloon cannot change the balloon device after boot: deflate_on_oom",
                );
            }
            st.balloon.target_mib = p.amount_mib;
            st.balloon.amount_mib = p.amount_mib;
            st.balloon.target_pages = mib_to_pages(p.amount_mib);
            ApiResponse::no_content()
        }
        ApiRequest::GetBalloonStats => ApiResponse::ok(&BalloonStats {
            target_pages: st.balloon.target_pages,
            actual_pages: st.balloon.actual_pages,
            target_mib: st.balloon.target_mib,
            actual_mib: st.balloon.actual_mib,
            guest: Some(
                serde_json::from_value(serde_json::json!({
                    "free_memory": 300 << 20,
                    "total_memory": 1000 << 20,
                    "available_memory": 500 << 20,
                    "major_faults": 7,
                    "last_update": 1_700_000_000,
                }))
                .expect("guest statistics by name"),
            ),
            hint_rounds: 1,
            hinted_pages: 1000,
            ..Default::default()
        }),
        ApiRequest::GetBalloonPolicy => ApiResponse::ok(&api::policy::PolicyStatus {
            enabled: false,
            paused: false,
            paused_reason: None,
            config: api::policy::PolicySettings::default(),
            last_decision: None,
            decisions: 0,
            target_changes: 0,
        }),
        ApiRequest::PutBalloonPolicy(_) | ApiRequest::PatchBalloonPolicy(_) => {
            ApiResponse::no_content()
        }
        ApiRequest::PatchBalloonStats(p) => {
            st.balloon.stats_polling_interval_s = p.stats_polling_interval_s;
            ApiResponse::no_content()
        }
        ApiRequest::GetMetrics => {
            let mut m = VmmMetrics::default();
            m.counters
                .insert("blimp_balloon_inflated_pages_total".into(), 1234);
            m.gauges.insert("blimp_guest_memory_bytes".into(), 1.5e9);
            ApiResponse::ok(&m)
        }
        ApiRequest::HintingStart => {
            st.hint.host_cmd_id = st.hint.host_cmd_id.max(1) + 1;
            st.hint.state = HintingState::Requested;
            ApiResponse::ok(&HintingStarted {
                cmd_id: st.hint.host_cmd_id,
            })
        }
        ApiRequest::FcHintingStart(_) => {
            st.hint.host_cmd_id = st.hint.host_cmd_id.max(1) + 1;
            st.hint.state = HintingState::Requested;
            ApiResponse::no_content()
        }
        ApiRequest::HintingStatus => ApiResponse::ok(&HintingStatusReply::from(st.hint.clone())),
        ApiRequest::HintingStop => {
            st.hint.state = HintingState::Stopped;
            ApiResponse::no_content()
        }
        ApiRequest::HintingDone => {
            st.hint.state = HintingState::Done;
            ApiResponse::no_content()
        }
        ApiRequest::PutMigration(m) => {
            if !st.migration.state.is_finished() && st.migration.state != MigrationState::Idle {
                return ApiResponse::migration_in_progress();
            }
            st.migration = MigrationStatus {
                state: MigrationState::Setup,
                destination: Some(m.destination.to_string()),
                total_pages: mib_to_pages(st.memory_mib),
                remaining_pages: mib_to_pages(st.memory_mib),
                ..MigrationStatus::idle()
            };
            ApiResponse::ok(&MigrationStarted {
                destination: m.destination.to_string(),
            })
        }
        ApiRequest::GetMigration => {
            let m = &mut st.migration;
            if !m.state.is_finished() && m.state != MigrationState::Idle {
                // Each poll is one round that sends half of what is left.
                m.round += 1;
                let sent = m.remaining_pages.div_ceil(2);
                m.pages_sent += sent;
                m.bytes_sent += sent * PAGE_SIZE;
                m.remaining_pages -= sent;
                m.elapsed_ms += 10;
                m.state = if m.remaining_pages == 0 {
                    m.downtime_ms = Some(5);
                    MigrationState::Completed
                } else if m.remaining_pages < 1000 {
                    MigrationState::Completing
                } else {
                    MigrationState::Active
                };
            }
            ApiResponse::ok(&st.migration)
        }
        ApiRequest::CancelMigration => {
            if st.migration.state.is_finished() || st.migration.state == MigrationState::Idle {
                return ApiResponse::no_migration();
            }
            st.migration.state = MigrationState::Cancelled;
            ApiResponse::no_content()
        }
        ApiRequest::PutSnapshot(s) => {
            // Like the VMM: a snapshot is a migration job to a file, polled
            // through GET /migration (this fake one finishes at once).
            st.migration = MigrationStatus {
                state: MigrationState::Completed,
                destination: Some(format!("file://{}", s.path.display())),
                ..MigrationStatus::idle()
            };
            let destination = format!("file://{}", s.path.display());
            st.snapshots.push(s.path);
            ApiResponse::ok(&MigrationStarted { destination })
        }
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh socket path in the temp dir (short enough for sun_path).
pub fn sock_path() -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("blimp-api-{}-{n}.sock", std::process::id()))
}

pub struct FakeVmm {
    pub server: Option<ApiServerHandle>,
    pub sock: PathBuf,
    pub hub: EventHub,
    pub state: Arc<Mutex<FakeState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeVmm {
    pub fn start() -> FakeVmm {
        Self::with_config(ServerConfig::default())
    }

    pub fn with_config(cfg: ServerConfig) -> FakeVmm {
        let sock = sock_path();
        let (chan, rx) = api::channel(|| {});
        let hub = rx.event_hub();
        let server = ApiServer::start_with_config(&sock, chan, cfg).expect("server starts");
        let state = Arc::new(Mutex::new(FakeState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let state = state.clone();
            let stop = stop.clone();
            let hub = hub.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let Some((req, responder)) = rx.recv_timeout(Duration::from_millis(20)) else {
                        continue;
                    };
                    let mut st = state.lock().unwrap();
                    match st.mode {
                        Mode::Normal => responder.respond(answer(&mut st, &hub, req)),
                        Mode::Hang => held.push(responder),
                        Mode::Drop => drop(responder),
                    }
                }
            })
        };
        FakeVmm {
            server: Some(server),
            sock,
            hub,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn client(&self) -> api::client::ApiClient {
        api::client::ApiClient::new(&self.sock).unwrap()
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        self.server.take();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Send raw bytes on a fresh connection and read until the server closes
/// (or `timeout`). Only for tests of malformed traffic.
pub fn raw_exchange(sock: &Path, bytes: &[u8], timeout: Duration) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Status code of a raw HTTP response text.
pub fn raw_status(resp: &str) -> Option<u16> {
    resp.split_whitespace().nth(1)?.parse().ok()
}
