//! Blimp's devices: legacy devices (serial, i8042, debug-exit), the virtio-mmio
//! transport and the virtio balloon.
//!
//! Devices know nothing of KVM file descriptors, HTTP or migration streams. They
//! touch guest memory only through [`GuestMemory`] (bounds-checked vm-memory
//! accesses, which also mark the VMM's own dirty bitmap) and release host memory
//! only through [`RamDiscard`], which the VMM implements over its backings.

#![forbid(unsafe_code)]

pub mod bus;
pub mod legacy;
pub mod persist;
pub mod virtio;

use std::fmt;

/// The bitmap type that records pages the VMM itself writes into guest memory
/// (used rings, stats buffers, ...). Migration ORs it with KVM's dirty log.
pub type DirtyBitmap = vm_memory::bitmap::AtomicBitmap;

/// Guest memory as every device sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<DirtyBitmap>;

/// The guest page: the unit of balloon PFNs (virtio spec: always 4 KiB,
/// whatever the host page size), of KVM's dirty log on x86_64, of the VMM's
/// own dirty bitmap and of the migration stream. The one definition every
/// crate above `devices` uses.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// `log2(PAGE_SIZE)`: a PFN is a guest-physical address shifted right by it.
pub const PAGE_SHIFT: u32 = 12;

/// A half-open range of guest-physical addresses `[start, start + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GpaRange {
    pub start: u64,
    pub len: u64,
}

impl GpaRange {
    pub fn new(start: u64, len: u64) -> Self {
        Self { start, len }
    }
    /// One past the last byte; `None` if it would overflow.
    pub fn end(&self) -> Option<u64> {
        self.start.checked_add(self.len)
    }
}

impl fmt::Display for GpaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, +{:#x})", self.start, self.len)
    }
}

/// What a discard did, for metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscardOutcome {
    /// Bytes whose host backing was actually released.
    pub bytes_released: u64,
    /// Number of syscalls (madvise/fallocate) issued.
    pub syscalls: u64,
}

impl std::ops::AddAssign for DiscardOutcome {
    fn add_assign(&mut self, o: Self) {
        self.bytes_released += o.bytes_released;
        self.syscalls += o.syscalls;
    }
}

/// Errors from [`RamDiscard`].
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("range {0} is not inside guest RAM")]
    OutOfRange(GpaRange),
    #[error("discarding {range} failed: {source}")]
    Syscall {
        range: GpaRange,
        #[source]
        source: std::io::Error,
    },
}

/// Releasing guest RAM back to the host, implemented by the VMM's `GuestRam`
/// (which knows each region's backing: private anonymous memory needs
/// `MADV_DONTNEED`, shared memory `fallocate(PUNCH_HOLE)`, hugetlbfs whole
/// huge pages only). The single place in Blimp that frees guest memory.
pub trait RamDiscard: Send + Sync {
    /// Release the host backing of `range`. The range must lie inside one RAM
    /// region or span several contiguous ones; callers validate first, the
    /// implementation checks again and refuses anything outside RAM.
    fn discard(&self, range: GpaRange) -> Result<DiscardOutcome, DiscardError>;

    /// Release the host backing of free pages the guest keeps (a free page
    /// hint or report): it may reuse them at any moment without a word, so
    /// nothing may be remembered about them for later. A backing that frees
    /// memory only in larger units (hugetlbfs) releases the units the range
    /// covers whole and leaves the rest as it is. By default `discard`.
    fn discard_free(&self, range: GpaRange) -> Result<DiscardOutcome, DiscardError> {
        self.discard(range)
    }

    /// Hint that `range` is about to be used again (after a deflate). Optional.
    fn will_need(&self, _range: GpaRange) {}

    /// The guest has every page back (a device reset): forget whatever was
    /// kept about pages it gave up before. Optional.
    fn forget_all(&self) {}
}
