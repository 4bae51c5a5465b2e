//! Legacy devices: COM1 serial, i8042 reset, debug-exit port.
