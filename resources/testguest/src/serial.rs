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
