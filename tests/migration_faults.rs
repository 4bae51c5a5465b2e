//! Fault injection for live migration: the destination closes, is killed,
//! stops reading, refuses or never acknowledges, at every point of the
//! stream and the switchover handshake. In every case exactly one VM runs
//! afterwards (here: the source, whose guest verifies its memory), and the
//! source's API says why. Also: cancel within 1 s against a destination
//! that stopped reading, in a page round and in the final round, and the
//! terminal Migrated state after a completed migration.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use api::client::ApiClient;
use common::{Step, Vm};
use serde_json::{Value, json};
use vmm::migration::handshake::{Message, Waiter};

const BOOT: Duration = Duration::from_secs(30);
/// Guest memory filled with a pattern before each migration attempt.
const FILL_MIB: u64 = 64;
const FILL_PAGES: u64 = FILL_MIB * 256;

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("blimp-fault-{name}-{}", std::process::id()))
}

/// Where the fake destination gives up.
#[derive(Clone, Copy, Debug, PartialEq)]
enum At {
    /// Right after accepting, before reading anything.
    Accept,
    /// After the stream header.
    Header,
    /// After this many bytes of page records of round 1.
    Round1(u64),
    /// At the first record of round 2 or later (the final round when the
    /// source is limited to one pre-copy round).
    FinalRound,
    /// In the middle of the state section's payload.
    State,
    /// After the trailer, before answering.
    Trailer,
}

/// What the fake destination does there.
#[derive(Clone, Debug, PartialEq)]
enum Then {
    /// Close the connection (what a killed process's socket does).
    Close,
    /// Stop reading and keep the connection open until told.
    Stall,
    /// (After the trailer) refuse with a reason.
    Nak(&'static str),
    /// (After the trailer) send garbage instead of an answer.
    Garbage,
    /// (After the trailer) ACK, read GO, then close without RUN.
    AckThenClose,
    /// (After the trailer) ACK, read GO, then say nothing.
    AckThenSilent,
    /// (After the trailer) ACK, read GO, then refuse with a reason after all.
    AckThenNak(&'static str),
    /// (After the trailer) ACK, read GO, send RUN: a destination that
    /// takes the VM over.
    TakeOver,
}

/// A destination that speaks the stream format and handshake and misbehaves
/// as told. Dropping it releases a stalled connection.
struct FakeDest {
    path: PathBuf,
    release: Option<mpsc::Sender<()>>,
    /// Told when the destination has read GO.
    go: mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<Result<String, String>>>,
}

impl FakeDest {
    fn start(name: &str, at: At, then: Then) -> FakeDest {
        let path = tmp(&format!("{name}.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind the fake destination");
        let (tx, rx) = mpsc::channel();
        let (go_tx, go) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let (s, _) = listener.accept().map_err(|e| e.to_string())?;
            serve(s, at, then, rx, go_tx)
        });
        FakeDest {
            path,
            release: Some(tx),
            go,
            thread: Some(thread),
        }
    }

    /// Wait until the destination has read GO.
    fn wait_go(&self, timeout: Duration) {
        self.go
            .recv_timeout(timeout)
            .expect("the fake destination never got GO");
    }

    fn url(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// What the fake destination saw (its last step).
    fn finish(mut self) -> String {
        self.release.take();
        match self.thread.take().unwrap().join() {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => format!("fake destination: {e}"),
            Err(_) => "fake destination panicked".into(),
        }
    }
}

impl Drop for FakeDest {
    fn drop(&mut self) {
        self.release.take();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

fn serve(
    mut s: UnixStream,
    at: At,
    then: Then,
    release: mpsc::Receiver<()>,
    go_seen: mpsc::Sender<()>,
) -> Result<String, String> {
    let stop = |s: UnixStream, what: String| -> Result<String, String> {
        if then == Then::Stall {
            // Keep the connection open, reading nothing, until released.
            let _ = release.recv_timeout(Duration::from_secs(120));
        }
        drop(s);
        Ok(what)
    };
    if at == At::Accept {
        return stop(s, "stopped at accept".into());
    }
    let mut fixed = [0u8; 20];
    s.read_exact(&mut fixed)
        .map_err(|e| format!("header: {e}"))?;
    let mut rest = vec![0u8; le32(&fixed[16..]) as usize * 16 + 4];
    s.read_exact(&mut rest)
        .map_err(|e| format!("header: {e}"))?;
    if at == At::Header {
        return stop(s, "stopped after the header".into());
    }
    let mut page_bytes = 0u64;
    let mut payload = vec![0u8; 1 << 20];
    loop {
        let mut h = [0u8; 36];
        s.read_exact(&mut h)
            .map_err(|e| format!("record header: {e}"))?;
        let tag = &h[0..4];
        let round = le32(&h[8..]);
        let len = le32(&h[24..]) as usize;
        if at == At::FinalRound && round >= 2 && (tag == b"DATA" || tag == b"ZERO") {
            return stop(s, format!("stopped at round {round}"));
        }
        if tag == b"STAT" && at == At::State {
            let mut half = vec![0u8; len / 2];
            s.read_exact(&mut half).map_err(|e| format!("state: {e}"))?;
            return stop(s, "stopped in the state section".into());
        }
        if payload.len() < len {
            payload.resize(len, 0);
        }
        s.read_exact(&mut payload[..len])
            .map_err(|e| format!("payload: {e}"))?;
        if tag == b"DATA" {
            page_bytes += len as u64;
            if let At::Round1(n) = at
                && page_bytes >= n
            {
                return stop(s, format!("stopped after {page_bytes} bytes of pages"));
            }
        }
        if tag == b"TEND" {
            break;
        }
    }
    match then {
        Then::Close | Then::Stall => stop(s, "stopped after the trailer".into()),
        Then::Nak(reason) => {
            s.write_all(&Message::Nak(reason.into()).encode())
                .map_err(|e| e.to_string())?;
            Ok("refused".into())
        }
        Then::Garbage => {
            s.write_all(b"HELLO, this is not a handshake message")
                .map_err(|e| e.to_string())?;
            Ok("sent garbage".into())
        }
        Then::AckThenClose | Then::AckThenSilent | Then::AckThenNak(_) | Then::TakeOver => {
            s.write_all(&Message::Ack.encode())
                .map_err(|e| e.to_string())?;
            let never = || false;
            let w = Waiter {
                cancelled: &never,
                timeout: Duration::from_secs(30),
            };
            let go = w.recv(&mut s, "GO").map_err(|e| e.to_string())?;
            if go != Message::Go {
                return Err(format!("expected GO, got {go:?}"));
            }
            let _ = go_seen.send(());
            match then {
                Then::AckThenClose => Ok("closed after GO".into()),
                Then::AckThenNak(reason) => {
                    s.write_all(&Message::Nak(reason.into()).encode())
                        .map_err(|e| e.to_string())?;
                    Ok("refused after GO".into())
                }
                Then::AckThenSilent => {
                    let _ = release.recv_timeout(Duration::from_secs(120));
                    Ok("silent after GO".into())
                }
                _ => {
                    s.write_all(&Message::Run.encode())
                        .map_err(|e| e.to_string())?;
                    Ok("took over".into())
                }
            }
        }
    }
}

/// A source VM with `FILL_MIB` MiB of pattern, a free page hinting balloon
/// (its driver started after the fill) and its console open for more
/// commands.
fn source(name: &str) -> (Vm, ApiClient) {
    let (mut vm, api, _) = common::boot_with_api_manual_balloon(
        name,
        &format!("fill {FILL_MIB} 3;balloon;echo READY"),
        &["--memory", "256M", "--balloon", "free_page_hint=on"],
    );
    vm.expect_line("READY", BOOT);
    (vm, api)
}

fn put_migration(api: &mut ApiClient, body: Value) {
    let (s, b) = api.put("/migration", &body).expect("PUT /migration");
    assert_eq!(s, 200, "PUT /migration {body}: {b}");
}

/// Poll `GET /migration` until it ends; returns the final status.
fn wait_end(api: &mut ApiClient, timeout: Duration) -> Value {
    common::wait_migration_end(api, timeout)
}

/// Wait up to `timeout` for the migration to end: it must have failed with
/// an error that says each of `says`.
fn assert_failed_saying(api: &mut ApiClient, timeout: Duration, says: &[&str]) {
    let st = wait_end(api, timeout);
    assert_eq!(st["state"], "Failed", "{st}");
    let err = st["error"].as_str().unwrap();
    assert!(
        says.iter().all(|w| err.contains(w)),
        "the error should say all of {says:?}: {st}"
    );
}

/// blimp logged a line that says each of `says`.
fn assert_logged(vm: &Vm, says: &[&str]) {
    let log = vm.log_lines();
    assert!(
        log.iter().any(|l| says.iter().all(|w| l.contains(w))),
        "no log line says all of {says:?}: {log:?}"
    );
}

fn vm_state(api: &mut ApiClient) -> String {
    let (s, v) = api.get("/vm").expect("GET /vm");
    assert_eq!(s, 200, "{v}");
    v["state"].as_str().unwrap_or("").to_string()
}

/// The source runs and its guest's memory is intact.
fn assert_source_runs_and_verifies(vm: &mut Vm, api: &mut ApiClient, case: &str) {
    assert_eq!(vm_state(api), "Running", "{case}: the source runs again");
    let line = verify(vm);
    assert!(
        line.contains(&format!("verify ok {FILL_PAGES} pages")),
        "{case}: {line}"
    );
}

/// Run `verify` on the guest console; returns its result line.
fn verify(vm: &mut Vm) -> String {
    vm.send("verify");
    loop {
        let line = vm.expect_line("verify", BOOT);
        if line.starts_with("verify ") {
            return line;
        }
    }
}

fn base_request(url: &str) -> Value {
    json!({
        "destination": url,
        "write_timeout_ms": 1500,
        "ack_timeout_ms": 1500,
    })
}

#[test]
fn a_destination_that_fails_anywhere_leaves_the_source_running() {
    let (mut vm, mut api) = source("faults");
    // (where, what, what the source's error must say)
    // A socket closed without a NAK: it may not be a blimp --incoming at all.
    const CLOSED: &str = "closed the connection before the handshake, without a word (no NAK): is it a `blimp run --incoming`";
    let cases: Vec<(At, Then, &str)> = vec![
        (At::Accept, Then::Close, CLOSED),
        (At::Header, Then::Close, CLOSED),
        (At::Round1(4 << 20), Then::Close, CLOSED),
        (
            At::Round1(4 << 20),
            Then::Stall,
            "accepted no data for 1500 ms",
        ),
        // The state section may fit in the socket's buffer: then the loss
        // shows when the ACK does not come.
        (
            At::State,
            Then::Close,
            "writing the migration stream|closed the connection before its ACK",
        ),
        (
            At::Trailer,
            Then::Close,
            "closed the connection before its ACK",
        ),
        (
            At::Trailer,
            Then::Stall,
            "no ACK message from the peer within",
        ),
        (
            At::Trailer,
            Then::Nak("layout mismatch (test)"),
            "refused the VM: layout mismatch (test)",
        ),
        (At::Trailer, Then::Garbage, "damaged ACK message"),
        (
            At::Trailer,
            Then::AckThenClose,
            "closed the connection before its RUN",
        ),
        // It does not run the VM: the source resumes it (docs/migration.md).
        (
            At::Trailer,
            Then::AckThenNak("changed its mind (test)"),
            "the destination refused the VM: changed its mind (test)",
        ),
    ];
    for (i, (at, then, why)) in cases.into_iter().enumerate() {
        let case = format!("case {i} ({at:?}, {then:?})");
        eprintln!("--- {case}");
        let dest = FakeDest::start(&format!("c{i}"), at, then.clone());
        let t = Instant::now();
        put_migration(&mut api, base_request(&dest.url()));
        let st = wait_end(&mut api, Duration::from_secs(60));
        eprintln!("{case}: {st} after {:?}", t.elapsed());
        assert_eq!(st["state"], "Failed", "{case}: {st}");
        let err = st["error"].as_str().unwrap_or("");
        assert!(
            why.split('|').any(|w| err.contains(w)),
            "{case}: error '{err}' should say '{why}'"
        );
        // A failed write names the byte it failed at in the status's count.
        if err.contains("writing the migration stream") {
            let at = format!("at byte {}:", st["stream_bytes"]);
            assert!(err.contains(&at), "{case}: error '{err}' should say '{at}'");
        }
        if matches!(then, Then::AckThenClose) {
            assert!(err.contains("the guest runs here again"), "{case}: {err}");
        }
        assert_source_runs_and_verifies(&mut vm, &mut api, &case);
        let seen = dest.finish();
        eprintln!("{case}: the fake destination {seen}");
    }
}

#[test]
fn a_destination_that_takes_over_then_goes_silent_leaves_the_source_paused() {
    // After GO, a destination that neither confirms nor closes may be running
    // the guest: the source must not run it too.
    let (mut vm, mut api) = source("silent");
    let dest = FakeDest::start("silent", At::Trailer, Then::AckThenSilent);
    put_migration(&mut api, base_request(&dest.url()));
    // Too late to cancel: the VM was handed over. It used to answer 204
    // (and the migration ended Failed, not Cancelled).
    dest.wait_go(Duration::from_secs(60));
    let (s, b) = api.delete("/migration").unwrap();
    assert_eq!(s, 409, "{b}");
    assert!(
        b["error"].as_str().unwrap_or("").contains("too late"),
        "{b}"
    );
    assert_failed_saying(
        &mut api,
        Duration::from_secs(60),
        &["no RUN message", "stays paused"],
    );
    assert_eq!(vm_state(&mut api), "Paused");
    // The user, knowing the destination does not run it, resumes it.
    let (s, b) = api.patch("/vm", &json!({"state": "Running"})).unwrap();
    assert_eq!(s, 204, "{b}");
    assert_source_runs_and_verifies(&mut vm, &mut api, "silent");
    drop(dest);
}

/// A real destination blimp, stopped (SIGSTOP) so that it reads nothing,
/// then killed (SIGKILL) while the source writes its page rounds; and a
/// real destination that refuses the VM (no huge pages for its backing).
#[test]
fn a_killed_or_refusing_real_destination_leaves_the_source_running() {
    let (mut vm, mut api) = source("real");
    let url_path = tmp("real.sock");
    let (mut dst, url) = common::start_incoming(&url_path, &[]);
    dst.signal(libc::SIGSTOP);
    put_migration(
        &mut api,
        json!({"destination": url, "write_timeout_ms": 60000}),
    );
    wait_stream_blocked(&mut api);
    dst.signal(libc::SIGKILL);
    assert_failed_saying(
        &mut api,
        Duration::from_secs(30),
        &["writing the migration stream"],
    );
    assert_source_runs_and_verifies(&mut vm, &mut api, "killed destination");
    let _ = dst.wait(BOOT);

    // A destination that cannot build the VM says why; the source resumes.
    // (Its RAM file is on a 2 MiB tmpfs: the guest's pages do not fit.)
    let fs = common::SmallTmpfs::mount("refusing", "2m");
    let backing = format!("file={}", fs.0.join("ram").display());
    let (mut dst, _) = common::start_incoming(&url_path, &["--memory-backend", &backing]);
    put_migration(&mut api, base_request(&url));
    assert_failed_saying(
        &mut api,
        Duration::from_secs(60),
        &["the destination refused the VM", "No space left on device"],
    );
    assert_source_runs_and_verifies(&mut vm, &mut api, "refusing destination");
    assert_ne!(
        dst.wait(BOOT).code(),
        Some(0),
        "the refusing destination fails"
    );
}

/// Wait until the migration's byte count stops growing: the destination
/// stopped reading and the source's write is blocked.
fn wait_stream_blocked(api: &mut ApiClient) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (u64::MAX, Instant::now());
    loop {
        let (_, st) = api.get("/migration").expect("GET /migration");
        assert!(
            !["Completed", "Failed", "Cancelled"].contains(&st["state"].as_str().unwrap_or("")),
            "the migration ended before it blocked: {st}"
        );
        let bytes = st["stream_bytes"].as_u64().unwrap_or(0);
        if bytes != last.0 {
            last = (bytes, Instant::now());
        } else if bytes > 0 && last.1.elapsed() > Duration::from_millis(500) {
            return st;
        }
        assert!(Instant::now() < deadline, "the stream never blocked: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `DELETE /migration`, then the time until the migration is Cancelled and
/// the VM Running.
fn cancel_and_time(api: &mut ApiClient) -> Duration {
    let t = Instant::now();
    let (s, b) = api.delete("/migration").expect("DELETE /migration");
    assert_eq!(s, 204, "{b}");
    common::wait_or_panic(
        "the cancel taking effect",
        Duration::from_secs(10),
        Duration::from_millis(5),
        || {
            let (_, st) = api.get("/migration").unwrap();
            if st["state"] == "Cancelled" && vm_state(api) == "Running" {
                Step::Done(())
            } else {
                Step::Pending(st.to_string())
            }
        },
    );
    t.elapsed()
}

#[test]
fn cancel_against_a_destination_that_stopped_reading_takes_effect_within_a_second() {
    let (mut vm, mut api) = source("cancel");
    // In a page round (the guest runs; the source's write is blocked).
    let dest = FakeDest::start("cancel-round", At::Round1(4 << 20), Then::Stall);
    put_migration(
        &mut api,
        json!({"destination": dest.url(), "write_timeout_ms": 600000}),
    );
    let st = wait_stream_blocked(&mut api);
    assert_eq!(st["state"], "Active", "{st}");
    assert_eq!(st["round"], 1, "{st}");
    let took = cancel_and_time(&mut api);
    eprintln!("cancel in a page round took {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_source_runs_and_verifies(&mut vm, &mut api, "cancel in a page round");
    drop(dest);

    // In the final round: the guest dirties memory so the last round is
    // large, the source allows one pre-copy round, and the destination stops
    // reading at the first record of round 2 (guest paused).
    vm.send(&format!("dirty {FILL_MIB} 2000"));
    vm.expect_line("dirty on", BOOT);
    let dest = FakeDest::start("cancel-final", At::FinalRound, Then::Stall);
    put_migration(
        &mut api,
        json!({"destination": dest.url(), "write_timeout_ms": 600000, "max_rounds": 1}),
    );
    let st = wait_stream_blocked(&mut api);
    assert_eq!(st["state"], "Completing", "{st}");
    assert_eq!(vm_state(&mut api), "Paused", "the final round runs paused");
    // Requests that would race the final round are refused; a change of
    // the balloon's target too (it would not reach the destination: it
    // used to be answered 204 and lost).
    let (s, b) = api.patch("/vm", &json!({"state": "Running"})).unwrap();
    assert_eq!(s, 409, "{b}");
    // The API is not held up by the stalled final round: GET /balloon
    // (through the event loop during a job) used to wait for the balloon
    // lock the final round held for its whole copy, and every request
    // behind it got 503 after 5 s.
    for path in ["/balloon", "/vm", "/balloon/statistics"] {
        let t = Instant::now();
        let (s, b) = api.get(path).unwrap();
        assert_eq!(s, 200, "GET {path}: {b}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "GET {path} took {:?}",
            t.elapsed()
        );
    }
    let (s, b) = api.patch("/balloon", &json!({"target_mib": 8})).unwrap();
    assert_eq!(s, 409, "{b}");
    assert!(
        b["error"].as_str().unwrap_or("").contains("being captured"),
        "{b}"
    );
    let took = cancel_and_time(&mut api);
    eprintln!("cancel in the final round took {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    vm.send("dirty 0 0");
    vm.expect_line("dirty off", BOOT);
    // The dirtying workload keeps the pattern's record up to date.
    let line = verify(&mut vm);
    assert!(line.contains("verify ok"), "{line}");
    drop(dest);
}

#[test]
fn a_migrated_source_refuses_every_change_and_exits_when_told() {
    let (mut vm, mut api) = source("owner");
    let dest = FakeDest::start("owner", At::Trailer, Then::TakeOver);
    let mut req = base_request(&dest.url());
    req["source_exits"] = json!(false);
    put_migration(&mut api, req);
    let st = wait_end(&mut api, Duration::from_secs(60));
    assert_eq!(st["state"], "Completed", "{st}");
    assert_eq!(dest.finish(), "took over");
    assert_eq!(vm_state(&mut api), "Migrated");
    // The guest no longer runs here (it runs at the destination): its
    // console does not answer.
    vm.send("echo STILL-RUNNING-HERE");
    assert!(
        !vm.says_within("STILL-RUNNING-HERE", Duration::from_secs(2)),
        "the migrated source runs its guest on"
    );
    let changes: Vec<(&str, &str, Value)> = vec![
        ("PATCH", "/vm", json!({"state": "Running"})),
        ("PATCH", "/vm", json!({"state": "Paused"})),
        (
            "PUT",
            "/migration",
            json!({"destination": "file:///tmp/blimp-never.mig"}),
        ),
        ("PUT", "/snapshot", json!({"path": "/tmp/blimp-never.snap"})),
        ("PATCH", "/balloon", json!({"target_mib": 16})),
        (
            "PATCH",
            "/balloon/statistics",
            json!({"stats_polling_interval_s": 1}),
        ),
        ("PUT", "/balloon/hinting/start", json!({})),
        // Firecracker's forms, answered on the API thread while no job ran.
        ("PATCH", "/balloon", json!({"amount_mib": 16})),
        (
            "PUT",
            "/balloon",
            json!({"amount_mib": 16, "deflate_on_oom": false}),
        ),
        ("PATCH", "/balloon/hinting/start", json!({})),
    ];
    for (method, path, body) in changes {
        let (s, b) = match method {
            "PATCH" => api.patch(path, &body),
            _ => api.put(path, &body),
        }
        .expect(path);
        assert_eq!(s, 409, "{method} {path}: {b}");
        assert!(
            b["error"]
                .as_str()
                .unwrap_or("")
                .contains("was migrated to"),
            "{method} {path}: {b}"
        );
    }
    for path in ["/vm", "/balloon", "/migration", "/balloon/statistics"] {
        let (s, b) = api.get(path).unwrap();
        assert_eq!(s, 200, "GET {path}: {b}");
    }
    assert!(!Path::new("/tmp/blimp-never.mig").exists());
    // It stays until told, then exits 0 saying why.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        vm.child.try_wait().unwrap().is_none(),
        "source_exits=false keeps it"
    );
    let (s, b) = api.put("/vm/shutdown", &json!({})).unwrap();
    assert_eq!(s, 204, "{b}");
    assert_eq!(vm.wait(BOOT).code(), Some(0));
    // The console says what happened.
    assert_logged(&vm, &["was migrated to", "stays"]);
}

#[test]
fn a_migrated_to_file_source_refuses_changes_then_exits_on_its_own() {
    let (mut vm, mut api) = source("owner-file");
    let file = tmp("owner.mig");
    let _ = std::fs::remove_file(&file);
    put_migration(
        &mut api,
        json!({"destination": format!("file://{}", file.display()), "source_exit_delay_ms": 3000}),
    );
    let st = wait_end(&mut api, Duration::from_secs(60));
    assert_eq!(st["state"], "Completed", "{st}");
    assert_eq!(vm_state(&mut api), "Migrated");
    let (s, b) = api.patch("/vm", &json!({"state": "Running"})).unwrap();
    assert_eq!(s, 409, "{b}");
    let (s, b) = api.patch("/balloon", &json!({"target_mib": 16})).unwrap();
    assert_eq!(s, 409, "{b}");
    let t = Instant::now();
    assert_eq!(vm.wait(BOOT).code(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    assert_logged(&vm, &["was migrated to", "exits in 3000 ms"]);
    // The file is a complete stream: it restores and the guest verifies.
    let mut dst = Vm::start_cmd("restore", &["--from", file.to_str().unwrap()]);
    let line = verify(&mut dst);
    assert!(
        line.contains(&format!("verify ok {FILL_PAGES} pages")),
        "{line}"
    );
    let _ = std::fs::remove_file(&file);
}

/// A source of stream version 1 does not wait for the switchover handshake
/// (it would report success and exit): a destination refuses it at the
/// header and runs nothing.
#[test]
fn a_destination_refuses_a_source_without_the_handshake() {
    let url_path = tmp("v1.sock");
    let (mut dst, _) = common::start_incoming(&url_path, &[]);
    let layout = arch::MemoryLayout::new(256 << 20).unwrap();
    let mut w = vmm::migration::stream::StreamWriter::new(Vec::new());
    w.header(&vmm::migration::stream::layout_ranges(&layout), 0)
        .unwrap();
    let (mut header, _) = {
        // The header alone: the writer wants a state before it finishes,
        // so take its buffer through a state and trailer and cut there.
        w.state(b"{}").unwrap();
        w.finish().unwrap()
    };
    let count = u32::from_le_bytes(header[16..20].try_into().unwrap()) as usize;
    let end = 20 + count * 16;
    header.truncate(end + 4);
    header[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32c::crc32c(&header[..end]);
    header[end..].copy_from_slice(&crc.to_le_bytes());
    let mut s = UnixStream::connect(&url_path).unwrap();
    s.write_all(&header).unwrap();
    let status = dst.wait(BOOT);
    assert_eq!(status.code(), Some(1));
    let log = dst.log_lines().join("\n");
    assert!(
        log.contains("stream format version 1, which has no switchover handshake"),
        "{log}"
    );
}

/// A destination stopped (SIGTERM) while a source stalls in the middle of
/// its stream, or after the destination's ACK while it waits for the GO
/// that never comes, exits at once with 128+15 and tells the source it
/// was stopped (NAK), so the source keeps its VM. It used to wait out the
/// 60 s idle limit (or for ever, against a source sending a byte every
/// 20 s), and exit 1 saying the source was silent.
#[test]
fn a_destination_stopped_while_the_source_stalls_exits_at_once() {
    // A real stream: a snapshot of a test guest, replayed by hand.
    let (mut vm, api) = source("stall-stop");
    let snap = tmp("stall-stop.snap");
    let st = common::migrate(
        &api,
        &json!({ "destination": format!("file://{}", snap.display()) }),
        Duration::from_secs(120),
    );
    assert_eq!(st["state"], "Completed", "{st}");
    assert_eq!(vm.wait(BOOT).code(), Some(0));
    let stream = std::fs::read(&snap).unwrap();
    let _ = std::fs::remove_file(&snap);
    let waiter = Waiter {
        cancelled: &|| false,
        timeout: Duration::from_secs(60),
    };
    for after_ack in [false, true] {
        let sock = tmp(&format!("stall-stop-{after_ack}.sock"));
        let (mut dst, _) = common::start_incoming(&sock, &[]);
        let mut s = UnixStream::connect(&sock).unwrap();
        if after_ack {
            s.write_all(&stream).unwrap();
            let ack = waiter.recv(&mut s, "ACK").unwrap();
            assert_eq!(ack, Message::Ack);
        } else {
            s.write_all(&stream[..4096]).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        }
        let stopped = Instant::now();
        dst.signal(libc::SIGTERM);
        let status = dst.wait(Duration::from_secs(30));
        let took = stopped.elapsed();
        assert_eq!(status.code(), Some(143), "after ACK: {after_ack}");
        assert!(
            took < Duration::from_secs(5),
            "exited {took:?} after SIGTERM"
        );
        match waiter.recv(&mut s, "NAK") {
            Ok(Message::Nak(why)) => assert!(why.contains("signal 15"), "{why}"),
            other => panic!("after ACK: {after_ack}: {other:?}"),
        }
        assert!(!sock.exists(), "the destination left its socket");
    }
}

/// A destination that is not there (never started, or already taken by
/// another source, whose socket is gone): the error says what that may
/// mean, and the source keeps its VM. It said a bare "No such file or
/// directory".
#[test]
fn a_missing_destination_is_named_as_such() {
    let (mut vm, mut api) = source("nowhere");
    let url = format!("unix://{}", tmp("nowhere.sock").display());
    put_migration(&mut api, json!({ "destination": url }));
    assert_failed_saying(
        &mut api,
        Duration::from_secs(30),
        &["cannot open destination", "nothing listens there"],
    );
    assert_source_runs_and_verifies(&mut vm, &mut api, "missing destination");
    vm.exit_with(0, BOOT);
}
