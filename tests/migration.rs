//! Migration to a file and to another blimp, restore, and refusal of
//! damaged streams.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::client::ApiClient;
use common::{Vm, sock_path, wait_for_socket};
use serde_json::{Value, json};

const BOOT: Duration = Duration::from_secs(30);

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("blimp-mig-{name}-{}", std::process::id()))
}

/// Start a migration and wait until it finishes; returns the final status.
fn migrate(api: &mut ApiClient, body: Value) -> Value {
    common::migrate(api, &body, Duration::from_secs(300))
}

/// Migrate to the file `file` and wait for the end: the migration must
/// complete. Returns its final status.
fn migrate_to_file(api: &mut ApiClient, file: &Path) -> Value {
    let st = migrate(
        api,
        json!({"destination": format!("file://{}", file.display())}),
    );
    assert_eq!(st["state"], "Completed", "{st}");
    st
}

fn start_source(
    name: &str,
    program: &str,
    memory: &str,
    extra: &[&str],
) -> (Vm, ApiClient, PathBuf) {
    let mut args = vec!["--memory", memory];
    args.extend_from_slice(extra);
    common::boot_with_api(name, program, &args)
}

fn restore(file: &Path, extra: &[&str]) -> Vm {
    let mut args = vec!["--from", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    Vm::start_cmd("restore", &args)
}

/// A live migration to `dst` (a `blimp run --incoming URL`) of a source
/// with `memory` whose guest filled `fill_mib` MiB from `seed`: it completes,
/// the source ends, and the guest, now on `dst` (its console on the test's
/// pipe), verifies every filled page
/// and exits there with `code`.
fn hand_over(
    name: &str,
    memory: &str,
    fill_mib: u64,
    seed: u64,
    url: &str,
    dst: &mut Vm,
    code: i32,
) {
    // The guest then waits for commands: they reach it on the destination.
    let program = format!("fill {fill_mib} {seed};echo MIGRATE NOW");
    let (mut vm, mut api, _) = start_source(name, &program, memory, &["--no-stdin"]);
    vm.expect_line("MIGRATE NOW", BOOT);
    let st = migrate(&mut api, json!({"destination": url}));
    assert_eq!(st["state"], "Completed", "{st}");
    dst.verify(&format!("verify ok {} pages", fill_mib * 256), BOOT);
    dst.exit_with(code, BOOT);
    assert_eq!(vm.wait(BOOT).code(), Some(0));
}

#[test]
fn migrate_to_file_and_restore_continues_the_guest() {
    let file = tmp("basic");
    let (mut vm, mut api, _) = start_source(
        "basic",
        "fill 256 1;echo MIGRATE NOW",
        "1G",
        &["--no-stdin"],
    );
    vm.expect_line("MIGRATE NOW", BOOT);
    let st = migrate_to_file(&mut api, &file);
    eprintln!("migration status: {st}");
    let data = st["bytes_sent"].as_u64().unwrap();
    assert!(
        data >= 256 << 20,
        "the 256 MiB filled were sent: {data} bytes"
    );
    assert!(
        data < 300 << 20,
        "zero pages are not sent as data: {data} bytes"
    );
    assert_eq!(
        vm.wait(BOOT).code(),
        Some(0),
        "the source ends after migrating"
    );

    // The guest waits at its prompt, wherever the migration ended: the
    // restored one takes commands, keeps time and finds its pages.
    let mut dst = restore(&file, &[]);
    dst.send("sleep 1");
    dst.expect_line("sleep done", BOOT);
    dst.verify("verify ok 65536 pages", BOOT);
    dst.exit_with(7, BOOT);
    assert!(
        !dst.transcript.iter().any(|l| l.contains("blimp-testguest")),
        "restored, not rebooted"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn live_migration_over_a_unix_socket() {
    let (mut dst, url) = common::start_incoming_with_console(&tmp("live.sock"), &[]);
    hand_over("live", "512M", 128, 5, &url, &mut dst, 9);
}

/// Connections that are not a source neither hold nor end a destination:
/// one that sends nothing (it held the destination for 60 s, then the
/// destination exited and the real source failed) and one that sends
/// something else (a port scanner's probe: the destination exited at once)
/// are told why and waiting goes on; the real source that comes after them
/// migrates, and the silent one then hears that the destination is taken.
#[test]
fn stray_connections_neither_hold_nor_end_a_destination() {
    use vmm::migration::handshake::{Message, Waiter};
    let sock = tmp("stray.sock");
    let (mut dst, url) = common::start_incoming_with_console(&sock, &[]);
    let mut silent = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut probe = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(&mut probe, b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let waiter = Waiter {
        cancelled: &|| false,
        timeout: BOOT,
    };
    match waiter.recv(&mut probe, "NAK") {
        Ok(Message::Nak(why)) => assert!(why.contains("not a Blimp migration stream"), "{why}"),
        other => panic!("the probe: {other:?}"),
    }
    hand_over("stray", "256M", 32, 4, &url, &mut dst, 7);
    match waiter.recv(&mut silent, "NAK") {
        Ok(Message::Nak(why)) => assert!(why.contains("already receiving a VM"), "{why}"),
        other => panic!("the silent connection: {other:?}"),
    }
}

#[test]
fn damaged_streams_are_refused_with_a_clear_error() {
    let file = tmp("damage");
    let (mut vm, mut api, _) = start_source(
        "damage",
        "fill 32 2;echo MIGRATE NOW;sleep 30",
        "256M",
        &["--no-stdin"],
    );
    vm.expect_line("MIGRATE NOW", BOOT);
    migrate_to_file(&mut api, &file);
    vm.wait(BOOT);
    let good = std::fs::read(&file).unwrap();
    let len = good.len();
    let damaged = tmp("damaged");
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    // A flipped byte in the header, early records, the middle (page data) and near the end (state, trailer).
    for at in [10, 100, 5000, len / 2, len - 2000, len - 100, len - 5] {
        let mut b = good.clone();
        b[at] ^= 0x40;
        cases.push((format!("byte {at} flipped"), b));
    }
    for cut in [0, 7, 64, 4096, len / 3, len - 1000, len - 1] {
        cases.push((format!("cut at {cut}"), good[..cut].to_vec()));
    }
    for (what, bytes) in cases {
        std::fs::write(&damaged, &bytes).unwrap();
        let out = std::process::Command::new(common::blimp())
            .args(["restore", "--no-stdin", "--from", damaged.to_str().unwrap()])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_ne!(
            out.status.code(),
            Some(0),
            "{what}: a damaged stream was accepted"
        );
        assert!(
            err.contains("refused at byte") || err.contains("migration stream"),
            "{what}: unclear error: {err}"
        );
        assert!(stdout.is_empty(), "{what}: the guest ran: {stdout}");
        eprintln!("{what}: {}", err.trim());
    }
    let _ = std::fs::remove_file(&damaged);
    let _ = std::fs::remove_file(&file);
}

#[test]
fn cancel_leaves_the_source_running() {
    // A large guest whose pages are all non-zero takes a while to write.
    let file = tmp("cancel");
    let (mut vm, api, _) = start_source("cancel", "fill 3000 4;echo MIGRATE NOW", "4G", &[]);
    vm.expect_line("MIGRATE NOW", Duration::from_secs(120));
    let (s, b) = api
        .put(
            "/migration",
            &json!({"destination": format!("file://{}", file.display())}),
        )
        .unwrap();
    assert_eq!(s, 200, "{b}");
    std::thread::sleep(Duration::from_millis(100));
    let (s, b) = api.delete("/migration").unwrap();
    assert_eq!(s, 204, "{b}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let (_, st) = api.get("/migration").unwrap();
        if st["state"] == "Cancelled" || st["state"] == "Completed" {
            break st;
        }
        assert!(Instant::now() < deadline, "{st}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(st["state"], "Cancelled", "{st}");
    assert!(
        !file.exists(),
        "a cancelled migration leaves no file behind"
    );
    let (_, info) = api.get("/vm").unwrap();
    assert_eq!(info["state"], "Running");
    // The guest still runs correctly.
    vm.verify("verify ok", Duration::from_secs(120));
    vm.exit_with(0, BOOT);
}

#[test]
fn restore_resumes_the_balloon_where_it_was() {
    let file = tmp("balloon");
    let (mut vm, mut api, _) = start_source(
        "mig-balloon-src",
        "fill 128 3;echo MIGRATE NOW",
        "1G",
        &["--balloon", "stats_interval=1,free_page_hint=on"],
    );
    vm.expect_line("MIGRATE NOW", BOOT);
    common::resize_balloon(&mut api, 200, Duration::from_secs(30));
    // Wait for a statistics report.
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.get("/balloon/statistics").unwrap().1["free_memory"].is_null() {
        assert!(Instant::now() < deadline, "no statistics");
        std::thread::sleep(Duration::from_millis(100));
    }
    migrate_to_file(&mut api, &file);
    assert_eq!(vm.wait(BOOT).code(), Some(0));

    let dsock = sock_path("mig-balloon-dst");
    let mut dst = restore(&file, &["--api-sock", dsock.to_str().unwrap()]);
    wait_for_socket(&dsock);
    let mut dapi = ApiClient::new(&dsock).unwrap();
    let (_, b) = dapi.get("/balloon").unwrap();
    assert_eq!(b["target_mib"], 200, "{b}");
    assert_eq!(b["actual_mib"], 200, "{b}");
    assert_eq!(b["free_page_hint"], true, "{b}");
    let (_, s) = dapi.get("/balloon/statistics").unwrap();
    assert!(
        s["free_memory"].as_u64().is_some(),
        "statistics carried over: {s}"
    );
    // The restored balloon keeps working: deflate, then the guest reuses the memory.
    common::resize_balloon(&mut dapi, 0, Duration::from_secs(30));
    dst.fill(512, 4, BOOT);
    dst.verify("verify ok 163840 pages", BOOT);
    dst.exit_with(0, BOOT);
    let _ = std::fs::remove_file(&file);
}

#[test]
fn live_migration_over_tcp_hands_the_vm_over() {
    // A free port on the loopback (released before the destination binds it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    // The source retries a refused connection for 3 s while this one starts.
    let mut dst = Vm::start_cmd("run", &["--incoming", &url]);
    hand_over("tcp", "256M", 64, 6, &url, &mut dst, 11);
}

/// `GET /vm` answers, and the VM runs.
fn assert_running(api: &ApiClient) {
    let (s, info) = api.get("/vm").unwrap();
    assert_eq!(
        (s, info["state"].as_str()),
        (200, Some("Running")),
        "{info}"
    );
}

/// `vm`, a `run --incoming unix://PATH` whose PATH something listens on,
/// exits 2 saying so.
fn refused_as_live(vm: &mut Vm) {
    assert_eq!(vm.wait(BOOT).code(), Some(2), "{}", log_text(vm));
    assert!(
        log_text(vm).contains("another process listens"),
        "{}",
        log_text(vm)
    );
}

/// The stderr lines of `vm` so far, joined, for assertions.
fn log_text(vm: &Vm) -> String {
    vm.log_lines().join("\n")
}

/// A destination whose `--api-sock` could not be created (another blimp's
/// live socket, a missing directory) is refused before it listens for a
/// migration: after a hand-over it would have been the VM's only home,
/// and one without an API.
#[test]
fn a_destination_whose_api_socket_cannot_be_made_is_refused_before_it_listens() {
    let (mut src, api, src_sock) = start_source("dst-api-taken", "echo UP", "128M", &[]);
    src.expect_line("UP", BOOT);
    let listen = tmp("dst-api-taken.mig");
    let url = format!("unix://{}", listen.display());
    let missing_dir = tmp("no-such-dir").join("api.sock");
    // A path that fits in a socket address while the private bind path
    // next to it does not; a directory that takes no private directory.
    // (DIR is 105 bytes; DIR/s 107; DIR/.bPID.0/s at least 113. With
    // DIR/a.sock at 104 bytes, a PID under 0x1000 made the bind path fit.)
    let long_dir = PathBuf::from("/tmp").join("d".repeat(100));
    std::fs::create_dir_all(&long_dir).unwrap();
    let long = long_dir.join("s");
    assert_eq!(long.as_os_str().len(), 107);
    // A path that cannot be a socket is a usage error (2); one another
    // process has, or a directory that refuses the bind, a runtime one (1).
    for (api_sock, why, status) in [
        (src_sock.clone(), "in use by another process", 1),
        (missing_dir.clone(), "no-such-dir", 2),
        (
            PathBuf::from("/proc/blimp-api.sock"),
            "private directory",
            1,
        ),
        (long.clone(), "may be at most", 2),
    ] {
        let mut dst = Vm::start(&[
            "--incoming",
            &url,
            "--api-sock",
            api_sock.to_str().unwrap(),
            "--no-stdin",
        ]);
        assert_eq!(dst.wait(BOOT).code(), Some(status), "{}", log_text(&dst));
        let log = log_text(&dst);
        assert!(
            log.contains(api_sock.to_str().unwrap()) && log.contains(why),
            "{log}"
        );
        assert!(!listen.exists(), "it never listened for the migration");
    }
    let _ = std::fs::remove_dir_all(&long_dir);
    // The source's API is untouched.
    assert_running(&api);
    src.exit_with(0, BOOT);
}

/// A destination already waiting on PATH is not disturbed by a second
/// `--incoming unix://PATH`: the second is refused, and the check it makes
/// (a connection that sends nothing) is not taken for the source; the
/// first then receives the migration.
#[test]
fn a_second_listener_on_the_same_path_leaves_the_first_waiting() {
    let listen = tmp("second-listener.mig");
    let (mut dst, url) = common::start_incoming_with_console(&listen, &[]);
    let mut second = Vm::start(&["--incoming", &url, "--no-stdin"]);
    refused_as_live(&mut second);
    hand_over("second-listener", "256M", 16, 9, &url, &mut dst, 0);
}

/// `--incoming unix://PATH` never takes over a live socket at PATH (here
/// another blimp's API socket, a typo away): it is refused, and the other
/// blimp's API still answers there.
#[test]
fn an_incoming_listener_never_takes_over_a_live_socket() {
    use std::os::unix::fs::MetadataExt;
    let (mut src, api, src_sock) = start_source("incoming-live", "echo UP", "128M", &[]);
    src.expect_line("UP", BOOT);
    let ino = std::fs::metadata(&src_sock).unwrap().ino();
    let url = format!("unix://{}", src_sock.display());
    let mut dst = Vm::start(&["--incoming", &url, "--no-stdin"]);
    refused_as_live(&mut dst);
    assert_eq!(std::fs::metadata(&src_sock).unwrap().ino(), ino);
    assert_running(&api);
    src.exit_with(0, BOOT);
}

/// If the destination's API socket is taken between its start and the
/// hand-over, the VM it now holds (the only copy: the source has ended)
/// runs on without an API instead of being dropped.
#[test]
fn a_handed_over_vm_runs_on_when_its_api_socket_was_taken_meanwhile() {
    let listen = tmp("api-taken-late.mig");
    let dst_sock = sock_path("api-taken-late-dst");
    let _ = std::fs::remove_file(&dst_sock);
    let (mut dst, url) =
        common::start_incoming_with_console(&listen, &["--api-sock", dst_sock.to_str().unwrap()]);
    // Someone else takes the path after the destination checked it.
    let squatter = std::os::unix::net::UnixListener::bind(&dst_sock).unwrap();
    hand_over("api-taken-late", "256M", 16, 7, &url, &mut dst, 0);
    let log = log_text(&dst);
    assert!(
        log.contains("in use by another process") && log.contains("runs on without an API"),
        "{log}"
    );
    drop(squatter);
    let _ = std::fs::remove_file(&dst_sock);
}

/// A destination stopped (SIGTERM, SIGINT) while it waits for a migration
/// removes its listening socket and exits with 128 + the signal.
#[test]
fn a_waiting_destination_stopped_by_a_signal_removes_its_socket() {
    for (sig, name) in [(libc::SIGTERM, "term"), (libc::SIGINT, "int")] {
        let listen = tmp(&format!("wait-{name}.mig"));
        let (mut dst, _) = common::start_incoming(&listen, &[]);
        dst.signal(sig);
        assert_eq!(dst.wait(BOOT).code(), Some(128 + sig), "{}", log_text(&dst));
        assert!(!listen.exists(), "{} was left behind", listen.display());
    }
}

/// A destination told to stop (SIGTERM) while it receives the stream
/// refuses the VM instead of taking it over only to stop it: the source
/// keeps its guest, whole, and says why.
#[test]
fn a_destination_stopped_while_receiving_leaves_the_vm_with_its_source() {
    let listen = tmp("stopped-dst.mig");
    let (mut dst, url) = common::start_incoming(&listen, &[]);
    let (mut src, api, _) = start_source("stopped-dst", "fill 400 5;echo MIGRATE NOW", "512M", &[]);
    src.expect_line("MIGRATE NOW", BOOT);
    let (s, b) = api.put("/migration", &json!({"destination": url})).unwrap();
    assert_eq!(s, 200, "{b}");
    // The destination removes its socket once it accepted the source.
    let deadline = Instant::now() + BOOT;
    while listen.exists() {
        assert!(Instant::now() < deadline, "the destination never accepted");
        std::thread::sleep(Duration::from_millis(2));
    }
    dst.signal(libc::SIGTERM);
    let st = common::wait_migration_end(&api, Duration::from_secs(120));
    assert_eq!(st["state"], "Failed", "{st}");
    let err = st["error"].as_str().unwrap_or("");
    assert!(err.contains("stopped (signal 15)"), "{st}");
    assert_eq!(
        dst.wait(BOOT).code(),
        Some(128 + libc::SIGTERM),
        "{}",
        log_text(&dst)
    );
    src.verify(&format!("verify ok {} pages", 400 * 256), BOOT);
    src.exit_with(0, BOOT);
}
