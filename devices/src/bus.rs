//! The seam between the VMM's PIO/MMIO dispatch and a device: an access at
//! `offset` from the base where the device was placed.

/// A device on the port-I/O or MMIO bus. Accesses of unexpected size or
/// offset are ignored (reads return zeros); a device never panics on them.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device asks the VMM to end the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitRequest {
    /// The guest reset the machine (i8042 0xfe, triple fault).
    Reset,
    /// The guest wrote `code` to the debug-exit port.
    DebugExit(u8),
}

/// Implemented by the VMM: how a device asks for the VM to stop.
pub trait ExitSignal: Send + Sync {
    fn request_exit(&self, why: ExitRequest);
}
