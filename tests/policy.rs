//! Issue #18 against a running test guest: the automatic balloon policy
//! (`--balloon-policy`, `/balloon/policy`, `blimp balloon policy`), its
//! `PolicyDecision` and `BalloonSettled` events, pause on a manual target,
//! host pressure from a PSI file, stale statistics, refusals, and its
//! state across a snapshot and a live migration.

mod common;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use api::client::ApiClient;
use api::events::ApiEvent;
use api::policy::PolicyDecision;
use common::{Vm, run_blimp, set_target, sock_path, wait_for_socket};
use serde_json::{Value, json};

const BOOT: Duration = Duration::from_secs(60);
/// Long enough for several decisions on a loaded machine.
const SETTLE: Duration = Duration::from_secs(40);
const MIB: u64 = 1 << 20;

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("blimp-policy-{name}-{}", std::process::id()))
}

/// `blimp balloon ARGS... --api-sock SOCK` to completion: exit code,
/// stdout, stderr.
fn balloon_cli(sock: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["balloon"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--api-sock", sock.to_str().unwrap()]);
    run_blimp(&all)
}

/// Boot a 1 GiB test guest that fills 100 MiB, with a balloon (statistics
/// every second) and `--balloon-policy POLICY` (unless empty).
fn boot(name: &str, policy: &str, extra: &[&str]) -> (Vm, ApiClient, PathBuf) {
    let (vm, api, sock, _) = boot_events(name, policy, extra);
    (vm, api, sock)
}

/// [`boot`], with the events followed from before the guest's driver is up.
fn boot_events(name: &str, policy: &str, extra: &[&str]) -> (Vm, ApiClient, PathBuf, EventLog) {
    let mut args = vec!["--memory", "1G", "--balloon", "stats_interval=1"];
    if !policy.is_empty() {
        args.extend_from_slice(&["--balloon-policy", policy]);
    }
    args.extend_from_slice(extra);
    let (mut vm, api, sock) = common::boot_with_api(name, "fill 100 1;echo READY", &args);
    let events = EventLog::start(&sock);
    vm.expect_line("READY", BOOT);
    (vm, api, sock, events)
}

/// Every event of a VM, read on a thread of its own.
struct EventLog {
    rx: Receiver<ApiEvent>,
    seen: Vec<ApiEvent>,
}

impl EventLog {
    fn start(sock: &Path) -> EventLog {
        let (tx, rx) = channel();
        let sock = sock.to_path_buf();
        let (ready_tx, ready_rx) = channel();
        std::thread::spawn(move || {
            let c = ApiClient::new(&sock).expect("client");
            let mut ev = c.events().expect("GET /events");
            let _ = ready_tx.send(());
            while let Ok(Some(e)) = ev.next_event(Duration::from_secs(600)) {
                if tx.send(e.event).is_err() {
                    break;
                }
            }
        });
        ready_rx.recv_timeout(BOOT).expect("event stream opened");
        EventLog {
            rx,
            seen: Vec::new(),
        }
    }

    /// Wait for an event `pred` accepts (already seen or new).
    fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&ApiEvent) -> bool,
    ) -> ApiEvent {
        let deadline = Instant::now() + timeout;
        let mut from = 0;
        loop {
            if let Some(e) = self.seen[from..].iter().find(|e| pred(e)) {
                return e.clone();
            }
            from = self.seen.len();
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what} within {timeout:?} (host {}); saw {:?}",
                common::load_average(),
                self.decisions()
            );
            if let Ok(e) = self.rx.recv_timeout(left.min(Duration::from_millis(200))) {
                self.seen.push(e);
            }
        }
    }

    fn drain(&mut self) {
        while let Ok(e) = self.rx.try_recv() {
            self.seen.push(e);
        }
    }

    fn decisions(&self) -> Vec<PolicyDecision> {
        self.seen
            .iter()
            .filter_map(|e| match e {
                ApiEvent::PolicyDecision(d) => Some(d.clone()),
                _ => None,
            })
            .collect()
    }
}

fn decision(e: &ApiEvent) -> Option<&PolicyDecision> {
    match e {
        ApiEvent::PolicyDecision(d) => Some(d),
        _ => None,
    }
}

fn policy(api: &ApiClient) -> Value {
    let (status, body) = api.get("/balloon/policy").expect("GET /balloon/policy");
    assert_eq!(status, 200, "{body}");
    body
}

/// `GET /balloon/policy`, which must say paused with a reason naming `cause`
/// (the request that paused it).
fn assert_paused_by(api: &ApiClient, cause: &str) -> Value {
    let p = policy(api);
    assert_eq!(p["paused"], true, "{p}");
    assert!(
        p["paused_reason"].as_str().unwrap().contains(cause),
        "paused by {cause}: {p}"
    );
    p
}

/// Poll `GET /balloon/policy` until `pred` holds.
fn wait_policy(
    api: &ApiClient,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let p = policy(api);
        if pred(&p) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?} (host {}): {p}",
            common::load_average()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn balloon(api: &ApiClient) -> Value {
    let (status, body) = api.get("/balloon").expect("GET /balloon");
    assert_eq!(status, 200, "{body}");
    body
}

/// The policy inflated and then held in the band (nothing more to give).
fn settled(p: &Value) -> bool {
    let d = &p["last_decision"];
    p["target_changes"].as_u64().unwrap_or(0) > 0
        && d["action"] == "hold"
        && ["within_band", "nothing_to_give"].contains(&d["reason"].as_str().unwrap_or(""))
}

#[test]
fn policy_on_via_cli_reclaims_down_to_the_headroom_and_says_why() {
    let (mut vm, api, sock, mut events) = boot_events("cli", "settle=1s", &[]);
    let p = wait_policy(&api, "policy settles", SETTLE, settled);
    assert_eq!(p["enabled"], true, "{p}");
    assert_eq!(p["paused"], false, "{p}");
    assert_eq!(p["config"]["settle_ms"], 1000, "{p}");
    assert_eq!(p["config"]["floor_mib"], 256, "{p}");
    let b = balloon(&api);
    let target = b["target_mib"].as_u64().unwrap();
    // 1024 MiB, ~920 available: the headroom (192 MiB + 8%) and its band stay.
    let headroom = p["last_decision"]["headroom_mib"].as_u64().unwrap();
    assert_eq!(headroom, 192 + 1024 * 8 / 100, "{p}");
    assert!(target >= 400, "reclaimed only {target} MiB: {p}");
    assert!(1024 - target >= 256, "below the floor: {target} MiB");
    let available = p["last_decision"]["available_mib"].as_u64().unwrap();
    assert!(
        available >= headroom && available <= headroom + headroom / 4 + 2,
        "available {available} MiB outside [headroom, headroom + band]: {p}"
    );
    assert_eq!(b["stats_polling_interval_s"], 1, "statistics on: {b}");
    // The events say why: settling, then excess inflates, each target set.
    let first = events.wait("an inflate", SETTLE, |e| {
        decision(e).is_some_and(|d| d.action == "inflate")
    });
    let d = decision(&first).unwrap();
    assert_eq!(d.reason, "excess", "{d:?}");
    assert!(d.detail.contains("available"), "{d:?}");
    assert_eq!(d.guest_ram_mib, 1024);
    assert!(d.new_target_mib > d.old_target_mib && d.available_mib.is_some());
    events.wait("settling hold", SETTLE, |e| {
        decision(e).is_some_and(|d| d.action == "hold" && d.reason == "settling")
    });
    events.wait("settled at the policy's target", SETTLE, |e| {
        matches!(e, ApiEvent::BalloonSettled { reached: true, target_mib, .. } if *target_mib == target)
    });
    events.drain();
    let inflates = events
        .decisions()
        .iter()
        .filter(|d| d.action == "inflate")
        .count() as u64;
    assert_eq!(
        inflates,
        p["target_changes"].as_u64().unwrap(),
        "one event per target change"
    );
    // Holds are published when their reason changes, not every second.
    let holds = events.decisions().len() as u64 - inflates;
    let decisions = policy(&api)["decisions"].as_u64().unwrap();
    assert!(
        holds < decisions,
        "{holds} hold events for {decisions} decisions"
    );
    // Metrics.
    let m = common::metrics(&mut ApiClient::new(&sock).unwrap());
    assert!(
        common::metric(&m, "balloon_policy_inflate_decisions") >= 1.0,
        "{m:?}"
    );
    assert!(common::metric(&m, "balloon_policy_target_changes") >= 1.0);
    let headroom_bytes = 192 * MIB + ((1024 * MIB) as f64 * 0.08) as u64;
    assert_eq!(
        common::metric(&m, "balloon_policy_headroom_bytes"),
        headroom_bytes as f64,
        "{m:?}"
    );
    // The CLI shows it.
    let (code, out, err) = balloon_cli(&sock, &["policy"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("policy:        on") && out.contains("last decision: hold"),
        "{out}"
    );
    vm.exit_with(0, BOOT);
}

#[test]
fn guest_pressure_deflates_at_once() {
    let (mut vm, api, _sock, mut events) = boot_events("pressure", "settle=1s,cooldown=60s", &[]);
    wait_policy(&api, "policy settles", SETTLE, settled);
    let before = balloon(&api)["target_mib"].as_u64().unwrap();
    let available = policy(&api)["last_decision"]["available_mib"]
        .as_u64()
        .unwrap();
    // Take most of what is left: available falls below the headroom.
    vm.send(&format!("fill {} 2", available - 40));
    vm.expect_line("fill done", BOOT);
    let e = events.wait("a deflate", SETTLE, |e| {
        decision(e).is_some_and(|d| d.action == "deflate")
    });
    let d = decision(&e).unwrap();
    assert!(
        ["below_headroom", "rising"].contains(&d.reason.as_str()),
        "{d:?}"
    );
    assert!(d.new_target_mib < before, "{d:?}");
    assert!(
        before - d.new_target_mib >= 64,
        "at least pressure_step: {d:?}"
    );
    // Back in the band, the cool-down holds inflation off.
    let p = wait_policy(&api, "cooling down", SETTLE, |p| {
        p["last_decision"]["reason"] == "cooling_down"
            || p["last_decision"]["reason"] == "within_band"
    });
    assert_eq!(p["last_decision"]["action"], "hold", "{p}");
    vm.verify("verify ok", BOOT);
    vm.exit_with(0, BOOT);
}

#[test]
fn a_manual_target_pauses_the_policy_until_it_is_enabled_again() {
    let (mut vm, mut api, sock) = boot("manual", "settle=1s", &[]);
    let p = wait_policy(&api, "policy settles", SETTLE, settled);
    let changes = p["target_changes"].as_u64().unwrap();
    set_target(&mut api, 100);
    assert_paused_by(&api, "PATCH /balloon");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(balloon(&api)["target_mib"], 100, "the policy kept off");
    assert_eq!(policy(&api)["target_changes"].as_u64().unwrap(), changes);
    // Re-enable: the policy takes over again.
    let (code, out, err) = balloon_cli(&sock, &["policy", "on"]);
    assert_eq!(code, 0, "{out}{err}");
    let p = wait_policy(&api, "resumed and inflating", SETTLE, |p| {
        p["paused"] == false && p["target_changes"].as_u64().unwrap() > changes
    });
    assert!(balloon(&api)["target_mib"].as_u64().unwrap() > 100, "{p}");
    // Firecracker's PUT /balloon, restating the device, pauses it too.
    let (status, b) = api
        .put(
            "/balloon",
            &json!({"amount_mib": 120, "deflate_on_oom": false, "stats_polling_interval_s": 1}),
        )
        .unwrap();
    assert_eq!(status, 204, "{b}");
    assert_paused_by(&api, "PUT /balloon");
    assert_eq!(balloon(&api)["target_mib"], 120);
    // Off: a manual target no longer reports a pause, and nothing moves it.
    let (code, _, err) = balloon_cli(&sock, &["policy", "off"]);
    assert_eq!(code, 0, "{err}");
    set_target(&mut api, 50);
    let p = policy(&api);
    assert_eq!(
        (p["enabled"].clone(), p["paused"].clone()),
        (json!(false), json!(false)),
        "{p}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(balloon(&api)["target_mib"], 50);
    // Set through the CLI's KEY=VALUE.
    let (code, out, err) = balloon_cli(&sock, &["policy", "set", "headroom=300M", "settle=2s"]);
    assert_eq!(code, 0, "{out}{err}");
    let p = policy(&api);
    assert_eq!(p["config"]["headroom_mib"], 300, "{p}");
    assert_eq!(p["config"]["settle_ms"], 2000, "{p}");
    assert_eq!(p["enabled"], false, "set does not turn it on: {p}");
    vm.exit_with(0, BOOT);
}

#[test]
fn bad_policy_requests_are_refused_naming_the_value() {
    let (mut vm, api, _sock) = boot("invalid", "", &[]);
    for (method, body, want) in [
        ("PUT", json!({"floor_mib": 4096}), "floor"),
        ("PATCH", json!({"floor": "2G"}), "floor"),
        (
            "PATCH",
            json!({"headroom_fraction": 1.5}),
            "headroom_fraction=1.5",
        ),
        ("PATCH", json!({"frobnicate": 1}), "'frobnicate'"),
        ("PUT", json!({"floor_mib": -5}), "floor_mib=-5"),
        ("PATCH", json!({"settle": "-1s"}), "settle=-1s"),
        ("PATCH", json!({"enabled": "yes"}), "enabled=yes"),
        ("PATCH", json!({"interval": "10ms"}), "interval=10 ms"),
    ] {
        let (status, b) = if method == "PUT" {
            api.put("/balloon/policy", &body)
        } else {
            api.patch("/balloon/policy", &body)
        }
        .unwrap();
        assert_eq!(status, 400, "{method} {body}: {b}");
        assert!(
            b["error"].as_str().unwrap().contains(want),
            "{method} {body}: {b}"
        );
    }
    let p = policy(&api);
    assert_eq!(p["enabled"], false, "nothing applied: {p}");
    assert_eq!(p["config"]["floor_mib"], 256, "{p}");
    vm.exit_with(0, BOOT);
}

#[test]
fn host_pressure_from_a_psi_file_halves_the_headroom() {
    let psi = tmp("psi");
    std::fs::write(&psi, "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n").unwrap();
    let opts = format!("settle=1s,psi_path={}", psi.display());
    let (mut vm, api, _sock) = boot("psi", &opts, &[]);
    let p = wait_policy(&api, "policy settles", SETTLE, settled);
    assert_eq!(p["last_decision"]["host_psi"], 0.0, "{p}");
    assert_eq!(p["last_decision"]["host_pressure"], false, "{p}");
    let calm_headroom = p["last_decision"]["headroom_mib"].as_u64().unwrap();
    let calm_target = balloon(&api)["target_mib"].as_u64().unwrap();
    std::fs::write(&psi, "some avg10=50.00 avg60=20.00 avg300=5.00 total=99\nfull avg10=10.00 avg60=0.00 avg300=0.00 total=9\n").unwrap();
    let p = wait_policy(&api, "reclaim under host pressure", SETTLE, |p| {
        p["last_decision"]["host_pressure"] == true
            && settled(p)
            && p["last_decision"]["old_target_mib"].as_u64() > Some(calm_target)
    });
    let headroom = p["last_decision"]["headroom_mib"].as_u64().unwrap();
    assert_eq!(headroom, calm_headroom / 2, "{p}");
    assert_eq!(p["last_decision"]["host_psi"], 50.0, "{p}");
    let target = balloon(&api)["target_mib"].as_u64().unwrap();
    assert!(
        target >= calm_target + calm_headroom / 2 - 40,
        "reclaimed {target} MiB under pressure vs {calm_target} calm: {p}"
    );
    vm.exit_with(0, BOOT);
    let _ = std::fs::remove_file(&psi);
}

#[test]
fn stale_statistics_never_inflate() {
    // Statistics on, policy configured but off; a missing PSI file means
    // host pressure unknown (logged once).
    let (mut vm, api, _sock) = boot(
        "stale",
        "enabled=off,settle=1s,stale_after=2s,psi_path=/nonexistent/blimp-psi",
        &[],
    );
    // The guest reports once or twice, then stops: its vCPUs are paused.
    std::thread::sleep(Duration::from_secs(2));
    api.set_vm_state(api::types::VmState::Paused).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let (status, b) = api
        .patch("/balloon/policy", &json!({"enabled": true}))
        .unwrap();
    assert_eq!(status, 204, "{b}");
    let p = wait_policy(&api, "stale", SETTLE, |p| {
        p["last_decision"]["reason"] == "stale_statistics"
    });
    std::thread::sleep(Duration::from_secs(4));
    let p2 = policy(&api);
    assert_eq!(
        p2["target_changes"], 0,
        "inflated on stale statistics: {p} {p2}"
    );
    assert_eq!(p2["last_decision"]["reason"], "stale_statistics", "{p2}");
    assert_eq!(balloon(&api)["target_mib"], 0);
    assert!(p2["last_decision"]["host_psi"].is_null(), "{p2}");
    // The guest answers again: the same policy reclaims (the test can fail).
    api.set_vm_state(api::types::VmState::Running).unwrap();
    wait_policy(&api, "inflates once statistics are fresh", SETTLE, |p| {
        p["target_changes"].as_u64().unwrap_or(0) > 0
    });
    let warned = vm
        .log_lines()
        .iter()
        .filter(|l| l.contains("host memory pressure unknown"))
        .count();
    assert_eq!(warned, 1, "logged once");
    vm.exit_with(0, BOOT);
}

#[test]
fn the_policy_is_refused_without_a_balloon_or_statistics() {
    // CLI: no balloon.
    let tg = common::testguest().to_str().unwrap().to_string();
    let (code, _, err) = run_blimp(&["run", "--kernel", &tg, "--balloon-policy", "on"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--balloon-policy needs a balloon"), "{err}");
    let (code, _, err) = run_blimp(&[
        "run",
        "--kernel",
        &tg,
        "--memory",
        "1G",
        "--balloon",
        "--balloon-policy",
        "floor=2G",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("floor=2048 MiB"), "{err}");
    // API: no balloon.
    let (mut vm, api, _) = common::boot_with_api("nob", "echo READY", &["--memory", "256M"]);
    vm.expect_line("READY", BOOT);
    let (status, b) = api.get("/balloon/policy").unwrap();
    assert_eq!(status, 400, "{b}");
    assert!(
        b["error"].as_str().unwrap().contains("needs a balloon"),
        "{b}"
    );
    vm.exit_with(0, BOOT);
    // API: a balloon without statistics.
    let (mut vm, api, _) =
        common::boot_with_api("nostats", "echo READY", &["--memory", "256M", "--balloon"]);
    vm.expect_line("READY", BOOT);
    let (status, b) = api.put("/balloon/policy", &json!({})).unwrap();
    assert_eq!(status, 400, "{b}");
    assert!(b["error"].as_str().unwrap().contains("statistics"), "{b}");
    assert_eq!(policy(&api)["enabled"], false);
    vm.exit_with(0, BOOT);
    // The guest's driver not up yet: the policy waits and says why.
    let (mut vm, api, _) = common::boot_with_api_manual_balloon(
        "nodriver",
        "echo READY",
        &[
            "--memory",
            "1G",
            "--balloon",
            "--balloon-policy",
            "settle=1s",
        ],
    );
    vm.expect_line("READY", BOOT);
    let p = wait_policy(&api, "waiting for the driver", SETTLE, |p| {
        p["paused"] == true
    });
    assert!(
        p["paused_reason"].as_str().unwrap().contains("driver"),
        "{p}"
    );
    vm.send("balloon");
    wait_policy(&api, "acts once the driver is up", SETTLE, |p| {
        p["paused"] == false && p["target_changes"].as_u64().unwrap_or(0) > 0
    });
    vm.exit_with(0, BOOT);
}

#[test]
fn balloon_settled_for_a_manual_target_reached_or_not() {
    let (mut vm, mut api, sock, mut events) = boot_events("settled", "", &[]);
    let (code, out, err) = balloon_cli(&sock, &["set", "200M", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    events.wait("settled at 200 MiB", SETTLE, |e| {
        matches!(
            e,
            ApiEvent::BalloonSettled {
                target_mib: 200,
                actual_mib: 200,
                reached: true
            }
        )
    });
    // Fill most of the guest: it cannot give a balloon of 900 MiB.
    set_target(&mut api, 0);
    events.wait("settled at 0", SETTLE, |e| {
        matches!(
            e,
            ApiEvent::BalloonSettled {
                target_mib: 0,
                reached: true,
                ..
            }
        )
    });
    vm.send("fill 700 3");
    vm.expect_line("fill done", BOOT);
    set_target(&mut api, 900);
    let e = events.wait("settled short of 900 MiB", SETTLE, |e| {
        matches!(
            e,
            ApiEvent::BalloonSettled {
                target_mib: 900,
                ..
            }
        )
    });
    let ApiEvent::BalloonSettled {
        actual_mib,
        reached,
        ..
    } = e
    else {
        unreachable!()
    };
    assert!(!reached && actual_mib < 900, "{e:?}");
    vm.exit_with(0, BOOT);
}

/// Enable, pause by a manual target, then save: the restored VM keeps
/// enabled, paused and the settings.
#[test]
fn a_snapshot_keeps_the_policy_state() {
    let file = tmp("snap");
    let (mut vm, mut api, _) = boot("snap", "settle=1s,headroom=150M", &[]);
    wait_policy(&api, "policy settles", SETTLE, settled);
    set_target(&mut api, 100);
    let (status, b) = api.put("/snapshot", &json!({"path": file})).unwrap();
    assert_eq!(status, 200, "{b}");
    let st = common::wait_migration_end(&api, Duration::from_secs(120));
    assert_eq!(st["state"], "Completed", "{st}");
    vm.exit_with(0, BOOT);

    let sock = sock_path("snap-dst");
    let mut dst = common::spawn_restore(&file, &sock, &["--no-stdin"]);
    wait_for_socket(&sock);
    let api = ApiClient::new(&sock).unwrap();
    let p = assert_paused_by(&api, "PATCH /balloon");
    assert_eq!(p["enabled"], true, "{p}");
    assert_eq!(p["config"]["headroom_mib"], 150, "{p}");
    assert_eq!(p["config"]["settle_ms"], 1000, "{p}");
    // Resumed, it acts on the restored guest.
    let (status, b) = api
        .patch("/balloon/policy", &json!({"enabled": true}))
        .unwrap();
    assert_eq!(status, 204, "{b}");
    wait_policy(&api, "acts after restore", SETTLE, |p| {
        p["target_changes"].as_u64().unwrap_or(0) > 0
    });
    api.shutdown_vm().unwrap();
    dst.wait(BOOT);
    let _ = std::fs::remove_file(&file);
}

#[test]
fn a_live_migration_keeps_the_policy_running() {
    let url_path = tmp("live.sock");
    let sock = sock_path("mig-dst");
    let (mut dst, url) = common::start_incoming(&url_path, &["--api-sock", sock.to_str().unwrap()]);
    let (mut vm, api, _) = boot("mig", "settle=1s,floor=300M", &[]);
    let before = wait_policy(&api, "policy settles", SETTLE, settled);
    let st = common::migrate(&api, &json!({"destination": url}), Duration::from_secs(300));
    assert_eq!(st["state"], "Completed", "{st}");
    assert_eq!(vm.wait(BOOT).code(), Some(0));
    wait_for_socket(&sock);
    let api = ApiClient::new(&sock).unwrap();
    let p = policy(&api);
    assert_eq!(p["enabled"], true, "{p}");
    assert_eq!(p["paused"], false, "{p}");
    assert_eq!(p["config"], before["config"], "{p}");
    // It decides on the destination (statistics flow there too).
    wait_policy(&api, "decides after migration", SETTLE, |p| {
        p["decisions"].as_u64().unwrap_or(0) > 0
    });
    api.shutdown_vm().unwrap();
    dst.wait(BOOT);
}
