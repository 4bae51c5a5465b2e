//! The VMM's errors: [`Error`] for building and running a VM, and
//! [`RestoreError`] for what a restore adds. Below every other file of the
//! crate that builds a VM, so that none of them needs `vmm.rs`.

use std::path::PathBuf;

use crate::boot::BootError;
use crate::bus::BusError;
use crate::device_manager::DeviceError;
use crate::memory::MemoryError;
use crate::migration::handshake::HandshakeError;
use crate::vcpu::VcpuError;
use crate::vm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Layout(#[from] arch::layout::LayoutError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("placing a device: {0}")]
    Bus(#[from] BusError),
    #[error("placing a virtio device: {0}")]
    Device(#[from] DeviceError),
    #[error("balloon: {0}")]
    Balloon(#[from] devices::virtio::balloon::Error),
    #[error("restoring: {0}")]
    Restore(#[from] RestoreError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("seccomp: {0}")]
    Seccomp(#[from] crate::seccomp::Error),
}

impl Error {
    /// True when the error comes from what the user asked for (a file that is
    /// not a kernel, an initrd that does not fit, a backing that cannot be
    /// had) rather than from the host failing at run time.
    /// An input file the host could not open for want of descriptors or
    /// memory, or an I/O error, is the host's failure, not a usage error.
    pub fn is_usage(&self) -> bool {
        use crate::boot::BootError;
        match self {
            Error::Boot(
                BootError::OpenKernel { source, .. } | BootError::ReadInitrd { source, .. },
            )
            | Error::Memory(MemoryError::File { source, .. }) => !host_short(source),
            _ => matches!(
                self,
                Error::Layout(_)
                    | Error::Boot(_)
                    | Error::Memory(
                        MemoryError::NoHugePages { .. }
                            | MemoryError::FileInUse { .. }
                            | MemoryError::ThpOnHugetlb
                    )
                    | Error::Vm(VmError::TooManyVcpus { .. })
            ),
        }
    }
}

/// The host ran short (descriptors, memory) or failed (I/O): not the
/// user's input at fault.
fn host_short(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EIO)
    )
}

pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Errors specific to restoring.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Stream(#[from] crate::migration::stream::StreamError),
    #[error("the migration stream's state section: {0}")]
    State(#[from] crate::migration::state::StateError),
    #[error("the migration stream's device state: {0}")]
    Devices(String),
    #[error(
        "the source sends stream format version {version}, which has no switchover handshake (version {} and later): upgrade the source blimp; nothing was run",
        crate::migration::stream::HANDSHAKE_VERSION
    )]
    NoHandshake { version: u32 },
    #[error("{len} bytes follow the trailer: the stream must end there")]
    TrailingBytes { len: usize },
    #[error("the source did not hand the VM over: {0}; not running it")]
    NoHandover(#[source] HandshakeError),
    #[error("cannot open {what}: {source}")]
    Open {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a regular file ({kind}); a migration file is needed")]
    NotAFile {
        path: PathBuf,
        kind: crate::migration::file_dest::FileKind,
    },
    #[error("guest RAM file: {0}")]
    RamFile(#[source] crate::migration::file_dest::Error),
    #[error("cannot prepare guest memory for the restore: {0}")]
    Memory(#[from] crate::memory::MemoryError),
    #[error(
        "signal {signal} while waiting for an incoming migration on {url}: nothing was received"
    )]
    Interrupted { url: String, signal: i32 },
}

/// `e` and its causes, each once (a cause whose text `e` already shows is
/// left out): what the user reads, and what a destination sends its source.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::BootError;

    #[test]
    fn a_kernel_the_host_could_not_open_is_not_a_usage_error() {
        let open = |errno| {
            Error::Boot(BootError::OpenKernel {
                path: "vmlinux".into(),
                source: std::io::Error::from_raw_os_error(errno),
            })
        };
        // The user's input: a missing or unreadable kernel (exit 2).
        assert!(open(libc::ENOENT).is_usage());
        assert!(open(libc::EACCES).is_usage());
        // The host's shortage: out of descriptors or memory (exit 1).
        assert!(!open(libc::EMFILE).is_usage());
        assert!(!open(libc::ENFILE).is_usage());
        assert!(!open(libc::ENOMEM).is_usage());
        let file = |errno| {
            Error::Memory(MemoryError::File {
                path: "ram".into(),
                source: std::io::Error::from_raw_os_error(errno),
            })
        };
        assert!(file(libc::EACCES).is_usage());
        assert!(!file(libc::EMFILE).is_usage());
    }
}
