//! p50/p99 latency of GET /balloon and PATCH /balloon over one keep-alive
//! connection, against a fake VMM that answers at once.
//!
//! `cargo bench -p api --bench latency` (N=10000 by default; BENCH_N to change).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use api::client::ApiClient;
use serde_json::json;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut v: Vec<Duration>) -> Duration {
    v.sort();
    let sum: Duration = v.iter().sum();
    let p99 = pct(&v, 0.99);
    println!(
        "{name:<16} n={:<6} mean={:>7.1?} p50={:>7.1?} p90={:>7.1?} p99={:>7.1?} max={:>7.1?}",
        v.len(),
        sum / v.len() as u32,
        pct(&v, 0.5),
        pct(&v, 0.9),
        p99,
        v[v.len() - 1]
    );
    p99
}

fn main() {
    // `cargo test --benches` runs this too; keep that quick.
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if std::env::args().any(|a| a == "--bench") {
            10_000
        } else {
            200
        });
    let vmm = common::FakeVmm::start();
    let c = ApiClient::new(&vmm.sock).expect("client");
    // Warm up the connection and both code paths.
    for _ in 0..200 {
        let _ = c.get("/balloon");
        let _ = c.patch("/balloon", &json!({"target_mib": 1}));
    }
    let mut get = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (s, _) = c.get("/balloon").expect("GET /balloon");
        get.push(t.elapsed());
        assert_eq!(s, 200);
    }
    let mut patch = Vec::with_capacity(n);
    for i in 0..n {
        let body = json!({ "target_mib": (i % 512) as u64 });
        let t = Instant::now();
        let (s, _) = c.patch("/balloon", &body).expect("PATCH /balloon");
        patch.push(t.elapsed());
        assert_eq!(s, 204);
    }
    let metrics = c.metrics().expect("metrics");
    let conns = metrics
        .lines()
        .find_map(|l| l.strip_prefix("blimp_api_connections_total "))
        .unwrap_or("?");
    println!("one keep-alive connection (connections accepted: {conns}), fake VMM thread");
    let p99_get = report("GET /balloon", get);
    let p99_patch = report("PATCH /balloon", patch);
    let goal = Duration::from_millis(1);
    println!(
        "p99 goal < 1 ms: {}",
        if p99_get < goal && p99_patch < goal {
            "met"
        } else {
            "NOT met"
        }
    );
}
