//! Dispatch of port-I/O and MMIO exits to devices by address range.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;

/// A device placed on a bus.
#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Errors placing a device.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("device range [{base:#x}, +{len:#x}) overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("device range at {base:#x} has zero length")]
    Empty { base: u64 },
}

/// A set of non-overlapping device ranges. Accesses nowhere are counted and
/// logged at debug level (rate-limited), reads return all-ones like an
/// unpopulated ISA bus; nothing panics.
pub struct Bus {
    name: &'static str,
    devices: BTreeMap<u64, Entry>,
    unhandled: AtomicU64,
}

impl Bus {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            devices: BTreeMap::new(),
            unhandled: AtomicU64::new(0),
        }
    }

    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((b, e)) = self.devices.range(..end).next_back()
            && b + e.len > base
        {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (base, e) = self.devices.range(..=addr).next_back()?;
        (addr - base < e.len).then_some((*base, e))
    }

    /// Number of accesses that hit no device.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }

    fn note_unhandled(&self, what: &str, addr: u64, len: usize) {
        let n = self.unhandled.fetch_add(1, Ordering::Relaxed);
        // Log the first few, then every 1000th, so a guest probing ports cannot flood the log.
        if n < 16 || n.is_multiple_of(1000) {
            log::debug!(
                "{} bus: unhandled {what} at {addr:#x} ({len} bytes), {} so far",
                self.name,
                n + 1
            );
        }
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((base, e)) => lock(&e.device).read(addr - base, data),
            None => {
                data.fill(0xff);
                self.note_unhandled("read", addr, data.len());
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr) {
            Some((base, e)) => lock(&e.device).write(addr - base, data),
            None => self.note_unhandled("write", addr, data.len()),
        }
    }
}

/// Lock a device, recovering from a poisoned mutex (a panicking device thread
/// must not take every vCPU down with it).
fn lock(m: &Mutex<dyn BusDevice>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Dev {
        last: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Dev {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range() {
        let mut bus = Bus::new("pio");
        let d = Arc::new(Mutex::new(Dev::default()));
        bus.insert(0x3f8, 8, d.clone()).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x3fd, &mut b);
        assert_eq!(b, [5]);
        bus.write(0x3f8, &[1]);
        assert_eq!(d.lock().unwrap().last, vec![(0, vec![1])]);
        bus.read(0x400, &mut b);
        assert_eq!(b, [0xff]);
        bus.write(0x3f7, &[1]);
        assert_eq!(bus.unhandled(), 2);
    }

    #[test]
    fn overlaps_refused() {
        let mut bus = Bus::new("mmio");
        let d = Arc::new(Mutex::new(Dev::default()));
        bus.insert(0x1000, 0x1000, d.clone()).unwrap();
        assert!(bus.insert(0x1800, 0x1000, d.clone()).is_err());
        assert!(bus.insert(0x800, 0x1000, d.clone()).is_err());
        assert!(bus.insert(0x1000, 0, d.clone()).is_err());
        bus.insert(0x2000, 0x1000, d).unwrap();
    }
}
