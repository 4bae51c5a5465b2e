//! Firecracker's balloon API, as its public swagger documents it
//! (`src/firecracker/swagger/firecracker.yaml`, docs/ballooning.md),
//! replayed against a running Blimp: each request of the table gets
//! Firecracker's status code and answer fields, and the guest really follows
//! (the balloon's size, the hinted blocks it holds).

mod common;

use std::time::{Duration, Instant};

use api::client::{ApiClient, Method};
use common::Vm;
use serde_json::{Value, json};

const BOOT: Duration = Duration::from_secs(60);

/// One documented request and what Firecracker answers to it.
struct Case {
    method: Method,
    path: &'static str,
    /// `Null`: no body.
    body: Value,
    status: u16,
    /// Fields the answer must have with these values (an error's
    /// `fault_message` must contain the string given for it).
    expect: Value,
}

fn case(method: Method, path: &'static str, body: Value, status: u16, expect: Value) -> Case {
    Case {
        method,
        path,
        body,
        status,
        expect,
    }
}

/// `method path body` answers 204, no body.
fn accepted(api: &ApiClient, method: Method, path: &'static str, body: Value) {
    replay(api, &case(method, path, body, 204, json!({})));
}

/// `GET path` answers 200 with at least the fields of `expect`.
fn get(api: &ApiClient, path: &'static str, expect: Value) {
    replay(api, &case(Method::GET, path, Value::Null, 200, expect));
}

/// `method path body` answers 400 with a `fault_message` that says `fault`.
fn refused(api: &ApiClient, method: Method, path: &'static str, body: Value, fault: &str) {
    replay(
        api,
        &case(method, path, body, 400, json!({ "fault_message": fault })),
    );
}

fn replay(api: &ApiClient, c: &Case) -> Value {
    let (status, answer) = api
        .request(c.method.clone(), c.path, &c.body)
        .unwrap_or_else(|e| panic!("{} {} {}: {e}", c.method, c.path, c.body));
    let what = format!("{} {} {} -> {status} {answer}", c.method, c.path, c.body);
    assert_eq!(status, c.status, "{what}");
    if status == 204 {
        assert!(answer.is_null(), "204 has no body: {what}");
    }
    if status >= 400 {
        let fault = answer["fault_message"].as_str().unwrap_or_else(|| {
            panic!("Firecracker's error body has fault_message: {what}");
        });
        assert_eq!(Some(fault), answer["error"].as_str(), "{what}");
    }
    for (k, v) in c.expect.as_object().unwrap() {
        if k == "fault_message" {
            let want = v.as_str().unwrap();
            assert!(
                answer[k].as_str().unwrap_or("").contains(want),
                "fault_message should mention {want:?}: {what}"
            );
        } else {
            assert_eq!(&answer[k], v, "field {k}: {what}");
        }
    }
    answer
}

fn wait_actual(api: &ApiClient, mib: u64) {
    let t = Instant::now();
    loop {
        let (_, b) = api.get("/balloon").unwrap();
        let (_, st) = api.get("/balloon/statistics").unwrap();
        if b["amount_mib"] == mib && st["actual_mib"] == mib {
            return;
        }
        assert!(
            t.elapsed() < BOOT,
            "the guest never gave {mib} MiB: {b} {st} (host {})",
            common::load_average()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_hinting(api: &ApiClient, state: &str) -> Value {
    let t = Instant::now();
    loop {
        let (s, st) = api.get("/balloon/hinting/status").unwrap();
        assert_eq!(s, 200, "{st}");
        if st["state"] == state {
            return st;
        }
        assert!(
            t.elapsed() < BOOT,
            "hinting never reached {state}: {st} (host {})",
            common::load_average()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn held_blocks(vm: &mut Vm) -> u64 {
    vm.send("hints");
    let line = vm.expect_line("hints rounds", BOOT);
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "held").expect("held");
    words[i + 1].parse().expect("held count")
}

#[test]
fn firecracker_balloon_requests_on_a_configured_balloon() {
    let (mut vm, api, _) = common::boot_with_api(
        "fcapi",
        "balloon;echo READY",
        &[
            "--memory",
            "1G",
            "--balloon",
            "deflate_on_oom=on,stats_interval=1,free_page_hint=on",
        ],
    );
    vm.expect_line("READY", BOOT);
    use Method as M;

    // GET /balloon: Firecracker's Balloon fields next to Blimp's.
    get(
        &api,
        "/balloon",
        json!({"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1,
               "free_page_hinting": true, "free_page_reporting": false, "target_mib": 0}),
    );

    // PUT /balloon restating the device sets the size; the guest gives it.
    let device = json!({"amount_mib": 64, "deflate_on_oom": true,
                        "stats_polling_interval_s": 1, "free_page_hinting": true});
    accepted(&api, M::PUT, "/balloon", device);
    wait_actual(&api, 64);
    // A different device cannot be made after boot (Firecracker: 400).
    for (body, field) in [
        (
            json!({"amount_mib": 64, "deflate_on_oom": false, "stats_polling_interval_s": 1,
                   "free_page_hinting": true}),
            "deflate_on_oom",
        ),
        (
            json!({"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1}),
            "free_page_hinting",
        ),
        (
            json!({"amount_mib": 64, "deflate_on_oom": true, "free_page_hinting": true}),
            "stats_polling_interval_s",
        ),
        (json!({"amount_mib": 64}), "deflate_on_oom"),
        (
            json!({"amount_mib": 64, "deflate_on_oom": true, "bogus": 1}),
            "bogus",
        ),
    ] {
        refused(&api, M::PUT, "/balloon", body, field);
    }
    // The refused PUTs changed nothing.
    get(&api, "/balloon", json!({"amount_mib": 64}));

    // PATCH /balloon {"amount_mib"} (BalloonUpdate).
    accepted(&api, M::PATCH, "/balloon", json!({"amount_mib": 128}));
    wait_actual(&api, 128);
    for (body, what) in [
        (json!({"amount_mib": 4096}), "larger than guest memory"),
        (json!({"amount_mib": "128"}), "invalid"),
        (json!({}), "missing field"),
    ] {
        refused(&api, M::PATCH, "/balloon", body, what);
    }

    // GET/PATCH /balloon/statistics.
    get(
        &api,
        "/balloon/statistics",
        json!({"target_mib": 128, "actual_mib": 128, "target_pages": 32768,
               "actual_pages": 32768}),
    );
    accepted(
        &api,
        M::PATCH,
        "/balloon/statistics",
        json!({"stats_polling_interval_s": 2}),
    );
    get(&api, "/balloon", json!({"stats_polling_interval_s": 2}));
    refused(
        &api,
        M::PATCH,
        "/balloon/statistics",
        json!({"stats_polling_interval_s": "2"}),
        "invalid",
    );

    // Hinting without acknowledge_on_stop: the guest stops, keeps its hinted
    // blocks until PATCH /balloon/hinting/stop sends DONE.
    accepted(
        &api,
        M::PATCH,
        "/balloon/hinting/start",
        json!({"acknowledge_on_stop": false}),
    );
    let st = wait_hinting(&api, "Stopped");
    let host = st["host_cmd"].as_u64().expect("host_cmd");
    assert!(host >= 2, "a round's command id: {st}");
    assert_eq!(st["guest_cmd"], host, "the guest acked the round: {st}");
    assert_eq!(st["host_cmd_id"], host, "{st}");
    assert!(
        held_blocks(&mut vm) > 0,
        "hinted blocks are held until DONE"
    );
    accepted(&api, M::PATCH, "/balloon/hinting/stop", Value::Null);
    get(
        &api,
        "/balloon/hinting/status",
        json!({"host_cmd": 1, "state": "Done"}),
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(held_blocks(&mut vm), 0, "DONE gave the blocks back");

    // No body: acknowledge_on_stop defaults to true, the device sends DONE
    // itself when the guest stops.
    accepted(&api, M::PATCH, "/balloon/hinting/start", Value::Null);
    let st = wait_hinting(&api, "Done");
    assert_eq!(st["host_cmd"], 1, "DONE: {st}");
    assert!(
        st["guest_cmd"].as_u64().unwrap() > host,
        "a new round: {st}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(held_blocks(&mut vm), 0, "acknowledged on stop");
    refused(
        &api,
        M::PATCH,
        "/balloon/hinting/start",
        json!({"acknowledge_on_stop": "not valid"}),
        "invalid",
    );

    // Blimp's own routes still answer as before, on the same paths.
    let (s, b) = api.put("/balloon/hinting/start", &json!({})).unwrap();
    assert_eq!(s, 200, "{b}");
    assert!(b["cmd_id"].as_u64().unwrap() > host, "{b}");
    let (s, b) = api.patch("/balloon", &json!({"target_mib": 0})).unwrap();
    assert_eq!(s, 204, "{b}");
    wait_actual(&api, 0);
    vm.exit_with(0, BOOT);
}

#[test]
fn firecracker_balloon_requests_without_a_balloon_or_hinting() {
    // Firecracker: 400 "balloon device not configured" / "hinting not enabled".
    let (mut vm, api, _) = common::boot_with_api("fcapi-none", "echo READY", &["--memory", "256M"]);
    vm.expect_line("READY", BOOT);
    use Method as M;
    for (method, path, body) in [
        (M::GET, "/balloon", Value::Null),
        (
            M::PUT,
            "/balloon",
            json!({"amount_mib": 0, "deflate_on_oom": false}),
        ),
        (M::PATCH, "/balloon", json!({"amount_mib": 1})),
        (M::GET, "/balloon/statistics", Value::Null),
        (M::PATCH, "/balloon/hinting/start", Value::Null),
    ] {
        refused(&api, method, path, body, "no balloon");
    }
    drop(api);
    vm.exit_with(0, BOOT);

    let (mut vm, api, _) = common::boot_with_api(
        "fcapi-nohint",
        "balloon;echo READY",
        &["--memory", "256M", "--balloon", "deflate_on_oom=on"],
    );
    vm.expect_line("READY", BOOT);
    for (method, path, body) in [
        (
            M::PATCH,
            "/balloon/hinting/start",
            json!({"acknowledge_on_stop": true}),
        ),
        (M::GET, "/balloon/hinting/status", Value::Null),
        (M::PATCH, "/balloon/hinting/stop", Value::Null),
    ] {
        refused(&api, method, path, body, "free_page_hint");
    }
    vm.exit_with(0, BOOT);
}
