//! Why the VM stopped, and how any thread asks it to stop.

use std::sync::Mutex;

use devices::bus::{ExitRequest, ExitSignal};
use vmm_sys_util::eventfd::EventFd;

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset or powered off the machine (i8042 reset, triple fault, system event).
    GuestReset,
    /// The guest wrote a status to the debug-exit port.
    DebugExit(u8),
    /// The VMM received a terminating signal.
    Signal(i32),
    /// Shutdown requested through the API.
    Shutdown,
    /// `Ctrl-A x` typed on the console's terminal.
    ConsoleQuit,
    /// The VM was migrated away: it lives on at the destination.
    Migrated,
    /// A fatal error (vCPU failure, unhandled emulation failure, ...).
    Error(String),
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset
            | ExitReason::Shutdown
            | ExitReason::ConsoleQuit
            | ExitReason::Migrated => 0,
            ExitReason::DebugExit(v) => i32::from(*v),
            ExitReason::Signal(s) => 128 + s,
            ExitReason::Error(_) => 1,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "the guest reset the machine"),
            ExitReason::DebugExit(v) => write!(f, "the guest wrote {v} to the debug-exit port"),
            ExitReason::Signal(s) => write!(f, "received signal {s}"),
            ExitReason::Shutdown => write!(f, "shutdown requested through the API"),
            ExitReason::ConsoleQuit => write!(f, "Ctrl-A x typed on the console"),
            ExitReason::Migrated => write!(f, "the VM was migrated to its destination"),
            ExitReason::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// The VM's stop switch: the first reason recorded wins; the event loop
/// watches the eventfd.
pub struct VmExit {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl VmExit {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Record `why` (unless a reason is already recorded) and wake the event loop.
    pub fn stop(&self, why: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            log::debug!("VM stop requested: {why}");
            *r = Some(why);
        }
        drop(r);
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot signal VM exit: {e}");
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ExitSignal for VmExit {
    fn request_exit(&self, why: ExitRequest) {
        self.stop(match why {
            ExitRequest::Reset => ExitReason::GuestReset,
            ExitRequest::DebugExit(v) => ExitReason::DebugExit(v),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_codes() {
        let e = VmExit::new().unwrap();
        e.request_exit(ExitRequest::DebugExit(3));
        e.stop(ExitReason::GuestReset);
        assert_eq!(e.reason(), Some(ExitReason::DebugExit(3)));
        assert_eq!(e.reason().unwrap().exit_code(), 3);
        assert_eq!(ExitReason::Signal(15).exit_code(), 143);
        assert_eq!(ExitReason::Error("x".into()).exit_code(), 1);
    }
}
