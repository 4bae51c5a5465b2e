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
    unsafe { core::arch::asm!("hlt", in("rdi") seen, in("rsi") 0u64) }
}

/// Takes (and clears) the InterruptStatus bits collected for `index`.
pub fn take_isr(index: usize) -> u32 {
    IRQ_ISR[index].swap(0, Ordering::SeqCst)
}

/// A device call: register accesses made from ring 0 by the #GP stub
/// (boot/idt.rs), in this order:
/// 1. the write (`write_addr` != 0);
/// 2. the idle wait, if asked, unless an interrupt arrived since the event
///    count `seen` was read (as [`wait`]);
/// 3. stop here if `cond_addr` != 0 and the u16 there still equals
///    `cond_val` (e.g. a used ring's index that has not moved);
/// 4. the second write (`write2_addr` != 0);
/// 5. the read (`read_addr` != 0, into `read_val`).
///
/// Linux's driver touches device registers in kernel mode, where an exit
/// costs little under PVM: the expensive part is going back to guest
/// ring 3 after an exit to the VMM (about 40 µs here, once per trip to
/// ring 0 however many exits it made). So the driver's register accesses
/// go through this call, and the accesses Linux makes around one
/// acknowledged request (kick, wait, then `actual` and `num_pages`) share
/// one trip. The sequence of accesses the device sees is Linux's.
#[repr(C)]
#[derive(Default)]
pub struct DevCall {
    write_addr: u64,
    write_val: u32,
    flags: u32,
    cond_addr: u64,
    cond_val: u32,
    ran: u32,
    write2_addr: u64,
    write2_val: u32,
    read_val: u32,
    read_addr: u64,
    seen: u64,
}

const DEVCALL_WAIT: u32 = 1;

/// What a device call did.
#[derive(Debug, Clone, Copy)]
pub struct DevCallResult {
    /// Steps 4 and 5 ran (the condition held, or there was none).
    pub ran: bool,
    /// The value read in step 5 (0 if there was no read or it did not run).
    pub read: u32,
}

impl DevCall {
    /// An empty call (a bare trap to ring 0 and back).
    pub fn new() -> Self {
        Self::default()
    }

    /// Step 1: write `val` to the register at `addr`.
    pub fn write(mut self, addr: u64, val: u32) -> Self {
        self.write_addr = addr;
        self.write_val = val;
        self
    }

    /// Step 2: halt until an interrupt unless one arrived since the event
    /// count `seen` was read.
    pub fn wait(mut self, seen: u64) -> Self {
        self.flags |= DEVCALL_WAIT;
        self.seen = seen;
        self
    }

    /// Step 3: go on only if the u16 at `addr` no longer equals `val`.
    pub fn if_changed(mut self, addr: u64, val: u16) -> Self {
        self.cond_addr = addr;
        self.cond_val = u32::from(val);
        self
    }

    /// Step 4: then write `val` to the register at `addr`.
    pub fn then_write(mut self, addr: u64, val: u32) -> Self {
        self.write2_addr = addr;
        self.write2_val = val;
        self
    }

    /// Step 5: then read the register at `addr`.
    pub fn then_read(mut self, addr: u64) -> Self {
        self.read_addr = addr;
        self
    }

    /// Makes the call.
    pub fn call(mut self) -> DevCallResult {
        let p = &raw mut self;
        // SAFETY: the #GP stub reads and writes only `*p`, the u16 at
        // `cond_addr` (read) and the registers named in it (device windows
        // the caller owns); it preserves all registers and resumes after
        // the `hlt`.
        unsafe {
            core::arch::asm!("hlt", in("rdi") 0u64, in("rsi") p);
            DevCallResult {
                ran: core::ptr::read_volatile(&raw const (*p).ran) != 0,
                read: core::ptr::read_volatile(&raw const (*p).read_val),
            }
        }
    }
}

// The #GP stub (boot/idt.rs) hard-codes these offsets.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(DevCall, write_addr) == 0);
    assert!(offset_of!(DevCall, write_val) == 8);
    assert!(offset_of!(DevCall, flags) == 12);
    assert!(offset_of!(DevCall, cond_addr) == 16);
    assert!(offset_of!(DevCall, cond_val) == 24);
    assert!(offset_of!(DevCall, ran) == 28);
    assert!(offset_of!(DevCall, write2_addr) == 32);
    assert!(offset_of!(DevCall, write2_val) == 40);
    assert!(offset_of!(DevCall, read_val) == 44);
    assert!(offset_of!(DevCall, read_addr) == 48);
    assert!(offset_of!(DevCall, seen) == 56);
};
