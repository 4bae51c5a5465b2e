//! The host's memory pressure and MemAvailable, read when the policy
//! decides: PSI's `some avg10` from the configured file
//! (`/proc/pressure/memory`, a cgroup's `memory.pressure`, or a test's
//! file) and `/proc/meminfo`. Reads are bounded and never block (the
//! policy reads on the event loop, holding its state's lock); nothing here
//! panics on what the file holds.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

use crate::migration::file_dest::FileKind;

/// Most bytes read of either file.
const MAX_READ: u64 = 8192;

/// Open `path` for reading without blocking: O_NONBLOCK, so that opening a
/// FIFO with no writer (or a device) returns at once, and anything but a
/// regular file is refused before its first read (a FIFO or a character
/// device such as /dev/kmsg can make a read wait forever). std opens with
/// O_CLOEXEC; O_NOCTTY keeps a terminal from becoming blimp's. The files
/// this module reads (/proc/pressure/*, a cgroup's memory.pressure,
/// /proc/meminfo) are regular files, whose reads do not wait.
fn open_regular(path: &str) -> Result<File, String> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    let t = f
        .metadata()
        .map_err(|e| format!("cannot stat {path}: {e}"))?
        .file_type();
    if let Some(kind) = FileKind::of_type(t) {
        return Err(format!(
            "{path} is not a regular file ({kind}): not read, a read could block the event loop"
        ));
    }
    Ok(f)
}

fn read_bounded(path: &str) -> Result<String, String> {
    let mut s = String::new();
    open_regular(path)?
        .take(MAX_READ)
        .read_to_string(&mut s)
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    Ok(s)
}

/// A new `psi_path`, checked when a request sets it: one that exists must
/// be a regular file (see [`open_regular`]). One that does not exist, or
/// cannot be looked at, is allowed as before (a kernel without PSI, a
/// cgroup not created yet): the policy decides without host pressure
/// until it can read it.
pub fn check_psi_path(path: &str) -> Result<(), String> {
    match std::fs::metadata(path).map(|m| FileKind::of_type(m.file_type())) {
        Ok(Some(kind)) => Err(format!(
            "psi_path {path} is not a regular file ({kind}): the policy reads host memory pressure from a regular file such as /proc/pressure/memory or a cgroup's memory.pressure"
        )),
        _ => Ok(()),
    }
}

/// `some avg10=X` of a PSI file, percent. Errors name the path.
pub fn read_psi(path: &str) -> Result<f64, String> {
    let text = read_bounded(path)?;
    parse_psi(&text).map_err(|e| format!("{path}: {e}"))
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

    /// A FIFO at a fresh path under the temporary directory.
    fn fifo(name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "blimp-psi-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&path);
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        path
    }

    /// A FIFO with no writer: opening it without O_NONBLOCK, or reading it,
    /// waits forever. The read runs on its own thread so that a regression
    /// fails the test instead of hanging it.
    #[test]
    fn a_fifo_is_refused_at_once() {
        let path = fifo("read");
        let p = path.to_str().unwrap().to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(read_psi(&p)));
        let r = rx.recv_timeout(std::time::Duration::from_secs(5));
        std::fs::remove_file(&path).unwrap();
        let e = r.expect("read_psi on a FIFO blocked").unwrap_err();
        assert!(e.contains("not a regular file (a FIFO)"), "{e}");
        assert!(e.contains(path.to_str().unwrap()), "{e}");
    }

    #[test]
    fn only_regular_files_are_read() {
        let e = read_psi("/dev/null").unwrap_err();
        assert!(
            e.contains("/dev/null is not a regular file (a character device)"),
            "{e}"
        );
        assert!(read_psi("/").unwrap_err().contains("a directory"));
        assert!(
            read_psi("/nonexistent/psi")
                .unwrap_err()
                .contains("/nonexistent/psi")
        );
        let file = std::env::temp_dir().join(format!("blimp-psi-file-{}", std::process::id()));
        std::fs::write(&file, "some avg10=2.50 avg60=0 avg300=0 total=1\n").unwrap();
        let r = read_psi(file.to_str().unwrap());
        std::fs::remove_file(&file).unwrap();
        assert_eq!(r, Ok(2.5));
        assert!(mem_available().is_some_and(|b| b > 0), "/proc/meminfo");
    }

    #[test]
    fn a_new_psi_path_must_be_a_regular_file_if_it_exists() {
        let path = fifo("check");
        let r = check_psi_path(path.to_str().unwrap());
        std::fs::remove_file(&path).unwrap();
        let e = r.unwrap_err();
        assert!(
            e.starts_with(&format!(
                "psi_path {} is not a regular file (a FIFO)",
                path.display()
            )),
            "{e}"
        );
        assert!(
            check_psi_path("/dev/null")
                .unwrap_err()
                .contains("character device")
        );
        assert_eq!(check_psi_path("/proc/meminfo"), Ok(()));
        assert_eq!(
            check_psi_path("/nonexistent/memory.pressure"),
            Ok(()),
            "unknown until it exists"
        );
    }
}
