//! Command-line errors: each names the bad file or value and exits with
//! status 2 for usage errors, 1 for runtime errors.

mod common;

use common::{run_blimp, testguest};

fn assert_usage(args: &[&str], needle: &str) {
    let (code, _out, err) = run_blimp(args);
    assert_eq!(
        code, 2,
        "args {args:?}: expected exit status 2, stderr: {err}"
    );
    assert!(
        err.contains(needle),
        "args {args:?}: stderr does not mention '{needle}': {err}"
    );
}

#[test]
fn missing_kernel() {
    assert_usage(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "/nonexistent/vmlinux",
    );
    assert_usage(&["run", "--kernel", "/nonexistent/vmlinux"], "No such file");
}

#[test]
fn kernel_that_is_not_a_kernel() {
    let f = std::env::temp_dir().join(format!("blimp-not-a-kernel-{}", std::process::id()));
    std::fs::write(&f, b"just text, not an ELF or bzImage").unwrap();
    let p = f.to_str().unwrap();
    assert_usage(
        &["run", "--kernel", p, "--no-stdin"],
        "neither an ELF vmlinux nor a bzImage",
    );
    std::fs::remove_file(&f).unwrap();
}

#[test]
fn unreadable_initrd() {
    let k = testguest().to_str().unwrap();
    assert_usage(
        &["run", "--kernel", k, "--initrd", "/nonexistent/initrd"],
        "initrd /nonexistent/initrd",
    );
    assert_usage(
        &["run", "--kernel", k, "--initrd", "/"],
        "not a regular file",
    );
}

#[test]
fn bad_memory_sizes() {
    let k = testguest().to_str().unwrap();
    assert_usage(&["run", "--kernel", k, "--memory", "0"], "cannot be 0");
    assert_usage(
        &["run", "--kernel", k, "--memory", "100T"],
        "larger than this host's RAM",
    );
    assert_usage(&["run", "--kernel", k, "--memory", "12X"], "\"12X\"");
    assert_usage(&["run", "--kernel", k, "--memory", "1M"], "at least 16 MiB");
}

#[test]
fn bad_vcpu_counts() {
    let k = testguest().to_str().unwrap();
    assert_usage(&["run", "--kernel", k, "--vcpus", "0"], "--vcpus 0");
    assert_usage(
        &["run", "--kernel", k, "--vcpus", "255"],
        "between 1 and 254",
    );
    assert_usage(&["run", "--kernel", k, "--vcpus", "300"], "--vcpus 300");
}

#[test]
fn unknown_arguments_are_usage_errors() {
    let (code, _, err) = run_blimp(&["run", "--kernal", "x"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run_blimp(&["run", "--kernel", "x", "--memory-backend", "tmpfs"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown memory backend 'tmpfs'"), "{err}");
}

#[test]
fn no_permission_on_dev_kvm_is_a_runtime_error() {
    // Run as an unprivileged user, who cannot open root's /dev/kvm (mode 0600).
    let meta = std::fs::metadata("/dev/kvm").expect("/dev/kvm must exist for this test");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        meta.permissions().mode() & 0o006,
        0,
        "/dev/kvm is world-accessible here; this test needs it not to be"
    );
    let k = testguest();
    // A copy the unprivileged user can read.
    let copy = std::env::temp_dir().join(format!("blimp-testguest-{}.elf", std::process::id()));
    std::fs::copy(k, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(common::blimp())
        .args(["run", "--kernel", copy.to_str().unwrap(), "--no-stdin"])
        .output()
        .expect("setpriv (util-linux) is needed for this test");
    std::fs::remove_file(&copy).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/dev/kvm") && err.contains("Permission denied"),
        "{err}"
    );
}

#[test]
fn help_teaches() {
    let (code, out, _) = run_blimp(&["run", "--help"]);
    assert_eq!(code, 0);
    for needle in [
        "--kernel",
        "--memory",
        "512M",
        "--debug-exit",
        "0xf4",
        "--vcpus",
        "--memory-backend",
    ] {
        assert!(out.contains(needle), "run --help lacks {needle}");
    }
}

/// A file's bytes, to show it was not touched.
fn contents(p: &std::path::Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// `--memory-backend file=PATH` puts guest RAM in PATH: a run refused for
/// its kernel leaves PATH as it was, the kernel (or initrd) itself is
/// never taken as the backing, and a file longer than the RAM is not cut.
#[test]
fn a_ram_file_is_not_touched_by_a_refused_run_nor_taken_from_the_kernel() {
    let dir = std::env::temp_dir().join(format!("blimp-cli-ramfile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let data: Vec<u8> = (0..(80u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let ram = dir.join("disk.img");
    std::fs::write(&ram, &data).unwrap();
    let ram_arg = format!("file={}", ram.display());
    let text = dir.join("kpath");
    std::fs::write(&text, b"a text file, not a kernel").unwrap();
    assert_usage(
        &[
            "run",
            "--kernel",
            text.to_str().unwrap(),
            "--memory",
            "64M",
            "--memory-backend",
            &ram_arg,
            "--no-stdin",
        ],
        "no ELF magic and no bzImage header",
    );
    assert!(
        contents(&ram) == data,
        "a refused run left the RAM file as it was"
    );

    // The kernel (and an initrd) as the backing: refused, left whole.
    let kernel = dir.join("vmlinux");
    std::fs::copy(testguest(), &kernel).unwrap();
    let before = contents(&kernel);
    let k = kernel.to_str().unwrap();
    let as_backing = format!("file={k}");
    assert_usage(
        &[
            "run",
            "--kernel",
            k,
            "--memory",
            "64M",
            "--memory-backend",
            &as_backing,
            "--no-stdin",
        ],
        "is the --kernel file itself",
    );
    assert_usage(
        &[
            "run",
            "--kernel",
            k,
            "--initrd",
            text.to_str().unwrap(),
            "--memory",
            "64M",
            "--memory-backend",
            &format!("file={}", text.display()),
            "--no-stdin",
        ],
        "is the --initrd file itself",
    );
    assert!(contents(&kernel) == before, "the kernel is unchanged");

    // A file longer than the RAM: the guest runs on its first 64 MiB, and
    // the rest is still there afterwards.
    let (code, _, err) = run_blimp(&[
        "run",
        "--kernel",
        k,
        "--memory",
        "64M",
        "--memory-backend",
        &ram_arg,
        "--no-stdin",
        "--debug-exit",
        "--cmdline",
        "testguest.balloon=0 testguest.run=\"exit 7\"",
    ]);
    assert_eq!(code, 7, "{err}");
    let after = contents(&ram);
    assert_eq!(
        after.len(),
        data.len(),
        "the RAM file was not cut to 64 MiB"
    );
    assert!(
        after[64 << 20..] == data[64 << 20..],
        "bytes past the RAM are kept"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A request refused as invalid is a usage error (exit status 2), whether
/// the API refused it (400) or the client before sending it. `balloon
/// stats-interval 100000` (400) and `balloon policy set foo=1` exited 1.
#[test]
fn invalid_client_requests_are_usage_errors() {
    let (_vm, _api, sock) = common::boot_with_api(
        "cli-400",
        "sleep 60",
        &["--memory", "128M", "--balloon", "stats_interval=1"],
    );
    let s = sock.to_str().unwrap();
    let api = ["--api-sock", s];
    for (args, needle) in [
        (&["balloon", "stats-interval", "100000"][..], "100000"),
        (&["balloon", "policy", "set", "foo=1"], "foo"),
        (&["balloon", "policy", "set", "settle=abc"], "abc"),
        (&["balloon", "policy", "set", "enabled=maybe"], "maybe"),
        (&["balloon", "policy", "set", "floor"], "KEY=VALUE"),
        (
            &["balloon", "policy", "set", "floor=32M", "floor=48M"],
            "floor given twice (floor and floor)",
        ),
        (
            &["balloon", "policy", "set", "enabled=on", "enabled=off"],
            "enabled given twice",
        ),
        (&["balloon", "hint", "start"], "hint"),
    ] {
        let all: Vec<&str> = args.iter().chain(&api).copied().collect();
        assert_usage(&all, needle);
    }
}

/// `--log-level verbose` was taken (env_logger ignored it, and with it the
/// warnings); a level outside the five is a usage error naming them.
#[test]
fn log_level_is_one_of_five() {
    for bad in ["verbose", "blimp=debug", "warning", ""] {
        let (code, _, err) = run_blimp(&["--log-level", bad, "vm", "info", "--api-sock", "/x"]);
        assert_eq!(code, 2, "--log-level {bad:?}: {err}");
        assert!(
            (bad.is_empty() || err.contains(&format!("'{bad}'")))
                && err.contains("--log-level")
                && err.contains("error, warn, info, debug, trace"),
            "--log-level {bad:?}: {err}"
        );
    }
    for good in ["debug", "ERROR"] {
        let (code, _, err) = run_blimp(&["vm", "info", "--api-sock", "/x", "--log-level", good]);
        assert_eq!(
            code, 1,
            "--log-level {good}: only the socket is missing: {err}"
        );
        assert!(err.contains("cannot connect to /x"), "{err}");
    }
}

/// `blimp metrics --json` printed Prometheus text: the flag was taken and
/// ignored. /metrics has no JSON form; the flag is refused.
#[test]
fn metrics_has_no_json() {
    let (code, _, err) = run_blimp(&["metrics", "--api-sock", "/x", "--json"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("'--json'"), "{err}");
    let (code, out, _) = run_blimp(&["metrics", "--help"]);
    assert_eq!(code, 0);
    assert!(
        !out.contains("--json") && out.contains("no JSON form"),
        "{out}"
    );
}

/// `blimp events | head -1`, `blimp balloon stats | head -1`: a client
/// command whose stdout its reader closed panicked ("failed printing to
/// stdout: Broken pipe", exit status 101). It ends quietly, status 0.
#[test]
fn client_commands_end_quietly_on_a_closed_stdout() {
    let (mut vm, _api, sock) = common::boot_with_api(
        "cli-epipe",
        "sleep 60",
        &[
            "--memory",
            "256M",
            "--balloon",
            "stats_interval=1,free_page_hint",
            "--balloon-policy",
            "enabled=off",
        ],
    );
    // `balloon hint start` needs the driver's features: wait for them (the
    // commands before it can all end at their first write, in milliseconds).
    vm.expect_line("balloon started", std::time::Duration::from_secs(30));
    let s = sock.to_str().unwrap();
    let snap = std::env::temp_dir().join(format!("blimp-cli-epipe-{}.snap", std::process::id()));
    // (command, whether to run it with --json too): a state change once
    // (its --json form prints nothing).
    let commands: [(&[&str], bool); 13] = [
        (&["events", "--count", "2"], true),
        (&["balloon", "get"], true),
        (&["balloon", "stats"], true),
        (&["balloon", "policy"], true),
        (&["balloon", "stats-interval", "1"], false),
        (&["balloon", "set", "0"], true),
        (&["balloon", "hint", "start"], false),
        (&["balloon", "hint", "status"], true),
        (&["vm", "info"], true),
        (&["vm", "pause"], false),
        (&["vm", "resume"], false),
        (&["metrics"], false),
        (&["snapshot", snap.to_str().unwrap()], true),
    ];
    for (args, json_too) in commands {
        for json in [false, true] {
            if json && !json_too {
                continue;
            }
            let (reader, writer) = std::io::pipe().unwrap();
            drop(reader);
            let out = std::process::Command::new(common::blimp())
                .args(args)
                .args(["--api-sock", s])
                .args(json.then_some("--json"))
                .stdout(writer)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && err.is_empty(),
                "{args:?} json {json}: {:?}: {err}",
                out.status
            );
        }
    }
    assert!(snap.exists(), "the snapshot was written");
    std::fs::remove_file(&snap).unwrap();

    // `blimp events` on a VM where nothing happens, its reader gone: it
    // has nothing to write, so no EPIPE tells it; it ends anyway.
    let quiet = common::sock_path("cli-epipe-quiet");
    let (_q, _qapi, _) = common::start_with_sock(
        "cli-epipe-quiet",
        &[
            "--memory",
            "128M",
            "--no-stdin",
            "--kernel",
            common::testguest().to_str().unwrap(),
        ],
    );
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = std::process::Command::new(common::blimp())
        .args(["events", "--api-sock", quiet.to_str().unwrap()])
        .stdout(writer)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("blimp events kept waiting with its reader gone");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

/// `blimp events` ended with "API request failed: error reading a body
/// from connection" and status 1 when the VM shut down normally: after a
/// ShuttingDown event, the stream ending (cut short as the VMM exits) is
/// its normal end, status 0.
#[test]
fn events_end_quietly_when_the_vm_shuts_down() {
    let (mut vm, api, sock) = common::boot_with_api(
        "cli-events-end",
        "sleep 120",
        &["--memory", "128M", "--balloon", "stats_interval=1"],
    );
    let mut child = std::process::Command::new(common::blimp())
        .args(["events", "--api-sock", sock.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // An event (statistics come every second) shows the reader subscribed.
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let first = lines.next().expect("an event").unwrap();
    assert!(!first.is_empty());
    let (s, b) = api.put("/vm/shutdown", &serde_json::json!({})).unwrap();
    assert_eq!(s, 204, "{b}");
    assert_eq!(vm.wait(std::time::Duration::from_secs(30)).code(), Some(0));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        rest.iter().any(|l| l.contains("ShuttingDown")),
        "no ShuttingDown event: {rest:?}"
    );
    assert!(status.success() && err.is_empty(), "{status:?}: {err}");
}

/// `--api-sock` naming a directory or a regular file was reported as
/// "connection refused (nobody listens; stale socket file?)"; a server
/// socket in /proc as a bare "No such file or directory". Each says what
/// the path is, or what failed.
#[test]
fn api_socket_paths_that_cannot_be_sockets() {
    let file = std::env::temp_dir().join(format!("blimp-cli-regular-{}", std::process::id()));
    std::fs::write(&file, b"").unwrap();
    let f = file.to_str().unwrap();
    for (path, kind) in [("/tmp", "a directory"), (f, "a regular file")] {
        let (code, _, err) = run_blimp(&["vm", "info", "--api-sock", path]);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(&format!("{path}: it is {kind}, not a socket")),
            "{err}"
        );
    }
    std::fs::remove_file(&file).unwrap();
    common::require_kvm();
    let k = testguest().to_str().unwrap();
    let (code, _, err) = run_blimp(&["run", "--kernel", k, "--api-sock", "/proc/x.sock"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("API socket /proc/x.sock: cannot create /proc/.b")
            && err.contains("private directory")
            && err.contains("No such file or directory"),
        "{err}"
    );
}

/// Arguments that cannot work together or cannot name a socket are usage
/// errors (2), as README's exit statuses say: `--memory-thp` with the
/// hugetlb backing, and an `--api-sock` too long for a socket address or
/// naming something that is not a socket exited 1, as runtime errors.
/// `blimp restore` and `run --incoming` take them alike.
#[test]
fn host_option_errors_are_usage_errors() {
    let k = testguest().to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut all = vec!["run", "--kernel", k, "--no-stdin", "--memory", "64M"];
        all.extend_from_slice(extra);
        all.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let file = std::env::temp_dir().join(format!("blimp-cli-apisock-{}", std::process::id()));
    std::fs::write(&file, b"").unwrap();
    let f = file.to_str().unwrap().to_string();
    // 108 bytes: no socket address holds it; 107: the private bind path
    // next to it (DIR/.bPID.0/s) does not fit, whatever the PID.
    let too_long = format!("/tmp/{}", "x".repeat(103));
    let long_dir = std::path::PathBuf::from("/tmp").join("e".repeat(100));
    std::fs::create_dir_all(&long_dir).unwrap();
    let bind_too_long = long_dir.join("s").to_str().unwrap().to_string();
    assert_eq!((too_long.len(), bind_too_long.len()), (108, 107));
    let missing_dir = format!("/tmp/blimp-cli-no-such-dir-{}/a.sock", std::process::id());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            run(&["--memory-backend", "hugetlb", "--memory-thp"]),
            "--memory-thp does not apply to the hugetlb backing",
        ),
        (
            run(&["--api-sock", &too_long]),
            "longer than a unix socket path",
        ),
        (run(&["--api-sock", &bind_too_long]), "may be at most"),
        (run(&["--api-sock", &f]), "exists and is not a socket"),
        (run(&["--api-sock", &missing_dir]), "blimp-cli-no-such-dir"),
        (
            ["restore", "--from", "/nonexistent", "--api-sock", &f]
                .map(String::from)
                .to_vec(),
            "exists and is not a socket",
        ),
        (
            [
                "restore",
                "--from",
                "/nonexistent",
                "--memory-backend",
                "hugetlb",
                "--memory-thp",
            ]
            .map(String::from)
            .to_vec(),
            "--memory-thp does not apply",
        ),
        (
            [
                "run",
                "--incoming",
                "unix:///tmp/blimp-cli-never.sock",
                "--api-sock",
                &too_long,
            ]
            .map(String::from)
            .to_vec(),
            "longer than a unix socket path",
        ),
    ];
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_usage(&args, needle);
    }
    std::fs::remove_file(&file).unwrap();
    let _ = std::fs::remove_dir_all(&long_dir);
}

/// `--memory 16M` with the test guest (loaded at 16 MiB) was reported as
/// "neither an ELF vmlinux nor a bzImage: ... Unable to read kernel
/// image"; it says the kernel does not fit, where it loads, and the RAM
/// that needs. 17M boots.
#[test]
fn a_kernel_beyond_guest_ram_is_named() {
    let k = testguest().to_str().unwrap();
    let args = |m| {
        [
            "run",
            "--kernel",
            k,
            "--memory",
            m,
            "--no-stdin",
            "--debug-exit",
            "--cmdline",
            "testguest.run=\"exit 7\"",
        ]
    };
    let (code, _, err) = run_blimp(&args("16M"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "kernel {k} does not fit in guest RAM: it loads at 0x1000000.."
        )) && err.contains("needs --memory of at least 17 MiB; --memory is 16 MiB"),
        "{err}"
    );
    common::require_kvm();
    let (code, _, err) = run_blimp(&args("17M"));
    assert_eq!(code, 7, "{err}");
}

/// An API socket path of 88-107 bytes, which a socket address holds, was
/// refused ("path must be shorter than SUN_LEN"): blimp bound it first
/// as PARENT/.blimp-api-PID-N/s, 20-odd bytes longer. The private name is
/// now short; a path that fits but whose private bind path does not is
/// refused with the limit for the user's path.
#[test]
fn long_api_socket_paths() {
    let base = std::env::temp_dir().join(format!("blimp-cli-long-{}", std::process::id()));
    // A directory whose name pads the socket path to `len` bytes.
    let path_of = |len: usize, file: &str| {
        let prefix = base.to_str().unwrap().len() + 1;
        let dir = base.join("d".repeat(len - prefix - 1 - file.len()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(file)
    };
    let sock = path_of(100, "api.sock");
    assert_eq!(sock.to_str().unwrap().len(), 100);
    let s = sock.to_str().unwrap();
    let mut vm = common::Vm::start(&[
        "--api-sock",
        s,
        "--debug-exit",
        "--cmdline",
        "testguest.run=\"sleep 30\"",
    ]);
    common::wait_for_socket(&sock);
    let (code, out, err) = run_blimp(&["vm", "info", "--api-sock", s]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("state:   Running"), "{out}");
    drop(vm.child.kill());
    vm.wait(std::time::Duration::from_secs(10));
    // 107 bytes fit a socket address, but not with the private directory:
    // a path that cannot be a socket, a usage error.
    let sock = path_of(107, "s");
    let k = testguest().to_str().unwrap();
    let (code, _, err) = run_blimp(&["run", "--kernel", k, "--api-sock", sock.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is 107 bytes: blimp binds it first as")
            && err.contains(
                "a unix socket path may be 107 bytes: here the API socket path may be at most"
            ),
        "{err}"
    );
    std::fs::remove_dir_all(&base).unwrap();
}

/// blimp's exit status with stderr `err` (and RUST_BACKTRACE unset, so that
/// a panic shows as 101, not as the SIGSYS of docs/seccomp.md).
fn status_with_stderr(args: &[&str], err: std::process::Stdio) -> std::process::ExitStatus {
    std::process::Command::new(common::blimp())
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .status()
        .expect("running blimp")
}

/// An error message that stderr cannot take (a full disk, a closed pipe,
/// a hung-up terminal) is lost; blimp still exits with the error's status
/// (it panicked in eprintln!: 101).
#[test]
fn an_unwritable_stderr_keeps_the_exit_status() {
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let st = status_with_stderr(&["run", "--kernel", "/nonexistent"], full().into());
    assert_eq!(st.code(), Some(2), "usage error, stderr /dev/full: {st:?}");
    let st = status_with_stderr(
        &["vm", "info", "--api-sock", "/nonexistent/blimp.sock"],
        full().into(),
    );
    assert_eq!(st.code(), Some(1), "client error, stderr /dev/full: {st:?}");
    // A pipe whose reader is gone: EPIPE (SIGPIPE is ignored by Rust).
    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two fresh fds into `fds`, a local array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds are ours from pipe(2); each OwnedFd closes its one.
    let (r, w) = unsafe {
        use std::os::fd::{FromRawFd, OwnedFd};
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    drop(r);
    let st = status_with_stderr(
        &["vm", "info", "--api-sock", "/nonexistent/blimp.sock"],
        w.into(),
    );
    assert_eq!(
        st.code(),
        Some(1),
        "client error, stderr a closed pipe: {st:?}"
    );
}
