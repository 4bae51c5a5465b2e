//! Legacy devices: COM1 serial, i8042 reset, debug-exit port.

pub mod debug_exit;
pub mod i8042;
pub mod serial;

pub use debug_exit::{DEBUG_EXIT_PORT, DebugExit};
pub use i8042::{I8042, I8042_PORT_BASE};
pub use serial::{COM1_IRQ, COM1_PORT_BASE, Serial};

/// An [`ExitSignal`](crate::bus::ExitSignal) that records the exits the
/// device under test asks for.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct RecordedExits(pub std::sync::Mutex<Vec<crate::bus::ExitRequest>>);

#[cfg(test)]
impl crate::bus::ExitSignal for RecordedExits {
    fn request_exit(&self, why: crate::bus::ExitRequest) {
        self.0.lock().unwrap().push(why);
    }
}
