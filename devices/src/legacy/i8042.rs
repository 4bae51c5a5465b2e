//! A minimal i8042 keyboard controller: enough for a guest to reset the
//! machine by writing 0xfe (pulse the reset line) to the command port 0x64,
//! which is how Linux reboots with `reboot=k`.

use std::sync::Arc;

use crate::bus::{BusDevice, ExitRequest, ExitSignal};

/// The controller occupies ports 0x60 (data) to 0x64 (status/command).
pub const I8042_PORT_BASE: u16 = 0x60;
pub const I8042_PORT_COUNT: u16 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    exit: Arc<dyn ExitSignal>,
}

impl I8042 {
    pub fn new(exit: Arc<dyn ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; data 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.request_exit(ExitRequest::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::RecordedExits as Record;

    #[test]
    fn reset_only_on_fe_to_command_port() {
        let r = Arc::new(Record::default());
        let mut d = I8042::new(r.clone());
        d.write(0, &[0xfe]);
        d.write(4, &[0xd1]);
        assert!(r.0.lock().unwrap().is_empty());
        d.write(4, &[0xfe]);
        assert_eq!(*r.0.lock().unwrap(), vec![ExitRequest::Reset]);
        let mut b = [0xffu8];
        d.read(4, &mut b);
        assert_eq!(b, [0]);
    }
}
