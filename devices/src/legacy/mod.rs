//! Legacy devices: COM1 serial, i8042 reset, debug-exit port.

pub mod debug_exit;
pub mod i8042;
pub mod serial;

pub use debug_exit::{DEBUG_EXIT_PORT, DebugExit};
pub use i8042::{I8042, I8042_PORT_BASE};
pub use serial::{COM1_IRQ, COM1_PORT_BASE, Serial};
