//! The serial console on a real terminal (a pty): the escape key, the
//! terminal put back exactly as it was on every exit path, job control (a
//! background blimp leaves the terminal alone), and a restored console that
//! shows its prompt again.

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use common::pty::{Pty, same_termios, wait_exit};
use common::{blimp, sock_path, testguest, wait_for_socket};

const BOOT: Duration = Duration::from_secs(30);
const HINT: &str = "Ctrl-A x quits";
const BANNER: &str = "blimp-testguest 0.1 ready";

fn blimp_run(args: &[&str]) -> Command {
    common::require_kvm();
    let mut c = Command::new(blimp());
    c.arg("run")
        .args(["--kernel", testguest().to_str().unwrap()])
        .args(args);
    c
}

/// The terminal is raw while blimp owns it (no line editing, no echo, no
/// signal keys), with its other settings kept.
fn assert_raw(pty: &Pty, orig: &libc::termios) {
    let now = pty.termios();
    let raw = libc::ICANON | libc::ECHO | libc::ISIG;
    assert_eq!(
        now.c_lflag & raw,
        0,
        "blimp did not put the terminal in raw mode"
    );
    assert_eq!(now.c_lflag | raw, orig.c_lflag | raw);
}

/// Wait for blimp on `pty` to exit with `code`; the terminal must then be
/// exactly as it was (`orig`). `after` names the exit path for messages.
fn assert_exits_restored(
    pty: &Pty,
    orig: &libc::termios,
    child: &mut Child,
    code: i32,
    after: &str,
) {
    let st = wait_exit(child, BOOT);
    assert_eq!(st.code(), Some(code), "{after}: {st:?}\n{}", pty.screen());
    assert!(
        same_termios(orig, &pty.termios()),
        "the terminal was not restored after {after}"
    );
}

#[test]
fn ctrl_a_x_quits_and_the_terminal_is_restored() {
    let pty = Pty::new();
    let orig = pty.termios();
    assert_ne!(orig.c_lflag & libc::ICANON, 0, "a fresh pty is canonical");
    let mut child = pty.spawn(&mut blimp_run(&["--memory", "256M"]));
    // The hint comes once, before the guest's first line.
    let at = pty.wait_for(0, HINT, BOOT);
    let at = pty.wait_for(at, BANNER, BOOT);
    let at = pty.wait_for(at, "testguest> ", BOOT);
    assert_raw(&pty, &orig);
    assert_eq!(pty.screen().matches(HINT).count(), 1, "{}", pty.screen());
    // Keystrokes reach the guest; Ctrl-A Ctrl-A is one Ctrl-A, which the
    // guest's line editor ignores, so the line stays intact.
    pty.type_bytes(b"echo on-the-\x01\x01pty\r");
    let at = pty.wait_for(at, "\non-the-pty", BOOT);
    pty.wait_for(at, "testguest> ", BOOT);
    pty.type_bytes(b"\x01x");
    assert_exits_restored(&pty, &orig, &mut child, 0, "Ctrl-A x");
}

#[test]
fn the_terminal_is_restored_on_debug_exit_and_on_a_signal() {
    // The guest ends the VM through the debug-exit port.
    let pty = Pty::new();
    let orig = pty.termios();
    let mut child = pty.spawn(&mut blimp_run(&[
        "--memory",
        "256M",
        "--debug-exit",
        "--cmdline",
        "testguest.run=\"echo running;sleep 1;exit 7\"",
    ]));
    pty.wait_for(0, "running", BOOT);
    assert_raw(&pty, &orig);
    assert_exits_restored(&pty, &orig, &mut child, 7, "a debug-exit");

    // SIGTERM: a clean shutdown with status 128 + 15.
    let pty = Pty::new();
    let orig = pty.termios();
    let mut child = pty.spawn(&mut blimp_run(&["--memory", "256M"]));
    pty.wait_for(0, "testguest> ", BOOT);
    assert_raw(&pty, &orig);
    // SAFETY: a signal to our own child, which has not been reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_exits_restored(&pty, &orig, &mut child, 128 + 15, "SIGTERM");

    // A usage error never touches the terminal.
    let pty = Pty::new();
    let orig = pty.termios();
    let mut child = pty.spawn(&mut blimp_run(&["--memory", "1.5.5G"]));
    assert_exits_restored(&pty, &orig, &mut child, 2, "a usage error");
}

/// A blimp started with `&` from a job-control shell is not the terminal's
/// foreground job: it must neither read the terminal nor change its mode
/// (either would stop it with SIGTTIN/SIGTTOU, and its API with it), even
/// without `--no-stdin`.
#[test]
fn a_background_blimp_leaves_the_terminal_alone() {
    let sock = sock_path("console-bg");
    let _ = std::fs::remove_file(&sock);
    let script = format!(
        "set -m\n\
         {blimp} run --kernel {tg} --memory 256M --api-sock {sock} &\n\
         for i in $(seq 300); do [ -S {sock} ] && break; sleep 0.1; done\n\
         sleep 1\n\
         echo typed-while-in-background\n\
         timeout 20 {blimp} vm info --api-sock {sock}; echo \"info-status=$?\"\n\
         timeout 20 {blimp} vm shutdown --api-sock {sock}; wait %1; echo \"blimp-status=$?\"\n",
        blimp = blimp().display(),
        tg = testguest().display(),
        sock = sock.display(),
    );
    let pty = Pty::new();
    let orig = pty.termios();
    let mut bash = pty.spawn(Command::new("bash").args(["-c", &script]));
    // Keystrokes while it runs stay in the terminal's queue, unread.
    pty.wait_for(0, BANNER, BOOT);
    pty.type_bytes(b"keys\n");
    let at = pty.wait_for(0, "info-status=", Duration::from_secs(60));
    assert!(
        same_termios(&orig, &pty.termios()),
        "a background blimp changed the terminal's mode"
    );
    pty.wait_for(at, "blimp-status=", Duration::from_secs(60));
    let st = wait_exit(&mut bash, BOOT);
    let screen = pty.screen();
    assert!(st.success(), "{st:?}\n{screen}");
    assert!(
        screen.contains("info-status=0"),
        "vm info hung or failed:\n{screen}"
    );
    assert!(
        screen.contains("state:") || screen.contains("Running"),
        "{screen}"
    );
    assert!(screen.contains("blimp-status=0"), "{screen}");
    assert!(
        !screen.contains(HINT),
        "no escape-key hint without a terminal:\n{screen}"
    );
    assert!(same_termios(&orig, &pty.termios()));
}

/// After `blimp restore` on a terminal the guest prints its prompt again
/// (blimp sends it one newline), so the user sees where they are.
#[test]
fn a_restored_console_shows_its_prompt() {
    let file = std::env::temp_dir().join(format!("blimp-console-restore-{}", std::process::id()));
    let (mut vm, api, _) = common::boot_with_api(
        "console-src",
        "fill 16 3;echo MIGRATE NOW",
        &["--memory", "256M"],
    );
    vm.expect_line("MIGRATE NOW", BOOT);
    let st = common::migrate(
        &api,
        &serde_json::json!({"destination": format!("file://{}", file.display())}),
        Duration::from_secs(120),
    );
    assert_eq!(st["state"], "Completed", "{st}");
    vm.wait(BOOT);

    let pty = Pty::new();
    let orig = pty.termios();
    let sock = sock_path("console-restored");
    let mut child = pty.spawn(Command::new(blimp()).args([
        "restore",
        "--from",
        file.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]));
    let at = pty.wait_for(0, HINT, BOOT);
    // Nothing typed: the prompt comes from the newline blimp sends.
    let at = pty.wait_for(at, "testguest> ", BOOT);
    wait_for_socket(&sock);
    pty.type_bytes(b"verify\r");
    pty.wait_for(at, "verify ok 4096 pages", BOOT);
    pty.type_bytes(b"\x01x");
    assert_exits_restored(&pty, &orig, &mut child, 0, "Ctrl-A x on a restored VM");
    let _ = std::fs::remove_file(&file);
}

/// A console nobody reads (blimp's stdout a pipe left full) does not keep
/// the VM from stopping: the vCPU's blocked write is given up when the VMM
/// kicks it, and SIGTERM ends blimp as it does otherwise.
#[test]
fn a_console_nobody_reads_does_not_keep_blimp_from_stopping() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::process::Stdio;
    let log = std::env::temp_dir().join(format!("blimp-unread-{}.log", std::process::id()));
    let mut child = blimp_run(&["--memory", "256M"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting blimp");
    let mut input = child.stdin.take().unwrap();
    // Kept open and never read.
    let out = child.stdout.take().unwrap();
    // Far more than the pipe holds (64 KiB): `help` prints its list.
    for _ in 0..1000 {
        writeln!(input, "help").unwrap();
    }
    let queued = || {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD on our end of the pipe into a local int.
        let rc = unsafe { libc::ioctl(out.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
        n
    };
    let t = std::time::Instant::now();
    while queued() < 60 << 10 {
        assert!(t.elapsed() < BOOT, "the console wrote {} bytes", queued());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The guest is now blocked on its console.
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let st = wait_exit(&mut child, Duration::from_secs(10));
    assert!(st.code().is_some(), "blimp did not exit by itself: {st:?}");
    drop(out);
    let said = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    assert!(
        said.contains("the console's output (stdout) has taken nothing for 1 s"),
        "{said}"
    );
}

/// Closing the terminal blimp runs on (the window closes, the ssh session
/// drops) is a clean SIGHUP shutdown: exit 128 + 1, API socket removed. The
/// terminal settings cannot be put back on a hung-up terminal (EIO), and
/// saying so on that terminal failed too and panicked (exit 101).
#[test]
fn a_hung_up_terminal_is_a_clean_sighup_exit() {
    let sock = sock_path("console-hangup");
    let _ = std::fs::remove_file(&sock);
    let pty = Pty::new();
    let orig = pty.termios();
    let mut child = pty.spawn(
        blimp_run(&["--memory", "256M", "--api-sock", sock.to_str().unwrap()])
            .env_remove("RUST_BACKTRACE"),
    );
    pty.wait_for(0, "testguest> ", BOOT);
    wait_for_socket(&sock);
    assert_raw(&pty, &orig);
    pty.hang_up();
    let st = wait_exit(&mut child, BOOT);
    assert_eq!(st.code(), Some(128 + libc::SIGHUP), "{st:?}");
    assert!(!sock.exists(), "the API socket was left behind");
}

/// Stopped from another terminal (SIGSTOP; SIGTSTP alike) while its shell
/// puts its own terminal settings back, then continued (`fg`: SIGCONT),
/// blimp makes the terminal raw again, so that Ctrl-C and the escape key
/// reach it and the guest; it stayed cooked, and a Ctrl-C typed for the
/// guest stopped the VM. At exit the settings found at SIGCONT come back.
#[test]
fn the_terminal_is_raw_again_after_a_stop_and_fg() {
    let pty = Pty::new();
    let orig = pty.termios();
    let mut child = pty.spawn(&mut blimp_run(&["--memory", "256M"]));
    let at = pty.wait_for(0, "testguest> ", BOOT);
    assert_raw(&pty, &orig);
    let pid = child.id() as i32;
    // SAFETY: kill(2) of our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stat = format!("/proc/{pid}/stat");
    let stopped = || {
        let s = std::fs::read_to_string(&stat).unwrap();
        s.rsplit(") ").next().is_some_and(|r| r.starts_with('T'))
    };
    let t = std::time::Instant::now();
    while !stopped() {
        assert!(t.elapsed() < BOOT, "blimp did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
    pty.set_termios(&orig);
    // SAFETY: kill(2) of our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let t = std::time::Instant::now();
    while pty.termios().c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG) != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the terminal is not raw again after SIGCONT"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_raw(&pty, &orig);
    // Ctrl-C is a byte for the guest, not SIGINT for blimp.
    pty.type_bytes(b"\x03echo after-fg\r");
    pty.wait_for(at, "\nafter-fg", BOOT);
    pty.type_bytes(b"\x01x");
    assert_exits_restored(&pty, &orig, &mut child, 0, "Ctrl-A x after a stop and fg");
}

/// Guest console output that stdout cannot take (a full disk, a pipe
/// without reader) is dropped with one warning naming the error, and the
/// VM runs on; it was dropped without a word.
#[test]
fn a_failing_stdout_is_reported_once() {
    let log = std::env::temp_dir().join(format!("blimp-full-stdout-{}.log", std::process::id()));
    let st = blimp_run(&[
        "--memory",
        "256M",
        "--no-stdin",
        "--debug-exit",
        "--cmdline",
        "testguest.run=\"help;help;exit 4\"",
    ])
    .stdout(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap(),
    )
    .stderr(std::fs::File::create(&log).unwrap())
    .status()
    .expect("running blimp");
    let said = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    assert_eq!(st.code(), Some(4), "{st:?}\n{said}");
    let warning = "the console's output (stdout): No space left on device";
    assert_eq!(said.matches(warning).count(), 1, "{said}");
}
