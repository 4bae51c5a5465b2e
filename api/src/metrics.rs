//! The server's own counters and the Prometheus text rendering of `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::types::VmmMetrics;

#[derive(Default)]
pub(crate) struct ServerStats {
    requests: Mutex<BTreeMap<u16, u64>>,
    pub connections_total: AtomicU64,
    pub connections_evicted: AtomicU64,
    pub connections_rejected: AtomicU64,
    pub vmm_timeouts: AtomicU64,
    pub vmm_unavailable: AtomicU64,
    pub events_dropped: AtomicU64,
}

impl ServerStats {
    pub fn count_request(&self, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry(status).or_insert(0) += 1;
        }
    }

    pub fn requests(&self) -> BTreeMap<u16, u64> {
        self.requests.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// Snapshot of values that live outside [`ServerStats`].
pub(crate) struct Gauges {
    pub connections_active: usize,
    pub event_readers: usize,
    pub events_published: u64,
    pub vmm_up: bool,
}

/// A Prometheus metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`; others become `_`.
pub(crate) fn sanitize_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// HELP text as the exposition format wants it: one line, `\` and
/// newlines escaped.
fn escape_help(h: &str) -> String {
    h.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('\\', "\\\\")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A family of one unlabelled sample for each `(name, help, value)`.
fn samples(out: &mut String, kind: &str, rows: &[(&str, &str, u64)]) {
    for (name, help, v) in rows {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
}

pub(crate) fn render(vmm: Option<&VmmMetrics>, stats: &ServerStats, g: &Gauges) -> String {
    let mut out = String::with_capacity(2048);
    family(
        &mut out,
        "blimp_api_requests_total",
        "counter",
        "API requests answered, by HTTP status.",
    );
    for (status, n) in stats.requests() {
        let _ = writeln!(out, "blimp_api_requests_total{{status=\"{status}\"}} {n}");
    }
    let counters: [(&str, &str, u64); 7] = [
        (
            "blimp_api_connections_total",
            "Connections accepted.",
            stats.connections_total.load(Ordering::Relaxed),
        ),
        (
            "blimp_api_connections_evicted_total",
            "Idle connections closed to make room for new ones.",
            stats.connections_evicted.load(Ordering::Relaxed),
        ),
        (
            "blimp_api_connections_rejected_total",
            "Connections refused because all slots were busy.",
            stats.connections_rejected.load(Ordering::Relaxed),
        ),
        (
            "blimp_api_vmm_timeouts_total",
            "Requests the VMM did not answer in time.",
            stats.vmm_timeouts.load(Ordering::Relaxed),
        ),
        (
            "blimp_api_vmm_unavailable_total",
            "Requests that could not be queued for the VMM.",
            stats.vmm_unavailable.load(Ordering::Relaxed),
        ),
        (
            "blimp_api_events_dropped_total",
            "Events slow readers missed.",
            stats.events_dropped.load(Ordering::Relaxed),
        ),
        (
            "blimp_api_events_published_total",
            "Events the VMM published.",
            g.events_published,
        ),
    ];
    samples(&mut out, "counter", &counters);
    let gauges: [(&str, &str, u64); 3] = [
        (
            "blimp_api_connections_active",
            "Open API connections.",
            g.connections_active as u64,
        ),
        (
            "blimp_api_event_readers",
            "Open GET /events streams.",
            g.event_readers as u64,
        ),
        (
            "blimp_vmm_up",
            "1 if the VMM answered the metrics request.",
            g.vmm_up as u64,
        ),
    ];
    samples(&mut out, "gauge", &gauges);
    if let Some(m) = vmm {
        render_vmm(&mut out, m);
    }
    out
}

/// The VMM's counters and gauges.
fn render_vmm(out: &mut String, m: &VmmMetrics) {
    // Every family gets a HELP line: the VMM's text, or a plain one.
    let help = |name: &str| {
        m.help
            .get(name)
            .map(|h| escape_help(h))
            .unwrap_or_else(|| format!("VMM metric {name}."))
    };
    for (name, v) in &m.counters {
        let h = help(name);
        let name = sanitize_name(name);
        family(out, &name, "counter", &h);
        let _ = writeln!(out, "{name} {v}");
    }
    for (name, v) in &m.gauges {
        let h = help(name);
        let name = sanitize_name(name);
        family(out, &name, "gauge", &h);
        let _ = writeln!(out, "{name} {}", fmt_f64(*v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(sanitize_name("a.b-c"), "a_b_c");
        assert_eq!(sanitize_name("9x"), "_9x");
        assert_eq!(sanitize_name(""), "_");
        assert_eq!(sanitize_name("ok_name:x"), "ok_name:x");
    }

    #[test]
    fn render_text() {
        let stats = ServerStats::default();
        stats.count_request(200);
        stats.count_request(200);
        stats.count_request(404);
        let mut vmm = VmmMetrics::default();
        vmm.counters
            .insert("blimp_balloon_inflate_pages_total".into(), 7);
        vmm.gauges.insert("blimp guest free".into(), f64::INFINITY);
        let text = render(
            Some(&vmm),
            &stats,
            &Gauges {
                connections_active: 1,
                event_readers: 0,
                events_published: 3,
                vmm_up: true,
            },
        );
        assert!(text.contains("blimp_api_requests_total{status=\"200\"} 2\n"));
        assert!(text.contains("blimp_api_requests_total{status=\"404\"} 1\n"));
        assert!(text.contains("# TYPE blimp_balloon_inflate_pages_total counter\n"));
        assert!(text.contains("# HELP blimp_balloon_inflate_pages_total VMM metric"));
        assert!(text.contains("# HELP blimp_guest_free VMM metric"));
        assert!(text.contains("blimp_balloon_inflate_pages_total 7\n"));
        assert!(text.contains("blimp_guest_free +Inf\n"));
        assert!(text.contains("blimp_vmm_up 1\n"));
        assert!(text.ends_with('\n'));
    }
}
