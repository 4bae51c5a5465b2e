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

/// First device interrupt vector (index 0 in the event tables); the IDT
/// (`boot::idt`) routes vectors from here on to the counting stubs.
pub const IRQ_VECTOR_BASE: u8 = 0x20;

/// Vector number for an index.
pub const fn vector(index: usize) -> u8 {
    IRQ_VECTOR_BASE + index as u8
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

const BURST_LEAVE_IN_FLIGHT: u32 = 1;

/// Requests one [`Burst`] carries at most.
pub const BURST_MAX: usize = 32;

/// A burst: a run of requests on one virtqueue, each acknowledged before
/// the next is made, driven from ring 0 by the #GP stub (boot/idt.rs) the
/// way Linux's balloon work function runs from one batch to the next in
/// kernel mode. The caller writes each request's descriptors ahead
/// ([`SplitQueue::prepare`](testguest::virtq::SplitQueue::prepare)); for
/// request `i` the stub then
/// 1. puts `heads[i]` in the avail ring and bumps avail.idx;
/// 2. kicks (QueueNotify) unless the device set VIRTQ_USED_F_NO_NOTIFY;
/// 3. waits until used.idx reaches avail.idx (only the burst's requests
///    may be in flight), halting between looks; if the device raised a
///    configuration change meanwhile (a new target, or DEVICE_NEEDS_RESET),
///    it stops and leaves the request in flight to the caller;
/// 4. writes `actuals[i]` to the `actual` register;
/// 5. stops if the `num_pages` value read last equals `actuals[i]` (no
///    difference left: Linux does not look again), else reads `num_pages`;
/// 6. goes on with request `i + 1` only if there is one and the value just
///    read lies in `bounds[i]`, i.e. Linux would make exactly that request
///    next.
///
/// So the device sees Linux's sequence of accesses, and the expensive part
/// of a trip to ring 0 under PVM (the return to ring 3, about 40 µs after
/// an exit to the VMM, and the trap itself) is paid once per burst instead
/// of once per request.
#[repr(C)]
pub struct Burst {
    avail_ring: u64,
    avail_idx_addr: u64,
    used_idx_addr: u64,
    notify_addr: u64,
    notify_val: u32,
    mask: u32,
    actual_addr: u64,
    num_pages_addr: u64,
    isr_addr: u64,
    count: u32,
    avail_idx: u32,
    published: u32,
    acked: u32,
    target: u32,
    flags: u32,
    heads: [u16; BURST_MAX],
    actuals: [u32; BURST_MAX],
    bounds: [[u32; 2]; BURST_MAX],
}

/// What a burst did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BurstResult {
    /// Requests made available to the device.
    pub published: usize,
    /// Requests acknowledged, with `actual` written after each.
    pub acked: usize,
    /// `num_pages` as read last (the caller's value if the stub read none).
    /// If it differs from the last `actual` written, it was read after that
    /// write: Linux's next towards_target().
    pub target: u32,
}

/// The virtqueue and registers a burst works on.
#[derive(Debug, Clone, Copy)]
pub struct BurstQueue {
    /// avail.ring[0], avail.idx and used.idx.
    pub avail_ring: u64,
    pub avail_idx_addr: u64,
    pub used_idx_addr: u64,
    /// The driver's avail.idx before the burst.
    pub avail_idx: u16,
    /// Queue size (a power of two, as split queues are).
    pub size: u16,
    /// QueueNotify and the queue's index.
    pub notify_addr: u64,
    pub notify_val: u32,
    /// The `actual` and `num_pages` registers.
    pub actual_addr: u64,
    pub num_pages_addr: u64,
    /// The device's index in the interrupt tables.
    pub irq: usize,
}

impl Burst {
    /// An empty burst on `q`; `target` is the `num_pages` value the caller
    /// read last (it planned the requests from it).
    pub fn new(q: BurstQueue, target: u32) -> Burst {
        debug_assert!(q.size.is_power_of_two());
        Burst {
            avail_ring: q.avail_ring,
            avail_idx_addr: q.avail_idx_addr,
            used_idx_addr: q.used_idx_addr,
            notify_addr: q.notify_addr,
            notify_val: q.notify_val,
            mask: u32::from(q.size) - 1,
            actual_addr: q.actual_addr,
            num_pages_addr: q.num_pages_addr,
            isr_addr: (&raw const IRQ_ISR[q.irq]) as u64,
            count: 0,
            avail_idx: u32::from(q.avail_idx),
            published: 0,
            acked: 0,
            target,
            flags: 0,
            heads: [0; BURST_MAX],
            actuals: [0; BURST_MAX],
            bounds: [[0; 2]; BURST_MAX],
        }
    }

    /// Requests added so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Adds a request: the chain at `head`, after whose acknowledgement
    /// `actual` is written; the next request is made only if `num_pages`
    /// then reads within `next_if` (inclusive). False if the burst is full.
    pub fn push(&mut self, head: u16, actual: u32, next_if: (u32, u32)) -> bool {
        let i = self.count as usize;
        if i == BURST_MAX {
            return false;
        }
        self.heads[i] = head;
        self.actuals[i] = actual;
        self.bounds[i] = [next_if.0, next_if.1];
        self.count += 1;
        true
    }

    /// Makes the stub return right after the first request's kick,
    /// leaving it in flight to the caller as a configuration change during
    /// the wait does (`balloon-handoff`: exercises that path on demand).
    pub fn leave_first_in_flight(&mut self) {
        self.flags |= BURST_LEAVE_IN_FLIGHT;
    }

    /// Runs the burst.
    pub fn call(mut self) -> BurstResult {
        if self.count == 0 {
            return BurstResult {
                published: 0,
                acked: 0,
                target: self.target,
            };
        }
        let p = &raw mut self;
        // SAFETY: the #GP stub reads `*p`, writes its result fields, writes
        // the avail ring entries and avail.idx named in it (the caller's
        // queue, whose descriptors it prepared), reads used.idx/flags and
        // accesses the registers named in it (device windows the caller
        // owns). It saves every register it uses, and resumes after the
        // `hlt`.
        unsafe {
            core::arch::asm!("hlt", in("rdi") 1u64, in("rsi") p);
            let r = |f: *const u32| core::ptr::read_volatile(f);
            BurstResult {
                published: r(&raw const (*p).published) as usize,
                acked: r(&raw const (*p).acked) as usize,
                target: r(&raw const (*p).target),
            }
        }
    }
}

// The #GP stub (boot/idt.rs) hard-codes these offsets.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(Burst, avail_ring) == 0);
    assert!(offset_of!(Burst, avail_idx_addr) == 8);
    assert!(offset_of!(Burst, used_idx_addr) == 16);
    assert!(offset_of!(Burst, notify_addr) == 24);
    assert!(offset_of!(Burst, notify_val) == 32);
    assert!(offset_of!(Burst, mask) == 36);
    assert!(offset_of!(Burst, actual_addr) == 40);
    assert!(offset_of!(Burst, num_pages_addr) == 48);
    assert!(offset_of!(Burst, isr_addr) == 56);
    assert!(offset_of!(Burst, count) == 64);
    assert!(offset_of!(Burst, avail_idx) == 68);
    assert!(offset_of!(Burst, published) == 72);
    assert!(offset_of!(Burst, acked) == 76);
    assert!(offset_of!(Burst, target) == 80);
    assert!(offset_of!(Burst, flags) == 84);
    assert!(offset_of!(Burst, heads) == 88);
    assert!(offset_of!(Burst, actuals) == 152);
    assert!(offset_of!(Burst, bounds) == 280);
};
