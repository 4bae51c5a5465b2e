//! The test guest's `ramp` workload against a running guest: it paces its
//! allocations on the guest clock, and when the balloon holds the memory it
//! needs it waits (counted as allocation stalls in the statistics the host
//! sees) until the host deflates, or fails after its bound, or takes pages
//! back itself with deflate-on-OOM.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use api::client::ApiClient;
use common::{resize_balloon, set_target};

const T: Duration = Duration::from_secs(60);

/// The key=value figures of a `ramp done …` / `error: ramp: …` line.
fn figures(line: &str) -> HashMap<String, u64> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| {
            let v = v.trim_end_matches("MiB");
            let n = v
                .parse()
                .unwrap_or_else(|_| panic!("{k}={v} in '{line}' is not a number"));
            (k.to_string(), n)
        })
        .collect()
}

/// `GET /balloon/statistics` once a report newer than `after` (Unix
/// seconds) arrived.
fn stats_after(api: &ApiClient, after: u64) -> serde_json::Value {
    let deadline = Instant::now() + T;
    loop {
        let (s, b) = api.get("/balloon/statistics").expect("GET statistics");
        assert_eq!(s, 200, "{b}");
        if b["last_update"].as_u64().is_some_and(|t| t > after) {
            return b;
        }
        assert!(Instant::now() < deadline, "no fresh statistics: {b}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn stat(b: &serde_json::Value, key: &str) -> u64 {
    b[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing: {b}"))
}

#[test]
fn ramp_paces_its_allocations_and_frees_them() {
    let (mut vm, _api, _) = common::boot_with_api(
        "ramp-pace",
        "meminfo;ramp 96 64 0.5 2;meminfo;ramp 16 8 0 1 0x77;echo READY",
        &["--memory", "512M", "--balloon", ""],
    );
    let before = vm.expect_line("meminfo ram", T);
    let line = vm.expect_line("ramp done", T);
    let after = vm.expect_line("meminfo ram", T);
    let f = figures(&line);
    assert_eq!(f["allocated"], 192, "two cycles of 96 MiB: {line}");
    assert_eq!(f["cycles"], 2, "{line}");
    assert_eq!(f["waits"], 0, "{line}");
    assert_eq!(f["failed"], 0, "{line}");
    // 96 MiB at 64 MiB/s is 1.5 s, plus 0.5 s held, twice: pacing never
    // lets it finish sooner (a loaded host only makes it later).
    assert!(
        (3_900..60_000).contains(&f["elapsed_ms"]),
        "elapsed {} ms for 2 x (1.5 s + 0.5 s): {line}",
        f["elapsed_ms"]
    );
    // The pages were freed: free memory is back where it was.
    assert_eq!(before, after, "ramp must free what it allocated");
    let line = vm.expect_line("ramp done", T);
    let f = figures(&line);
    assert!(
        f["elapsed_ms"] >= 1_950 && f["allocated"] == 16,
        "16 MiB at 8 MiB/s: {line}"
    );
    vm.expect_line("READY", T);
    // Bad arguments are refused with the usage, the guest keeps going.
    vm.send("ramp 64 0");
    vm.expect_line("error: bad argument '0'", T);
    vm.send("ramp 64");
    vm.expect_line("error: usage: ramp MIB RATE", T);
    // CYCLES 0 repeats until Ctrl-C arrives on the console.
    vm.send("ramp 8 64 0.2 0");
    std::thread::sleep(Duration::from_millis(1500));
    vm.send("\u{3}");
    let line = vm.expect_line("ramp done", T);
    let f = figures(&line);
    assert_eq!(f.get("interrupted"), Some(&1), "{line}");
    assert!(f["cycles"] >= 2, "several 0.33 s cycles in 1.5 s: {line}");
    // Without a balloon holding pages, running dry is a plain failure.
    vm.send("ramp 4096 2048");
    let line = vm.expect_line("error: ramp: out of memory", T);
    assert_eq!(figures(&line)["failed"], 1, "{line}");
    vm.send("exit 0");
    vm.wait(T);
}

#[test]
fn ramp_waits_for_the_balloon_and_reports_stalls() {
    let (mut vm, mut api, _) = common::boot_with_api(
        "ramp-wait",
        "echo READY",
        &["--memory", "512M", "--balloon", "stats_interval=1"],
    );
    vm.expect_line("READY", T);
    resize_balloon(&mut api, 400, T);
    let t0 = unix_now();
    let s0 = stats_after(&api, t0);
    let stalls0 = stat(&s0, "alloc_stall");
    assert!(
        stat(&s0, "available_memory") < 112 << 20,
        "the balloon holds 400 of 512 MiB: {s0}"
    );

    // Nobody deflates: the allocation gives up after its 2 s bound.
    vm.send("ramp 200 100 0 1 5 2");
    let line = vm.expect_line("error: ramp: no memory came back after waiting", T);
    let f = figures(&line);
    assert_eq!(f["failed"], 1, "{line}");
    assert_eq!(f["waits"], 1, "{line}");
    assert!(
        (2_000..10_000).contains(&f["longest_wait_ms"]),
        "waited {} ms, bound 2 s: {line}",
        f["longest_wait_ms"]
    );
    assert!(f["allocated"] < 200, "{line}");
    // Its pages were freed when it failed, as a program's are when it dies.
    vm.send("meminfo");
    let mi = vm.expect_line("meminfo ram", T);
    let free_mib: u64 = mi
        .split_whitespace()
        .rev()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{mi}"));
    assert!(free_mib >= 60, "ramp kept its pages after failing: {mi}");

    // Now the host deflates while the ramp waits: the allocation waits,
    // the host sees the stall in the statistics, deflates, the ramp ends.
    let stalls1 = stat(&stats_after(&api, unix_now()), "alloc_stall");
    assert!(
        stalls1 >= stalls0 + 20,
        "the 2 s wait counted a stall per 100 ms: {stalls0} -> {stalls1}"
    );
    vm.send("ramp 200 100 0 1 5 60");
    let deadline = Instant::now() + T;
    let stalled = loop {
        let s = stats_after(&api, t0);
        if stat(&s, "alloc_stall") > stalls1 + 20 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "alloc_stall did not rise while the ramp waited: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(stat(&stalled, "direct_scan") > 0, "{stalled}");
    assert!(
        stat(&stalled, "available_memory") < 8 << 20,
        "available memory while waiting must be what is really free: {stalled}"
    );
    let waited_from = Instant::now();
    set_target(&mut api, 0);
    let line = vm.expect_line("ramp done", T);
    let f = figures(&line);
    assert_eq!(f["allocated"], 200, "{line}");
    assert_eq!(f["failed"], 0, "{line}");
    assert!(f["waits"] >= 1, "{line}");
    assert!(f["stall_ms"] >= 1_000, "it waited for the host: {line}");
    assert!(f["longest_wait_ms"] <= f["stall_ms"], "{line}");
    assert!(
        f["stall_attempts"] >= 10,
        "one attempt per 100 ms waited: {line}"
    );
    assert!(waited_from.elapsed() < T);
    let t1 = unix_now();
    let s = stats_after(&api, t1);
    assert!(stat(&s, "direct_reclaim") > 0, "{s}");
    assert!(
        stat(&s, "alloc_stall") >= stalls1 + f["stall_attempts"],
        "{s}"
    );
    vm.send("exit 0");
    vm.wait(T);
}

#[test]
fn ramp_takes_pages_back_with_deflate_on_oom() {
    let (mut vm, mut api, _) = common::boot_with_api(
        "ramp-oom",
        "echo READY",
        &[
            "--memory",
            "512M",
            "--balloon",
            "deflate_on_oom,stats_interval=1",
        ],
    );
    vm.expect_line("READY", T);
    resize_balloon(&mut api, 400, T);
    vm.send("ramp 200 200");
    let line = vm.expect_line("ramp done", T);
    let f = figures(&line);
    assert_eq!(f["allocated"], 200, "{line}");
    assert_eq!(f["failed"], 0, "{line}");
    assert!(f["waits"] >= 1, "it ran dry before the OOM deflate: {line}");
    let (_, b) = api.get("/balloon").unwrap();
    let actual = b["actual_mib"].as_u64().unwrap();
    assert!(
        actual < 400 - 64,
        "the guest deflated on its own (actual {actual} MiB): {b}"
    );
    vm.send("exit 0");
    vm.wait(T);
}
