//! Interrupt bookkeeping shared between the ring-0 stubs (boot/idt.rs) and
//! the ring-3 program, and the idle call.
//!
//! Every device interrupt increments [`EVENTS`]. Ring 3 waits race-free:
//! read [`EVENTS`], look for work, and if there is none call [`wait`] with
//! the value read; the ring-0 idle stub only halts if no interrupt arrived
//! in between (`sti; hlt` makes the check-and-halt atomic).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Device interrupt vectors 0x20..0x40, indexed from 0.
pub const NUM_IRQ_VECTORS: usize = 32;
/// Index of the LAPIC timer vector (0x20).
pub const IRQ_TIMER: usize = 0;
/// Index of the COM1 vector (0x21).
pub const IRQ_SERIAL: usize = 1;
/// First index for virtio-mmio devices (0x22, 0x23, ...).
pub const IRQ_VIRTIO_BASE: usize = 2;

/// Global count of device interrupts.
pub static EVENTS: AtomicU64 = AtomicU64::new(0);
/// Per-vector interrupt counts.
pub static IRQ_COUNT: [AtomicU64; NUM_IRQ_VECTORS] = [const { AtomicU64::new(0) }; NUM_IRQ_VECTORS];
/// Per-vector virtio-mmio base whose InterruptStatus the stub reads and
/// acknowledges (0 = none).
pub static IRQ_ACK: [AtomicU64; NUM_IRQ_VECTORS] = [const { AtomicU64::new(0) }; NUM_IRQ_VECTORS];
/// Per-vector accumulated InterruptStatus bits, taken by [`take_isr`].
pub static IRQ_ISR: [AtomicU32; NUM_IRQ_VECTORS] = [const { AtomicU32::new(0) }; NUM_IRQ_VECTORS];

/// Vector number for an index.
pub const fn vector(index: usize) -> u8 {
    crate::boot::idt::IRQ_VECTOR_BASE + index as u8
}

/// Current event count; pass it to [`wait`] after checking for work.
#[inline]
pub fn snapshot() -> u64 {
    EVENTS.load(Ordering::SeqCst)
}

/// Halts the vCPU until an interrupt arrives, unless one arrived since
/// `seen` was read.
#[inline]
pub fn wait(seen: u64) {
    // SAFETY: a ring-3 `hlt` traps (#GP) into the idle path of the #GP
    // stub (boot/idt.rs), which preserves all registers and resumes after it.
    unsafe { core::arch::asm!("hlt", in("rdi") seen) }
}

/// Takes (and clears) the InterruptStatus bits collected for `index`.
pub fn take_isr(index: usize) -> u32 {
    IRQ_ISR[index].swap(0, Ordering::SeqCst)
}
