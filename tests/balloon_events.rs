//! Issue #16 against a running test guest: every Prometheus family of
//! `GET /metrics` has `# HELP` and `# TYPE`; the `BalloonStatistics` and
//! `HintingChanged` events openapi.yaml documents are published on
//! `GET /events`; rapid target changes do not log "deflated below the
//! target", and an unsolicited deflate is still detected.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use api::events::ApiEvent;
use common::{resize_balloon, set_target, start_with_api, wait_balloon};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(60);

/// Parse the exposition text: family -> (HELP, TYPE), checking that each
/// sample belongs to a family declared before it, with exactly one HELP
/// and one TYPE line each.
fn families(text: &str) -> BTreeMap<String, (String, String)> {
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    let mut kind: BTreeMap<String, String> = BTreeMap::new();
    let mut sampled = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, h) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(
                help.insert(name.into(), h.into()).is_none(),
                "two HELP lines for {name}"
            );
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                ["counter", "gauge"].contains(&t),
                "{name}: unexpected type {t}"
            );
            assert!(
                kind.insert(name.into(), t.into()).is_none(),
                "two TYPE lines for {name}"
            );
        } else if line.starts_with('#') || line.is_empty() {
            continue;
        } else {
            let name = line.split(['{', ' ']).next().unwrap();
            let (_, value) = line.rsplit_once(' ').expect("sample value");
            assert!(
                value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
                "{line}"
            );
            assert!(
                help.contains_key(name),
                "sample {line} before/without # HELP {name}"
            );
            assert!(
                kind.contains_key(name),
                "sample {line} before/without # TYPE {name}"
            );
            sampled.insert(name.to_string());
        }
    }
    assert_eq!(
        help.keys().collect::<Vec<_>>(),
        kind.keys().collect::<Vec<_>>(),
        "HELP and TYPE name the same families"
    );
    help.into_iter()
        .map(|(n, h)| {
            let t = kind[&n].clone();
            (n, (h, t))
        })
        .collect()
}

/// A guest of `memory` with `--balloon balloon` whose balloon driver is up
/// (it printed READY after starting it), and its API.
fn ready_vm(name: &str, memory: &str, balloon: &str) -> (common::Vm, api::client::ApiClient) {
    let (mut vm, api) = start_with_api(name, memory, balloon, "balloon;echo READY");
    vm.expect_line("READY", BOOT);
    (vm, api)
}

#[test]
fn every_metric_family_has_help_and_type() {
    common::require_kvm();
    let (mut vm, api) = ready_vm("events-metrics", "256M", "stats_interval=1,free_page_hint");
    let text = api.metrics().expect("GET /metrics");
    let fams = families(&text);
    for (name, (help, _)) in &fams {
        assert!(
            !help.trim().is_empty() && !help.starts_with("VMM metric"),
            "{name} has no real HELP: {help:?}"
        );
    }
    // The VMM's own families are there, with the devices' doc comments.
    for name in [
        "balloon_inflate_pages",
        "balloon_deflate_below_target",
        "vcpu_mmio_exits",
        "uptime_seconds",
        "blimp_api_requests_total",
    ] {
        assert!(fams.contains_key(name), "{name} missing: {fams:?}");
    }
    assert!(
        fams["balloon_deflate_below_target"]
            .0
            .contains("below the target"),
        "{fams:?}"
    );
    vm.exit_with(0, BOOT);
}

/// Read events until `pred` holds for one (or panic after `timeout`).
fn wait_event(
    events: &mut api::client::EventStream<'_>,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&ApiEvent) -> bool,
) -> ApiEvent {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {what} event; saw {seen:?}");
        match events.next_event(left) {
            Ok(Some(env)) => {
                if pred(&env.event) {
                    return env.event;
                }
                seen.push(env.event.kind());
            }
            Ok(None) => panic!("event stream ended; saw {seen:?}"),
            Err(e) => panic!("no {what} event ({e}); saw {seen:?}"),
        }
    }
}

#[test]
fn statistics_and_hinting_events_are_published() {
    common::require_kvm();
    let (mut vm, api) = ready_vm("events-sse", "512M", "stats_interval=1,free_page_hint");
    let mut events = api.events().expect("GET /events");
    // Statistics arrive every second: an event carries the guest's values.
    let ev = wait_event(
        &mut events,
        Duration::from_secs(20),
        "BalloonStatistics",
        |e| matches!(e, ApiEvent::BalloonStatistics(s) if s.guest.is_some_and(|g| g.by_name("total_memory").is_some())),
    );
    let ApiEvent::BalloonStatistics(st) = ev else {
        unreachable!()
    };
    // Guest statistics are only read back with their `last_update`.
    let guest = st.guest.expect("guest statistics");
    let total = guest.by_name("total_memory").unwrap();
    assert!(
        total > 256 << 20 && total <= 512 << 20,
        "total_memory {total} for a 512 MiB guest"
    );
    assert!(guest.updated > std::time::UNIX_EPOCH, "{st:?}");

    // A hinting round: the host's start, the guest's ack/stop, then DONE.
    let (s, b) = api.put("/balloon/hinting/start", &json!({})).unwrap();
    assert_eq!(s, 200, "{b}");
    let id = b["cmd_id"].as_u64().unwrap() as u32;
    let mut states = Vec::new();
    wait_event(
        &mut events,
        Duration::from_secs(30),
        "HintingChanged(Stopped)",
        |e| {
            if let ApiEvent::HintingChanged(h) = e {
                assert_eq!(h.host_cmd_id, id, "{h:?}");
                states.push(format!("{:?}", h.state));
                return format!("{:?}", h.state) == "Stopped";
            }
            false
        },
    );
    assert_eq!(
        states.first().map(String::as_str),
        Some("Requested"),
        "{states:?}"
    );
    let (s, _) = api.put("/balloon/hinting/done", &json!({})).unwrap();
    assert_eq!(s, 204);
    wait_event(
        &mut events,
        Duration::from_secs(10),
        "HintingChanged(Done)",
        |e| matches!(e, ApiEvent::HintingChanged(h) if format!("{:?}", h.state) == "Done"),
    );
    drop(events);
    vm.exit_with(0, BOOT);
}

const WARNING: &str = "deflated below the target";

/// The target goes down and back up faster than the guest follows, many
/// times: the guest deflates towards targets it read, which a later raise
/// has replaced; none of that is a "deflated below the target" warning.
#[test]
fn rapid_target_changes_do_not_warn() {
    common::require_kvm();
    let (mut vm, mut api) = ready_vm("events-rapid", "512M", "");
    resize_balloon(&mut api, 200, BOOT);
    let mut below_seen = 0;
    for i in 0..30u64 {
        set_target(&mut api, 8);
        std::thread::sleep(Duration::from_millis(i % 10));
        set_target(&mut api, 192);
        // Did the guest end up below the new target after a deflate?
        let (_, b) = api.get("/balloon").unwrap();
        if b["actual_mib"].as_u64().unwrap_or(0) < 192 {
            below_seen += 1;
        }
        wait_balloon(&mut api, 192, BOOT);
        resize_balloon(&mut api, 200, BOOT);
    }
    let ms = common::metrics(&mut api);
    let deflates = common::metric(&ms, "balloon_deflate_requests");
    eprintln!(
        "rapid changes: {deflates} deflate requests, below the new target {below_seen} times"
    );
    assert!(
        deflates > 0.0,
        "the guest never deflated: the test tested nothing"
    );
    assert_eq!(common::metric(&ms, "balloon_deflate_below_target"), 0.0);
    let warnings: Vec<_> = vm
        .log_lines()
        .into_iter()
        .filter(|l| l.contains(WARNING))
        .collect();
    assert!(warnings.is_empty(), "false warnings: {warnings:?}");
    vm.exit_with(0, BOOT);
}

/// A deflate the host did not ask for (the guest's OOM path) is still
/// counted as below the target.
#[test]
fn unsolicited_deflate_is_still_detected() {
    common::require_kvm();
    let (mut vm, mut api) = ready_vm("events-oom", "512M", "deflate_on_oom");
    resize_balloon(&mut api, 100, BOOT);
    assert_eq!(
        common::metric(&common::metrics(&mut api), "balloon_deflate_below_target"),
        0.0
    );
    vm.send("oom 16");
    vm.expect_line("oom deflated", BOOT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::metric(&common::metrics(&mut api), "balloon_deflate_below_target") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the OOM deflate was not detected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.exit_with(0, BOOT);
}
