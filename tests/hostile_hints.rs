//! A hostile guest driver sends bad free page hinting and free page
//! reporting input (`hostile hint-*`, `hostile report-*`): the VMM ignores
//! it, counts it, and keeps serving hinting rounds and reports afterwards.

mod common;

use std::time::{Duration, Instant};

use api::client::ApiClient;
use common::{Vm, sock_path, wait_for_socket};
use serde_json::{Value, json};

const BOOT: Duration = Duration::from_secs(60);

fn hint_status(api: &mut ApiClient) -> Value {
    let (s, b) = api.get("/balloon/hinting/status").unwrap();
    assert_eq!(s, 200, "{b}");
    b
}

fn wait_state(api: &mut ApiClient, state: &str) -> Value {
    let t = Instant::now();
    loop {
        let st = hint_status(api);
        if st["state"] == state {
            return st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "hinting never reached {state}: {st}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sum of the `GET /metrics` counters whose name contains `part`.
fn metric(api: &ApiClient, part: &str) -> u64 {
    let text = api.metrics().unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| name.contains(part))
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn statistic(api: &mut ApiClient, name: &str) -> u64 {
    let (s, b) = api.get("/balloon/statistics").unwrap();
    assert_eq!(s, 200, "{b}");
    b[name].as_u64().unwrap_or_else(|| panic!("no {name}: {b}"))
}

fn start_round(api: &mut ApiClient) -> u64 {
    let (s, b) = api.put("/balloon/hinting/start", &json!({})).unwrap();
    assert_eq!(s, 200, "{b}");
    b["cmd_id"].as_u64().unwrap()
}

fn done(api: &mut ApiClient) {
    let (s, b) = api.put("/balloon/hinting/done", &json!({})).unwrap();
    assert_eq!(s, 204, "{b}");
    wait_state(api, "Done");
}

/// Sends `hostile CASE` and waits for its `sent` line.
fn hostile(vm: &mut Vm, case: &str) -> String {
    vm.send(&format!("hostile {case}"));
    let line = vm.expect_line(&format!("hostile {case} sent"), BOOT);
    eprintln!("{line}");
    line
}

#[test]
fn bad_hints_and_reports_are_ignored_and_the_device_keeps_serving() {
    let sock = sock_path("hostile-hints");
    let vm_args = [
        "--memory",
        "1G",
        "--debug-exit",
        "--balloon",
        "free_page_hint=on,free_page_reporting=on",
        "--api-sock",
        sock.to_str().unwrap(),
        "--cmdline",
        "testguest.run=\"fill 128 3;echo READY\"",
    ];
    let mut vm = Vm::start(&vm_args);
    wait_for_socket(&sock);
    let mut api = ApiClient::new(&sock).unwrap();
    vm.expect_line("READY", BOOT);

    // A normal round first, for comparison.
    let id1 = start_round(&mut api);
    let st = wait_state(&mut api, "Stopped");
    assert_eq!(st["guest_cmd_id"].as_u64(), Some(id1), "{st}");
    let normal = st["hinted_pages"].as_u64().unwrap();
    assert!(normal > 0, "a normal round hints pages: {st}");
    done(&mut api);
    eprintln!("normal round {id1}: {normal} pages hinted");

    let hinted0 = statistic(&mut api, "hinted_pages");
    let ignored0 = metric(&api, "hints_ignored");
    let invalid0 = metric(&api, "invalid_buffers");

    // A wrong command id, then a hint of a block the guest still uses.
    hostile(&mut vm, "hint-stale-id");
    let ignored1 = metric(&api, "hints_ignored");
    assert!(
        ignored1 >= ignored0 + 2,
        "stale id and its hint ignored: {ignored0} -> {ignored1}"
    );
    assert_eq!(statistic(&mut api, "hinted_pages"), hinted0);

    // Hints outside RAM during a round the guest acked.
    vm.send("hostile hint-outside-ram");
    vm.expect_line("hostile hint-outside-ram waiting for a hinting round", BOOT);
    let id2 = start_round(&mut api);
    assert!(id2 > id1);
    eprintln!("{}", vm.expect_line("hostile hint-outside-ram sent", BOOT));
    let st = wait_state(&mut api, "Stopped");
    assert_eq!(st["guest_cmd_id"].as_u64(), Some(id2), "{st}");
    assert_eq!(st["hinted_pages"].as_u64(), Some(0), "nothing hinted: {st}");
    let ignored2 = metric(&api, "hints_ignored");
    assert!(
        ignored2 >= ignored1 + 2,
        "both outside hints ignored: {ignored1} -> {ignored2}"
    );
    done(&mut api);

    // A hint range in a device-readable buffer of 12 bytes.
    hostile(&mut vm, "hint-wrong-direction");
    let invalid1 = metric(&api, "invalid_buffers");
    assert!(invalid1 > invalid0, "{invalid0} -> {invalid1}");
    assert_eq!(statistic(&mut api, "hinted_pages"), hinted0);

    // Reports outside RAM, too long, and in the wrong direction.
    let reported0 = statistic(&mut api, "reported_pages");
    let queue_errors0 = metric(&api, "queue_errors");
    hostile(&mut vm, "report-outside-ram");
    hostile(&mut vm, "report-too-long");
    let invalid2 = metric(&api, "invalid_buffers");
    assert!(
        invalid2 >= invalid1 + 2,
        "outside-RAM and device-readable reports counted: {invalid1} -> {invalid2}"
    );
    // The reporting ring holds 32 descriptors, so the over-long chain ends
    // on a NEXT past the table: the device refuses the queue (NEEDS_RESET)
    // unless the ring held more than 32 and it skipped the report.
    let queue_errors = metric(&api, "queue_errors");
    eprintln!(
        "invalid_buffers {invalid1} -> {invalid2}, queue_errors {queue_errors0} -> {queue_errors}"
    );
    assert!(
        queue_errors > queue_errors0 || invalid2 >= invalid1 + 3,
        "the too-long report was refused"
    );
    // A later `balloon` restarts the driver if the device needs a reset.
    vm.send("balloon");
    vm.expect_line("balloon started", BOOT);
    assert_eq!(
        statistic(&mut api, "reported_pages"),
        reported0,
        "nothing of the bad reports was taken"
    );

    // The VMM still answers and serves.
    let (s, b) = api.get("/vm").unwrap();
    assert_eq!(s, 200, "{b}");
    let id3 = start_round(&mut api);
    let st = wait_state(&mut api, "Stopped");
    assert_eq!(st["guest_cmd_id"].as_u64(), Some(id3), "{st}");
    let again = st["hinted_pages"].as_u64().unwrap();
    eprintln!("round {id3} after the hostile input: {again} pages hinted");
    assert!(again > 0, "{st}");
    done(&mut api);
    assert_eq!(statistic(&mut api, "hinted_pages"), hinted0 + again);

    std::thread::sleep(Duration::from_millis(200));
    vm.send("report");
    let line = vm.expect_line("report done", BOOT);
    eprintln!("{line}");
    assert!(!line.contains("done 0 "), "{line}");
    assert!(statistic(&mut api, "reported_pages") > reported0);

    vm.send("verify");
    vm.expect_line("verify ok 32768 pages", BOOT);
    eprintln!(
        "metrics: hints_ignored {} invalid_buffers {}",
        metric(&api, "hints_ignored"),
        metric(&api, "invalid_buffers")
    );
    vm.send("exit 0");
    assert_eq!(vm.wait(BOOT).code(), Some(0));
}
