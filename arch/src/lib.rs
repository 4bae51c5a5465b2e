//! x86_64 boot layout for Blimp: the guest-physical memory map, e820 and
//! `boot_params` (the Linux 64-bit boot protocol), identity page tables, GDT,
//! initial registers, CPUID and MSRs, the MP table and the LAPIC's LINT pins.
//!
//! Everything here is pure data building: this crate opens no file
//! descriptors; the VMM applies what it builds to KVM.

#![forbid(unsafe_code)]

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msrs;
pub mod paging;
pub mod pvm;
pub mod regs;

pub use layout::{MemoryLayout, RamRegion};
