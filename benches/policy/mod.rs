//! `cargo bench --bench vm -- policy`: the automatic balloon policy (issue
//! #18) against a 2 GiB test guest, measured on this machine, with the time
//! series written to `docs/policy.csv` and drawn in `docs/policy.svg`.
//!
//! Phases, one guest throughout:
//! 1. idle: the guest fills 1800 MiB and frees 1500 (so host RSS is really
//!    high with 300 MiB used); time until host RSS dropped by 1.2 GiB, and
//!    whether the guest ever had less than the floor;
//! 2. `ramp 1536 200` then `ramp 1536 500` with deflate-on-OOM off: whether
//!    an allocation failed, the longest wait and the total stall (the policy
//!    is given time to reclaim again before each);
//! 3. steady load (512 MiB held, 256 MiB rewritten at 64 MiB/s) for
//!    `BLIMP_BENCH_POLICY_STEADY_S` seconds (default 300): target changes;
//! 4. host PSI fed from a file (`psi_path`): `some avg10` 0 → 40: the
//!    headroom the policy keeps and the target, before and after.
//!
//! The host PSI file holds 0 for phases 1-3 so that other work on this
//! shared machine does not change the figures. `BLIMP_BENCH_POLICY_OFF=1`
//! runs the same with the policy off (a baseline; files go to target/);
//! `BLIMP_BENCH_POLICY_IDLE_S` (default 120) bounds phase 1's wait and
//! `BLIMP_BENCH_POLICY_PSI_S` (default 60) phase 4's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::client::ApiClient;
use serde_json::Value;

use crate::common::{self, Vm};

const MIB: u64 = 1 << 20;
const GUEST_MIB: u64 = 2048;
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
const T: Duration = Duration::from_secs(600);

/// One row of the time series.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Seconds since the guest was ready.
    pub t: f64,
    pub phase: &'static str,
    pub guest_used_mib: Option<f64>,
    pub balloon_mib: Option<f64>,
    pub target_mib: Option<f64>,
    pub guest_available_mib: Option<f64>,
    pub host_rss_mib: f64,
}

/// One policy event (`PolicyDecision`, or `BalloonSettled`).
#[derive(Clone, Debug)]
pub struct Decision {
    pub t: f64,
    /// "inflate", "deflate", "hold" or "settled".
    pub action: String,
    pub reason: String,
    pub old_target_mib: Option<f64>,
    pub new_target_mib: Option<f64>,
    pub headroom_mib: Option<f64>,
    pub host_pressure: Option<bool>,
}

impl Decision {
    fn changes_target(&self) -> bool {
        matches!(self.action.as_str(), "inflate" | "deflate")
            && self.old_target_mib != self.new_target_mib
    }

    /// `action:old->new (reason)`, without commas (a CSV field).
    fn label(&self) -> String {
        let mib = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.0}"));
        if self.action == "settled" {
            return format!("settled:{} ({})", mib(self.new_target_mib), self.reason)
                .replace([',', '\n', '"'], ";");
        }
        format!(
            "{}:{}->{} ({})",
            self.action,
            mib(self.old_target_mib),
            mib(self.new_target_mib),
            self.reason
        )
        .replace([',', '\n', '"'], ";")
    }
}

/// What the sampler and the event reader collect, shared with the bench.
#[derive(Default)]
struct Series {
    samples: Vec<Sample>,
    decisions: Vec<Decision>,
    phase: &'static str,
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// VmRSS of `pid` in bytes, 0 once it is gone.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// One sample from the API and /proc.
fn sample(api: &ApiClient, pid: u32, t: f64, phase: &'static str) -> Sample {
    let mut s = Sample {
        t,
        phase,
        host_rss_mib: rss(pid) as f64 / MIB as f64,
        ..Sample::default()
    };
    if let Ok((200, b)) = api.get("/balloon") {
        s.balloon_mib = num(&b["actual_mib"]);
        s.target_mib = num(&b["target_mib"]);
    }
    if let Ok((200, st)) = api.get("/balloon/statistics") {
        let m = |k: &str| num(&st[k]).map(|v| v / MIB as f64);
        s.guest_available_mib = m("available_memory");
        // total_memory excludes the balloon (deflate-on-OOM off), so this
        // is what the guest's programs and bookkeeping hold.
        s.guest_used_mib = m("total_memory").zip(m("free_memory")).map(|(t, f)| t - f);
    }
    s
}

/// Reads `GET /events` into `series` until `stop`.
fn read_events(sock: PathBuf, t0: Instant, series: Arc<Mutex<Series>>, stop: Arc<AtomicBool>) {
    let Ok(api) = ApiClient::new(&sock) else {
        return;
    };
    let Ok(mut events) = api.events() else {
        eprintln!("policy bench: GET /events refused; no decisions recorded");
        return;
    };
    let epoch_ms = api_types_now_ms() as f64 - t0.elapsed().as_secs_f64() * 1e3;
    while !stop.load(Ordering::Relaxed) {
        let env = match events.next_event(Duration::from_millis(500)) {
            Ok(Some(env)) => env,
            Ok(None) => return,
            // Timeouts, and events this build's client cannot decode.
            Err(_) => continue,
        };
        let Ok(v) = serde_json::to_value(&env) else {
            continue;
        };
        let kind = v["type"].as_str().unwrap_or("");
        let t = (v["timestamp_ms"].as_f64().unwrap_or(0.0) - epoch_ms) / 1e3;
        let d = match kind {
            "PolicyDecision" => Decision {
                t,
                action: v["action"].as_str().unwrap_or("?").to_string(),
                reason: v["reason"].as_str().unwrap_or("").to_string(),
                old_target_mib: num(&v["old_target_mib"]),
                new_target_mib: num(&v["new_target_mib"]),
                headroom_mib: num(&v["headroom_mib"]),
                host_pressure: v["host_pressure"].as_bool(),
            },
            "BalloonSettled" => Decision {
                t,
                action: "settled".into(),
                reason: format!("actual {} reached {}", v["actual_mib"], v["reached"]),
                old_target_mib: num(&v["target_mib"]),
                new_target_mib: num(&v["target_mib"]),
                headroom_mib: None,
                host_pressure: None,
            },
            _ => continue,
        };
        series.lock().unwrap().decisions.push(d);
    }
}

fn api_types_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The key=value figures of a `ramp` line.
fn figures(line: &str) -> HashMap<String, u64> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim_end_matches("MiB").parse().ok()?)))
        .collect()
}

/// `some avg10=X avg60=X avg300=X total=0` and a `full` line, as
/// /proc/pressure/memory has them, written atomically.
fn write_psi(path: &Path, avg10: f64) {
    let text = format!(
        "some avg10={avg10:.2} avg60={avg10:.2} avg300={avg10:.2} total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    );
    write_atomic(path, text.as_bytes());
}

fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

/// Environment variable with a number of seconds, or `default`.
fn secs_env(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: expected whole seconds")),
        Err(_) => default,
    }
}

struct Bench {
    vm: Vm,
    api: ApiClient,
    t0: Instant,
    series: Arc<Mutex<Series>>,
}

impl Bench {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn phase(&self, name: &'static str) {
        self.series.lock().unwrap().phase = name;
        println!("policy: [{:6.1} s] phase {name}", self.now());
    }

    fn balloon(&self) -> (u64, u64) {
        let (_, b) = self.api.get("/balloon").expect("GET /balloon");
        (
            b["target_mib"].as_u64().unwrap_or(0),
            b["actual_mib"].as_u64().unwrap_or(0),
        )
    }

    /// `GET /balloon/policy` (Null if the route is missing).
    fn policy(&self) -> Value {
        match self.api.get("/balloon/policy") {
            Ok((200, b)) => b,
            _ => Value::Null,
        }
    }

    fn target_changes(&self) -> Option<u64> {
        self.policy()["target_changes"].as_u64()
    }

    /// Waits until the target is at least `min_target` MiB, has not
    /// changed for `quiet` and actual has reached it, at most `limit`.
    /// Returns the target.
    fn wait_settled(&self, min_target: u64, quiet: Duration, limit: Duration) -> u64 {
        let end = Instant::now() + limit;
        let mut last = self.balloon();
        let mut since = Instant::now();
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(500));
            let b = self.balloon();
            if b != last {
                last = b;
                since = Instant::now();
            } else if b.0 == b.1 && b.0 >= min_target && since.elapsed() >= quiet {
                break;
            }
        }
        last.0
    }

    /// Sends `ramp …` and returns its figures and line.
    fn ramp(&mut self, cmd: &str) -> (HashMap<String, u64>, String) {
        self.vm.send(cmd);
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.vm.next_line(left).unwrap_or_else(|| {
                panic!("no answer to '{cmd}' (host {})", common::load_average())
            });
            if line.starts_with("ramp done") || line.starts_with("error: ramp") {
                return (figures(&line), line);
            }
            if line.starts_with("error:") {
                panic!("'{cmd}': {line}");
            }
        }
    }
}

pub fn policy() {
    let off = std::env::var_os("BLIMP_BENCH_POLICY_OFF").is_some();
    let steady_s = secs_env("BLIMP_BENCH_POLICY_STEADY_S", 300);
    let psi_s = secs_env("BLIMP_BENCH_POLICY_PSI_S", 60);
    let out_dir = if off {
        common::repo_root().join("target")
    } else {
        common::repo_root().join("docs")
    };
    let psi = std::env::temp_dir().join(format!("blimp-bench-psi-{}", std::process::id()));
    write_psi(&psi, 0.0);
    let policy_arg = format!("psi_path={}", psi.display());
    let mut args = vec!["--memory", "2G", "--balloon", "stats_interval=1"];
    if !off {
        args.extend_from_slice(&["--balloon-policy", &policy_arg]);
    }
    // Fill 1800 MiB and free 1500: 300 MiB used, ~1.8 GiB resident.
    let (mut vm, api, sock) =
        common::boot_with_api("policy", "fill 1800 1;free 1500;echo READY", &args);
    vm.expect_line("READY", T);
    let t0 = Instant::now();
    let series = Arc::new(Mutex::new(Series {
        phase: "idle",
        ..Series::default()
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (series, stop, sock) = (series.clone(), stop.clone(), sock.clone());
        let pid = vm.pid();
        std::thread::spawn(move || {
            let api = ApiClient::new(&sock).expect("API client");
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let phase = series.lock().unwrap().phase;
                let s = sample(&api, pid, t0.elapsed().as_secs_f64(), phase);
                series.lock().unwrap().samples.push(s);
                next += SAMPLE_EVERY;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        })
    };
    let events = {
        let (series, stop, sock) = (series.clone(), stop.clone(), sock.clone());
        std::thread::spawn(move || read_events(sock, t0, series, stop))
    };
    let mut b = Bench {
        vm,
        api,
        t0,
        series: series.clone(),
    };
    let pol = b.policy();
    let floor_mib = pol["config"]["floor_mib"].as_f64().unwrap_or(256.0);
    println!(
        "policy: 2 GiB test guest, stats every 1 s, {}; host PSI from a file (0 until phase 4)",
        if off {
            "policy OFF (baseline)".to_string()
        } else {
            format!("policy on, defaults: {}", pol["config"])
        }
    );

    // ------------------------------------------------------------ phase 1
    b.phase("idle");
    let rss0 = rss(b.vm.pid());
    println!(
        "policy: guest filled 1800 MiB and freed 1500 (300 MiB used): host RSS {} MiB",
        rss0 / MIB
    );
    let mut dropped_at = None;
    let idle_limit = Duration::from_secs(secs_env("BLIMP_BENCH_POLICY_IDLE_S", 120));
    while b.t0.elapsed() < idle_limit {
        if rss0.saturating_sub(rss(b.vm.pid())) >= 1229 * MIB {
            dropped_at = Some(b.now());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match dropped_at {
        Some(t) => println!(
            "policy: idle: host RSS dropped by >= 1.2 GiB after {t:.1} s (target <= 60 s): {}",
            if t <= 60.0 { "ok" } else { "MISSED" }
        ),
        None => println!(
            "policy: idle: host RSS did NOT drop by 1.2 GiB within {} s (now {} MiB, from {} MiB)",
            idle_limit.as_secs(),
            rss(b.vm.pid()) / MIB,
            rss0 / MIB
        ),
    }
    {
        // What the policy did before its first inflate (holds included).
        let s = series.lock().unwrap();
        let first: Vec<String> = s
            .decisions
            .iter()
            .take_while(|d| d.action != "inflate")
            .map(|d| format!("{:.1}s {} ({})", d.t, d.action, d.reason))
            .collect();
        println!(
            "policy: idle: decisions before the first inflate: {}",
            first.join(", ")
        );
    }
    let idle_target = b.wait_settled(0, Duration::from_secs(15), Duration::from_secs(60));
    let settled = idle_target;
    println!(
        "policy: idle: settled at target {settled} MiB (guest keeps {} MiB), host RSS {} MiB",
        GUEST_MIB.saturating_sub(settled),
        rss(b.vm.pid()) / MIB
    );
    {
        let s = series.lock().unwrap();
        let curve: Vec<String> = s
            .samples
            .iter()
            .filter(|x| x.t <= dropped_at.unwrap_or(60.0) + 5.0)
            .step_by(4)
            .map(|x| format!("{:.0}s:{:.0}", x.t, x.host_rss_mib))
            .collect();
        println!(
            "policy: idle: host RSS curve (MiB, every 2 s): {}",
            curve.join(" ")
        );
    }

    // ------------------------------------------------------------ phase 2
    for rate in [200, 500] {
        b.phase(if rate == 200 { "ramp-200" } else { "ramp-500" });
        let (tg, act) = b.balloon();
        let (f, line) = b.ramp(&format!("ramp 1536 {rate} 0 1 0x11 120"));
        println!("policy: ramp 1536 MiB at {rate} MiB/s from balloon {act}/{tg} MiB: {line}");
        let alloc_s = (f.get("elapsed_ms").copied().unwrap_or(0) as f64
            - f.get("stall_ms").copied().unwrap_or(0) as f64)
            / 1e3;
        println!(
            "policy: ramp {rate}: failed allocations {}, waits {}, longest wait {} ms, total stall {} ms, elapsed {} ms (rate reached outside waits: {:.0} MiB/s)",
            f.get("failed").copied().unwrap_or(1),
            f.get("waits").copied().unwrap_or(0),
            f.get("longest_wait_ms").copied().unwrap_or(0),
            f.get("stall_ms").copied().unwrap_or(0),
            f.get("elapsed_ms").copied().unwrap_or(0),
            f.get("allocated").copied().unwrap_or(0) as f64 / alloc_s.max(1e-3)
        );
        // The ramp freed its 1.5 GiB: wait for the policy to take it back
        // (cool-down, settle, steps) before the next phase.
        b.phase("reclaim");
        let from = b.now();
        let settled = b.wait_settled(
            idle_target.saturating_sub(128),
            Duration::from_secs(5),
            Duration::from_secs(180),
        );
        println!(
            "policy: after the ramp: reclaimed again to target {settled} MiB in {:.0} s",
            b.now() - from
        );
    }

    // ------------------------------------------------------------ phase 3
    b.phase("steady");
    let changes0 = b.target_changes();
    let d0 = series.lock().unwrap().decisions.len();
    let start = b.now();
    b.vm.send("dirty 256 64");
    b.vm.expect_line("dirty on", T);
    let (f, line) = b.ramp(&format!("ramp 512 128 {steady_s} 1 0x33 120"));
    b.vm.send("dirty 0 0");
    b.vm.expect_line("dirty off", T);
    let changes1 = b.target_changes();
    let (n_all, n_late) = {
        let s = series.lock().unwrap();
        let ch: Vec<&Decision> = s.decisions[d0..]
            .iter()
            .filter(|d| d.changes_target())
            .collect();
        (ch.len(), ch.iter().filter(|d| d.t > start + 60.0).count())
    };
    println!("policy: steady: {line}");
    println!(
        "policy: steady load {steady_s} s (512 MiB allocated at 128 MiB/s and held, 256 MiB of the first fill rewritten at 64 MiB/s): {n_all} target changes (GET /balloon/policy target_changes {}), {n_late} after the first 60 s (expected <= 5): {}",
        changes0
            .zip(changes1)
            .map_or("n/a".into(), |(a, c)| (c - a).to_string()),
        if n_all <= 5 { "ok" } else { "MISSED" }
    );
    let _ = f;

    // ------------------------------------------------------------ phase 4
    b.phase("host-psi");
    let settled = b.wait_settled(0, Duration::from_secs(15), Duration::from_secs(90));
    let hr = |from: f64| {
        let s = series.lock().unwrap();
        s.decisions
            .iter()
            .rev()
            .filter(|d| d.t >= from)
            .find_map(|d| d.headroom_mib)
    };
    let before_headroom = hr(0.0);
    let psi_at = b.now();
    write_psi(&psi, 40.0);
    println!("policy: host PSI some avg10 0 -> 40 at {psi_at:.0} s");
    std::thread::sleep(Duration::from_secs(psi_s));
    let after_target = b.balloon().0;
    let after_headroom = hr(psi_at);
    let under_pressure = series
        .lock()
        .unwrap()
        .decisions
        .iter()
        .filter(|d| d.t >= psi_at && d.host_pressure == Some(true))
        .count();
    println!("policy: host pressure: {under_pressure} decisions saw host_pressure=true");
    println!(
        "policy: host pressure: headroom {} -> {} MiB, target {settled} -> {after_target} MiB within {psi_s} s ({})",
        before_headroom.map_or("?".into(), |v| format!("{v:.0}")),
        after_headroom.map_or("?".into(), |v| format!("{v:.0}")),
        if after_target > settled {
            "reclaim rose"
        } else {
            "reclaim did NOT rise"
        }
    );
    write_psi(&psi, 0.0);

    b.vm.send("exit 0");
    b.vm.wait(T);
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let _ = events.join();
    let _ = std::fs::remove_file(&psi);

    let s = series.lock().unwrap();
    let under_floor: Vec<&Sample> = s
        .samples
        .iter()
        .filter(|x| {
            x.balloon_mib
                .is_some_and(|a| (GUEST_MIB as f64 - a) < floor_mib)
        })
        .collect();
    println!(
        "policy: floor {floor_mib:.0} MiB: guest memory (RAM - balloon) below it in {} of {} samples",
        under_floor.len(),
        s.samples.len()
    );
    let csv = out_dir.join(if off { "policy-off.csv" } else { "policy.csv" });
    let svg = out_dir.join(if off { "policy-off.svg" } else { "policy.svg" });
    write_atomic(&csv, to_csv(&s.samples, &s.decisions).as_bytes());
    let chart = chart_svg(&s.samples, &s.decisions).expect("drawing the chart");
    write_atomic(&svg, chart.as_bytes());
    println!(
        "policy: wrote {} ({} samples, {} decisions) and {}",
        csv.display(),
        s.samples.len(),
        s.decisions.len(),
        svg.display()
    );
}

/// The time series as CSV: one row per sample, the decisions made since
/// the previous sample in the last column (`action:old->new`, `|`-joined).
pub fn to_csv(samples: &[Sample], decisions: &[Decision]) -> String {
    let mut out = String::from(
        "t_s,phase,guest_used_mib,balloon_mib,target_mib,guest_available_mib,host_rss_mib,decisions\n",
    );
    let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.1}"));
    let mut prev = f64::NEG_INFINITY;
    for s in samples {
        let ds: Vec<String> = decisions
            .iter()
            .filter(|d| d.t > prev && d.t <= s.t && d.action != "hold")
            .map(Decision::label)
            .collect();
        prev = s.t;
        out.push_str(&format!(
            "{:.2},{},{},{},{},{},{:.1},{}\n",
            s.t,
            s.phase,
            f(s.guest_used_mib),
            f(s.balloon_mib),
            f(s.target_mib),
            f(s.guest_available_mib),
            s.host_rss_mib,
            ds.join("|")
        ));
    }
    out
}

/// The chart: guest used, balloon, guest available and host RSS over time,
/// inflate/deflate decisions as ticks along the top.
pub fn chart_svg(samples: &[Sample], decisions: &[Decision]) -> Result<String, String> {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let t_max = samples.last().map_or(1.0, |s| s.t).max(1.0);
        let y_max = samples
            .iter()
            .map(|s| s.host_rss_mib)
            .fold(GUEST_MIB as f64, f64::max)
            * 1.3;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Blimp balloon policy, 2 GiB test guest (MiB over seconds)",
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("MiB")
            .draw()
            .map_err(|e| e.to_string())?;
        type Get = fn(&Sample) -> Option<f64>;
        let lines: [(&str, RGBColor, Get); 4] = [
            ("guest used", BLUE, |s| s.guest_used_mib),
            ("balloon", RGBColor(230, 120, 0), |s| s.balloon_mib),
            ("guest available", RGBColor(0, 150, 0), |s| {
                s.guest_available_mib
            }),
            ("host RSS", RED, |s| Some(s.host_rss_mib)),
        ];
        for (name, color, get) in lines {
            let pts: Vec<(f64, f64)> = samples
                .iter()
                .filter_map(|s| get(s).map(|v| (s.t, v)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        // Decisions: green ticks for inflate, purple for deflate, along
        // the bottom.
        let top = y_max;
        let ticks = decisions.iter().filter(|d| d.changes_target()).map(|d| {
            let c = if d.action == "inflate" {
                RGBColor(0, 150, 0)
            } else {
                RGBColor(150, 0, 150)
            };
            PathElement::new(vec![(d.t, 0.0), (d.t, top * 0.05)], c.stroke_width(2))
        });
        chart
            .draw_series(ticks)
            .map_err(|e| e.to_string())?
            .label("decision (green inflate, purple deflate)")
            .legend(|(x, y)| PathElement::new(vec![(x, y - 6), (x, y + 6)], BLACK));
        // Phase boundaries.
        let mut marks = Vec::new();
        for w in samples.windows(2) {
            if w[0].phase != w[1].phase {
                marks.push((w[1].t, w[1].phase));
            }
        }
        for (i, (t, phase)) in marks.into_iter().enumerate() {
            // Alternate heights so close boundaries stay readable.
            let y = if i % 2 == 0 { 0.74 } else { 0.70 };
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(t, top * 0.06), (t, top * (y + 0.02))],
                    RGBColor(160, 160, 160),
                )))
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(std::iter::once(Text::new(
                    phase.to_string(),
                    (t, top * (y + 0.03)),
                    ("sans-serif", 12),
                )))
                .map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}
