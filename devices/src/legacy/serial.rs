//! COM1: a 16550A UART emulated by vm-superio, its interrupt delivered
//! through an eventfd the VMM registers as an irqfd for IRQ 4.
//!
//! Input the VMM reads from stdin is queued here and fed into the UART's
//! receive FIFO as the guest drains it, so nothing typed is lost when the
//! guest reads slowly.

use std::collections::VecDeque;
use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::persist::{Persist, PersistError, Versioned, versioned};

pub const COM1_PORT_BASE: u16 = 0x3f8;
pub const COM1_PORT_COUNT: u16 = 8;
pub const COM1_IRQ: u32 = 4;
/// Receive buffer register offset: a read there may make FIFO space.
const RBR_OFFSET: u8 = 0;
/// Modem control register offset (its bit 4 is loopback mode).
const MCR_OFFSET: u8 = 4;
/// Bound on input held back while the guest is not reading (1 MiB).
const MAX_PENDING_INPUT: usize = 1 << 20;
/// vm-superio's receive FIFO size (a 16550A's).
const UART_FIFO_SIZE: usize = 64;

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
        let chunk: Vec<u8> = self.pending.iter().take(n).copied().collect();
        // Only what the UART took leaves the queue: in loopback mode it
        // takes nothing (the guest's 8250 probe sets it for a moment), and
        // the rest waits for the next chance (`write` of MCR, a read).
        let taken = match self.uart.enqueue_raw_bytes(&chunk) {
            Ok(k) => k,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                // The bytes are in the FIFO; the interrupt did not go.
                log::debug!("serial: input queued, but its interrupt failed: {e:?}");
                n
            }
        };
        self.pending.drain(..taken.min(n));
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
        if off == MCR_OFFSET {
            // Out of loopback mode: input held back meanwhile may go in.
            self.feed();
        }
    }
}

/// Saved state of the COM1 UART: vm-superio's `SerialState` (which is not
/// serde) mirrored register by register, plus the input the VMM queued that
/// has not reached the UART's FIFO yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub version: u32,
    /// Divisor latch, low and high byte.
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Receive FIFO: bytes the guest has not read yet (at most 64).
    pub in_buffer: Vec<u8>,
    /// Input queued behind the FIFO (at most 1 MiB).
    pub pending_input: Vec<u8>,
}

versioned!(SerialState, "serial", 1);

impl Persist for Serial {
    type State = SerialState;

    fn save(&self) -> Result<SerialState, PersistError> {
        let s = self.uart.state();
        Ok(SerialState {
            version: SerialState::VERSION,
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            pending_input: self.pending.iter().copied().collect(),
        })
    }
}

impl Serial {
    /// Rebuild the UART from `state`, writing guest output to `out` and
    /// interrupting through `irq` (register it as the irqfd for COM1_IRQ as
    /// [`new`](Self::new)'s is). If the saved registers show an enabled
    /// interrupt condition (THR empty, data ready) the interrupt is raised
    /// again, as vm-superio does on restore.
    pub fn restore(
        irq: EventFd,
        out: Box<dyn Write + Send>,
        state: &SerialState,
    ) -> Result<Self, PersistError> {
        state.check_version()?;
        if state.pending_input.len() > MAX_PENDING_INPUT {
            return Err(PersistError::invalid(
                SerialState::NAME,
                format!(
                    "{} bytes of pending input, more than the {MAX_PENDING_INPUT} kept",
                    state.pending_input.len()
                ),
            ));
        }
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Uart::from_state(&s, IrqEventFd(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| match e {
                vm_superio::serial::Error::Trigger(source) => PersistError::Io {
                    what: "serial interrupt",
                    source,
                },
                vm_superio::serial::Error::IOError(source) => PersistError::Io {
                    what: "serial output",
                    source,
                },
                vm_superio::serial::Error::FullFifo => PersistError::invalid(
                    SerialState::NAME,
                    format!(
                        "receive FIFO holds {} bytes, more than the UART's {UART_FIFO_SIZE}",
                        state.in_buffer.len()
                    ),
                ),
            })?;
        Ok(Self {
            uart,
            pending: state.pending_input.iter().copied().collect(),
        })
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

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    /// Input typed while the guest has the UART in loopback mode (Linux's
    /// 8250 probe sets it for a moment) waits, and arrives once it is off.
    #[test]
    fn input_typed_in_loopback_mode_is_kept() {
        let mut s = Serial::new(evt(), Box::new(Sink::default()));
        s.write(u64::from(MCR_OFFSET), &[0x10]);
        assert!(s.queue_input(b"ab"));
        let mut b = [0u8];
        s.read(u64::from(RBR_OFFSET), &mut b);
        assert_eq!(s.pending.len(), 2, "held back, not dropped");
        s.write(u64::from(MCR_OFFSET), &[0]);
        for want in b"ab" {
            s.read(u64::from(RBR_OFFSET), &mut b);
            assert_eq!(b[0], *want);
        }
    }

    #[test]
    fn save_restore_round_trip_keeps_registers_and_input() {
        let sink = Sink::default();
        let mut s = Serial::new(evt(), Box::new(sink.clone()));
        // Program the UART as a driver would: 115200 8N1, FIFO, interrupts.
        s.write(3, &[0x80]); // DLAB
        s.write(0, &[0x01]);
        s.write(1, &[0x00]);
        s.write(3, &[0x03]);
        s.write(1, &[0x01]); // IER: data available
        s.write(4, &[0x0b]); // MCR
        s.write(7, &[0x5a]); // scratch
        let input: Vec<u8> = (0..100u8).collect();
        assert!(s.queue_input(&input));
        // The guest reads a few bytes before the save.
        for want in 0..3u8 {
            let mut b = [0u8];
            s.read(0, &mut b);
            assert_eq!(b[0], want);
        }
        let saved = s.save().unwrap();
        assert_eq!(saved.version, SerialState::VERSION);
        assert_eq!(saved.scratch, 0x5a);
        assert_eq!(saved.in_buffer.len() + saved.pending_input.len(), 97);

        let json = crate::persist::to_json(&saved).unwrap();
        let text = serde_json::to_string(&json).unwrap();
        let back: SerialState =
            crate::persist::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(back, saved);
        let irq = evt();
        let out = Sink::default();
        let mut r =
            Serial::restore(irq.try_clone().unwrap(), Box::new(out.clone()), &back).unwrap();
        assert_eq!(r.save().unwrap(), saved);
        // Data was ready with the interrupt enabled: raised again.
        assert_eq!(irq.read().unwrap(), 1);
        // The console keeps working: the rest of the input, in order...
        let mut got = Vec::new();
        for _ in 3..100 {
            let mut b = [0u8];
            r.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, (3..100u8).collect::<Vec<_>>());
        let mut b = [0u8];
        r.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        // ...and output goes to the new writer.
        r.write(0, b"k");
        assert_eq!(&*out.0.lock().unwrap(), b"k");
    }

    #[test]
    fn restore_refuses_bad_state() {
        let s = Serial::new(evt(), Box::new(io::sink()));
        let good = s.save().unwrap();
        let bad = SerialState {
            version: 2,
            ..good.clone()
        };
        assert!(matches!(
            Serial::restore(evt(), Box::new(io::sink()), &bad),
            Err(PersistError::UnsupportedVersion { found: 2, .. })
        ));
        let bad = SerialState {
            in_buffer: vec![0; 65],
            ..good.clone()
        };
        let e = Serial::restore(evt(), Box::new(io::sink()), &bad)
            .err()
            .unwrap();
        assert!(e.to_string().contains("receive FIFO holds 65"), "{e}");
        let bad = SerialState {
            pending_input: vec![0; MAX_PENDING_INPUT + 1],
            ..good
        };
        assert!(matches!(
            Serial::restore(evt(), Box::new(io::sink()), &bad),
            Err(PersistError::Invalid { .. })
        ));
    }
}
