//! The debug-exit port (enabled by `blimp run --debug-exit`): a guest write of
//! value `v` to I/O port 0xf4 ends the VMM with exit status `v`. The test
//! guest uses it to report results the way QEMU's isa-debug-exit is used.

use std::sync::Arc;

use crate::bus::{BusDevice, ExitRequest, ExitSignal};

pub const DEBUG_EXIT_PORT: u16 = 0xf4;

pub struct DebugExit {
    exit: Arc<dyn ExitSignal>,
}

impl DebugExit {
    pub fn new(exit: Arc<dyn ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() {
            return;
        }
        // Only the low byte counts: process exit statuses are 8 bits.
        self.exit.request_exit(ExitRequest::DebugExit(data[0]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::RecordedExits as Record;

    #[test]
    fn write_requests_exit_with_low_byte() {
        let r = Arc::new(Record::default());
        let mut d = DebugExit::new(r.clone());
        d.write(0, &[3]);
        d.write(0, &[7, 1, 0, 0]);
        d.write(1, &[9]);
        d.write(0, &[]);
        assert_eq!(
            *r.0.lock().unwrap(),
            vec![ExitRequest::DebugExit(3), ExitRequest::DebugExit(7)]
        );
    }
}
