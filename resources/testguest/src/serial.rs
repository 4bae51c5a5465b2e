//! COM1 (8250/16550A at I/O 0x3f8, IRQ 4): polled output, interrupt-driven
//! input (IER.RDA).

use core::fmt;

use crate::io::{inb, outb};

const COM1: u16 = 0x3f8;
const RBR_THR: u16 = 0; // receive buffer / transmit holding (DLAB=0)
const IER: u16 = 1;
const FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;

const IER_RDA: u8 = 1 << 0;
const LCR_DLAB: u8 = 1 << 7;
const LCR_8N1: u8 = 0x03;
const MCR_DTR_RTS_OUT2: u8 = 0x0b;
const LSR_DR: u8 = 1 << 0;
const LSR_THRE: u8 = 1 << 5;

/// 115200 8N1, FIFOs on, interrupts off.
pub fn init() {
    outb(COM1 + IER, 0);
    outb(COM1 + LCR, LCR_DLAB);
    outb(COM1 + RBR_THR, 1); // divisor 1 = 115200
    outb(COM1 + IER, 0);
    outb(COM1 + LCR, LCR_8N1);
    outb(COM1 + FCR, 0xc7);
    outb(COM1 + MCR, MCR_DTR_RTS_OUT2);
}

/// Enables the received-data interrupt.
pub fn enable_rx_interrupt() {
    outb(COM1 + IER, IER_RDA);
}

pub fn write_byte(b: u8) {
    // Bounded wait for THRE (the emulated UART is always ready).
    for _ in 0..100_000 {
        if inb(COM1 + LSR) & LSR_THRE != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    outb(COM1 + RBR_THR, b);
}

pub fn write_bytes(s: &[u8]) {
    for &b in s {
        write_byte(b);
    }
}

/// A received byte, if any.
pub fn try_read() -> Option<u8> {
    if inb(COM1 + LSR) & LSR_DR != 0 {
        Some(inb(COM1 + RBR_THR))
    } else {
        None
    }
}

/// `fmt::Write` sink for COM1. Lines end in a bare `\n`.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::serial::Console, format_args!($($arg)*));
    }};
}

#[macro_export]
macro_rules! println {
    () => { $crate::serial::write_byte(b'\n') };
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::serial::write_byte(b'\n');
    }};
}

/// UART scratch register: stores a byte, does nothing else.
const SCR: u16 = 7;

/// The bytes `rep_outs` writes: byte i is `i * 7 + 3`.
static REP_OUTS_BYTES: [u8; 4096] = {
    let mut b = [0u8; 4096];
    let mut i = 0;
    while i < b.len() {
        b[i] = (i as u8).wrapping_mul(7).wrapping_add(3);
        i += 1;
    }
    b
};

/// Where a `rep outsb` of [`rep_outs`] did not end as it must.
pub struct RepOutsError {
    /// Which instruction (from 0).
    pub at: u64,
    /// RCX after it (0 expected).
    pub rcx: u64,
    /// How far RSI moved (the byte count expected).
    pub advanced: u64,
    /// The scratch register afterwards, and the last byte written.
    pub scratch: u8,
    pub expected: u8,
}

/// `rep-outs BYTES COUNT`: COUNT `rep outsb` instructions, each writing
/// BYTES bytes (at most 4096) to the scratch register. Each byte is an
/// exit to the VMM, and KVM serves up to 1024 of them before it enters the
/// guest again, so a pause mostly lands in the middle of an instruction.
/// Each must end with RCX 0, RSI moved by BYTES and the last byte in the
/// scratch register.
pub fn rep_outs(bytes: u64, count: u64) -> Result<(), RepOutsError> {
    let n = bytes.clamp(1, REP_OUTS_BYTES.len() as u64);
    let expected = REP_OUTS_BYTES[n as usize - 1];
    for at in 0..count {
        outb(COM1 + SCR, !expected);
        let start = REP_OUTS_BYTES.as_ptr() as u64;
        let (rcx, rsi): (u64, u64);
        // SAFETY: reads n <= 4096 bytes of a static; port I/O touches no
        // Rust-visible memory. The direction flag is clear (ABI).
        unsafe {
            core::arch::asm!("rep outsb", inout("rcx") n => rcx, inout("rsi") start => rsi,
                in("dx") COM1 + SCR, options(nostack, readonly, preserves_flags))
        };
        let scratch = inb(COM1 + SCR);
        let advanced = rsi.wrapping_sub(start);
        if rcx != 0 || advanced != n || scratch != expected {
            return Err(RepOutsError {
                at,
                rcx,
                advanced,
                scratch,
                expected,
            });
        }
    }
    Ok(())
}
