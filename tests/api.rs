//! The REST API against a running test-guest VM, driven only through the
//! unix socket.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use api::client::ApiClient;
use common::{Vm, set_target, wait_balloon};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(30);

fn start(name: &str, program: &str, extra: &[&str]) -> (Vm, ApiClient, std::path::PathBuf) {
    let mut args = vec!["--memory", "1G", "--balloon", "stats_interval=1"];
    args.extend_from_slice(extra);
    common::boot_with_api(name, program, &args)
}

/// Send raw bytes and read the answer (one response, or until the server
/// closes, or 10 s).
fn raw(sock: &std::path::Path, bytes: &[u8]) -> String {
    raw_with(sock, bytes, false)
}

/// As [`raw`]; with `give_up`, the client closes its sending side after
/// the bytes, as a client that dies mid-request does.
fn raw_with(sock: &std::path::Path, bytes: &[u8], give_up: bool) -> String {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer (413) and close before a huge body is sent: a
    // broken pipe here is fine, the answer is what we check.
    let _ = s.write_all(bytes);
    if give_up {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                // One response is enough: stop at the end of a small JSON body.
                let text = String::from_utf8_lossy(&out);
                if let Some(i) = text.find("\r\n\r\n") {
                    let len = text[..i].lines().find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    });
                    if let Some(len) = len
                        && out.len() >= i + 4 + len
                    {
                        break;
                    }
                }
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn control_a_vm_through_the_socket() {
    // The guest's balloon driver starts by itself at boot (as Linux probes
    // its devices): nothing is typed to start it.
    let (mut vm, mut api, sock) = start("control", "echo booted", &[]);
    vm.expect_line("booted", BOOT);
    assert!(
        vm.transcript
            .iter()
            .any(|l| l.starts_with("balloon started")),
        "the balloon driver did not start at boot: {:?}",
        vm.transcript
    );
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");

    let (s, info) = api.get("/vm").unwrap();
    assert_eq!(s, 200);
    assert_eq!(info["state"], "Running");
    assert_eq!(info["memory_mib"], 1024);
    assert_eq!(info["balloon"], true);

    // Set a target and wait for the guest to reach it.
    set_target(&mut api, 128);
    wait_balloon(&mut api, 128, Duration::from_secs(30));
    let (_, b) = api.get("/balloon").unwrap();
    assert_eq!(b["target_pages"], 128 * 256);
    assert_eq!(b["actual_pages"], 128 * 256);

    // Statistics from the guest.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, st) = api.get("/balloon/statistics").unwrap();
        assert_eq!(s, 200);
        if st["total_memory"].as_u64().is_some() {
            assert_eq!(st["actual_mib"], 128);
            break;
        }
        assert!(Instant::now() < deadline, "no statistics: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Pause: the guest makes no progress (a command sent now is not answered).
    let (s, body) = api.patch("/vm", &json!({"state": "Paused"})).unwrap();
    assert_eq!(s, 204, "{body}");
    assert_eq!(api.get("/vm").unwrap().1["state"], "Paused");
    vm.send("echo while paused");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !vm.transcript.iter().any(|l| l.contains("while paused")),
        "the guest ran while paused"
    );
    let (s, _) = api.patch("/vm", &json!({"state": "Paused"})).unwrap();
    assert_eq!(s, 409, "pausing a paused VM");
    let (s, _) = api.patch("/vm", &json!({"state": "Running"})).unwrap();
    assert_eq!(s, 204);
    vm.expect_line("while paused", Duration::from_secs(10));

    // Shut down through the API.
    let (s, _) = api.put("/vm/shutdown", &json!({})).unwrap();
    assert_eq!(s, 204);
    assert_eq!(vm.wait(BOOT).code(), Some(0));
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn every_error_class_has_its_status_and_message() {
    let (mut vm, api, sock) = start("errors", "sleep 120", &[]);
    let err = |v: &serde_json::Value| v["error"].as_str().unwrap_or_default().to_string();

    let (s, b) = api.patch("/balloon", &json!({"target_mib": 4096})).unwrap();
    assert_eq!(s, 400);
    assert!(err(&b).contains("larger than guest memory"), "{b}");
    let (s, b) = api
        .patch("/balloon", &json!({"target_mib": "lots"}))
        .unwrap();
    assert_eq!(s, 400, "{b}");
    let (s, b) = api.patch("/balloon", &json!({"target_mib": -1})).unwrap();
    assert_eq!(s, 400, "{b}");
    let (s, b) = api
        .patch("/balloon", &json!({"target_mib": 1, "colour": "red"}))
        .unwrap();
    assert_eq!(s, 400, "{b}");
    assert!(err(&b).contains("colour"), "unknown field named: {b}");
    let (s, b) = api.get("/nope").unwrap();
    assert_eq!(s, 404, "{b}");
    assert!(!err(&b).is_empty());
    let (s, b) = api.delete("/balloon").unwrap();
    assert_eq!(s, 405, "{b}");
    let (s, b) = api.patch("/vm", &json!({"state": "Running"})).unwrap();
    assert_eq!(s, 409, "{b}");
    assert!(err(&b).contains("already Running"), "{b}");

    let big = vec![b'x'; 10 << 20];
    let mut req = format!(
        "PATCH /balloon HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        big.len()
    )
    .into_bytes();
    req.extend_from_slice(&big);
    let r = raw(&sock, &req);
    assert_eq!(status_of(&r), 413, "{r}");

    let r = raw(
        &sock,
        b"PATCH /balloon HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n{\"ta",
    );
    assert_eq!(status_of(&r), 400, "bad JSON: {r}");

    // A policy key given twice is refused, naming it; serde_json's maps
    // kept the last one (204, floor 300 MiB). Nothing is applied.
    let floor = || api.get("/balloon/policy").unwrap().1["config"]["floor_mib"].clone();
    let before = floor();
    assert!(before.is_u64(), "{before}");
    for (method, body, key) in [
        ("PATCH", r#"{"floor":"256M","floor":"300M"}"#, "floor"),
        ("PUT", r#"{"floor":"256M","floor":"300M"}"#, "floor"),
        ("PATCH", r#"{"settle_ms":100,"settle_ms":200}"#, "settle_ms"),
        ("PATCH", r#"{"enabled":true,"enabled":false}"#, "enabled"),
    ] {
        let req = format!(
            "{method} /balloon/policy HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let r = raw(&sock, req.as_bytes());
        assert_eq!(status_of(&r), 400, "{method} {body}: {r}");
        assert!(
            r.contains(&format!("'{key}' given twice")),
            "{method} {body}: {r}"
        );
    }
    assert_eq!(floor(), before, "a refused policy body changed the floor");

    // The state's message offers only what PATCH /vm takes.
    let (s, b) = api.patch("/vm", &json!({"state": "running"})).unwrap();
    assert_eq!(s, 400, "{b}");
    assert!(
        err(&b).contains("expected `Running` or `Paused`") && !err(&b).contains("Migrated"),
        "{b}"
    );

    // A VM without a balloon answers balloon requests with 400.
    drop(api);
    vm.signal(libc::SIGTERM);
    vm.wait(BOOT);
    let (mut vm2, api2, sock2) = common::start_with_sock(
        "errors-noballoon",
        &[
            "--memory",
            "256M",
            "--no-stdin",
            "--cmdline",
            "testguest.run=\"sleep 60\"",
        ],
    );
    let (s, b) = api2.get("/balloon").unwrap();
    assert_eq!(s, 400, "{b}");
    assert!(err(&b).contains("no balloon"), "{b}");
    // A second blimp refuses the live socket.
    let (code, _, stderr) = common::run_blimp(&[
        "run",
        "--kernel",
        common::testguest().to_str().unwrap(),
        "--no-stdin",
        "--api-sock",
        sock2.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(sock2.to_str().unwrap()) && stderr.contains("in use"),
        "{stderr}"
    );
    vm2.signal(libc::SIGTERM);
    vm2.wait(BOOT);
}

#[test]
fn a_thousand_malformed_requests_do_not_disturb_the_guest() {
    // The guest fills and verifies memory over and over while we attack the API.
    let program = (1..=12)
        .map(|i| format!("fill 48 {i};verify"))
        .collect::<Vec<_>>()
        .join(";")
        + ";echo loop finished";
    let (mut vm, mut api, sock) = start("robust", &program, &[]);
    // Content-Length is always right, except in the request cut mid-way.
    let req = |method: &str, path: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let bad: Vec<Vec<u8>> = vec![
        req("PATCH", "/balloon", "{bad}"),
        req("PATCH", "/balloon", r#"{"target_mib":true}"#),
        req("PATCH", "/balloon", r#"{"target_mib":-5}"#),
        req(
            "PATCH",
            "/balloon",
            r#"{"target_mib":99999999999999999999999}"#,
        ),
        req("PATCH", "/vm", r#"{"state":"Dead"}"#),
        req("PATCH", "/balloon", r#"{"target_mib":1,"extra":true}"#),
        b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"BREW /coffee HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        // Cut mid-way: the client stops sending (see `give_up` below).
        b"PATCH /balloon HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"tar".to_vec(),
        b"\x00\x01\x02 garbage \xff\xfe\r\n\r\n".to_vec(),
    ];
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(UnixStream::connect(&sock).expect("idle connection"));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..1000 {
        let kind = i % bad.len();
        let r = raw_with(&sock, &bad[kind], kind == 8);
        let s = status_of(&r);
        *statuses.entry(s).or_insert(0) += 1;
        assert!(
            s == 0 || (400..500).contains(&s),
            "request {i} got {s}: {r}"
        );
    }
    eprintln!("statuses for 1000 malformed requests: {statuses:?}");
    drop(idle);
    // A valid request is still answered quickly.
    let t = Instant::now();
    let (s, _) = api.get("/balloon").unwrap();
    let took = t.elapsed();
    assert_eq!(s, 200);
    assert!(
        took < Duration::from_millis(100),
        "valid request took {took:?}"
    );
    vm.expect_line("loop finished", Duration::from_secs(120));
    let verifies = vm
        .transcript
        .iter()
        .filter(|l| l.contains("verify ok"))
        .count();
    assert_eq!(verifies, 12, "every verify passed: {:?}", vm.transcript);
    assert!(!vm.transcript.iter().any(|l| l.contains("FAIL")));
    set_target(&mut api, 16);
    wait_balloon(&mut api, 16, Duration::from_secs(30));
    vm.send("exit 0");
    assert_eq!(vm.wait(BOOT).code(), Some(0));
}

/// `blimp run` of a 256 MiB test guest (no stdin, stderr piped) after
/// the shell commands `limits` (`ulimit ...`), plus `extra` arguments.
fn run_under_limits(limits: &str, extra: &[&str]) -> std::process::Child {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{limits} && exec \"$0\" \"$@\""))
        .arg(common::blimp())
        .args(["run", "--kernel"])
        .arg(common::testguest())
        .args(["--memory", "256M", "--no-stdin"])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// blimp started under a low open-files limit (`ulimit -n 40`, soft and
/// hard: nothing to raise it to) with 30 idle connections open: a new
/// client runs blimp out of descriptors at accept, and the API closes the
/// longest idle connection to make room, so the client is answered within
/// a second or two. It used to retry every 50 ms, warning each time,
/// until the idle connections timed out (9.5 s, ~200 warnings).
#[test]
fn out_of_descriptors_the_api_makes_room_for_a_new_client() {
    common::require_kvm();
    let sock = std::env::temp_dir().join(format!("blimp-fdlimit-{}.sock", std::process::id()));
    let child = run_under_limits("ulimit -n 40", &["--api-sock", sock.to_str().unwrap()]);
    common::wait_for_socket(&sock);
    let idle: Vec<UnixStream> = (0..30)
        .filter_map(|_| UnixStream::connect(&sock).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    let (status, body) = ApiClient::new(&sock).unwrap().get("/vm").unwrap();
    let took = asked.elapsed();
    assert_eq!(status, 200, "{body}");
    drop(idle);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("GET /vm answered in {took:?}; blimp's stderr:\n{stderr}");
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    let warnings = stderr.matches("API accept failed").count();
    assert!(warnings <= 2, "{warnings} accept warnings");
    assert_eq!(out.status.code(), Some(143), "{stderr}");
}

/// blimp raises its soft open-files limit to the hard one at start.
#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit() {
    common::require_kvm();
    let child = run_under_limits("ulimit -Sn 64 && ulimit -Hn 4096", &[]);
    let limits = format!("/proc/{}/limits", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let text = std::fs::read_to_string(&limits).unwrap_or_default();
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or("")
            .to_string();
        if line.split_whitespace().nth(3) == Some("4096") || Instant::now() > deadline {
            break line;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>()[3..5],
        ["4096", "4096"],
        "{line}"
    );
}
