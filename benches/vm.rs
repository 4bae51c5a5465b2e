//! End-to-end figures against real VMs (test guest, this machine's KVM):
//! balloon inflate speed and its breakdown, API latency, a free page hinting
//! round, free page reporting's time to RSS drop, and migration with and
//! without hints.
//!
//! `cargo bench --bench vm` runs all; `cargo bench --bench vm -- inflate sg
//! api api-inflate hinting reporting migration policy` picks sections
//! (`policy`: the automatic balloon policy, see benches/policy/mod.rs).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "policy/mod.rs"]
mod policy;

use std::time::{Duration, Instant};

use api::client::ApiClient;
use common::Vm;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(600);

fn start(name: &str, memory: &str, balloon: &str, program: &str) -> (Vm, ApiClient) {
    common::start_with_api(&format!("bench-{name}"), memory, balloon, program)
}

fn inflate() {
    let (mut vm, mut api) = start(
        "inflate",
        "8G",
        "",
        "balloon;touch 7680;mmio-rtt 2000;echo READY",
    );
    let rtt = vm.expect_line("mmio-rtt", T);
    vm.expect_line("READY", T);
    let rss0 = vm.rss_bytes();
    let m0 = common::metrics(&mut api);
    let t = Instant::now();
    common::set_target(&mut api, 7168);
    let took = common::wait_balloon(&mut api, 7168, T);
    let _ = t;
    std::thread::sleep(Duration::from_millis(100));
    let rss1 = vm.rss_bytes();
    let m1 = common::metrics(&mut api);
    let d = |k: &str| common::metric(&m1, k) - common::metric(&m0, k);
    let kicks = d("inflate_requests");
    let pages = d("inflate_pages");
    let discard_ms = d("discard_ns") / 1e6;
    // pfn_buffer_ns excludes the discard, which follows the used buffer.
    let vmm_us_per_batch = d("pfn_buffer_ns") / kicks.max(1.0) / 1e3;
    // mmio-rtt N read R ns write W ns
    let words: Vec<&str> = rtt.split_whitespace().collect();
    let read_ns: f64 = words.get(3).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let write_ns: f64 = words.get(6).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    println!("inflate: 8 GiB test guest, 7.5 GiB touched, target 0 -> 7168 MiB");
    println!(
        "  time to actual = target: {:.0} ms ({:.0} pages/s, {pages:.0} pages)",
        took.as_secs_f64() * 1e3,
        pages / took.as_secs_f64()
    );
    println!(
        "  host RSS {} MiB -> {} MiB: {:.1}% of 7 GiB returned",
        rss0 / MIB,
        rss1 / MIB,
        (rss0.saturating_sub(rss1)) as f64 / (7168.0 * MIB as f64) * 100.0
    );
    println!(
        "  inflate buffers (kicks) {kicks:.0}, discard calls {:.0}, discard syscalls {:.0}",
        d("discard_calls"),
        d("discard_syscalls")
    );
    println!(
        "  MMIO exits to the VMM per batch: {:.2} (the kick goes to an ioeventfd and is not counted)",
        d("vcpu_mmio_exits") / kicks.max(1.0)
    );
    println!(
        "  VMM processing per 256-PFN batch (parse, validate, merge, bitmap, used ring; no discard): {vmm_us_per_batch:.2} µs"
    );
    println!(
        "  time in discard calls: {discard_ms:.0} ms total, {:.1} µs per call",
        discard_ms * 1e3 / d("discard_calls").max(1.0)
    );
    let call_ns: f64 = words.get(9).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let trap_ns: f64 = words.get(15).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    println!(
        "  MMIO exit round trip from guest ring 3 (this host): read {:.1} µs, write {:.1} µs",
        read_ns / 1e3,
        write_ns / 1e3
    );
    println!(
        "  (the test guest's ring-0 device call with one read: {:.1} µs; bare trap to ring 0 and back: {:.1} µs)",
        call_ns / 1e3,
        trap_ns / 1e3
    );
    println!(
        "  per batch: {:.0} µs (of which discard {:.0} µs, VMM processing {vmm_us_per_batch:.1} µs)",
        took.as_secs_f64() * 1e6 / kicks.max(1.0),
        discard_ms * 1e3 / kicks.max(1.0)
    );
    let floor_ms = kicks * write_ns / 1e6 + discard_ms;
    println!(
        "  floor = kicks x exit round trip + discard time = {floor_ms:.0} ms; measured / floor = {:.2}",
        took.as_secs_f64() * 1e3 / floor_ms.max(1e-9)
    );
    vm.send("exit 0");
    vm.wait(T);
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn api_latency() {
    let (mut vm, api) = start("api", "1G", "", "balloon;echo READY");
    vm.expect_line("READY", T);
    for (what, patch) in [("GET /balloon", false), ("PATCH /balloon", true)] {
        let mut lat = Vec::with_capacity(10_000);
        for i in 0..10_000u64 {
            let t = Instant::now();
            let (s, _) = if patch {
                api.patch("/balloon", &json!({"target_mib": i % 2}))
                    .unwrap()
            } else {
                api.get("/balloon").unwrap()
            };
            lat.push(t.elapsed());
            assert!(s == 200 || s == 204);
        }
        println!(
            "api: {what} against a running VM, 10,000 requests: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
            percentile(&mut lat, 0.5).as_secs_f64() * 1e6,
            percentile(&mut lat, 0.99).as_secs_f64() * 1e6,
            percentile(&mut lat, 1.0).as_secs_f64() * 1e6
        );
    }
    vm.send("exit 0");
    vm.wait(T);
}

// ---------------------------------------------------------------- API latency during an inflate

/// One keep-alive connection with a hand-written HTTP/1.1 exchange, so the
/// figures are the server's (like `curl`), not a client runtime's.
struct RawConn(std::os::unix::net::UnixStream, Vec<u8>);

impl RawConn {
    fn new(sock: &std::path::Path) -> Self {
        let s = std::os::unix::net::UnixStream::connect(sock).expect("connect to the API socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        RawConn(s, Vec::with_capacity(4096))
    }

    /// Send one request, read the whole answer; returns its status.
    fn call(&mut self, method: &str, path: &str, body: &str) -> u16 {
        use std::io::{Read, Write};
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.0.write_all(req.as_bytes()).expect("write request");
        self.1.clear();
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.0.read(&mut chunk).expect("read answer");
            assert!(n > 0, "API server closed the connection");
            self.1.extend_from_slice(&chunk[..n]);
            let Some(end) = self.1.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&self.1[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if self.1.len() >= end + 4 + len {
                return head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .expect("status code");
            }
        }
    }
}

/// The host's own floor, outside blimp: a round trip between two threads
/// of this process over a socketpair, one every 2 ms until `stop`.
fn thread_ping_pong(stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Vec<Duration> {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let echo = std::thread::spawn(move || {
        let _ = vmm::sched::request_slice(vmm::sched::API_SLICE);
        let mut byte = [0u8; 1];
        while b.read_exact(&mut byte).is_ok() && byte[0] == 1 {
            b.write_all(&byte).expect("echo");
        }
    });
    let _ = vmm::sched::request_slice(vmm::sched::API_SLICE);
    let mut lat = Vec::with_capacity(20_000);
    let mut byte = [1u8; 1];
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        a.write_all(&[1]).expect("ping");
        a.read_exact(&mut byte).expect("pong");
        lat.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(2));
    }
    a.write_all(&[0]).expect("stop the echo thread");
    echo.join().expect("echo thread");
    lat
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// GET and PATCH /balloon (alternating, one every 2 ms on one keep-alive
/// connection) while an 8 GiB test guest with 7.5 GiB touched inflates its
/// balloon from 0 to 7 GiB; the PATCH re-sends the current target, so it
/// goes the whole way (server, channel, VMM, device) without changing it.
fn api_inflate() {
    let (mut vm, mut api, sock) = common::boot_with_api(
        "bench-apiinflate",
        "balloon;touch 7680;echo READY",
        &["--memory", "8G", "--balloon", ""],
    );
    vm.expect_line("READY", T);
    // The measuring thread is a latency-sensitive client like blimp's API
    // thread: it asks for the same short slice, or its own wake-ups behind
    // the busy vCPU and event loop would be what is measured.
    let client_slice = vmm::sched::request_slice(vmm::sched::API_SLICE);
    let mut conn = RawConn::new(&sock);
    // Warm the connection and the paths.
    for _ in 0..50 {
        assert_eq!(conn.call("GET", "/balloon", ""), 200);
    }
    let target = 7168u64;
    let patch = format!("{{\"target_mib\": {target}}}");
    // What is measured, in turn: the two balloon requests, and two
    // controls: GET /vm goes through the VMM's event loop (the path every
    // request took before), a 404 is answered by the server thread alone
    // (the floor: this host's thread wake-up and scheduling).
    let kinds: [(&str, &str, &str, &str, u16); 4] = [
        ("GET /balloon", "GET", "/balloon", "", 200),
        ("PATCH /balloon", "PATCH", "/balloon", &patch, 204),
        (
            "GET /vm (control: via the event loop)",
            "GET",
            "/vm",
            "",
            200,
        ),
        (
            "GET /nope (control: server thread only, 404)",
            "GET",
            "/nope",
            "",
            404,
        ),
    ];
    let mut lat: Vec<Vec<Duration>> = vec![Vec::with_capacity(20_000); kinds.len()];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let floor = {
        let stop = stop.clone();
        std::thread::spawn(move || thread_ping_pong(stop))
    };
    let t0 = Instant::now();
    common::set_target(&mut api, target);
    let mut i = 0usize;
    let took = loop {
        let k = i % kinds.len();
        let (_, method, path, body, want) = kinds[k];
        let t = Instant::now();
        let s = conn.call(method, path, body);
        lat[k].push(t.elapsed());
        assert_eq!(s, want, "{method} {path}");
        i += 1;
        if i.is_multiple_of(50) {
            let (_, b) = api.get("/balloon").unwrap();
            if b["actual_mib"].as_u64() == Some(target) {
                break t0.elapsed();
            }
            assert!(t0.elapsed() < T, "inflate did not finish: {b}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    println!(
        "api during inflate: 8 GiB test guest, 7.5 GiB touched, balloon 0 -> {target} MiB took {:.0} ms; one request every 2 ms in turn, raw HTTP/1.1 keep-alive (host {})",
        ms(took),
        common::load_average()
    );
    println!(
        "  blimp's API thread and this client ask for a {} µs scheduler slice (client: {})",
        vmm::sched::API_SLICE.as_micros(),
        match &client_slice {
            Ok(()) => "granted".to_string(),
            Err(e) => format!("refused: {e}"),
        }
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut floor = floor.join().expect("ping-pong thread");
    let kinds = kinds.map(|k| k.0).into_iter().chain([
        "control: two threads of the bench, socketpair round trip (the host's floor, no blimp)",
    ]);
    lat.push(std::mem::take(&mut floor));
    for (what, lat) in kinds.zip(lat.iter_mut()) {
        let n = lat.len();
        println!(
            "  {what}: {n} requests during the inflate: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            ms(percentile(lat, 0.5)),
            ms(percentile(lat, 0.99)),
            ms(percentile(lat, 1.0))
        );
    }
    vm.send("exit 0");
    vm.wait(T);
}

/// One free page hinting round of an 8 GiB guest with 1 GiB used, with
/// notification suppression off (every hint block kicks) and on.
fn hint_round(suppress: bool) -> (f64, f64, u64, f64) {
    // A build from before notification suppression (`.ci/bench-compare`
    // against an old commit) has only the old behaviour and not the key.
    let opts = if !suppress && !knows_balloon_key("notify_suppression") {
        "free_page_hint=on".to_string()
    } else {
        format!(
            "free_page_hint=on,notify_suppression={}",
            if suppress { "on" } else { "off" }
        )
    };
    let (mut vm, mut api) = start(
        &format!("hint-{suppress}"),
        "8G",
        &opts,
        "balloon;fill 1024 1;echo READY",
    );
    vm.expect_line("READY", T);
    let m0 = common::metrics(&mut api);
    let t = Instant::now();
    let (s, _) = api.put("/balloon/hinting/start", &json!({})).unwrap();
    assert_eq!(s, 200);
    let st = loop {
        let (_, st) = api.get("/balloon/hinting/status").unwrap();
        if st["state"] == "Stopped" {
            break st;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let took = t.elapsed();
    let m1 = common::metrics(&mut api);
    let kicks = common::metric(&m1, "free_page_kicks") - common::metric(&m0, "free_page_kicks");
    let hinted = st["hinted_pages"].as_u64().unwrap_or(0) * 4096 / MIB;
    let irqs = common::metric(&m1, "vring_interrupts") - common::metric(&m0, "vring_interrupts");
    vm.send("exit 0");
    vm.wait(T);
    (took.as_secs_f64() * 1e3, kicks, hinted, irqs)
}

/// Whether the `blimp` under test knows `--balloon KEY` (its `run --help`
/// lists the keys).
fn knows_balloon_key(key: &str) -> bool {
    let out = std::process::Command::new(common::blimp())
        .args(["run", "--help"])
        .output()
        .expect("running blimp run --help");
    String::from_utf8_lossy(&out.stdout).contains(key)
}

fn hinting() {
    let (old_ms, old_kicks, old_mib, old_irqs) = hint_round(false);
    println!(
        "hinting: one full round on an 8 GiB guest with 1 GiB used, notify_suppression=off: {old_ms:.0} ms, {old_kicks:.0} kicks, {old_irqs:.0} used-buffer interrupts, {old_mib} MiB hinted"
    );
    if !knows_balloon_key("notify_suppression") {
        println!("hinting: this build has no notify_suppression (older than issue #15)");
        return;
    }
    let (new_ms, new_kicks, new_mib, new_irqs) = hint_round(true);
    println!(
        "hinting: the same with notify_suppression=on (default): {new_ms:.0} ms, {new_kicks:.0} kicks, {new_irqs:.0} used-buffer interrupts, {new_mib} MiB hinted; time {:.2}x (target <= 0.7), kicks {:.3}x",
        new_ms / old_ms,
        new_kicks / old_kicks.max(1.0)
    );
}

fn reporting() {
    let (mut vm, _api) = start(
        "report",
        "2G",
        "free_page_reporting=on",
        "balloon;fill 1024 3;free 1024;echo READY",
    );
    vm.expect_line("READY", T);
    let before = vm.rss_bytes();
    let t = Instant::now();
    vm.send("report");
    let mut after = before;
    while before.saturating_sub(after) < 900 * MIB && t.elapsed() < Duration::from_secs(30) {
        after = vm.rss_bytes();
    }
    println!(
        "reporting: 1 GiB freed in a 2 GiB guest, `report`: host RSS {} -> {} MiB, dropped >= 900 MiB after {:.0} ms",
        before / MIB,
        after / MIB,
        t.elapsed().as_secs_f64() * 1e3
    );
    vm.send("exit 0");
    vm.wait(T);
}

fn migrate(api: &mut ApiClient, dest: &str, hints: bool) -> (Value, Duration) {
    let t = Instant::now();
    let (s, b) = api
        .put(
            "/migration",
            &json!({"destination": dest, "free_page_hints": hints}),
        )
        .unwrap();
    assert_eq!(s, 200, "{b}");
    loop {
        let (_, st) = api.get("/migration").unwrap();
        if ["Completed", "Failed", "Cancelled"].contains(&st["state"].as_str().unwrap_or("")) {
            assert_eq!(st["state"], "Completed", "{st}");
            return (st, t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn migration() {
    for hints in [true, false] {
        let (mut vm, mut api) = start(
            &format!("mig{hints}"),
            "8G",
            "free_page_hint=on",
            "balloon;fill 7168 1;free 6144;echo READY",
        );
        vm.expect_line("READY", T);
        let file = std::env::temp_dir().join(format!("blimp-bench-{hints}.mig"));
        let (st, took) = migrate(&mut api, &format!("file://{}", file.display()), hints);
        println!(
            "migration: 8 GiB guest, 1 GiB live, to a file, hints {hints}: {} MiB of page data, {} MiB file, {} pages hinted, {:.0} ms, downtime {} ms",
            st["bytes_sent"].as_u64().unwrap() / MIB,
            std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) / MIB,
            st["pages_hinted"],
            took.as_secs_f64() * 1e3,
            st["downtime_ms"]
        );
        let _ = std::fs::remove_file(&file);
        vm.wait(T);
    }
    for hints in [true, false] {
        let (mut vm, mut api) = start(
            &format!("dirty{hints}"),
            "2G",
            "free_page_hint=on",
            "balloon;fill 1024 2;free 512;dirty 256 200;echo READY;sleep 600",
        );
        vm.expect_line("READY", T);
        let file = std::env::temp_dir().join(format!("blimp-bench-dirty-{hints}.mig"));
        let (st, took) = migrate(&mut api, &format!("file://{}", file.display()), hints);
        println!(
            "migration: 2 GiB guest, 512 MiB live, `dirty 256 200` running, hints {hints}: {} rounds, {} MiB of page data, {} pages hinted, {:.0} ms, downtime {} ms",
            st["round"],
            st["bytes_sent"].as_u64().unwrap() / MIB,
            st["pages_hinted"],
            took.as_secs_f64() * 1e3,
            st["downtime_ms"]
        );
        let _ = std::fs::remove_file(&file);
        vm.wait(T);
    }
}

/// One inflate of 7 GiB and its deflate on an 8 GiB test guest that
/// touched 7.5 GiB (the VIRTIO_BALLOON_F_SG series' workload), with PFN
/// arrays (`sg=off`) or chunks (`sg=on`): one side of the comparison.
struct SgRound {
    /// PATCH to `actual` = target as the guest reports it (GET /balloon).
    inflate_guest_ms: f64,
    /// PATCH to >= 99% of 7 GiB back on the host (RSS, or free huge pages
    /// for hugetlb): the inflate including the host's discard.
    inflate_host_ms: f64,
    inflate_kicks: f64,
    /// Share of 7 GiB returned, measured once the discards are over.
    returned: f64,
    deflate_ms: f64,
    deflate_kicks: f64,
    discard_ms: f64,
}

/// Host memory the guest holds, in bytes: its RSS, or for hugetlb the huge
/// pages in use on the host (RSS does not count them).
fn guest_held(vm: &Vm, backend: &str) -> u64 {
    if backend == "hugetlb" {
        common::huge_pages_in_use_bytes()
    } else {
        vm.rss_bytes()
    }
}

/// Poll every millisecond until `done`; the time since `t0`.
fn poll_ms(t0: Instant, what: &str, mut done: impl FnMut() -> bool) -> f64 {
    while !done() {
        assert!(t0.elapsed() < T, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
    t0.elapsed().as_secs_f64() * 1e3
}

fn balloon_actual(api: &ApiClient) -> Option<u64> {
    let (_, body) = api.get("/balloon").expect("GET /balloon");
    body["actual_mib"].as_u64()
}

/// `backend` is a `--memory-backend` kind, `+thp` adding `--memory-thp`.
fn sg_round(backend: &str, sg: bool) -> SgRound {
    let name = format!("sg-{backend}-{sg}");
    let (kind, mut args) = common::backend_args(backend);
    args.extend([
        "--memory",
        "8G",
        "--balloon",
        if sg { "sg=on" } else { "sg=off" },
    ]);
    let (mut vm, mut api, _) = common::boot_with_api(
        &format!("bench-{name}"),
        "balloon;touch 7680;echo READY",
        &args,
    );
    let started = vm.expect_line("balloon started", T);
    assert_eq!(started.contains(" sg "), sg, "{started}");
    vm.expect_line("READY", T);
    let held0 = guest_held(&vm, kind);
    let m0 = common::metrics(&mut api);
    let want = 7168 * MIB * 99 / 100;
    let t0 = Instant::now();
    common::set_target(&mut api, 7168);
    // With MUST_TELL_HOST the device returns the buffers first and
    // discards after (the event loop, behind the discard gate); the API
    // thread answers GET /balloon meanwhile. So the guest's view and the
    // host's are timed apart, both from the PATCH.
    let mut guest_ms = None;
    let mut first_ms = None;
    let mut host_ms = None;
    poll_ms(t0, "the inflate", || {
        let now = t0.elapsed().as_secs_f64() * 1e3;
        if guest_ms.is_none() && balloon_actual(&api) == Some(7168) {
            guest_ms = Some(now);
        }
        let back = held0.saturating_sub(guest_held(&vm, kind));
        if first_ms.is_none() && back >= 64 * MIB {
            first_ms = Some(now);
        }
        if host_ms.is_none() && back >= want {
            host_ms = Some(now);
        }
        guest_ms.is_some() && host_ms.is_some()
    });
    let (inflate_guest_ms, inflate_host_ms) = (guest_ms.unwrap(), host_ms.unwrap());
    // Both views are in; the last discard call may still be counting.
    std::thread::sleep(Duration::from_millis(100));
    let held1 = guest_held(&vm, kind);
    let m1 = common::metrics(&mut api);
    let t1 = Instant::now();
    common::set_target(&mut api, 0);
    let deflate_ms = poll_ms(t1, "the deflate", || balloon_actual(&api) == Some(0));
    let held2 = guest_held(&vm, kind);
    let m2 = common::metrics(&mut api);
    let d = |a: &std::collections::HashMap<String, f64>,
             b: &std::collections::HashMap<String, f64>,
             k: &str| common::metric(b, k) - common::metric(a, k);
    let r = SgRound {
        inflate_guest_ms,
        inflate_host_ms: inflate_host_ms.max(inflate_guest_ms),
        inflate_kicks: d(&m0, &m1, "inflate_kicks"),
        returned: held0.saturating_sub(held1) as f64 / (7168.0 * MIB as f64) * 100.0,
        deflate_ms,
        deflate_kicks: d(&m1, &m2, "deflate_kicks"),
        discard_ms: d(&m0, &m1, "discard_ns") / 1e6,
    };
    println!(
        "  {backend:7} {:10} inflate: guest {:6.0} ms, host {:6.0} ms (the first 64 MiB back at {:.0} ms; {:.0} ms in {:.0} discard calls), {:5.0} kicks, {:5.0} buffers, held {} -> {} MiB ({:.1}% of 7 GiB returned); deflate {:5.0} ms, {:5.0} kicks, held after {} MiB",
        if sg { "chunks" } else { "PFN arrays" },
        r.inflate_guest_ms,
        r.inflate_host_ms,
        first_ms.unwrap_or(f64::NAN),
        r.discard_ms,
        d(&m0, &m1, "discard_calls"),
        r.inflate_kicks,
        d(&m0, &m1, "inflate_requests"),
        held0 / MIB,
        held1 / MIB,
        r.returned,
        r.deflate_ms,
        r.deflate_kicks,
        held2 / MIB
    );
    vm.send("exit 0");
    vm.wait(T);
    r
}

/// The host kernel's own cost of giving `total` bytes of 4 KiB memfd
/// pages back, without a VM: the bytes spread over one memfd per discard
/// thread (as blimp stripes its memfd RAM), each mapped shared here and
/// touched page by page (so every page is in the page cache and in this
/// process's page tables, as guest RAM is in blimp's), then punched in
/// 16 MiB calls by one child process per file, all at once, as blimp's
/// punch helpers do. Returns the milliseconds from the start signal until
/// the last child is done. What the chunked memfd inflate cannot go below
/// on this host: the kernel's work, with nothing of blimp or KVM in it.
/// With `unmapped`, the pages are dropped from this process's page tables
/// (`MADV_DONTNEED`, untimed) before the start: the kernel's cost of
/// freeing the pages alone, below what any VMM with guest RAM mapped pays.
fn memfd_punch_floor(total: u64, unmapped: bool) -> f64 {
    let n = vmm::discard_workers::host_parts();
    let per = (total / n as u64) & !(2 * MIB - 1);
    let mut maps = Vec::new();
    for i in 0..n {
        let name = std::ffi::CString::new(format!("blimp-bench-floor-{i}")).unwrap();
        // SAFETY: memfd_create with a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a new descriptor nobody else owns.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(per).expect("sizing the floor memfd");
        // SAFETY: a new shared mapping of the whole file, unmapped below;
        // nothing else in this process refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                per as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the mapping above, `per` bytes, readable and writable.
        let mem = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), per as usize) };
        for page in mem.chunks_mut(4096) {
            page[0] = 1;
        }
        if unmapped {
            // SAFETY: the mapping above; MADV_DONTNEED on a shared file
            // mapping only drops its page-table entries (the file keeps
            // the pages).
            let rc = unsafe { libc::madvise(addr, per as usize, libc::MADV_DONTNEED) };
            assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
        }
        maps.push((file, addr));
    }
    let mut go = [0i32; 2];
    // SAFETY: pipe(2) into a two-element array.
    assert_eq!(unsafe { libc::pipe(go.as_mut_ptr()) }, 0, "pipe");
    let mut children = Vec::new();
    for (file, _) in &maps {
        let fd = std::os::fd::AsRawFd::as_raw_fd(file);
        // SAFETY: the child only calls read, fallocate and _exit, which
        // are async-signal-safe (this process has other threads).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let mut b = 0u8;
            // SAFETY: read of one byte into a local.
            unsafe { libc::read(go[0], (&raw mut b).cast(), 1) };
            // The helpers' own punch loop (16 MiB calls; allocates nothing).
            let (_, r) = vmm::punch::punch_pieces(fd, &[(0, per)]);
            // SAFETY: _exit ends this child at once.
            unsafe { libc::_exit(i32::from(r.is_err())) }
        }
        children.push(pid);
    }
    let t = Instant::now();
    let start = vec![0u8; n];
    // SAFETY: write of `n` bytes from a local buffer; the pipe holds them.
    let wrote = unsafe { libc::write(go[1], start.as_ptr().cast(), n) };
    assert_eq!(wrote, n as isize, "starting the floor children");
    for pid in children {
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "a floor child failed: status {status:#x}"
        );
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    for (_, addr) in maps {
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(addr, per as usize) };
    }
    // SAFETY: the pipe's two ends, opened above and used no more.
    unsafe {
        libc::close(go[0]);
        libc::close(go[1]);
    }
    ms
}

/// The chunked protocol against PFN arrays, same run, per backing.
fn sg() {
    println!(
        "sg: 8 GiB test guest, 7.5 GiB touched, inflate 0 -> 7168 MiB then deflate to 0, PFN arrays vs chunks (--balloon sg=on)"
    );
    // BLIMP_BENCH_SG_BACKENDS=memfd (comma-separated) picks backings.
    let only = std::env::var("BLIMP_BENCH_SG_BACKENDS").ok();
    let picked = |b: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == b));
    let mut backends: Vec<&str> = ["anon", "memfd"]
        .into_iter()
        .filter(|b| picked(b))
        .collect();
    // hugetlb: 4096 free huge pages for the 8 GiB guest, reserved here for
    // the run (as root) when the host has fewer, and put back after (also
    // if a round fails).
    let mut huge = None;
    if picked("hugetlb") {
        match common::reserve_huge_pages(4096) {
            Ok(guard) => {
                if let Some(o) = guard.changed_from() {
                    println!("  hugetlb: nr_hugepages raised from {o} for this run");
                }
                huge = Some(guard);
                backends.push("hugetlb");
            }
            Err(why) => println!(
                "  hugetlb skipped: 4096 free 2 MiB huge pages needed for an 8 GiB guest: {why}"
            ),
        }
    }
    // With --memory-thp: anon where THP `enabled` allows MADV_HUGEPAGE;
    // memfd with `shmem_enabled` set to `advise` for the run (as root) when
    // the host rules it out, and put back after.
    let mut shmem = None;
    if picked("anon+thp") {
        match vmm::memory::thp_honoured(&vmm::MemoryBackend::Anon) {
            Some((true, _)) => backends.push("anon+thp"),
            Some((false, file)) => println!(
                "  anon+thp skipped: {file} rules transparent huge pages out for a MADV_HUGEPAGE mapping on this host"
            ),
            None => println!("  anon+thp skipped: no transparent huge page settings in sysfs"),
        }
    }
    if picked("memfd+thp") {
        match common::allow_shmem_thp() {
            Ok(guard) => {
                if let Some(o) = guard.changed_from() {
                    println!("  memfd+thp: shmem_enabled set from {o} to advise for this run");
                }
                shmem = Some(guard);
                backends.push("memfd+thp");
            }
            Err(why) => println!("  memfd+thp skipped: {why}"),
        }
    }
    for backend in backends {
        let pfn = sg_round(backend, false);
        let chunks = sg_round(backend, true);
        if backend == "memfd" {
            for unmapped in [false, true] {
                let floor = memfd_punch_floor(7168 * MIB, unmapped);
                println!(
                    "  memfd   host kernel floor, no VM: 7 GiB of touched, {} 4 KiB memfd pages punched by {} processes (as blimp's punch helpers do) in {floor:.0} ms: {:.3}x of the PFN-array inflate, {:.3}x of the chunked one",
                    if unmapped { "then unmapped" } else { "mapped" },
                    vmm::discard_workers::host_parts(),
                    floor / pfn.inflate_host_ms,
                    floor / chunks.inflate_host_ms
                );
            }
        }
        println!(
            "  {backend:7} chunks / PFN arrays: inflate until the host has the memory back {:.3}x (target <= 0.3), as the guest sees it {:.3}x; inflate kicks {:.4}x (target <= 0.01); deflate time {:.3}x, kicks {:.4}x; returned {:.1}% / {:.1}% (target >= 99%)",
            chunks.inflate_host_ms / pfn.inflate_host_ms,
            chunks.inflate_guest_ms / pfn.inflate_guest_ms,
            chunks.inflate_kicks / pfn.inflate_kicks.max(1.0),
            chunks.deflate_ms / pfn.deflate_ms,
            chunks.deflate_kicks / pfn.deflate_kicks.max(1.0),
            chunks.returned,
            pfn.returned
        );
    }
    let changed = [&huge, &shmem]
        .iter()
        .any(|g| g.as_ref().is_some_and(|g| g.changed_from().is_some()));
    drop((huge, shmem));
    if changed {
        println!("  (host settings put back)");
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    if want("inflate") {
        inflate();
    }
    if want("sg") {
        sg();
    }
    if want("api") {
        api_latency();
    }
    if want("api-inflate") {
        api_inflate();
    }
    if want("hinting") {
        hinting();
    }
    if want("reporting") {
        reporting();
    }
    if want("migration") {
        migration();
    }
    if want("policy") {
        policy::policy();
    }
}
