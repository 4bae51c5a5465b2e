//! Size limits of a migration stream, shared by the stream reader
//! (`stream.rs`) and the VM state (`state.rs`) without either naming the
//! other.

use arch::MemoryLayout;

use devices::PAGE_SIZE;

/// Largest state section written or accepted; the reader accepts at most
/// what the stream's guest can have ([`max_state_bytes`]).
pub const MAX_STATE_BYTES: u32 = 256 << 20;
/// Most RAM regions a stream header may list.
pub const MAX_REGIONS: u32 = 64;
/// Most vCPUs a VM has (as `blimp run --vcpus`).
pub const MAX_VCPUS: usize = 254;
/// State section allowance for everything but the vCPUs and the balloon's
/// inflated runs (VM devices, serial, balloon and transport fixed parts).
pub const STATE_FIXED_BYTES: u64 = 256 << 10;
/// State section allowance per vCPU: the JSON of a vCPU with the most
/// CPUID entries and MSRs and the widest values fits (a unit test checks).
pub const STATE_PER_VCPU_BYTES: u64 = 96 << 10;
/// State section allowance per guest page: one balloon inflated run (the
/// runs are at most one per page) in JSON.
pub const STATE_PER_PAGE_BYTES: u64 = 48;

/// The largest state section a guest with RAM `layout` can have: the fixed
/// part, [`MAX_VCPUS`] vCPUs, and one balloon run per page, at most
/// [`MAX_STATE_BYTES`]. Checked at the state record's header, before its
/// payload is read.
pub fn max_state_bytes(layout: &MemoryLayout) -> u32 {
    let pages = layout.size() / PAGE_SIZE;
    let limit = STATE_FIXED_BYTES
        .saturating_add(STATE_PER_VCPU_BYTES * MAX_VCPUS as u64)
        .saturating_add(pages.saturating_mul(STATE_PER_PAGE_BYTES));
    u32::try_from(limit.min(u64::from(MAX_STATE_BYTES))).unwrap_or(MAX_STATE_BYTES)
}
