//! `blimp migrate` as a user drives it: Ctrl-C cancels the migration (and
//! says so), `blimp migrate --cancel` cancels one started elsewhere, and the
//! progress it shows counts real bytes from the first round on.

mod common;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api::client::ApiClient;
use serde_json::{Value, json};

const BOOT: Duration = Duration::from_secs(30);

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("blimp-mcli-{name}-{}", std::process::id()))
}

/// A destination that accepts and then reads nothing: the source's writes
/// block once the socket's buffers are full.
fn stalling_destination(name: &str) -> (PathBuf, std::thread::JoinHandle<UnixStream>) {
    let path = tmp(name);
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || l.accept().unwrap().0);
    (path, t)
}

fn status(api: &mut ApiClient) -> Value {
    let (s, st) = api.get("/migration").unwrap();
    assert_eq!(s, 200, "{st}");
    st
}

/// Wait until the migration is in round 1 with its writes blocked.
fn wait_blocked_in_round_1(api: &mut ApiClient) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (0, Instant::now());
    loop {
        let st = status(api);
        let bytes = st["stream_bytes"].as_u64().unwrap_or(0);
        if st["state"] == "Active" && bytes > 0 && bytes == last.0 {
            if last.1.elapsed() > Duration::from_millis(500) {
                return st;
            }
        } else {
            last = (bytes, Instant::now());
        }
        assert!(Instant::now() < deadline, "never blocked: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_state(api: &mut ApiClient, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = status(api);
        if st["state"] == want {
            return st;
        }
        assert!(Instant::now() < deadline, "never {want}: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn vm_running(api: &mut ApiClient) {
    let (_, v) = api.get("/vm").unwrap();
    assert_eq!(v["state"], "Running", "{v}");
}

#[test]
fn ctrl_c_on_blimp_migrate_cancels_the_migration_and_says_so() {
    let (mut vm, mut api, sock) = common::boot_with_api(
        "mcli-int",
        "fill 64 4;echo READY",
        &["--memory", "256M", "--no-stdin"],
    );
    vm.expect_line("READY", BOOT);
    let (dest, accepted) = stalling_destination("int.sock");
    let child = Command::new(common::blimp())
        .args([
            "migrate",
            "--api-sock",
            sock.to_str().unwrap(),
            "--to",
            &format!("unix://{}", dest.display()),
            "--write-timeout-ms",
            "600000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let st = wait_blocked_in_round_1(&mut api);
    // What the progress shows: real bytes in round 1, and not 100% done.
    assert_eq!(st["round"], 1, "{st}");
    assert!(st["stream_bytes"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["remaining_pages"], st["total_pages"], "{st}");
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("blimp migrate: {stderr}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("interrupted: cancelling the migration"),
        "{stderr}"
    );
    assert!(stderr.contains("migration cancelled (Ctrl-C)"), "{stderr}");
    wait_state(&mut api, "Cancelled");
    vm_running(&mut api);
    drop(accepted.join());
    let _ = std::fs::remove_file(&dest);
}

#[test]
fn blimp_migrate_cancel_stops_a_running_migration() {
    let (mut vm, mut api, sock) = common::boot_with_api(
        "mcli-cancel",
        "fill 64 4;echo READY",
        &["--memory", "256M", "--no-stdin"],
    );
    vm.expect_line("READY", BOOT);
    let (dest, accepted) = stalling_destination("cancel.sock");
    let (s, b) = api
        .put(
            "/migration",
            &json!({"destination": format!("unix://{}", dest.display()), "write_timeout_ms": 600000}),
        )
        .unwrap();
    assert_eq!(s, 200, "{b}");
    wait_blocked_in_round_1(&mut api);
    let (code, stdout, stderr) =
        common::run_blimp(&["migrate", "--cancel", "--api-sock", sock.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.starts_with("Cancelled"), "{stdout}");
    vm_running(&mut api);
    // Nothing left to cancel: a clear error.
    let (code, _, stderr) =
        common::run_blimp(&["migrate", "--cancel", "--api-sock", sock.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no migration is in progress"), "{stderr}");
    drop(accepted.join());
    let _ = std::fs::remove_file(&dest);
}

/// `blimp balloon set --wait` while the VM is migrated away: it used to
/// fail with "cannot connect" once the source exited, or wait out its whole
/// `--timeout` on a source that stays (figures that never move), while the
/// destination followed the target. It now says where the VM went.
#[test]
fn balloon_set_wait_says_where_the_vm_went() {
    // The guest's driver is never started: the balloon does not move.
    let (mut vm, api, sock) = common::boot_with_api_manual_balloon(
        "mcli-setwait",
        "echo READY",
        &["--memory", "256M", "--balloon", "stats_interval=0"],
    );
    vm.expect_line("READY", BOOT);
    let waiting = Command::new(common::blimp())
        .args(["balloon", "set", "64M", "--wait", "--timeout", "120"])
        .args(["--api-sock", sock.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let file = tmp("setwait.snap");
    let dest = format!("file://{}", file.display());
    let (s, b) = api
        .put(
            "/migration",
            &json!({"destination": dest, "source_exits": false}),
        )
        .unwrap();
    assert_eq!(s, 200, "{b}");
    let t = Instant::now();
    let out = waiting.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("migrated to {dest}")), "{stderr}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    let (s, b) = api.put("/vm/shutdown", &json!({})).unwrap();
    assert_eq!(s, 204, "{b}");
    let _ = vm.wait(BOOT);
    let _ = std::fs::remove_file(&file);
}
