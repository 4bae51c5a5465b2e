//! Blimp's VM and vCPU lifecycle, guest memory, event loop, dirty tracking and migration.

pub mod bus;
pub mod config;
pub mod memory;
