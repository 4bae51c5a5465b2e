//! Blimp's VM and vCPU lifecycle, guest memory, event loop, dirty tracking
//! and migration.

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
mod machine;
pub mod memory;
pub mod migration;
pub mod policy;
pub mod punch;
pub mod pvm;
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
