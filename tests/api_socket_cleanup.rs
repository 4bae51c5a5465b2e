//! Issue #16: the API socket is removed on every exit path, also when two
//! SIGTERMs arrive quickly during a restore (the second one used to kill
//! blimp with the default action once the first had stopped the VM and the
//! signals were unblocked, before the API server removed its socket).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

const BOOT: Duration = Duration::from_secs(60);

/// A fresh directory for this test's files.
fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("blimp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir(&d).unwrap();
    d
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn double_sigterm_during_restore_never_leaves_the_socket() {
    common::require_kvm();
    let files = tmp_dir("sock-cleanup-files");
    let snap = files.join("snap");
    // A snapshot with 512 MiB of filled memory: restoring it takes a moment.
    let (mut vm, api, _) = common::boot_with_api(
        "sock-cleanup-src",
        "fill 512 1;echo SNAP",
        &["--memory", "768M", "--no-stdin"],
    );
    vm.expect_line("SNAP", BOOT);
    let (s, b) = api
        .put("/snapshot", &json!({ "path": snap.to_str().unwrap() }))
        .unwrap();
    assert_eq!(s, 200, "{b}");
    let st = common::wait_migration_end(&api, Duration::from_secs(120));
    assert_eq!(st["state"], "Completed", "{st}");
    vm.signal(libc::SIGTERM);
    vm.wait(BOOT);
    let size = std::fs::metadata(&snap).unwrap().len();
    assert!(size > 500 << 20, "snapshot of {size} bytes");

    // How long a restore takes until its API answers, to aim the signals
    // at the restore itself and at the moments around the API's start.
    let dir = tmp_dir("sock-cleanup");
    let sock = dir.join("api.sock");
    let t0 = Instant::now();
    let mut probe = common::spawn_restore(&snap, &sock, &["--no-stdin"]);
    common::wait_for_socket(&sock);
    let restore_time = t0.elapsed();
    probe.signal(libc::SIGTERM);
    probe.wait(BOOT);
    assert!(!sock.exists(), "a single SIGTERM left the socket");
    eprintln!("restore until the API answers: {restore_time:?}");

    // The second SIGTERM must come after the first was read (two pending
    // ones are one): during the restore, and at increasing gaps after the
    // API came up, when the first one stops the VM and the second arrives
    // during the teardown.
    let mut signalled_with_socket = 0;
    let runs = 12u32;
    for i in 0..runs {
        let mut r = common::spawn_restore(&snap, &sock, &["--no-stdin"]);
        let (first, gap) = if i < 4 {
            std::thread::sleep(restore_time * i / 4);
            ("during the restore", Duration::from_millis(5))
        } else {
            common::wait_for_socket(&sock);
            (
                "with the API up",
                Duration::from_millis(u64::from(i - 4) * 4),
            )
        };
        if sock.exists() {
            signalled_with_socket += 1;
        }
        r.signal(libc::SIGTERM);
        std::thread::sleep(gap);
        // It may be gone already.
        // SAFETY: kill(2) on our own child's pid (not yet reaped).
        unsafe { libc::kill(r.pid() as i32, libc::SIGTERM) };
        let status = r.wait(BOOT);
        let left = entries(&dir);
        assert!(
            left.is_empty(),
            "run {i} (first SIGTERM {first}, second {gap:?} later; exit {status:?}): left behind {left:?}"
        );
    }
    eprintln!("{signalled_with_socket} of {runs} runs were signalled with the socket up");
    assert!(signalled_with_socket >= 8, "the API never came up in time");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&files).unwrap();
}

/// Every terminating signal someone sends on purpose is a clean shutdown:
/// exit 128 + the signal, the API socket removed. SIGQUIT, SIGUSR1,
/// SIGUSR2 and SIGALRM used to kill blimp with their default action,
/// leaving the socket (and a raw terminal, and a snapshot's temp file).
#[test]
fn every_terminating_signal_is_a_clean_exit() {
    common::require_kvm();
    let dir = tmp_dir("sock-cleanup-signals");
    let signals = [
        (libc::SIGHUP, "hup"),
        (libc::SIGQUIT, "quit"),
        (libc::SIGUSR1, "usr1"),
        (libc::SIGUSR2, "usr2"),
        (libc::SIGALRM, "alrm"),
    ];
    // All at once: one boot's wait for the lot.
    let mut vms: Vec<_> = signals
        .iter()
        .map(|&(sig, name)| {
            let sock = dir.join(format!("{name}.sock"));
            let vm = common::Vm::start(&[
                "--memory",
                "256M",
                "--no-stdin",
                "--api-sock",
                sock.to_str().unwrap(),
            ]);
            (sig, name, sock, vm)
        })
        .collect();
    for (sig, _, sock, vm) in &vms {
        common::wait_for_socket(sock);
        vm.signal(*sig);
    }
    for (sig, name, sock, vm) in &mut vms {
        let status = vm.wait(BOOT);
        assert_eq!(status.code(), Some(128 + *sig), "SIG{name}: {status:?}");
        assert!(!sock.exists(), "SIG{name} left the API socket");
    }
    assert!(entries(&dir).is_empty(), "left behind: {:?}", entries(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
}
