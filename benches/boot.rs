//! Boot latency: time from spawning `blimp run` to the test guest's first
//! serial line, for a 512 MiB guest. Prints min / median / p90 over N runs.
//!
//! `cargo bench --bench boot` (BLIMP_BENCH_RUNS=N to change the run count).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn testguest() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("resources/build.sh"))
        .arg("testguest")
        .stderr(Stdio::inherit())
        .output()
        .expect("resources/build.sh testguest");
    assert!(out.status.success(), "building the test guest failed");
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("ELF path")
            .trim(),
    )
}

fn blimp() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new("cargo")
        .args(["build", "--release", "--bin", "blimp"])
        .current_dir(&root)
        .status()
        .expect("cargo build");
    assert!(status.success());
    root.join("target/release/blimp")
}

fn one_boot(blimp: &PathBuf, kernel: &PathBuf) -> Duration {
    let start = Instant::now();
    let mut child = Command::new(blimp)
        .args([
            "run",
            "--memory",
            "512M",
            "--debug-exit",
            "--no-stdin",
            "--kernel",
        ])
        .arg(kernel)
        .args(["--cmdline", "testguest.run=\"exit 0\""])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn blimp");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first serial line");
    let t = start.elapsed();
    let status = child.wait().expect("wait");
    assert!(
        status.success(),
        "guest did not exit 0: {status:?} (first line: {line:?})"
    );
    t
}

fn main() {
    let runs: usize = std::env::var("BLIMP_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let (blimp, kernel) = (blimp(), testguest());
    one_boot(&blimp, &kernel); // warm the page cache
    let mut t: Vec<Duration> = (0..runs).map(|_| one_boot(&blimp, &kernel)).collect();
    t.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "boot: `blimp run` to first serial line, 512 MiB test guest, {runs} runs: min {:.2} ms, median {:.2} ms, p90 {:.2} ms, max {:.2} ms",
        ms(t[0]),
        ms(t[runs / 2]),
        ms(t[(runs * 9 / 10).min(runs - 1)]),
        ms(t[runs - 1])
    );
}
