//! Shared helpers for tests that boot guests: building the test guest,
//! running `blimp` with its serial output captured line by line.
#![allow(dead_code)]

pub mod linux;
pub mod pty;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The `blimp` binary under test: this build's, or the one named by
/// `BLIMP_UNDER_TEST` (how `.ci/bench-compare` runs the benchmarks against
/// another commit's build with this tree's harness and test guest).
pub fn blimp() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| match std::env::var_os("BLIMP_UNDER_TEST") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_blimp")),
    })
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Tests that boot guests need /dev/kvm: fail loudly without it, never pass silently.
pub fn require_kvm() {
    let kvm = Path::new("/dev/kvm");
    assert!(
        kvm.exists(),
        "this test boots a guest and needs /dev/kvm, which is missing"
    );
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        panic!("this test boots a guest and needs read/write access to /dev/kvm: {e}");
    }
}

/// Set by `.ci/timed-runner` for the test binary alone (libtest's
/// `--report-time`). A build a test starts must not inherit it: cargo keys
/// its fingerprints on it, so a `cargo build` with it set rebuilds the whole
/// workspace in the shared target directory, and the next `cargo test`
/// rebuilds it all again without it (7.5 minutes of a suite run under load).
pub const TIMED_RUNNER_ONLY: &str = "RUSTC_BOOTSTRAP";

/// Run `resources/build.sh WHAT` (its log passed on to the test's output)
/// and return its standard output, whose last lines name what it built.
pub fn build_sh(what: &str) -> String {
    let out = Command::new(repo_root().join("resources/build.sh"))
        .arg(what)
        .env_remove(TIMED_RUNNER_ONLY)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running resources/build.sh {what}: {e}"));
    assert!(
        out.status.success(),
        "resources/build.sh {what} failed ({:?}); see its output above",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Build (or reuse the cached) test guest and return its ELF path.
pub fn testguest() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let stdout = build_sh("testguest");
        let last = stdout
            .lines()
            .last()
            .expect("build.sh printed nothing")
            .trim();
        let p = PathBuf::from(last);
        assert!(
            p.is_absolute() && p.exists(),
            "build.sh's last line is not the ELF: {last}"
        );
        p
    })
    .as_path()
}

/// A running `blimp run`, with its stdout (the serial console) read by a thread.
pub struct Vm {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every line seen so far, for failure messages.
    pub transcript: Vec<String>,
    pub started: Instant,
    ended: bool,
    log: Arc<Mutex<Vec<String>>>,
}

impl Vm {
    /// Start `blimp run` with `args`; the test guest is the kernel unless
    /// `args` names one.
    pub fn start(args: &[&str]) -> Vm {
        Vm::start_cmd("run", args)
    }

    /// Start `blimp SUBCOMMAND args`; `run` gets the test guest as kernel
    /// unless `args` names one or waits for an incoming migration.
    pub fn start_cmd(sub: &str, args: &[&str]) -> Vm {
        require_kvm();
        if sub != "run" || args.contains(&"--kernel") || args.contains(&"--incoming") {
            Vm::spawn(sub, args)
        } else {
            let mut all = vec!["--kernel", testguest().to_str().expect("UTF-8 path")];
            all.extend_from_slice(args);
            Vm::spawn("run", &all)
        }
    }

    /// Start `blimp SUBCOMMAND args...` (`run`, or a future `restore`)
    /// with the console captured.
    pub fn spawn(subcommand: &str, args: &[&str]) -> Vm {
        require_kvm();
        let mut cmd = Command::new(blimp());
        cmd.arg(subcommand);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawning blimp");
        let stdout = child.stdout.take().expect("stdout");
        // blimp's log (stderr): passed on (libtest shows it for failing
        // tests) and kept for checks.
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                log2.lock().unwrap().push(line);
            }
        });
        let stdin = child.stdin.take();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Vm {
            child,
            stdin,
            lines: rx,
            transcript: Vec::new(),
            started,
            ended: false,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for a line containing `needle`; returns it. Panics with the
    /// transcript on timeout or if blimp's output ends first.
    pub fn expect_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    eprintln!("[guest] {line}");
                    self.transcript.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "timed out after {timeout:?} waiting for '{needle}' (host {}); output so far:\n{}",
                    load_average(),
                    self.transcript.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "blimp's output ended while waiting for '{needle}'; output:\n{}",
                    self.transcript.join("\n")
                ),
            }
        }
    }

    /// The next console line, without printing it; `None` on timeout or
    /// when blimp's output ended (see [`Vm::output_ended`]).
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.transcript.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                self.ended = true;
                None
            }
        }
    }

    /// The lines blimp logged on stderr so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// blimp's stdout was closed (it exited or is exiting).
    pub fn output_ended(&self) -> bool {
        self.ended
    }

    /// Send a line to the serial console.
    /// Write `bytes` to blimp's stdin as they are, in one call.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin is piped");
        stdin.write_all(bytes).expect("writing to blimp's stdin");
        stdin.flush().expect("flushing blimp's stdin");
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is piped");
        stdin
            .write_all(line.as_bytes())
            .expect("writing to blimp's stdin");
        stdin.write_all(b"\n").expect("writing to blimp's stdin");
        stdin.flush().expect("flushing blimp's stdin");
    }

    /// Wait for blimp to exit; drains the remaining output into the transcript.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    eprintln!("[guest] {line}");
                    self.transcript.push(line);
                }
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "blimp did not exit within {timeout:?}; output:\n{}",
                    self.transcript.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `fill MIB SEED` on the test guest's console (it writes `MIB` MiB
    /// of a pattern made from `SEED`); waits for `fill done MIB MiB`.
    pub fn fill(&mut self, mib: u64, seed: u64, timeout: Duration) {
        self.send(&format!("fill {mib} {seed}"));
        self.expect_line(&format!("fill done {mib} MiB"), timeout);
    }

    /// `verify` on the test guest's console (it checks every page it
    /// filled); waits for a line containing `want` (`verify ok`, or with
    /// the page count) and returns it.
    /// A `verify FAIL` line (pages lost or damaged) fails at once.
    pub fn verify(&mut self, want: &str, timeout: Duration) -> String {
        self.send("verify");
        let deadline = Instant::now() + timeout;
        loop {
            let line =
                self.expect_line("verify", deadline.saturating_duration_since(Instant::now()));
            assert!(
                !line.contains("verify FAIL"),
                "the guest's memory is damaged: {line}; output:\n{}",
                self.transcript.join("\n")
            );
            if line.contains(want) {
                return line;
            }
        }
    }

    /// Whether a console line containing `needle` comes within `within`
    /// (for what must not happen: a guest that must not be running).
    pub fn says_within(&mut self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next_line(left) {
                Some(line) if line.contains(needle) => return true,
                Some(_) => {}
                None => return false,
            }
        }
        false
    }

    /// Ask the test guest to exit with `code` (`exit CODE` on its console,
    /// which needs `--debug-exit`); blimp must exit with the same status.
    pub fn exit_with(&mut self, code: i32, timeout: Duration) {
        self.send(&format!("exit {code}"));
        assert_eq!(self.wait(timeout).code(), Some(code), "blimp's exit status");
    }

    /// Send a signal to blimp.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({sig})");
    }

    /// Resident set size of the blimp process, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.pid())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The host's load average, for timeout messages: a wait that timed out
/// on a machine busy with other work reads differently from a hang.
pub fn load_average() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let parts: Vec<&str> = l.split_whitespace().take(3).collect();
    format!(
        "load average {} on {} CPUs",
        parts.join(" "),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

/// VmRSS of a process, in bytes (from /proc/PID/status).
pub fn rss_bytes(pid: u32) -> u64 {
    let s =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc/PID/status");
    let kib: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// The number after `key` (e.g. `HugePages_Free:`) in /proc/meminfo; 0
/// when it cannot be read.
pub fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Free 2 MiB huge pages on this host (`HugePages_Free` in /proc/meminfo;
/// 0 when it cannot be read).
pub fn free_huge_pages() -> u64 {
    meminfo("HugePages_Free:")
}

/// Bytes of this host's 2 MiB huge pages in use (hugetlb guest RAM is not
/// in any process's RSS).
pub fn huge_pages_in_use_bytes() -> u64 {
    meminfo("HugePages_Total:").saturating_sub(free_huge_pages()) * (2 << 20)
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// A host setting a test or bench run changed (as root): dropping it, also
/// while unwinding from a failed assertion, writes the old value back.
#[must_use = "the setting is put back when this is dropped"]
pub struct PutBack {
    file: &'static str,
    old: Option<String>,
}

impl PutBack {
    /// The value this run replaced; `None` when the host already had what
    /// the run needs and nothing was changed.
    pub fn changed_from(&self) -> Option<&str> {
        self.old.as_deref()
    }
}

impl Drop for PutBack {
    fn drop(&mut self) {
        if let Some(old) = &self.old
            && let Err(e) = std::fs::write(self.file, old)
        {
            eprintln!("could not put {} back to {old}: {e}", self.file);
        }
    }
}

/// Have at least `want` free 2 MiB huge pages, raising nr_hugepages (as
/// root) when there are fewer, until the guard is dropped. `Err(why)` when
/// the host could not provide them (nothing is changed then).
pub fn reserve_huge_pages(want: u64) -> Result<PutBack, String> {
    let free = free_huge_pages();
    if free >= want {
        return Ok(PutBack {
            file: NR_HUGEPAGES,
            old: None,
        });
    }
    let old: u64 = std::fs::read_to_string(NR_HUGEPAGES)
        .map_err(|e| format!("cannot read {NR_HUGEPAGES}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("bad {NR_HUGEPAGES}: {e}"))?;
    std::fs::write(NR_HUGEPAGES, format!("{}", old + want - free))
        .map_err(|e| format!("cannot write {NR_HUGEPAGES}: {e}"))?;
    let guard = PutBack {
        file: NR_HUGEPAGES,
        old: Some(old.to_string()),
    };
    let now = free_huge_pages();
    if now < want {
        return Err(format!(
            "asked the kernel for {want} free huge pages, only {now} are free"
        ));
    }
    Ok(guard)
}

/// Have the host back `MADV_HUGEPAGE` shared memory (memfd) with
/// transparent huge pages: `shmem_enabled` is set to `advise` (as root)
/// when its setting rules them out, until the guard is dropped.
pub fn allow_shmem_thp() -> Result<PutBack, String> {
    if let Some((true, _)) = vmm::memory::thp_honoured(&vmm::MemoryBackend::Memfd) {
        return Ok(PutBack {
            file: SHMEM_THP,
            old: None,
        });
    }
    let old = vmm::memory::thp_setting(SHMEM_THP)
        .ok_or_else(|| format!("cannot read the setting in force in {SHMEM_THP}"))?;
    std::fs::write(SHMEM_THP, "advise").map_err(|e| format!("cannot write {SHMEM_THP}: {e}"))?;
    let guard = PutBack {
        file: SHMEM_THP,
        old: Some(old),
    };
    match vmm::memory::thp_honoured(&vmm::MemoryBackend::Memfd) {
        Some((true, _)) => Ok(guard),
        _ => Err(format!("{SHMEM_THP} did not take `advise`")),
    }
}

/// The `blimp run` arguments of a backing spec: `KIND` (`anon`, `memfd`,
/// …) or `KIND+thp`, which adds `--memory-thp`; and the kind.
pub fn backend_args(spec: &str) -> (&str, Vec<&str>) {
    let (kind, thp) = match spec.strip_suffix("+thp") {
        Some(k) => (k, true),
        None => (spec, false),
    };
    let mut args = vec!["--memory-backend", kind];
    if thp {
        args.push("--memory-thp");
    }
    (kind, args)
}

/// Run `blimp` with `args` to completion (for quick error-path checks).
pub fn run_blimp(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(blimp())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running blimp");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Start `blimp restore --from FROM --api-sock SOCK EXTRA...` with the
/// console captured; returns at once (see [`wait_for_socket`]).
pub fn spawn_restore(from: &Path, sock: &Path, extra: &[&str]) -> Vm {
    let mut args = vec![
        "--from",
        from.to_str().expect("UTF-8 path"),
        "--api-sock",
        sock.to_str().expect("UTF-8 path"),
    ];
    args.extend_from_slice(extra);
    Vm::spawn("restore", &args)
}

/// A unique API socket path for a test.
pub fn sock_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("blimp-test-{name}-{}.sock", std::process::id()))
}

/// Wait up to 10 s for `p` to exist (e.g. the Unix socket an incoming
/// migration listens on).
pub fn wait_for_path(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Start `blimp run --incoming unix://PATH --no-stdin EXTRA...` (a
/// destination waiting for a live migration) and wait until it listens on
/// `path`; returns it and the URL a source sends to.
pub fn start_incoming(path: &Path, extra: &[&str]) -> (Vm, String) {
    incoming(path, &["--no-stdin"], extra)
}

/// [`start_incoming`] with the console on the test's pipe: the migrated
/// guest takes its next commands from [`Vm::send`].
pub fn start_incoming_with_console(path: &Path, extra: &[&str]) -> (Vm, String) {
    incoming(path, &[], extra)
}

fn incoming(path: &Path, console: &[&str], extra: &[&str]) -> (Vm, String) {
    let url = format!("unix://{}", path.display());
    let mut args = vec!["--incoming", &url];
    args.extend_from_slice(console);
    args.extend_from_slice(extra);
    let vm = Vm::start(&args);
    wait_for_path(path);
    (vm, url)
}

/// Wait until the API socket accepts connections (the file can exist a
/// moment before the server listens).
pub fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "API socket {} is not accepting connections",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One look at something a test waits for: done (with the value the wait
/// returns), or not yet, with how far it got in words (e.g. `actual 96 of
/// 160 MiB, 24576 pages inflated`).
pub enum Step<T> {
    Done(T),
    Pending(String),
}

/// A wait that ran out of time, with what tells a slow machine from a hang:
/// how far the guest got, how long ago that last changed, and the load.
#[derive(Debug)]
pub struct Stalled {
    pub what: String,
    pub timeout: Duration,
    /// The last [`Step::Pending`] description.
    pub progress: String,
    /// How long before the deadline the description last changed: close to
    /// zero means still moving (a slow or busy machine), close to the
    /// timeout means stuck from the start (a hang).
    pub unchanged_for: Duration,
    /// [`load_average`] at the deadline.
    pub load: String,
}

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let moving = if self.unchanged_for < Duration::from_secs(5) {
            "still moving at the deadline: slow, not stuck"
        } else {
            "not moving: looks stuck"
        };
        write!(
            f,
            "{} not within {:?}; got as far as: {}; unchanged for the last {:.1} s ({moving}); host {}",
            self.what,
            self.timeout,
            self.progress,
            self.unchanged_for.as_secs_f64(),
            self.load
        )
    }
}

/// Poll `probe` every `every` until it says [`Step::Done`]; returns its value
/// and the time it took, or, after `timeout`, a [`Stalled`] that says how far
/// it got. The one wait loop of the tests whose waits can be long.
pub fn wait_progress<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Step<T>,
) -> Result<(T, Duration), Stalled> {
    let start = Instant::now();
    let mut last = String::new();
    let mut changed = start;
    loop {
        match probe() {
            Step::Done(v) => return Ok((v, start.elapsed())),
            Step::Pending(p) => {
                if p != last {
                    last = p;
                    changed = Instant::now();
                }
            }
        }
        if start.elapsed() >= timeout {
            return Err(Stalled {
                what: what.to_string(),
                timeout,
                progress: last,
                unchanged_for: changed.elapsed(),
                load: load_average(),
            });
        }
        std::thread::sleep(every);
    }
}

/// [`wait_progress`] that panics with the [`Stalled`] report.
pub fn wait_or_panic<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    probe: impl FnMut() -> Step<T>,
) -> (T, Duration) {
    wait_progress(what, timeout, every, probe).unwrap_or_else(|s| panic!("{s}"))
}

/// The value of the `NAME VALUE` line of `GET /metrics` (a name without
/// labels); `None` if blimp does not answer or has no such line.
pub fn counter(client: &api::client::ApiClient, name: &str) -> Option<u64> {
    let m = client.metrics().ok()?;
    m.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(name)).then(|| w.next())?
        })
        .and_then(|v| v.parse().ok())
}

/// The balloon's progress in words, for [`Step::Pending`] and timeout
/// messages: `GET /balloon`'s actual and target sizes and the device's
/// page counters.
pub fn balloon_progress(client: &api::client::ApiClient, body: &serde_json::Value) -> String {
    let c = |n: &str| counter(client, n).map_or("?".to_string(), |v| v.to_string());
    format!(
        "actual {} MiB of target {} MiB ({} pages inflated, {} deflated so far)",
        body["actual_mib"],
        body["target_mib"],
        c("balloon_inflate_pages"),
        c("balloon_deflate_pages")
    )
}

/// Poll `GET /balloon` until `actual_mib` equals `target_mib`.
pub fn wait_balloon(
    client: &mut api::client::ApiClient,
    target_mib: u64,
    timeout: Duration,
) -> Duration {
    let client = &*client;
    wait_or_panic(
        &format!("the balloon reaching {target_mib} MiB"),
        timeout,
        Duration::from_millis(20),
        || {
            let (status, body) = client.get("/balloon").expect("GET /balloon");
            assert_eq!(status, 200, "{body}");
            if body["actual_mib"].as_u64() == Some(target_mib)
                && body["target_mib"].as_u64() == Some(target_mib)
            {
                Step::Done(())
            } else {
                Step::Pending(balloon_progress(client, &body))
            }
        },
    )
    .1
}

/// Poll `GET /migration` until the job (migration or snapshot) ended;
/// returns its final status.
pub fn wait_migration_end(client: &api::client::ApiClient, timeout: Duration) -> serde_json::Value {
    wait_or_panic(
        "the migration ending",
        timeout,
        Duration::from_millis(20),
        || {
            let (status, st) = client.get("/migration").expect("GET /migration");
            assert_eq!(status, 200, "{st}");
            if ["Completed", "Failed", "Cancelled"].contains(&st["state"].as_str().unwrap_or("")) {
                Step::Done(st)
            } else {
                // Everything but the clock, so a stuck job reads as stuck.
                let mut p = st.clone();
                if let Some(o) = p.as_object_mut() {
                    o.remove("elapsed_ms");
                }
                Step::Pending(p.to_string())
            }
        },
    )
    .0
}

/// `PUT /migration` with `body` (expecting 200), then
/// [`wait_migration_end`].
pub fn migrate(
    client: &api::client::ApiClient,
    body: &serde_json::Value,
    timeout: Duration,
) -> serde_json::Value {
    let (status, b) = client.put("/migration", body).expect("PUT /migration");
    assert_eq!(status, 200, "PUT /migration {body}: {b}");
    wait_migration_end(client, timeout)
}

/// `PATCH /balloon {"target_mib": mib}`, expecting 204.
pub fn set_target(client: &mut api::client::ApiClient, mib: u64) {
    let (status, body) = client
        .patch("/balloon", &serde_json::json!({ "target_mib": mib }))
        .expect("PATCH /balloon");
    assert_eq!(status, 204, "PATCH /balloon {mib}: {body}");
}

/// [`set_target`] then [`wait_balloon`]: the balloon moved to `mib`;
/// returns how long the wait took.
pub fn resize_balloon(
    client: &mut api::client::ApiClient,
    mib: u64,
    timeout: Duration,
) -> Duration {
    set_target(client, mib);
    wait_balloon(client, mib, timeout)
}

/// Runs the test guest with `--debug-exit`, no console input, `program`
/// as its `testguest.run` and `args` (memory, ...).
pub fn run_program(program: &str, args: &[&str]) -> Vm {
    let cmdline = format!("testguest.run=\"{program}\"");
    let mut all = vec!["--debug-exit", "--no-stdin", "--cmdline", &cmdline];
    all.extend_from_slice(args);
    Vm::start(&all)
}

/// Boots the test guest with `--debug-exit`, an API socket named after
/// `name`, `program` as its `testguest.run` and `args` (memory, balloon,
/// ...); returns once the API socket accepts connections, with its path.
pub fn boot_with_api(
    name: &str,
    program: &str,
    args: &[&str],
) -> (Vm, api::client::ApiClient, PathBuf) {
    boot_with_api_cmdline(name, &format!("testguest.run=\"{program}\""), args)
}

/// The test guest's switch that keeps its balloon driver from starting at
/// boot; the program then starts it with `balloon` when it wants.
pub const NO_AUTO_BALLOON: &str = "testguest.balloon=0";

/// [`boot_with_api`] with the guest's balloon driver not started at boot
/// ([`NO_AUTO_BALLOON`]): for tests that start it themselves.
pub fn boot_with_api_manual_balloon(
    name: &str,
    program: &str,
    args: &[&str],
) -> (Vm, api::client::ApiClient, PathBuf) {
    let cmdline = format!("{NO_AUTO_BALLOON} testguest.run=\"{program}\"");
    boot_with_api_cmdline(name, &cmdline, args)
}

/// [`boot_with_api`] with a whole guest command line.
pub fn boot_with_api_cmdline(
    name: &str,
    cmdline: &str,
    args: &[&str],
) -> (Vm, api::client::ApiClient, PathBuf) {
    let mut all = vec!["--debug-exit", "--cmdline", cmdline];
    all.extend_from_slice(args);
    start_with_sock(name, &all)
}

/// `blimp run --api-sock SOCK ARGS...` with a socket named after `name`
/// (nothing else added); returns once the socket accepts connections.
pub fn start_with_sock(name: &str, args: &[&str]) -> (Vm, api::client::ApiClient, PathBuf) {
    let sock = sock_path(name);
    let mut all = vec!["--api-sock", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    let vm = Vm::start(&all);
    wait_for_socket(&sock);
    let api = api::client::ApiClient::new(&sock).expect("API client");
    (vm, api, sock)
}

/// [`boot_with_api`] with `--memory memory --balloon balloon`.
pub fn start_with_api(
    name: &str,
    memory: &str,
    balloon: &str,
    program: &str,
) -> (Vm, api::client::ApiClient) {
    let (vm, api, _) = boot_with_api(name, program, &["--memory", memory, "--balloon", balloon]);
    (vm, api)
}

/// `GET /metrics` as a map from metric name (without the `blimp_` prefix,
/// labels kept) to value.
pub fn metrics(client: &mut api::client::ApiClient) -> std::collections::HashMap<String, f64> {
    let r = client.metrics().expect("GET /metrics");
    r.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.trim_start_matches("blimp_").to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The value of the first metric in `ms` whose name ends with `suffix`
/// (0 if there is none).
pub fn metric(ms: &std::collections::HashMap<String, f64>, suffix: &str) -> f64 {
    ms.iter()
        .find(|(k, _)| k.ends_with(suffix))
        .map(|(_, v)| *v)
        .unwrap_or(0.0)
}

/// A fresh directory for one test, removed on drop.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let p = std::env::temp_dir().join(format!("blimp-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).unwrap();
        TestDir(p)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A small tmpfs (`size` as mount takes it) mounted for one test (tests
/// run as root), unmounted on drop.
pub struct SmallTmpfs(pub TestDir);

impl SmallTmpfs {
    pub fn mount(name: &str, size: &str) -> SmallTmpfs {
        let dir = TestDir::new(name);
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir.0)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill it and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallTmpfs(dir)
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0.0).status();
    }
}
