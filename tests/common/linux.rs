//! Helpers for tests that boot the real Linux guest (`resources/linux`,
//! `docs/linux-guest.md`): building it once per test binary, booting it
//! under `blimp run` with a balloon and the API socket, and talking to its
//! agent (`@@ begin NAME`, `@@ NAME ...`, `@@ done NAME rc=N`).
//!
//! On the PVM hosts (this project's machines and CI) the guest kernel runs
//! emulated, ~1000x slower than on hardware KVM: a boot to the agent takes
//! ~6-15 s and every guest kernel operation is slow, so the timeouts here
//! are generous; on hardware KVM everything takes milliseconds.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use api::client::ApiClient;

use super::{
    Step, Vm, balloon_progress, build_sh, load_average, sock_path, spawn_restore, wait_for_socket,
    wait_progress,
};

pub const MIB: u64 = 1 << 20;

/// A minute: the unit of the Linux tests' time limits, which are only there
/// to end a hang (a failed limit prints how far the guest got and the load).
pub const MIN: Duration = Duration::from_secs(60);

/// Bytes as MiB, for messages.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// Relative difference of `a` from `b`.
pub fn rel_diff(a: u64, b: u64) -> f64 {
    (a as f64 - b as f64).abs() / b as f64
}

/// Print a finished test's wall time and the binary's so far (`FILE: TEST
/// took ...`), the figure the suite's summary and README quote.
pub fn done(file: &str, test: &str, started: Instant) {
    eprintln!(
        "{file}: {test} took {:.1} s (suite wall clock so far {:.1} s, host {})",
        started.elapsed().as_secs_f64(),
        suite_clock().elapsed().as_secs_f64(),
        load_average()
    );
}

/// The deflate-on-OOM tests' guest (`linux_e2e`, `linux_sg`): 64 MiB with
/// a 32 MiB balloon (the default floor, a quarter of guest memory, allows
/// 48), and an allocation [`OOM_EXCESS_MIB`] over what the guest has
/// available after the inflate. Every MiB faulted in or given back by the
/// OOM notifier is emulated kernel work on PVM, so both stay small; see
/// `linux_e2e::deflate_on_oom_lets_an_allocation_beyond_memavailable_succeed`.
pub const OOM_GUEST_MEMORY: &str = "64M";
pub const OOM_BALLOON_MIB: u64 = 32;
/// How far the allocation exceeds MemAvailable.
pub const OOM_EXCESS_MIB: u64 = 4;
/// What the balloon must give back at least: the excess less what Linux
/// can find beyond MemAvailable's estimate (free pages between its high
/// and min watermarks: under 1 MiB at 64 MiB), with a margin.
pub const OOM_MIN_DEFLATE_MIB: u64 = OOM_EXCESS_MIB - 2;

/// The deflate-on-OOM allocation in MiB: [`OOM_EXCESS_MIB`] over
/// `mem_available_kib`.
pub fn oom_alloc_mib(mem_available_kib: u64) -> u64 {
    mem_available_kib / 1024 + OOM_EXCESS_MIB
}

/// What every Linux test boot gets on the kernel command line. Blimp adds
/// what the PVM hosts need (`noxsave clearcpuid=...`, see `arch::pvm`) and
/// the `virtio_mmio.device=` entry itself. `quiet`: every console byte goes
/// through the emulated 8250 driver, boot messages cost seconds on PVM.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 nokaslr rodata=off quiet";

/// Longest a boot to the agent's ready line may take (the PVM hosts need
/// ~6-15 s; a loaded CI machine more).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// The built guest: an uncompressed ELF vmlinux and an uncompressed cpio.
pub struct LinuxGuest {
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
}

/// Build (or reuse the cached) Linux guest: `resources/build.sh linux`,
/// once per test binary. A cold build takes 2-4 min on 2 cores.
pub fn linux_guest() -> &'static LinuxGuest {
    static GUEST: OnceLock<LinuxGuest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let t = Instant::now();
        let stdout = build_sh("linux");
        let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
        assert!(
            lines.len() >= 2,
            "resources/build.sh linux printed fewer than two lines: {stdout}"
        );
        let vmlinux = PathBuf::from(lines[lines.len() - 2]);
        let initrd = PathBuf::from(lines[lines.len() - 1]);
        for p in [&vmlinux, &initrd] {
            assert!(
                p.is_absolute() && p.exists(),
                "resources/build.sh linux: {} is not an existing absolute path",
                p.display()
            );
        }
        eprintln!(
            "linux guest: {} + {} (build or cache hit took {:.1} s)",
            vmlinux.display(),
            initrd.display(),
            t.elapsed().as_secs_f64()
        );
        LinuxGuest { vmlinux, initrd }
    })
}

/// When the first Linux VM of this test binary was requested: the suite's
/// wall clock (libtest has no suite hook; its "finished in" line is the
/// binary's total).
pub fn suite_clock() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// One agent command's answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub command: String,
    pub rc: i32,
    /// The result lines (`@@ NAME ...`), without the `@@ NAME ` prefix.
    pub lines: Vec<String>,
    /// From sending the command (or from the call, for `blimp.run=`
    /// commands) to its `done` line.
    pub took: Duration,
}

impl Reply {
    /// Panics unless the command succeeded.
    pub fn ok(self) -> Self {
        assert_eq!(
            self.rc, 0,
            "agent command `{}` failed (rc={}): {:?}",
            self.command, self.rc, self.lines
        );
        self
    }

    /// The value of `key=VALUE` in the first result line that has it.
    pub fn value(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        self.lines
            .iter()
            .flat_map(|l| l.split_whitespace())
            .find_map(|w| w.strip_prefix(prefix.as_str()))
    }

    /// `key=N` as a number; panics if absent or not a number.
    pub fn num(&self, key: &str) -> u64 {
        let v = self.value(key).unwrap_or_else(|| {
            panic!(
                "agent command `{}`: no {key}= in {:?}",
                self.command, self.lines
            )
        });
        v.parse().unwrap_or_else(|_| {
            panic!(
                "agent command `{}`: {key}={v} is not a number",
                self.command
            )
        })
    }

    /// The first result line starting with `word`.
    pub fn line(&self, word: &str) -> Option<&str> {
        self.lines
            .iter()
            .map(String::as_str)
            .find(|l| l.split_whitespace().next() == Some(word))
    }
}

/// What a balloon-driver boot of the Linux guest looks like.
pub struct LinuxVmConfig<'a> {
    /// Test name: the API socket's name and the console prefix.
    pub name: &'a str,
    pub memory: &'a str,
    /// `--balloon` options; `None`: no balloon.
    pub balloon: Option<&'a str>,
    /// Appended to [`BASE_CMDLINE`].
    pub cmdline_extra: &'a str,
    /// More `blimp run` arguments (e.g. `--balloon-policy ...`).
    pub args: &'a [&'a str],
}

impl Default for LinuxVmConfig<'_> {
    fn default() -> Self {
        LinuxVmConfig {
            name: "linux",
            memory: "256M",
            balloon: None,
            cmdline_extra: "",
            args: &[],
        }
    }
}

/// A Linux guest under `blimp run`, at its agent's prompt.
pub struct LinuxVm {
    pub vm: Vm,
    pub name: String,
    pub api: ApiClient,
    pub sock: PathBuf,
    /// From spawning blimp to the agent's ready line.
    pub ready_after: Duration,
}

impl LinuxVm {
    /// Boot and wait for `BLIMP-AGENT READY`. Panics (with the console) if
    /// the guest panics, blimp exits, or the agent is not ready in
    /// [`BOOT_TIMEOUT`].
    pub fn boot(cfg: &LinuxVmConfig) -> LinuxVm {
        let mut lvm = LinuxVm::start(cfg);
        lvm.wait_ready();
        lvm
    }

    /// Start blimp and return once its API socket answers, before the
    /// guest is up (to watch `GET /events` from the start); then
    /// [`LinuxVm::wait_ready`].
    pub fn start(cfg: &LinuxVmConfig) -> LinuxVm {
        suite_clock();
        let guest = linux_guest();
        let sock = sock_path(cfg.name);
        let _ = std::fs::remove_file(&sock);
        let cmdline = format!("{BASE_CMDLINE} {}", cfg.cmdline_extra);
        let mut args: Vec<&str> = vec![
            "--kernel",
            guest.vmlinux.to_str().unwrap(),
            "--initrd",
            guest.initrd.to_str().unwrap(),
            "--memory",
            cfg.memory,
            "--vcpus",
            "1",
            "--api-sock",
            sock.to_str().unwrap(),
            "--cmdline",
            cmdline.trim_end(),
        ];
        if let Some(b) = cfg.balloon {
            args.push("--balloon");
            args.push(b);
        }
        args.extend_from_slice(cfg.args);
        let vm = Vm::start(&args);
        LinuxVm::attach(vm, cfg.name, sock)
    }

    /// Wait for the agent's ready line (see [`LinuxVm::boot`]).
    pub fn wait_ready(&mut self) {
        self.wait_for("BLIMP-AGENT READY", BOOT_TIMEOUT);
        self.ready_after = self.vm.started.elapsed();
    }

    /// Wrap a started blimp (e.g. a restore) whose API socket is `sock`.
    pub fn attach(vm: Vm, name: &str, sock: PathBuf) -> LinuxVm {
        LinuxVm {
            vm,
            name: name.to_string(),
            api: connect_later(&sock),
            sock,
            ready_after: Duration::ZERO,
        }
    }

    /// `blimp restore` of the migration file or snapshot `from`, with an API
    /// socket named after `name`.
    pub fn restore(name: &str, from: &Path) -> LinuxVm {
        let sock = sock_path(name);
        let _ = std::fs::remove_file(&sock);
        let restored = spawn_restore(from, &sock, &[]);
        LinuxVm::attach(restored, name, sock)
    }

    /// Migrate to the file `path` (`PUT /migration`, free page hints as
    /// `free_page_hints` says) and wait up to 5 minutes for the end; returns
    /// the final `GET /migration`.
    pub fn migrate_to_file(&self, path: &Path, free_page_hints: bool) -> serde_json::Value {
        super::migrate(
            &self.api,
            &serde_json::json!({
                "destination": format!("file://{}", path.display()),
                "free_page_hints": free_page_hints,
            }),
            5 * MIN,
        )
    }

    /// Read console lines until one equals `wanted` (after stripping `\r`).
    fn wait_for(&mut self, wanted: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self.next_console_line(deadline, timeout, &format!("`{wanted}`"));
            if line.contains("Kernel panic") {
                // Let the rest of the panic message arrive.
                while let Some(l) = self.vm.next_line(Duration::from_secs(2)) {
                    eprintln!("[{}] {}", self.name, l.trim_end_matches('\r'));
                }
                self.fail("the guest kernel panicked");
            }
            if line == wanted {
                return line;
            }
        }
    }

    /// The next console line before `deadline`, without its `\r` and echoed
    /// to the test's output; fails the test (naming `waiting_for` and the
    /// `timeout` it was given) when the time runs out or blimp's output ends.
    fn next_console_line(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        waiting_for: &str,
    ) -> String {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(raw) = self.vm.next_line(left) else {
            let why = if self.vm.output_ended() {
                "blimp's output ended"
            } else {
                "timed out"
            };
            self.fail(&format!(
                "{why} after {timeout:?} waiting for {waiting_for}{}",
                self.balloon_note()
            ));
        };
        let line = raw.trim_end_matches('\r').to_string();
        eprintln!("[{}] {line}", self.name);
        line
    }

    /// `; balloon: actual ... (pages moved)` for a timeout message, when
    /// blimp still answers (empty when it does not).
    fn balloon_note(&self) -> String {
        if self.vm.output_ended() {
            return String::new();
        }
        match self.api.get("/balloon") {
            Ok((200, b)) => format!("; balloon: {}", balloon_progress(&self.api, &b)),
            _ => String::new(),
        }
    }

    /// Panic with the console transcript, the host's load and how long the
    /// guest has run.
    pub fn fail(&self, why: &str) -> ! {
        let tail: Vec<&str> = self
            .vm
            .transcript
            .iter()
            .rev()
            .take(60)
            .map(|l| l.trim_end_matches('\r'))
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        panic!(
            "[{}] {why}\n(host {}; {} s since boot; last console line: {:?})\nlast console lines:\n{}",
            self.name,
            load_average(),
            self.vm.started.elapsed().as_secs(),
            tail.last().copied().unwrap_or(""),
            tail.join("\n")
        );
    }

    /// Run one agent command over the console and wait for its `done` line.
    pub fn cmd(&mut self, line: &str, timeout: Duration) -> Reply {
        let t = Instant::now();
        self.vm.send(line);
        self.collect(line, t, timeout)
    }

    /// Wait for the answer to `line` (sent already, or from `blimp.run=`).
    pub fn collect(&mut self, line: &str, since: Instant, timeout: Duration) -> Reply {
        let name = line.split_whitespace().next().expect("empty command");
        let done_prefix = format!("@@ done {name} rc=");
        let result_prefix = format!("@@ {name} ");
        let deadline = since + timeout;
        let mut lines = Vec::new();
        loop {
            let l = self.next_console_line(deadline, timeout, &format!("the answer to `{line}`"));
            if let Some(rc) = l.strip_prefix(&done_prefix) {
                let rc = rc.trim().parse().unwrap_or(-1);
                return Reply {
                    command: line.to_string(),
                    rc,
                    lines,
                    took: since.elapsed(),
                };
            }
            if let Some(r) = l.strip_prefix(&result_prefix) {
                lines.push(r.to_string());
            } else if l.contains("Kernel panic") {
                self.fail("the guest kernel panicked");
            }
        }
    }

    /// The guest's `/proc/meminfo`: (MemTotal, MemFree, MemAvailable) in KiB.
    pub fn meminfo(&mut self) -> (u64, u64, u64) {
        let r = self.cmd("meminfo", Duration::from_secs(60)).ok();
        (r.num("MemTotal"), r.num("MemFree"), r.num("MemAvailable"))
    }

    /// VmRSS of the blimp process, bytes.
    pub fn rss(&self) -> u64 {
        self.vm.rss_bytes()
    }

    /// `GET /balloon`.
    pub fn balloon(&self) -> serde_json::Value {
        let (status, body) = self.api.get("/balloon").expect("GET /balloon");
        assert_eq!(status, 200, "GET /balloon: {body}");
        body
    }

    /// `PATCH /balloon {"target_mib": mib}`.
    pub fn set_target(&self, mib: u64) {
        let (status, body) = self
            .api
            .patch("/balloon", &serde_json::json!({ "target_mib": mib }))
            .expect("PATCH /balloon");
        assert_eq!(status, 204, "PATCH /balloon {mib}: {body}");
    }

    /// Poll `GET /balloon` until `pred(actual_mib)`; returns the time it
    /// took. A timeout fails with how far the balloon got (actual, target,
    /// pages the device saw move), the load and the console.
    pub fn wait_actual(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(u64) -> bool,
    ) -> Duration {
        self.wait(
            &format!("the balloon's actual size becoming {what}"),
            timeout,
            Duration::from_millis(50),
            || {
                let b = self.balloon();
                let actual = b["actual_mib"].as_u64().expect("actual_mib");
                if pred(actual) {
                    Step::Done(())
                } else {
                    Step::Pending(balloon_progress(&self.api, &b))
                }
            },
        )
        .1
    }

    /// [`wait_progress`] for this guest: on a timeout, fail with how far it
    /// got, the load and the console.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        every: Duration,
        probe: impl FnMut() -> Step<T>,
    ) -> (T, Duration) {
        match wait_progress(what, timeout, every, probe) {
            Ok(r) => r,
            Err(stalled) => self.fail(&stalled.to_string()),
        }
    }

    /// A `balloon_NAME` counter of the device from `GET /metrics`; panics
    /// if there is none.
    pub fn counter(&self, name: &str) -> u64 {
        let m = self.api.metrics().expect("GET /metrics");
        let key = format!("balloon_{name}");
        m.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(key.as_str())).then(|| w.next())?
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("[{}] no counter {key} in GET /metrics:\n{m}", self.name))
    }

    /// End the guest with the agent's `poweroff` (a keyboard-controller
    /// reset) and check that blimp exits 0.
    pub fn poweroff(mut self) {
        self.vm.send("poweroff");
        let status = self.vm.wait(Duration::from_secs(120));
        if status.code() != Some(0) {
            self.fail(&format!("blimp exited with {status:?} after poweroff"));
        }
        let _ = std::fs::remove_file(&self.sock);
        self.assert_quiet_log();
    }

    /// A well-behaved Linux driver must not make blimp log warnings or
    /// errors (refused register writes, rejected buffers, ...).
    pub fn assert_quiet_log(&self) {
        // Give the stderr reader a moment to catch up with an exited blimp.
        std::thread::sleep(Duration::from_millis(100));
        let bad: Vec<String> = self
            .vm
            .log_lines()
            .into_iter()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        assert!(
            bad.is_empty(),
            "[{}] blimp logged warnings or errors while the Linux driver drove it:\n{}",
            self.name,
            bad.join("\n")
        );
    }
}

impl Drop for LinuxVm {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// Connect to the API socket once blimp has created it.
fn connect_later(sock: &Path) -> ApiClient {
    wait_for_socket(sock);
    ApiClient::new(sock).expect("API client")
}

// ----- virtio-balloon features ---------------------------------------------

pub const VIRTIO_F_VERSION_1: u32 = 32;
pub const F_MUST_TELL_HOST: u32 = 0;
pub const F_STATS_VQ: u32 = 1;
pub const F_DEFLATE_ON_OOM: u32 = 2;
pub const F_FREE_PAGE_HINT: u32 = 3;
pub const F_PAGE_POISON: u32 = 4;
pub const F_REPORTING: u32 = 5;
/// Blimp-experimental chunked inflate/deflate (`--balloon sg=on`).
pub const F_BLIMP_SG: u32 = 23;

/// Name of a balloon feature bit, for messages.
pub fn feature_name(bit: u32) -> String {
    match bit {
        F_MUST_TELL_HOST => "MUST_TELL_HOST".into(),
        F_STATS_VQ => "STATS_VQ".into(),
        F_DEFLATE_ON_OOM => "DEFLATE_ON_OOM".into(),
        F_FREE_PAGE_HINT => "FREE_PAGE_HINT".into(),
        F_PAGE_POISON => "PAGE_POISON".into(),
        F_REPORTING => "REPORTING".into(),
        F_BLIMP_SG => "BLIMP_SG".into(),
        VIRTIO_F_VERSION_1 => "VERSION_1".into(),
        b => format!("bit {b}"),
    }
}

fn names(bits: u64) -> String {
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(feature_name)
        .collect::<Vec<_>>()
        .join(",")
}

/// The features Blimp offers for the balloon configuration `GET /balloon`
/// describes (as `devices::virtio::balloon::Balloon::new` computes them).
pub fn offered_features(balloon: &serde_json::Value) -> u64 {
    let on = |k: &str| balloon[k].as_bool().unwrap_or(false);
    let mut f = 1u64 << VIRTIO_F_VERSION_1;
    for (k, bit) in [
        ("must_tell_host", F_MUST_TELL_HOST),
        ("deflate_on_oom", F_DEFLATE_ON_OOM),
        ("free_page_hint", F_FREE_PAGE_HINT),
        ("page_poison", F_PAGE_POISON),
        ("free_page_reporting", F_REPORTING),
    ] {
        if on(k) {
            f |= 1 << bit;
        }
    }
    if balloon["stats_polling_interval_s"].as_u64().unwrap_or(0) > 0 {
        f |= 1 << F_STATS_VQ;
    }
    f
}

/// Run the agent's `features` command and return the balloon's negotiated
/// feature bits (from sysfs: one `0`/`1` per bit, bit 0 first) and its
/// virtio status. Panics unless exactly one balloon is bound to
/// `virtio_balloon` with DRIVER_OK and FEATURES_OK set.
pub fn negotiated_features(vm: &mut LinuxVm) -> (u64, u32, Reply) {
    let r = vm.cmd("features", Duration::from_secs(60)).ok();
    let balloons: Vec<&String> = r
        .lines
        .iter()
        .filter(|l| l.contains("device=0x0005"))
        .collect();
    if balloons.len() != 1 {
        vm.fail(&format!(
            "expected one virtio balloon (device 0x0005) in `features`, got {:?}",
            r.lines
        ));
    }
    let l = balloons[0];
    let field = |k: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in `{l}`"))
            .to_string()
    };
    let driver = field("driver=");
    assert_eq!(
        driver, "virtio_balloon",
        "balloon not bound to its driver: {l}"
    );
    let status = u32::from_str_radix(field("status=").trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("bad status in `{l}`"));
    let bits = field("features=");
    let mut f = 0u64;
    for (i, c) in bits.chars().enumerate().take(64) {
        match c {
            '1' => f |= 1 << i,
            '0' => {}
            _ => panic!("bad features string in `{l}`"),
        }
    }
    // ACKNOWLEDGE 1 | DRIVER 2 | DRIVER_OK 4 | FEATURES_OK 8; not NEEDS_RESET
    // 0x40 or FAILED 0x80.
    assert_eq!(
        status & 0xcf,
        0x0f,
        "balloon device status {status:#x} is not ACK|DRIVER|FEATURES_OK|DRIVER_OK: {l}"
    );
    (f, status, r)
}

/// Assert the driver negotiated every feature Blimp offered (Linux keeps
/// PAGE_POISON only when the guest poisons pages: `may_drop_poison`).
pub fn assert_negotiated_all(name: &str, offered: u64, negotiated: u64, may_drop_poison: bool) {
    let mut missing = offered & !negotiated;
    if may_drop_poison {
        missing &= !(1 << F_PAGE_POISON);
    }
    assert_eq!(
        missing,
        0,
        "[{name}] the Linux driver did not negotiate {} (offered {}, negotiated {})",
        names(missing),
        names(offered),
        names(negotiated)
    );
    let extra = negotiated & !offered;
    assert_eq!(
        extra,
        0,
        "[{name}] negotiated features Blimp never offered: {}",
        names(extra)
    );
    eprintln!(
        "[{name}] negotiated {} (offered {})",
        names(negotiated),
        names(offered)
    );
}
