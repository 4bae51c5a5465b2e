//! Port I/O and MMIO accessors. Usable from ring 3 because the guest runs
//! with RFLAGS.IOPL = 3 and maps MMIO pages user-accessible.

use core::arch::asm;

#[inline]
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

#[inline]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as above.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads a 32-bit MMIO register.
///
/// # Safety
/// `addr` must be a mapped, uncached MMIO register.
#[inline]
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a 32-bit MMIO register.
///
/// # Safety
/// `addr` must be a mapped, uncached MMIO register.
#[inline]
pub unsafe fn mmio_write32(addr: u64, v: u32) {
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

#[inline]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc is allowed in ring 3 (CR4.TSD clear).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The debug-exit port: `out 0xf4, al` ends the VMM with status `al`
/// (when Blimp runs with `--debug-exit`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
