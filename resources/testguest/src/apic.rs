//! Local APIC (timer, EOI) and I/O APIC (routing device interrupts), both
//! in KVM's in-kernel irqchip, programmed from ring 3 through uncached
//! user-accessible mappings.

use crate::io::{mmio_read32, mmio_write32};

pub const LAPIC_BASE: u64 = 0xfee0_0000;
pub const IOAPIC_BASE: u64 = 0xfec0_0000;

// LAPIC registers (Intel SDM vol. 3, 11.4.1).
const LAPIC_ID: u64 = 0x20;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_LVT_LINT0: u64 = 0x350;
const LAPIC_TIMER_ICR: u64 = 0x380;
const LAPIC_TIMER_CCR: u64 = 0x390;
const LAPIC_TIMER_DCR: u64 = 0x3e0;

const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
/// Divide configuration "divide by 1" (0b1011).
const DCR_DIV1: u32 = 0b1011;

// I/O APIC (82093AA): index/data window; redirection table from 0x10.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOAPIC_VER: u32 = 0x01;
const IOREDTBL: u32 = 0x10;
const REDIR_MASKED: u64 = 1 << 16;
const REDIR_LEVEL: u64 = 1 << 15;

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: LAPIC page is mapped uncached and user-accessible.
    unsafe { mmio_read32(LAPIC_BASE + reg) }
}

fn lapic_write(reg: u64, v: u32) {
    // SAFETY: as above.
    unsafe { mmio_write32(LAPIC_BASE + reg, v) }
}

/// Software-enables the LAPIC, masks LINT0 (the PIC is unused), sets up
/// the timer (divide by 1, masked, one-shot).
pub fn init_lapic() {
    lapic_write(
        LAPIC_SVR,
        SVR_ENABLE | u32::from(crate::boot::idt::SPURIOUS_VECTOR),
    );
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
    lapic_write(LAPIC_TIMER_DCR, DCR_DIV1);
    lapic_write(
        LAPIC_LVT_TIMER,
        LVT_MASKED | u32::from(crate::events::vector(crate::events::IRQ_TIMER)),
    );
    lapic_write(LAPIC_TIMER_ICR, 0);
}

pub fn lapic_id() -> u8 {
    (lapic_read(LAPIC_ID) >> 24) as u8
}

/// Starts the timer counting down from `count` (masked: no interrupt).
pub fn timer_start_masked(count: u32) {
    lapic_write(
        LAPIC_LVT_TIMER,
        LVT_MASKED | u32::from(crate::events::vector(crate::events::IRQ_TIMER)),
    );
    lapic_write(LAPIC_TIMER_ICR, count);
}

pub fn timer_current() -> u32 {
    lapic_read(LAPIC_TIMER_CCR)
}

/// One-shot timer interrupt after `ns` nanoseconds (KVM's LAPIC timer
/// counts at 1 GHz, so with divide-by-1 one count is 1 ns).
pub fn timer_oneshot_ns(ns: u32) {
    lapic_write(
        LAPIC_LVT_TIMER,
        u32::from(crate::events::vector(crate::events::IRQ_TIMER)),
    );
    lapic_write(LAPIC_TIMER_ICR, ns.max(1));
}

pub fn timer_stop() {
    lapic_write(LAPIC_TIMER_ICR, 0);
}

fn ioapic_read(reg: u32) -> u32 {
    // SAFETY: IOAPIC page is mapped uncached and user-accessible.
    unsafe {
        mmio_write32(IOAPIC_BASE + IOREGSEL, reg);
        mmio_read32(IOAPIC_BASE + IOWIN)
    }
}

fn ioapic_write(reg: u32, v: u32) {
    // SAFETY: as above.
    unsafe {
        mmio_write32(IOAPIC_BASE + IOREGSEL, reg);
        mmio_write32(IOAPIC_BASE + IOWIN, v);
    }
}

/// Number of IOAPIC input pins.
pub fn ioapic_pins() -> u32 {
    ((ioapic_read(IOAPIC_VER) >> 16) & 0xff) + 1
}

/// Trigger mode of a routed pin.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Trigger {
    Edge,
    Level,
}

/// Routes IOAPIC pin `gsi` to `vector` on this CPU (fixed delivery,
/// physical destination, active high) and unmasks it.
pub fn route(gsi: u32, vector: u8, trigger: Trigger) -> Result<(), &'static str> {
    if gsi >= ioapic_pins() {
        return Err("gsi beyond the IOAPIC's pins");
    }
    let mut entry = u64::from(vector) | (u64::from(lapic_id()) << 56);
    if trigger == Trigger::Level {
        entry |= REDIR_LEVEL;
    }
    let reg = IOREDTBL + 2 * gsi;
    ioapic_write(reg, REDIR_MASKED as u32);
    ioapic_write(reg + 1, (entry >> 32) as u32);
    ioapic_write(reg, entry as u32);
    Ok(())
}
