//! virtio-mmio transport, version 2 register layout (virtio 1.x spec 4.2.2),
//! driven from ring 3; register accesses are made from ring 0 through a
//! device call (as Linux's driver makes them in kernel mode), the rings
//! themselves are plain memory.

use testguest::virtq::SplitQueue;

use crate::events::DevCall;
use crate::io::{mmio_read32, mmio_write32};

// Register offsets (spec 4.2.2, Linux include/uapi/linux/virtio_mmio.h).
pub const VIRTIO_MMIO_MAGIC_VALUE: u64 = 0x000;
pub const VIRTIO_MMIO_VERSION: u64 = 0x004;
pub const VIRTIO_MMIO_DEVICE_ID: u64 = 0x008;
pub const VIRTIO_MMIO_DEVICE_FEATURES: u64 = 0x010;
pub const VIRTIO_MMIO_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const VIRTIO_MMIO_DRIVER_FEATURES: u64 = 0x020;
pub const VIRTIO_MMIO_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const VIRTIO_MMIO_QUEUE_SEL: u64 = 0x030;
pub const VIRTIO_MMIO_QUEUE_NUM_MAX: u64 = 0x034;
pub const VIRTIO_MMIO_QUEUE_NUM: u64 = 0x038;
pub const VIRTIO_MMIO_QUEUE_READY: u64 = 0x044;
pub const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x050;
pub const VIRTIO_MMIO_INTERRUPT_STATUS: u64 = 0x060;
pub const VIRTIO_MMIO_INTERRUPT_ACK: u64 = 0x064;
pub const VIRTIO_MMIO_STATUS: u64 = 0x070;
pub const VIRTIO_MMIO_QUEUE_DESC_LOW: u64 = 0x080;
pub const VIRTIO_MMIO_QUEUE_DESC_HIGH: u64 = 0x084;
pub const VIRTIO_MMIO_QUEUE_AVAIL_LOW: u64 = 0x090;
pub const VIRTIO_MMIO_QUEUE_AVAIL_HIGH: u64 = 0x094;
pub const VIRTIO_MMIO_QUEUE_USED_LOW: u64 = 0x0a0;
pub const VIRTIO_MMIO_QUEUE_USED_HIGH: u64 = 0x0a4;
pub const VIRTIO_MMIO_CONFIG_GENERATION: u64 = 0x0fc;
pub const VIRTIO_MMIO_CONFIG: u64 = 0x100;

/// "virt" in little endian.
pub const VIRTIO_MMIO_MAGIC: u32 = 0x7472_6976;

// Device status bits (spec 2.1).
pub const VIRTIO_CONFIG_S_ACKNOWLEDGE: u32 = 1;
pub const VIRTIO_CONFIG_S_DRIVER: u32 = 2;
pub const VIRTIO_CONFIG_S_DRIVER_OK: u32 = 4;
pub const VIRTIO_CONFIG_S_FEATURES_OK: u32 = 8;
pub const VIRTIO_CONFIG_S_NEEDS_RESET: u32 = 0x40;
pub const VIRTIO_CONFIG_S_FAILED: u32 = 0x80;

// InterruptStatus bits.
#[allow(dead_code)]
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

#[derive(Debug, Clone, Copy)]
pub enum ProbeError {
    BadMagic(u32),
    /// Version 1 is the legacy layout, which this driver does not speak.
    BadVersion(u32),
    /// DeviceID 0: an empty slot.
    NoDevice,
}

impl core::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ProbeError::BadMagic(m) => write!(f, "wrong magic value {m:#010x}"),
            ProbeError::BadVersion(v) => write!(f, "unsupported virtio-mmio version {v}"),
            ProbeError::NoDevice => write!(f, "no device (device id 0)"),
        }
    }
}

/// One virtio-mmio register window.
#[derive(Clone, Copy)]
pub struct Mmio {
    pub base: u64,
}

impl Mmio {
    /// Reads a register from ring 3. (One access alone costs less this
    /// way than as a [`DevCall`]; a call pays off for several accesses.)
    pub fn read(&self, off: u64) -> u32 {
        // SAFETY: the window lies in the MMIO hole, mapped uncached + user.
        unsafe { mmio_read32(self.base + off) }
    }

    /// Writes a register from ring 3.
    pub fn write(&self, off: u64, v: u32) {
        // SAFETY: as above.
        unsafe { mmio_write32(self.base + off, v) }
    }

    /// Address of the register at `off`, for building a [`DevCall`].
    pub fn reg(&self, off: u64) -> u64 {
        self.base + off
    }

    /// Checks magic and version; returns the device ID.
    pub fn probe(&self) -> Result<u32, ProbeError> {
        let magic = self.read(VIRTIO_MMIO_MAGIC_VALUE);
        if magic != VIRTIO_MMIO_MAGIC {
            return Err(ProbeError::BadMagic(magic));
        }
        let version = self.read(VIRTIO_MMIO_VERSION);
        if version != 2 {
            return Err(ProbeError::BadVersion(version));
        }
        match self.read(VIRTIO_MMIO_DEVICE_ID) {
            0 => Err(ProbeError::NoDevice),
            id => Ok(id),
        }
    }

    pub fn status(&self) -> u32 {
        self.read(VIRTIO_MMIO_STATUS)
    }

    /// The device set DEVICE_NEEDS_RESET (one Status read).
    pub fn needs_reset(&self) -> bool {
        self.status() & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }

    pub fn reset(&self) {
        self.write(VIRTIO_MMIO_STATUS, 0);
    }

    pub fn add_status(&self, bits: u32) {
        let s = self.status();
        self.write(VIRTIO_MMIO_STATUS, s | bits);
    }

    pub fn device_features(&self) -> u64 {
        self.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = self.read(VIRTIO_MMIO_DEVICE_FEATURES);
        self.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = self.read(VIRTIO_MMIO_DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    pub fn set_driver_features(&self, f: u64) {
        self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES, (f >> 32) as u32);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES, f as u32);
    }

    /// QueueNumMax of queue `index` (0 = the queue does not exist).
    pub fn queue_num_max(&self, index: u16) -> u32 {
        self.write(VIRTIO_MMIO_QUEUE_SEL, u32::from(index));
        self.read(VIRTIO_MMIO_QUEUE_NUM_MAX)
    }

    /// Programs queue `index` with `q`'s size and ring addresses and sets
    /// it ready (spec 4.2.3.2).
    pub fn setup_queue(&self, index: u16, q: &SplitQueue) -> Result<(), &'static str> {
        self.write(VIRTIO_MMIO_QUEUE_SEL, u32::from(index));
        if self.read(VIRTIO_MMIO_QUEUE_READY) != 0 {
            return Err("queue already ready");
        }
        let max = self.read(VIRTIO_MMIO_QUEUE_NUM_MAX);
        if max == 0 || u32::from(q.size()) > max {
            return Err("queue size beyond QueueNumMax");
        }
        self.write(VIRTIO_MMIO_QUEUE_NUM, u32::from(q.size()));
        let pairs = [
            (
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
                q.desc_addr(),
            ),
            (
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                q.avail_addr(),
            ),
            (
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
                q.used_addr(),
            ),
        ];
        for (lo, hi, addr) in pairs {
            self.write(lo, addr as u32);
            self.write(hi, (addr >> 32) as u32);
        }
        self.write(VIRTIO_MMIO_QUEUE_READY, 1);
        Ok(())
    }

    pub fn notify(&self, index: u16) {
        self.write(VIRTIO_MMIO_QUEUE_NOTIFY, u32::from(index));
    }

    /// Reads and acknowledges InterruptStatus (poll mode; with interrupts
    /// the ring-0 stub does this).
    pub fn take_interrupt_status(&self) -> u32 {
        let s = self.read(VIRTIO_MMIO_INTERRUPT_STATUS);
        if s != 0 {
            self.write(VIRTIO_MMIO_INTERRUPT_ACK, s);
        }
        s
    }

    pub fn config_generation(&self) -> u32 {
        self.read(VIRTIO_MMIO_CONFIG_GENERATION)
    }

    pub fn config_read32(&self, off: u64) -> u32 {
        self.read(VIRTIO_MMIO_CONFIG + off)
    }

    pub fn config_write32(&self, off: u64, v: u32) {
        self.write(VIRTIO_MMIO_CONFIG + off, v)
    }
}

/// First virtio-mmio slot (where Blimp places its first device).
const FIRST_SLOT: u64 = 0xd000_0000;
/// A slot with no device behind it: writes exit to the VMM and are ignored.
const EMPTY_SLOT: u64 = 0xd000_f000;

/// Mean costs in ns measured by `mmio-rtt N`.
pub struct RoundTrips {
    /// An MMIO read made from ring 3 (MagicValue of the first slot).
    pub read: u64,
    /// An MMIO write made from ring 3 (to an empty slot).
    pub write: u64,
    /// The same read as a device call (trap to ring 0, read, return):
    /// what each of the driver's register accesses costs.
    pub call_read: u64,
    /// The same write as a device call.
    pub call_write: u64,
    /// The trap alone: ring 3 to the ring-0 stub and back, no access.
    pub trap: u64,
}

/// `mmio-rtt N`: each figure is the mean of N exits to the VMM and back
/// (or N bare traps).
pub fn round_trip_ns(n: u64) -> RoundTrips {
    let n = n.max(1);
    let time = |f: &mut dyn FnMut()| {
        let t0 = crate::clock::now_ns();
        for _ in 0..n {
            f();
        }
        (crate::clock::now_ns() - t0) / n
    };
    let magic = FIRST_SLOT + VIRTIO_MMIO_MAGIC_VALUE;
    RoundTrips {
        // SAFETY: the MMIO hole is mapped uncached + user; reading
        // MagicValue has no side effect.
        read: time(&mut || {
            let _ = unsafe { mmio_read32(magic) };
        }),
        // SAFETY: mapped MMIO with no device behind it.
        write: time(&mut || unsafe { mmio_write32(EMPTY_SLOT, 0) }),
        call_read: time(&mut || {
            DevCall::new().then_read(magic).call();
        }),
        call_write: time(&mut || {
            DevCall::new().write(EMPTY_SLOT, 0).call();
        }),
        trap: time(&mut || {
            DevCall::new().call();
        }),
    }
}
