//! COM1: a 16550A UART emulated by vm-superio, its interrupt delivered
//! through an eventfd the VMM registers as an irqfd for IRQ 4.
//!
//! Input the VMM reads from stdin is queued here and fed into the UART's
//! receive FIFO as the guest drains it, so nothing typed is lost when the
//! guest reads slowly.

use std::collections::VecDeque;
use std::io::{self, Write};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

pub const COM1_PORT_BASE: u16 = 0x3f8;
pub const COM1_PORT_COUNT: u16 = 8;
pub const COM1_IRQ: u32 = 4;
/// Receive buffer register offset: a read there may make FIFO space.
const RBR_OFFSET: u8 = 0;
/// Bound on input held back while the guest is not reading (1 MiB).
const MAX_PENDING_INPUT: usize = 1 << 20;

/// The serial interrupt: an eventfd registered as an irqfd.
pub struct IrqEventFd(pub EventFd);

impl Trigger for IrqEventFd {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

type Uart = vm_superio::Serial<IrqEventFd, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

pub struct Serial {
    uart: Uart,
    pending: VecDeque<u8>,
}

impl Serial {
    /// A UART writing guest output to `out`, interrupting through `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: vm_superio::Serial::new(IrqEventFd(irq), out),
            pending: VecDeque::new(),
        }
    }

    /// The interrupt eventfd to register as an irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// Queue bytes typed by the user for the guest. Returns false if the
    /// backlog is full and bytes were dropped.
    pub fn queue_input(&mut self, bytes: &[u8]) -> bool {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        let accepted = bytes.len().min(room);
        self.pending.extend(&bytes[..accepted]);
        self.feed();
        accepted == bytes.len()
    }

    /// Move pending input into the UART FIFO as far as it has room.
    fn feed(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let room = self.uart.fifo_capacity();
        if room == 0 {
            return;
        }
        let n = room.min(self.pending.len());
        let chunk: Vec<u8> = self.pending.drain(..n).collect();
        if let Err(e) = self.uart.enqueue_raw_bytes(&chunk) {
            log::debug!("serial: cannot enqueue input: {e:?}");
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) else {
            return;
        };
        *first = self.uart.read(off);
        if off == RBR_OFFSET {
            self.feed();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(off, v) {
            log::debug!("serial: write at offset {off}: {e:?}");
        }
    }
}

/// A writer to the VMM's stdout that flushes every write, so interactive
/// echo shows up at once.
pub struct StdoutWriter;

impl Write for StdoutWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_buffered_input() {
        let sink = Sink::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(evt, Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        // More input than the 64-byte FIFO holds is kept, not lost.
        let input: Vec<u8> = (0..200u8).collect();
        assert!(s.queue_input(&input));
        let mut got = Vec::new();
        for _ in 0..200 {
            let mut b = [0u8];
            s.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
        // Odd offsets and empty accesses do not panic.
        s.read(300, &mut [0u8]);
        s.write(0, &[]);
        s.read(0, &mut []);
    }
}
