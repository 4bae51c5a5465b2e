//! A new user's first hour, driven from README.md itself: its first command
//! (parsed out of the README, so the two cannot drift; only the /tmp socket
//! paths are made unique), its curl and `blimp balloon` examples with the
//! guest's memory seen to change, and its live-migration example exactly
//! as written, in a job-control shell on a terminal. Also: `balloon set
//! --wait` against a guest that never starts its balloon driver says so.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use api::client::ApiClient;
use common::pty::{Pty, same_termios, wait_exit};
use common::{repo_root, wait_balloon, wait_for_socket};

const BOOT: Duration = Duration::from_secs(30);

/// The lines of the `n`-th ```sh block of the README section `heading`.
fn sh_block(readme: &str, heading: &str, n: usize) -> Vec<String> {
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no section '{heading}'"));
    let section = &readme[start + heading.len() + 2..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let block = section
        .split("```sh\n")
        .nth(n + 1)
        .unwrap_or_else(|| panic!("README section '{heading}' has no sh block {n}"));
    let block = &block[..block.find("```").expect("unterminated block")];
    block.lines().map(str::to_string).collect()
}

/// The README's /tmp paths, made unique to this run (the README text is
/// otherwise taken verbatim).
struct Paths {
    dir: PathBuf,
}

impl Paths {
    fn new() -> Paths {
        let dir = std::env::temp_dir().join(format!("blimp-readme-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Paths { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `line` with each `/tmp/NAME.sock` replaced; every replaced name must
    /// be in the line.
    fn subst(&self, line: &str, names: &[&str]) -> String {
        let mut out = line.to_string();
        for n in names {
            let from = format!("/tmp/{n}");
            assert!(out.contains(&from), "README line lost {from}: {line}");
            out = out.replace(&from, self.path(n).to_str().unwrap());
        }
        assert!(
            !out.replace(self.dir.to_str().unwrap(), "")
                .contains("/tmp/"),
            "a /tmp path of the README is not made unique: {out}"
        );
        out
    }
}

impl Drop for Paths {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs one README line with bash in the repository root (as a user in a
/// second terminal would); returns its stdout, failing on a non-zero exit.
fn run_line(line: &str) -> String {
    let out = Command::new("timeout")
        .args(["120", "bash", "-c", line])
        .current_dir(repo_root())
        .output()
        .expect("running bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "README line failed ({:?}): {line}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Types `meminfo` on the guest's console; returns its free MiB and where
/// the screen ends after the answer.
fn guest_free_mib(pty: &Pty, at: usize) -> (u64, usize) {
    pty.type_bytes(b"meminfo\r");
    let end = pty.wait_for(at, " MiB\r\n", BOOT);
    let screen = pty.screen();
    let line = screen[at..end]
        .lines()
        .find(|l| l.starts_with("meminfo ram"))
        .unwrap_or_else(|| panic!("no meminfo line: {}", &screen[at..end]));
    let free = line
        .split_whitespace()
        .skip_while(|w| *w != "free")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("meminfo line without free MiB: {line}"));
    (free, end)
}

#[test]
fn the_readme_first_steps_work_as_written() {
    common::require_kvm();
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let first = sh_block(&readme, "## The two commands", 0)
        .into_iter()
        .find(|l| l.starts_with("cargo build"))
        .expect("the README's first command");
    assert!(first.contains("target/release/blimp run"), "{first}");
    let examples: Vec<String> = sh_block(&readme, "## The two commands", 1)
        .into_iter()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert!(examples.len() >= 4, "README examples: {examples:?}");
    let migration = sh_block(&readme, "## Migration", 0);
    let live_at = migration
        .iter()
        .position(|l| l.starts_with("# live"))
        .expect("README's live-migration example");
    let live: Vec<String> = migration[live_at + 1..]
        .iter()
        .take_while(|l| !l.starts_with('#'))
        .cloned()
        .collect();
    assert!(live.len() >= 2 && live[0].ends_with('&'), "{live:?}");

    let paths = Paths::new();
    let sock = paths.path("blimp.sock");

    // The first command, on a terminal (it is interactive).
    let pty = Pty::new();
    let orig = pty.termios();
    let mut shell = pty.spawn(
        Command::new("bash")
            .args(["-c", &paths.subst(&first, &["blimp.sock"])])
            .env_remove(common::TIMED_RUNNER_ONLY)
            .current_dir(repo_root()),
    );
    // `cargo build` is quick when the test binary's build already made blimp.
    let at = pty.wait_for(0, "blimp-testguest 0.1 ready", Duration::from_secs(900));
    let at = pty.wait_for(at, "balloon started", BOOT);
    let at = pty.wait_for(at, "testguest> ", BOOT);
    wait_for_socket(&sock);
    let mut api = ApiClient::new(&sock).unwrap();
    let (free0, at) = guest_free_mib(&pty, at);
    eprintln!("guest free memory at boot: {free0} MiB");

    // The examples, in order, from "another terminal".
    let mut at = at;
    let mut outputs = Vec::new();
    for line in &examples {
        let out = run_line(&paths.subst(line, &["blimp.sock"]));
        eprintln!("$ {line}\n{out}");
        if line.contains("-X PATCH") {
            let mib = line
                .split("\"target_mib\":")
                .nth(1)
                .and_then(|v| v.trim_end_matches(['}', '\'']).parse::<u64>().ok())
                .expect("the PATCH example's target_mib");
            wait_balloon(&mut api, mib, Duration::from_secs(60));
            let (free, end) = guest_free_mib(&pty, at);
            at = end;
            eprintln!("guest free memory with a {mib} MiB balloon: {free} MiB");
            let lost = free0 as i64 - free as i64;
            assert!(
                (lost - mib as i64).abs() <= 2,
                "the guest lost {lost} MiB for a {mib} MiB balloon"
            );
        }
        outputs.push((line.clone(), out));
    }
    let get = &outputs
        .iter()
        .find(|(l, _)| l.starts_with("curl") && !l.contains("-X"))
        .expect("the README's GET example")
        .1;
    let body: serde_json::Value = serde_json::from_str(get).expect("GET /balloon is JSON");
    assert_eq!(body["target_mib"], 256, "{body}");
    assert_eq!(body["driver_ok"], true, "{body}");
    let set = outputs
        .iter()
        .find(|(l, _)| l.contains("balloon set"))
        .expect("the README's `blimp balloon set` example");
    let want: u64 = set
        .0
        .split_whitespace()
        .skip_while(|w| *w != "set")
        .nth(1)
        .and_then(|s| s.trim_end_matches('M').parse().ok())
        .expect("balloon set SIZE in MiB");
    assert!(
        set.1.contains(&format!("balloon is at {want} MiB")),
        "{}",
        set.1
    );
    let (free, at) = guest_free_mib(&pty, at);
    eprintln!("guest free memory with a {want} MiB balloon: {free} MiB");
    let lost = free0 as i64 - free as i64;
    assert!(
        (lost - want as i64).abs() <= 2,
        "the guest lost {lost} MiB for a {want} MiB balloon"
    );

    // The live-migration example, as written, in a job-control shell on a
    // second terminal: the backgrounded destination must not be stopped.
    let names = ["blimp.sock", "mig.sock", "dst.sock"];
    let mut script = String::from("set -m -e\n");
    for l in &live {
        let present: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| l.contains(&format!("/tmp/{n}")))
            .collect();
        script.push_str(&paths.subst(l, &present));
        script.push('\n');
    }
    script.push_str("echo \"readme-live-status=$?\"\n");
    let pty2 = Pty::new();
    let orig2 = pty2.termios();
    let mut shell2 = pty2.spawn(
        Command::new("timeout")
            .args(["300", "bash", "-c", &script])
            .current_dir(repo_root()),
    );
    let st = wait_exit(&mut shell2, Duration::from_secs(320));
    let screen2 = pty2.screen();
    eprintln!("live-migration example:\n{screen2}");
    assert!(st.success(), "{st:?}\n{screen2}");
    assert!(screen2.contains("readme-live-status=0"), "{screen2}");
    assert!(screen2.contains("state:   Running"), "{screen2}");
    assert!(same_termios(&orig2, &pty2.termios()));
    // The source's VM went away (status 0 after the hand-over), and its
    // terminal is back as it was.
    let at = pty.wait_for(at, "migrated", Duration::from_secs(60));
    let st = wait_exit(&mut shell, Duration::from_secs(60));
    assert_eq!(st.code(), Some(0), "{st:?}\n{}", &pty.screen()[at..]);
    assert!(same_termios(&orig, &pty.termios()));
    // The guest runs at the destination, balloon and all.
    let dst = paths.path("dst.sock");
    let mut dapi = ApiClient::new(&dst).unwrap();
    let (s, vm) = dapi.get("/vm").unwrap();
    assert_eq!((s, vm["state"].as_str()), (200, Some("Running")), "{vm}");
    wait_balloon(&mut dapi, want, BOOT);
    common::set_target(&mut dapi, 64);
    wait_balloon(&mut dapi, 64, Duration::from_secs(60));
    let (s, b) = dapi.put("/vm/shutdown", &serde_json::json!({})).unwrap();
    assert!(s == 204 || s == 200, "{s} {b}");
    wait_gone(&dst);
}

/// Waits until a blimp's API socket is gone (it removes it on exit).
fn wait_gone(sock: &Path) {
    let deadline = Instant::now() + BOOT;
    while sock.exists() {
        assert!(Instant::now() < deadline, "{} still there", sock.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `blimp balloon set --wait` on a guest whose balloon driver never starts
/// (the test guest with `testguest.balloon=0`) names the missing DRIVER_OK
/// instead of a bare timeout; once the driver starts, the same command
/// succeeds.
#[test]
fn balloon_set_wait_says_when_the_driver_never_started() {
    let (mut vm, api, sock) = common::boot_with_api_manual_balloon(
        "no-driver",
        "echo READY",
        &["--memory", "512M", "--balloon", "stats_interval=1"],
    );
    vm.expect_line("READY", BOOT);
    assert!(
        !vm.transcript.iter().any(|l| l.contains("balloon started")),
        "testguest.balloon=0 must keep the driver from starting: {:?}",
        vm.transcript
    );
    let (s, b) = api.get("/balloon").unwrap();
    assert_eq!(s, 200);
    assert_eq!(b["driver_ok"], false, "{b}");
    let s = sock.to_str().unwrap();
    let t = Instant::now();
    let (code, _, stderr) = common::run_blimp(&[
        "balloon",
        "set",
        "128M",
        "--wait",
        "--timeout",
        "3",
        "--api-sock",
        s,
    ]);
    let took = t.elapsed();
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("the guest has not started its balloon driver (DRIVER_OK not set)"),
        "{stderr}"
    );
    assert!(stderr.contains("testguest.balloon=0"), "{stderr}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(20),
        "{took:?}"
    );
    let (code, out, _) = common::run_blimp(&["balloon", "get", "--api-sock", s]);
    assert_eq!(code, 0);
    assert!(out.contains("not started (DRIVER_OK not set)"), "{out}");

    // The driver starts: the target set before is followed.
    vm.send("balloon");
    vm.expect_line("balloon started", BOOT);
    let (code, out, stderr) = common::run_blimp(&[
        "balloon",
        "set",
        "128M",
        "--wait",
        "--timeout",
        "60",
        "--api-sock",
        s,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("balloon is at 128 MiB"), "{out}");
    let (_, b) = api.get("/balloon").unwrap();
    assert_eq!(b["driver_ok"], true, "{b}");
    assert_eq!(b["actual_mib"], 128, "{b}");
    vm.send("exit 0");
    assert_eq!(vm.wait(BOOT).code(), Some(0));
}
