//! The host's memory pressure and MemAvailable, read when the policy
//! decides: PSI's `some avg10` from the configured file
//! (`/proc/pressure/memory`, a cgroup's `memory.pressure`, or a test's
//! file) and `/proc/meminfo`. Reads are bounded; nothing here panics on
//! what the file holds.

use std::io::Read;

/// Most bytes read of either file.
const MAX_READ: u64 = 8192;

fn read_bounded(path: &str) -> std::io::Result<String> {
    let mut s = String::new();
    std::fs::File::open(path)?
        .take(MAX_READ)
        .read_to_string(&mut s)?;
    Ok(s)
}

/// `some avg10=X` of a PSI file, percent.
pub fn read_psi(path: &str) -> Result<f64, String> {
    let text = read_bounded(path).map_err(|e| e.to_string())?;
    parse_psi(&text)
}

pub fn parse_psi(text: &str) -> Result<f64, String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("some "))
        .ok_or("no `some` line")?;
    let v = line
        .split_whitespace()
        .find_map(|t| t.strip_prefix("avg10="))
        .ok_or("no avg10= on the `some` line")?;
    v.parse::<f64>()
        .ok()
        .filter(|p| p.is_finite() && *p >= 0.0)
        .ok_or_else(|| format!("avg10={v}: not a percentage"))
}

/// Host MemAvailable in bytes (`None`: unreadable).
pub fn mem_available() -> Option<u64> {
    let text = read_bounded("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_lines() {
        let t = "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=5\n";
        assert_eq!(parse_psi(t), Ok(12.5));
        assert!(parse_psi("full avg10=1.00").is_err());
        assert!(parse_psi("some avg10=abc").unwrap_err().contains("abc"));
        assert!(parse_psi("some avg10=-1").is_err());
        assert!(parse_psi("").is_err());
    }
}
