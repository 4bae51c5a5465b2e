//! Blimp's VM and vCPU lifecycle, guest memory, event loop, dirty tracking
//! and migration.

/// `eprintln!` that never panics: a message for a stderr that cannot take
/// it (a hung-up terminal: EIO; a full disk: ENOSPC; a closed pipe: EPIPE)
/// is lost, instead of turning an orderly exit into a panic (exit 101).
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod api_handler;
pub mod boot;
pub mod bus;
pub mod config;
pub mod console;
pub mod device_manager;
pub mod device_state;
pub mod discard_workers;
pub mod emulation;
mod error;
pub mod exit;
pub mod limits;
mod machine;
pub mod memory;
pub mod migration;
pub mod policy;
pub mod punch;
pub mod pvm;
mod ram_holes;
pub mod ram_stripes;
pub mod restore;
pub mod sched;
pub mod seccomp;
pub mod signals;
pub mod vcpu;
pub mod vm;
mod vmm;

pub use config::{BalloonConfig, MemoryBackend, VmConfig};
pub use error::error_chain;
pub use exit::ExitReason;
pub use vmm::{Error, Vmm};
