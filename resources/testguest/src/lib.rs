//! Pure logic of the Blimp test guest, kept free of hardware access so that
//! `cargo test --lib` exercises it on the host. The freestanding binary
//! (`main.rs`) links this library and adds the ring-0/ring-3 machinery.
#![cfg_attr(not(test), no_std)]

pub mod balloon_proto;
pub mod cmdline;
pub mod command;
pub mod frames;
pub mod lineedit;
pub mod num;
pub mod pattern;
pub mod ramp;
pub mod virtq;
