//! Free page hinting, free page reporting and page poison against the test
//! guest's driver (which follows Linux's virtio_balloon.c).

mod common;

use std::time::{Duration, Instant};

use api::client::ApiClient;
use common::{Step, Vm};
use serde_json::{Value, json};

const BOOT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn start(name: &str, balloon: &str, program: &str, memory: &str) -> (Vm, ApiClient) {
    common::start_with_api(name, memory, balloon, program)
}

fn hint_status(api: &mut ApiClient) -> Value {
    let (s, b) = api.get("/balloon/hinting/status").unwrap();
    assert_eq!(s, 200, "{b}");
    b
}

fn wait_state(api: &mut ApiClient, state: &str) -> (Value, Duration) {
    common::wait_or_panic(
        &format!("hinting reaching {state}"),
        Duration::from_secs(30),
        Duration::from_millis(2),
        || {
            let st = hint_status(api);
            if st["state"] == state {
                Step::Done(st)
            } else {
                Step::Pending(st.to_string())
            }
        },
    )
}

#[test]
fn hinting_round_reports_free_memory_and_never_live_pages() {
    // hint_discard=on: hinted pages are discarded, so a live page hinted by
    // mistake would fail `verify` afterwards.
    let (mut vm, mut api) = start(
        "hint",
        "free_page_hint=on,hint_discard=on",
        "fill 300 5;echo READY",
        "2G",
    );
    vm.expect_line("READY", BOOT);
    let (s, b) = api.put("/balloon/hinting/start", &json!({})).unwrap();
    assert_eq!(s, 200, "{b}");
    let id = b["cmd_id"].as_u64().unwrap();
    assert!(id >= 2, "command ids start at 2: {b}");
    // The guest acks the id, sends its free 4 MiB blocks, then STOP.
    let (st, took) = wait_state(&mut api, "Stopped");
    eprintln!("hinting round {id}: {st} in {took:?}");
    assert_eq!(
        st["guest_cmd_id"].as_u64(),
        Some(id),
        "the guest acked our id"
    );
    assert_eq!(st["host_cmd_id"].as_u64(), Some(id));
    let hinted = st["hinted_pages"].as_u64().unwrap();
    assert!(
        hinted * 4096 >= 1536 * MIB,
        "only {} MiB hinted",
        hinted * 4096 / MIB
    );
    // The guest holds the hinted blocks until DONE.
    vm.send("hints");
    let h = vm.expect_line("hints rounds", BOOT);
    assert!(
        !h.contains("held 0 "),
        "hinted blocks are held until DONE: {h}"
    );
    // None of the filled 300 MiB was hinted (they would have been discarded).
    vm.verify("verify ok 76800 pages", BOOT);
    // A new round, stopped by the host, then DONE: the guest frees its blocks.
    let (s, b) = api.put("/balloon/hinting/start", &json!({})).unwrap();
    assert_eq!(s, 200, "{b}");
    assert!(b["cmd_id"].as_u64().unwrap() > id, "ids increase");
    let (s, _) = api.put("/balloon/hinting/stop", &json!({})).unwrap();
    assert_eq!(s, 204);
    let (s, _) = api.put("/balloon/hinting/done", &json!({})).unwrap();
    assert_eq!(s, 204);
    wait_state(&mut api, "Done");
    std::thread::sleep(Duration::from_millis(200));
    vm.send("hints");
    let h = vm.expect_line("hints rounds", BOOT);
    assert!(
        h.contains("held 0 "),
        "after DONE the guest freed its hinted blocks: {h}"
    );
    // The freed memory is usable again.
    vm.fill(1024, 6, BOOT);
    vm.verify("verify ok", BOOT);
    let (_, m) = api.get("/balloon/statistics").unwrap();
    assert!(m["hint_rounds"].as_u64().unwrap() >= 2, "{m}");
    assert!(m["hinted_pages"].as_u64().unwrap() >= hinted, "{m}");
    vm.exit_with(0, BOOT);
}

#[test]
fn hinting_is_refused_when_not_negotiated() {
    let (mut vm, api) = start("nohint", "", "echo READY", "512M");
    vm.expect_line("READY", BOOT);
    let (s, b) = api.put("/balloon/hinting/start", &json!({})).unwrap();
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"].as_str().unwrap().contains("free_page_hint"),
        "{b}"
    );
    vm.send("exit 0");
    vm.wait(BOOT);
}

/// Fill then free 1 GiB, let the guest report, watch host memory.
fn report_round(poison: Option<u8>) -> (u64, u64, Vec<String>) {
    let balloon = if poison.is_some() {
        "free_page_reporting=on,page_poison=on"
    } else {
        "free_page_reporting=on"
    };
    let poison_cmd = poison
        .map(|p| format!("poison {p:#x};"))
        .unwrap_or_default();
    let program = format!("{poison_cmd}fill 1024 3;free 1024;echo READY");
    let (mut vm, api) = start(&format!("report{poison:?}"), balloon, &program, "2G");
    vm.expect_line("READY", BOOT);
    let before = vm.rss_bytes();
    let t = Instant::now();
    vm.send("report");
    vm.expect_line("report done", BOOT);
    // Host memory falls within 10 s without any target change.
    let mut after = vm.rss_bytes();
    while before.saturating_sub(after) < 900 * MIB && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
        after = vm.rss_bytes();
    }
    let dropped = before.saturating_sub(after);
    eprintln!(
        "reporting (poison {poison:?}): host RSS {} -> {} MiB (dropped {} MiB) after {:?}",
        before / MIB,
        after / MIB,
        dropped / MIB,
        t.elapsed()
    );
    let (_, b) = api.get("/balloon").unwrap();
    assert_eq!(b["target_mib"], 0, "no target change");
    // The guest reuses the memory (and checks its poison when it does).
    vm.fill(1024, 4, BOOT);
    vm.verify("verify ok", BOOT);
    vm.exit_with(0, BOOT);
    (before, dropped, vm.transcript.clone())
}

#[test]
fn free_page_reporting_returns_freed_memory_to_the_host() {
    let (_, dropped, transcript) = report_round(None);
    assert!(
        dropped >= 900 * MIB,
        "host RSS fell by only {} MiB",
        dropped / MIB
    );
    assert!(
        !transcript.iter().any(|l| l.starts_with("error")),
        "{transcript:?}"
    );
}

#[test]
fn poisoned_reported_pages_keep_their_content() {
    let (_, dropped, transcript) = report_round(Some(0xaa));
    assert!(
        dropped < 100 * MIB,
        "reported pages were discarded despite poison_val 0xaa: RSS fell {} MiB",
        dropped / MIB
    );
    assert!(
        !transcript.iter().any(|l| l.contains("error: poison")),
        "the guest's poison check failed: {transcript:?}"
    );
    // With poison value 0 the device may discard (a zero page reads as 0).
    let (_, dropped, transcript) = report_round(Some(0));
    assert!(
        dropped >= 900 * MIB,
        "poison 0: RSS fell only {} MiB",
        dropped / MIB
    );
    assert!(
        !transcript.iter().any(|l| l.contains("error: poison")),
        "{transcript:?}"
    );
}
