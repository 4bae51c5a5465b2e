//! The virtio-mmio transport (virtio spec 1.x, section 4.2, version 2 layout).
//!
//! One [`MmioTransport`] sits in front of one [`VirtioDevice`]. It owns the
//! register state the driver programs (feature selectors, queue registers,
//! device status), turns DRIVER_OK into [`VirtioDevice::activate`] with
//! validated `virtio_queue::Queue`s, and owns one notification eventfd per
//! queue the device can ever have; the VMM registers those as KVM ioeventfds
//! on `base + 0x50` with the queue index as datamatch.
//!
//! Lock order: the transport is called with its own lock held (by the VMM's
//! MMIO bus) and then locks the device; the device's event loop only ever
//! locks the device.

use std::sync::{Arc, Mutex, MutexGuard};

use log::{error, info, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    ActivateError, Interrupt, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
    VirtioDevice,
};
use crate::{GuestMemory, warn_limited};

mod persist;
pub use persist::{MmioTransportState, QueueRegsState};

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Modern (non-legacy) virtio-mmio.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("BLMP" in little endian).
pub const MMIO_VENDOR_ID: u32 = 0x504d_4c42;
/// Size of the MMIO window a transport decodes (registers + config space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register (for the VMM's ioeventfds).
pub const MMIO_QUEUE_NOTIFY_OFFSET: u64 = 0x50;

// Register offsets (spec 4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = MMIO_QUEUE_NOTIFY_OFFSET;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// Status bits the driver may set, in the order it must set them.
const STATUS_SEQUENCE: [u32; 4] = [
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
];

/// What the driver programmed for one queue, kept raw until DRIVER_OK.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct QueueRegs {
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & 0xffff_ffff_0000_0000) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0x0000_0000_ffff_ffff) | (u64::from(high) << 32);
}

/// The virtio-mmio transport for one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<dyn Interrupt>,
    queue_evts: Vec<EventFd>,
    device_type: u32,

    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// Registers of every possible queue (`max_queues` entries).
    queues: Vec<QueueRegs>,
    /// Max sizes of the queues that exist under the current features.
    queue_max: Vec<u16>,
    status: u32,
    /// Set when the device refused a reset: it will not be driven again.
    failed: bool,
}

impl MmioTransport {
    /// Wrap `device`; creates one (non-blocking) notification eventfd per
    /// queue the device can ever have.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<dyn Interrupt>,
    ) -> std::io::Result<Self> {
        let (device_type, max_queues, queue_max) = {
            let dev = lock(&device);
            (dev.device_type(), dev.max_queues(), dev.queue_max_sizes())
        };
        let queue_evts = (0..max_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queue_evts,
            device_type,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![QueueRegs::default(); max_queues],
            queue_max,
            status: 0,
            failed: false,
        })
    }

    /// One eventfd per queue the device can ever have (max over all
    /// features); the VMM registers each as a KVM ioeventfd on
    /// `base + 0x50` with datamatch = queue index (u32).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The wrapped device.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// Device status as the driver would read it.
    pub fn device_status(&self) -> u32 {
        let mut s = self.status;
        if lock(&self.device).needs_reset() {
            s |= VIRTIO_CONFIG_S_NEEDS_RESET;
        }
        s
    }

    /// MMIO read at `offset` inside the window. Bad sizes or offsets are
    /// logged (rate-limited) and read as zeros.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= REG_CONFIG {
            let dev = lock(&self.device);
            dev.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 {
            warn_limited!(
                "virtio-mmio(type {}): {}-byte read of register {:#x} ignored",
                self.device_type,
                data.len(),
                offset
            );
            return;
        }
        let v: u32 = match offset {
            REG_MAGIC => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let f = lock(&self.device).avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self
                .queue_max
                .get(self.queue_sel as usize)
                .copied()
                .map_or(0, u32::from),
            REG_QUEUE_READY => self
                .selected_queue()
                .map_or(0, |q| u32::from(self.queues[q].ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.device_status(),
            // No shared memory regions: length and base read as all ones.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => lock(&self.device).config_generation(),
            _ => {
                warn_limited!(
                    "virtio-mmio(type {}): read of unknown or write-only register {:#x}",
                    self.device_type,
                    offset
                );
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// MMIO write at `offset` inside the window. Bad sizes, offsets or
    /// out-of-sequence writes are logged (rate-limited) and ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            if self.failed {
                return;
            }
            let mut dev = lock(&self.device);
            dev.write_config(offset - REG_CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn_limited!(
                "virtio-mmio(type {}): {}-byte write of register {:#x} ignored",
                self.device_type,
                data.len(),
                offset
            );
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => self.write_driver_features(v),
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => self.with_queue_regs(offset, |q| match u16::try_from(v) {
                Ok(n) => q.size = n,
                Err(_) => {
                    warn_limited!("virtio-mmio: QueueNum {v} too large");
                    q.size = 0;
                }
            }),
            REG_QUEUE_READY => {
                self.write_queue_ready(v);
            }
            REG_QUEUE_DESC_LOW => self.with_queue_regs(offset, |q| set_low(&mut q.desc, v)),
            REG_QUEUE_DESC_HIGH => self.with_queue_regs(offset, |q| set_high(&mut q.desc, v)),
            REG_QUEUE_DRIVER_LOW => self.with_queue_regs(offset, |q| set_low(&mut q.driver, v)),
            REG_QUEUE_DRIVER_HIGH => self.with_queue_regs(offset, |q| set_high(&mut q.driver, v)),
            REG_QUEUE_DEVICE_LOW => self.with_queue_regs(offset, |q| set_low(&mut q.device, v)),
            REG_QUEUE_DEVICE_HIGH => self.with_queue_regs(offset, |q| set_high(&mut q.device, v)),
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            REG_SHM_SEL => {}
            _ => warn_limited!(
                "virtio-mmio(type {}): write of unknown or read-only register {:#x} ({:#x})",
                self.device_type,
                offset,
                v
            ),
        }
    }

    fn selected_queue(&self) -> Option<usize> {
        let q = self.queue_sel as usize;
        (q < self.queue_max.len() && q < self.queues.len()).then_some(q)
    }

    fn has(&self, bit: u32) -> bool {
        self.status & bit != 0
    }

    /// Queue registers may be written between FEATURES_OK and DRIVER_OK,
    /// for an existing queue that is not ready yet.
    fn with_queue_regs(&mut self, offset: u64, f: impl FnOnce(&mut QueueRegs)) {
        if !self.has(VIRTIO_CONFIG_S_FEATURES_OK) || self.has(VIRTIO_CONFIG_S_DRIVER_OK) {
            warn_limited!(
                "virtio-mmio(type {}): queue register {:#x} written in status {:#x}, ignored",
                self.device_type,
                offset,
                self.status
            );
            return;
        }
        let Some(q) = self.selected_queue() else {
            warn_limited!(
                "virtio-mmio(type {}): queue register {:#x} written for missing queue {}",
                self.device_type,
                offset,
                self.queue_sel
            );
            return;
        };
        if self.queues[q].ready {
            warn_limited!(
                "virtio-mmio(type {}): queue {} register {:#x} written while ready, ignored",
                self.device_type,
                q,
                offset
            );
            return;
        }
        f(&mut self.queues[q]);
    }

    /// Returns false when the write was refused (and logged).
    fn write_queue_ready(&mut self, v: u32) -> bool {
        // Writing 0 to a queue that is not ready (or does not exist) changes
        // nothing, in any status. Linux's virtio-mmio does exactly that for
        // every queue whenever a driver lets go of its device (`vm_del_vq`
        // after the reset: QueueSel, QueueReady = 0, read it back), so it
        // must not be logged as a refused write.
        if v == 0 && self.selected_queue().is_none_or(|q| !self.queues[q].ready) {
            return true;
        }
        if !self.has(VIRTIO_CONFIG_S_FEATURES_OK) || self.has(VIRTIO_CONFIG_S_DRIVER_OK) {
            warn_limited!(
                "virtio-mmio(type {}): QueueReady={} in status {:#x}, ignored",
                self.device_type,
                v,
                self.status
            );
            return false;
        }
        match self.selected_queue() {
            Some(q) => {
                self.queues[q].ready = v == 1;
                true
            }
            None => {
                warn_limited!(
                    "virtio-mmio(type {}): QueueReady for missing queue {}",
                    self.device_type,
                    self.queue_sel
                );
                false
            }
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if !self.has(VIRTIO_CONFIG_S_DRIVER) || self.has(VIRTIO_CONFIG_S_FEATURES_OK) {
            warn_limited!(
                "virtio-mmio(type {}): DriverFeatures written in status {:#x}, ignored",
                self.device_type,
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.driver_features, v),
            1 => set_high(&mut self.driver_features, v),
            sel => {
                if v != 0 {
                    warn_limited!(
                        "virtio-mmio(type {}): driver acked features {:#x} in bank {}, ignored",
                        self.device_type,
                        v,
                        sel
                    );
                }
                return;
            }
        }
        let mut dev = lock(&self.device);
        let offered = dev.avail_features();
        let unknown = self.driver_features & !offered;
        if unknown != 0 {
            warn_limited!(
                "virtio-mmio(type {}): driver acked unoffered features {:#x}, dropped",
                self.device_type,
                unknown
            );
        }
        dev.set_acked_features(self.driver_features & offered);
        self.queue_max = dev.queue_max_sizes();
    }

    fn notify(&mut self, v: u32) {
        match self.queue_evts.get(v as usize) {
            Some(evt) if (v as usize) < self.queue_max.len() => {
                if let Err(e) = evt.write(1) {
                    error!(
                        "virtio-mmio(type {}): signalling queue {} failed: {}",
                        self.device_type, v, e
                    );
                }
            }
            _ => warn_limited!(
                "virtio-mmio(type {}): notify for missing queue {}",
                self.device_type,
                v
            ),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's bit; the driver cannot set it.
        let v = v & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let old = self.status;
        if v & old != old {
            warn_limited!(
                "virtio-mmio(type {}): status {:#x} -> {:#x} clears bits, ignored",
                self.device_type,
                old,
                v
            );
            return;
        }
        let added = v & !old;
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            warn!(
                "virtio-mmio(type {}): driver gave up on the device (FAILED)",
                self.device_type
            );
            self.status |= VIRTIO_CONFIG_S_FAILED;
        }
        let known = STATUS_SEQUENCE
            .iter()
            .fold(VIRTIO_CONFIG_S_FAILED, |a, b| a | b);
        if added & !known != 0 {
            warn_limited!(
                "virtio-mmio(type {}): unknown status bits {:#x} ignored",
                self.device_type,
                added & !known
            );
        }
        for (i, &bit) in STATUS_SEQUENCE.iter().enumerate() {
            if added & bit == 0 {
                continue;
            }
            // Every earlier step must be set (now or before).
            let prereq = STATUS_SEQUENCE[..i].iter().fold(0, |a, b| a | b);
            if self.status & prereq != prereq {
                warn_limited!(
                    "virtio-mmio(type {}): status bit {:#x} set out of order (status {:#x})",
                    self.device_type,
                    bit,
                    self.status
                );
                return;
            }
            if bit == VIRTIO_CONFIG_S_FEATURES_OK && !self.features_ok() {
                return;
            }
            self.status |= bit;
            if bit == VIRTIO_CONFIG_S_DRIVER_OK {
                self.activate();
            }
        }
    }

    /// Decide whether the negotiated features are acceptable; on success
    /// prepare the queue registers of the queues that now exist.
    fn features_ok(&mut self) -> bool {
        if self.failed {
            error!(
                "virtio-mmio(type {}): device failed an earlier reset, refusing FEATURES_OK",
                self.device_type
            );
            return false;
        }
        let dev = lock(&self.device);
        let acked = dev.acked_features();
        if acked & (1u64 << VIRTIO_F_VERSION_1) == 0 {
            warn!(
                "virtio-mmio(type {}): driver did not accept VIRTIO_F_VERSION_1 (acked {:#x})",
                self.device_type, acked
            );
            return false;
        }
        self.queue_max = dev.queue_max_sizes();
        drop(dev);
        if self.queue_max.len() > self.queues.len() {
            error!(
                "virtio-mmio(type {}): device reports {} queues, more than its maximum {}",
                self.device_type,
                self.queue_max.len(),
                self.queues.len()
            );
            return false;
        }
        for (regs, &max) in self.queues.iter_mut().zip(&self.queue_max) {
            *regs = QueueRegs {
                size: max,
                ..QueueRegs::default()
            };
        }
        true
    }

    /// Build and validate the queues the driver set up.
    fn build_queues(&self) -> Result<Vec<Queue>, ActivateError> {
        let mut out = Vec::with_capacity(self.queue_max.len());
        for (index, (regs, &max)) in self.queues.iter().zip(&self.queue_max).enumerate() {
            let bad = |reason: String| ActivateError::BadQueue { index, reason };
            let mut q = Queue::new(max).map_err(|e| bad(format!("max size {max}: {e}")))?;
            if regs.ready {
                q.try_set_size(regs.size)
                    .map_err(|e| bad(format!("size {}: {e}", regs.size)))?;
                q.try_set_desc_table_address(GuestAddress(regs.desc))
                    .map_err(|e| bad(format!("descriptor table {:#x}: {e}", regs.desc)))?;
                q.try_set_avail_ring_address(GuestAddress(regs.driver))
                    .map_err(|e| bad(format!("driver area {:#x}: {e}", regs.driver)))?;
                q.try_set_used_ring_address(GuestAddress(regs.device))
                    .map_err(|e| bad(format!("device area {:#x}: {e}", regs.device)))?;
                if regs.driver == 0 {
                    // virtio-queue takes an available ring at 0 for one
                    // never set and would refuse the first buffer: say so
                    // now, not as a "bad available ring" at the first kick.
                    return Err(bad(
                        "driver area (available ring) at guest address 0, which this device does not serve".into(),
                    ));
                }
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    return Err(bad(format!(
                        "rings not inside guest memory (size {}, desc {:#x}, driver {:#x}, device {:#x})",
                        regs.size, regs.desc, regs.driver, regs.device
                    )));
                }
            }
            out.push(q);
        }
        Ok(out)
    }

    fn activate(&mut self) {
        let result = self.build_queues().and_then(|queues| {
            let evts = self.queue_evts[..queues.len()]
                .iter()
                .map(EventFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| ActivateError::Other(format!("cloning queue eventfds: {e}")))?;
            lock(&self.device).activate(self.mem.clone(), self.interrupt.clone(), queues, evts)
        });
        match result {
            Ok(()) => info!("virtio-mmio(type {}): device activated", self.device_type),
            Err(e) => {
                error!(
                    "virtio-mmio(type {}): activation failed: {}",
                    self.device_type, e
                );
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                if let Err(e) = self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG) {
                    error!(
                        "virtio-mmio(type {}): config interrupt failed: {}",
                        self.device_type, e
                    );
                }
            }
        }
    }

    fn reset(&mut self) {
        let queue_max = {
            let mut dev = lock(&self.device);
            if !dev.reset() {
                error!(
                    "virtio-mmio(type {}): device cannot be reset; it stays failed",
                    self.device_type
                );
                self.failed = true;
            }
            dev.queue_max_sizes()
        };
        self.queue_max = queue_max;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues.fill(QueueRegs::default());
        self.interrupt
            .ack(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
    }
}

/// Lock the device, surviving a poisoned mutex (a panic elsewhere must not
/// take the vCPU thread down with it).
fn lock(device: &Arc<Mutex<dyn VirtioDevice>>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| {
        error!("virtio device mutex poisoned; continuing");
        poisoned.into_inner()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::{Persist, PersistError, QueueRingState};
    use std::sync::atomic::{AtomicU32, Ordering};

    const F_A: u64 = 1 << 0;
    const F_B: u64 = 1 << 1;
    const V1: u64 = 1 << VIRTIO_F_VERSION_1;

    #[derive(Default)]
    struct Activation {
        sizes: Vec<u16>,
        ready: Vec<bool>,
        evts: usize,
        states: Vec<virtio_queue::QueueState>,
    }

    struct Dummy {
        acked: u64,
        active: Option<Activation>,
        resets: u32,
        refuse_reset: bool,
        config: [u8; 8],
        broken: bool,
        no_queue_states: bool,
    }

    impl Dummy {
        fn new() -> Self {
            Self {
                acked: 0,
                active: None,
                resets: 0,
                refuse_reset: false,
                config: [1, 2, 3, 4, 5, 6, 7, 8],
                broken: false,
                no_queue_states: false,
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            5
        }
        fn avail_features(&self) -> u64 {
            V1 | F_A | F_B
        }
        fn acked_features(&self) -> u64 {
            self.acked
        }
        fn set_acked_features(&mut self, f: u64) {
            self.acked = f;
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            if self.acked & F_B != 0 {
                vec![256, 256, 2]
            } else {
                vec![256, 256]
            }
        }
        fn max_queues(&self) -> usize {
            3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            if let Some(src) = self.config.get(o..o + data.len()) {
                data.copy_from_slice(src);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            if let Some(dst) = self.config.get_mut(o..o + data.len()) {
                dst.copy_from_slice(data);
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMemory,
            _interrupt: Arc<dyn Interrupt>,
            queues: Vec<Queue>,
            queue_evts: Vec<EventFd>,
        ) -> Result<(), ActivateError> {
            if queues.iter().any(|q| !q.ready()) {
                return Err(ActivateError::Other("queue not ready".into()));
            }
            self.active = Some(Activation {
                sizes: queues.iter().map(|q| q.size()).collect(),
                ready: queues.iter().map(|q| q.ready()).collect(),
                evts: queue_evts.len(),
                states: queues.iter().map(Queue::state).collect(),
            });
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            self.active = None;
            self.acked = 0;
            !self.refuse_reset
        }
        fn is_activated(&self) -> bool {
            self.active.is_some()
        }
        fn needs_reset(&self) -> bool {
            self.broken
        }
        fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
            if self.no_queue_states {
                return None;
            }
            Some(
                self.active
                    .as_ref()
                    .map_or(Vec::new(), |a| a.states.clone()),
            )
        }
    }

    #[derive(Default)]
    struct TestIrq {
        status: AtomicU32,
        triggers: AtomicU32,
    }

    impl Interrupt for TestIrq {
        fn trigger(&self, status: u32) -> std::io::Result<()> {
            self.status.fetch_or(status, Ordering::SeqCst);
            self.triggers.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn status(&self) -> u32 {
            self.status.load(Ordering::SeqCst)
        }
        fn ack(&self, bits: u32) {
            self.status.fetch_and(!bits, Ordering::SeqCst);
        }
    }

    struct Fixture {
        t: MmioTransport,
        dev: Arc<Mutex<Dummy>>,
        irq: Arc<TestIrq>,
    }

    fn fixture() -> Fixture {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let irq = Arc::new(TestIrq::default());
        let t = MmioTransport::new(dev.clone(), mem, irq.clone()).unwrap();
        Fixture { t, dev, irq }
    }

    fn r32(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FOK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;

    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        w32(t, REG_STATUS, ACK);
        w32(t, REG_STATUS, ACK | DRV);
        w32(t, REG_DRIVER_FEATURES_SEL, 1);
        w32(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        w32(t, REG_DRIVER_FEATURES_SEL, 0);
        w32(t, REG_DRIVER_FEATURES, features as u32);
        w32(t, REG_STATUS, ACK | DRV | FOK);
        r32(t, REG_STATUS)
    }

    /// Negotiate `features`, set up queue `i` as `queues[i]` (size, ring
    /// base) and write DRIVER_OK.
    fn bring_up(t: &mut MmioTransport, features: u64, queues: &[(u32, u64)]) {
        negotiate(t, features);
        for (q, &(size, base)) in (0..).zip(queues) {
            setup_queue(t, q, size, base);
        }
        w32(t, REG_STATUS, ACK | DRV | FOK | DOK);
    }

    fn setup_queue(t: &mut MmioTransport, q: u32, size: u32, base: u64) {
        w32(t, REG_QUEUE_SEL, q);
        assert_eq!(r32(t, REG_QUEUE_READY), 0);
        assert!(r32(t, REG_QUEUE_NUM_MAX) >= size);
        w32(t, REG_QUEUE_NUM, size);
        w32(t, REG_QUEUE_DESC_LOW, base as u32);
        w32(t, REG_QUEUE_DESC_HIGH, (base >> 32) as u32);
        w32(t, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w32(t, REG_QUEUE_DRIVER_HIGH, 0);
        w32(t, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w32(t, REG_QUEUE_DEVICE_HIGH, 0);
        w32(t, REG_QUEUE_READY, 1);
        assert_eq!(r32(t, REG_QUEUE_READY), 1);
    }

    #[test]
    fn identification_registers() {
        let mut f = fixture();
        assert_eq!(r32(&mut f.t, REG_MAGIC), 0x7472_6976);
        assert_eq!(r32(&mut f.t, REG_VERSION), 2);
        assert_eq!(r32(&mut f.t, REG_DEVICE_ID), 5);
        assert_eq!(r32(&mut f.t, REG_VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(r32(&mut f.t, REG_SHM_LEN_LOW), u32::MAX);
        assert_eq!(f.t.queue_evts().len(), 3);
    }

    #[test]
    fn device_features_by_selector() {
        let mut f = fixture();
        assert_eq!(r32(&mut f.t, REG_DEVICE_FEATURES), 0b11);
        w32(&mut f.t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r32(&mut f.t, REG_DEVICE_FEATURES), 1);
        w32(&mut f.t, REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r32(&mut f.t, REG_DEVICE_FEATURES), 0);
    }

    #[test]
    fn bad_sizes_and_offsets_read_zero() {
        let mut f = fixture();
        let mut b = [0xffu8; 2];
        f.t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        f.t.read(0x0f0, &mut b);
        assert_eq!(b, [0; 4]);
        let mut b = [0xffu8; 8];
        f.t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0; 8]);
        // Writes of odd sizes are ignored.
        f.t.write(REG_STATUS, &[1]);
        assert_eq!(r32(&mut f.t, REG_STATUS), 0);
        f.t.write(0x0f0, &[1, 2, 3, 4]);
        f.t.write(REG_MAGIC, &[1, 2, 3, 4]);
        assert_eq!(r32(&mut f.t, REG_MAGIC), MMIO_MAGIC_VALUE);
    }

    #[test]
    fn features_masked_to_offered() {
        let mut f = fixture();
        negotiate(&mut f.t, V1 | F_A | (1 << 40));
        assert_eq!(f.dev.lock().unwrap().acked, V1 | F_A);
    }

    #[test]
    fn features_ok_requires_version_1() {
        let mut f = fixture();
        let s = negotiate(&mut f.t, F_A);
        assert_eq!(s & FOK, 0, "FEATURES_OK must not stick without VERSION_1");
        let mut f = fixture();
        let s = negotiate(&mut f.t, V1);
        assert_eq!(s, ACK | DRV | FOK);
    }

    #[test]
    fn features_frozen_after_features_ok() {
        let mut f = fixture();
        negotiate(&mut f.t, V1);
        w32(&mut f.t, REG_DRIVER_FEATURES, F_A as u32);
        assert_eq!(f.dev.lock().unwrap().acked, V1);
    }

    #[test]
    fn status_out_of_order_is_refused() {
        let mut f = fixture();
        w32(&mut f.t, REG_STATUS, DRV);
        assert_eq!(r32(&mut f.t, REG_STATUS), 0);
        w32(&mut f.t, REG_STATUS, ACK);
        w32(&mut f.t, REG_STATUS, ACK | DRV | DOK);
        assert_eq!(r32(&mut f.t, REG_STATUS), ACK | DRV);
        // Clearing bits is refused.
        w32(&mut f.t, REG_STATUS, ACK);
        assert_eq!(r32(&mut f.t, REG_STATUS), ACK | DRV);
        // FAILED may be set at any time.
        w32(&mut f.t, REG_STATUS, ACK | DRV | VIRTIO_CONFIG_S_FAILED);
        assert_eq!(
            r32(&mut f.t, REG_STATUS),
            ACK | DRV | VIRTIO_CONFIG_S_FAILED
        );
    }

    #[test]
    fn queue_num_max_zero_for_missing_queues() {
        let mut f = fixture();
        negotiate(&mut f.t, V1);
        for (q, want) in [(0, 256), (1, 256), (2, 0), (7, 0), (u32::MAX, 0)] {
            w32(&mut f.t, REG_QUEUE_SEL, q);
            assert_eq!(r32(&mut f.t, REG_QUEUE_NUM_MAX), want, "queue {q}");
        }
        let mut f = fixture();
        negotiate(&mut f.t, V1 | F_B);
        w32(&mut f.t, REG_QUEUE_SEL, 2);
        assert_eq!(r32(&mut f.t, REG_QUEUE_NUM_MAX), 2);
        w32(&mut f.t, REG_QUEUE_SEL, 3);
        assert_eq!(r32(&mut f.t, REG_QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn activation_passes_queues_and_eventfds() {
        let mut f = fixture();
        bring_up(
            &mut f.t,
            V1 | F_B,
            &[(128, 0x1_0000), (256, 0x2_0000), (2, 0x3_0000)],
        );
        assert_eq!(r32(&mut f.t, REG_STATUS), ACK | DRV | FOK | DOK);
        let dev = f.dev.lock().unwrap();
        let a = dev.active.as_ref().expect("activated");
        assert_eq!(a.sizes, vec![128, 256, 2]);
        assert_eq!(a.ready, vec![true; 3]);
        assert_eq!(a.evts, 3);
    }

    #[test]
    fn queue_outside_memory_fails_activation_with_needs_reset() {
        let mut f = fixture();
        bring_up(&mut f.t, V1, &[(256, 0x1_0000), (256, 0xffff_0000)]);
        let s = r32(&mut f.t, REG_STATUS);
        assert_ne!(s & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(f.dev.lock().unwrap().active.is_none());
        assert_ne!(f.irq.status() & VIRTIO_MMIO_INT_CONFIG, 0);
    }

    /// An available ring at guest address 0 fails activation with its
    /// reason, rather than breaking the device at the first kick.
    #[test]
    fn an_available_ring_at_address_zero_fails_activation() {
        let mut f = fixture();
        negotiate(&mut f.t, V1);
        setup_queue(&mut f.t, 1, 256, 0x2_0000);
        w32(&mut f.t, REG_QUEUE_SEL, 0);
        w32(&mut f.t, REG_QUEUE_NUM, 256);
        w32(&mut f.t, REG_QUEUE_DESC_LOW, 0x1_0000);
        w32(&mut f.t, REG_QUEUE_DRIVER_LOW, 0);
        w32(&mut f.t, REG_QUEUE_DEVICE_LOW, 0x1_2000);
        w32(&mut f.t, REG_QUEUE_READY, 1);
        w32(&mut f.t, REG_STATUS, ACK | DRV | FOK | DOK);
        assert_ne!(r32(&mut f.t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(f.dev.lock().unwrap().active.is_none());
    }

    #[test]
    fn bad_queue_size_fails_activation() {
        let mut f = fixture();
        // Queue 0 of a size that is not a power of two.
        bring_up(&mut f.t, V1, &[(100, 0x1_0000), (256, 0x2_0000)]);
        assert_ne!(r32(&mut f.t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        // Misaligned ring.
        let mut f = fixture();
        bring_up(&mut f.t, V1, &[(256, 0x1_0001), (256, 0x2_0000)]);
        assert_ne!(r32(&mut f.t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_registers_ignored_outside_setup_window() {
        let mut f = fixture();
        // Before FEATURES_OK.
        w32(&mut f.t, REG_QUEUE_SEL, 0);
        w32(&mut f.t, REG_QUEUE_READY, 1);
        assert_eq!(r32(&mut f.t, REG_QUEUE_READY), 0);
        negotiate(&mut f.t, V1);
        // Missing queue.
        w32(&mut f.t, REG_QUEUE_SEL, 2);
        w32(&mut f.t, REG_QUEUE_READY, 1);
        assert_eq!(r32(&mut f.t, REG_QUEUE_READY), 0);
    }

    /// What Linux's virtio-mmio does when a driver is unbound (or removed):
    /// reset, then for each queue it had: QueueSel, QueueReady = 0, read
    /// QueueReady back (it WARNs unless 0). The queues are gone after the
    /// reset and the device has fewer of them (features are cleared), so
    /// the writes are no-ops that must be accepted, not refused and logged.
    #[test]
    fn queue_ready_zero_after_reset_is_a_quiet_no_op() {
        let mut f = fixture();
        bring_up(
            &mut f.t,
            V1 | F_B,
            &[(256, 0x1_0000), (256, 0x2_0000), (2, 0x3_0000)],
        );
        w32(&mut f.t, REG_STATUS, 0);
        for q in 0..3 {
            w32(&mut f.t, REG_QUEUE_SEL, q);
            assert!(f.t.write_queue_ready(0), "queue {q}");
            assert_eq!(r32(&mut f.t, REG_QUEUE_READY), 0, "queue {q}");
        }
        // Making a queue ready is still refused outside the setup window...
        w32(&mut f.t, REG_QUEUE_SEL, 0);
        assert!(!f.t.write_queue_ready(1));
        assert_eq!(r32(&mut f.t, REG_QUEUE_READY), 0);
        // ...and so is un-readying a live queue (no VIRTIO_F_RING_RESET).
        bring_up(&mut f.t, V1, &[(256, 0x1_0000), (256, 0x2_0000)]);
        w32(&mut f.t, REG_QUEUE_SEL, 1);
        assert!(!f.t.write_queue_ready(0));
        assert_eq!(r32(&mut f.t, REG_QUEUE_READY), 1);
        assert!(f.dev.lock().unwrap().active.is_some());
    }

    #[test]
    fn reset_clears_state() {
        let mut f = fixture();
        bring_up(
            &mut f.t,
            V1 | F_B,
            &[(256, 0x1_0000), (256, 0x2_0000), (2, 0x3_0000)],
        );
        f.irq.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
        w32(&mut f.t, REG_STATUS, 0);
        assert_eq!(r32(&mut f.t, REG_STATUS), 0);
        assert_eq!(r32(&mut f.t, REG_INTERRUPT_STATUS), 0);
        {
            let dev = f.dev.lock().unwrap();
            assert_eq!(dev.resets, 1);
            assert!(dev.active.is_none());
        }
        w32(&mut f.t, REG_QUEUE_SEL, 2);
        assert_eq!(r32(&mut f.t, REG_QUEUE_NUM_MAX), 0);
        // And the device can be driven again.
        bring_up(&mut f.t, V1, &[(256, 0x1_0000), (256, 0x2_0000)]);
        assert!(f.dev.lock().unwrap().active.is_some());
    }

    #[test]
    fn failed_reset_blocks_features_ok() {
        let mut f = fixture();
        f.dev.lock().unwrap().refuse_reset = true;
        w32(&mut f.t, REG_STATUS, 0);
        // Status must read 0 after a reset, or Linux spins forever.
        assert_eq!(r32(&mut f.t, REG_STATUS), 0);
        let s = negotiate(&mut f.t, V1);
        assert_eq!(s & FOK, 0);
    }

    #[test]
    fn device_needs_reset_shows_in_status() {
        let mut f = fixture();
        negotiate(&mut f.t, V1);
        f.dev.lock().unwrap().broken = true;
        assert_ne!(r32(&mut f.t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        // The driver cannot set it itself.
        f.dev.lock().unwrap().broken = false;
        w32(
            &mut f.t,
            REG_STATUS,
            ACK | DRV | FOK | VIRTIO_CONFIG_S_NEEDS_RESET,
        );
        assert_eq!(r32(&mut f.t, REG_STATUS), ACK | DRV | FOK);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let mut f = fixture();
        f.irq
            .trigger(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG)
            .unwrap();
        assert_eq!(r32(&mut f.t, REG_INTERRUPT_STATUS), 3);
        w32(&mut f.t, REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(r32(&mut f.t, REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    }

    #[test]
    fn queue_notify_write_signals_eventfd() {
        let mut f = fixture();
        negotiate(&mut f.t, V1);
        w32(&mut f.t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(f.t.queue_evts()[1].read().unwrap(), 1);
        assert!(f.t.queue_evts()[0].read().is_err()); // nothing pending (non-blocking)
        // Missing queue: ignored.
        w32(&mut f.t, REG_QUEUE_NOTIFY, 2);
        assert!(f.t.queue_evts()[2].read().is_err());
        w32(&mut f.t, REG_QUEUE_NOTIFY, 99);
    }

    #[test]
    fn config_space_is_delegated() {
        let mut f = fixture();
        let mut b = [0u8; 2];
        f.t.read(0x102, &mut b);
        assert_eq!(b, [3, 4]);
        f.t.write(0x100, &[9]);
        let mut b = [0u8; 1];
        f.t.read(0x100, &mut b);
        assert_eq!(b, [9]);
        let mut b = [0xffu8; 4];
        f.t.read(0x1000, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn queue_notify_offset_is_spec_value() {
        assert_eq!(MMIO_QUEUE_NOTIFY_OFFSET, 0x50);
        assert_eq!(REG_CONFIG, 0x100);
    }

    // ----- save / restore ---------------------------------------------------

    fn json_round_trip(s: &MmioTransportState) -> MmioTransportState {
        let v = crate::persist::to_json(s).unwrap();
        let text = serde_json::to_string(&v).unwrap();
        crate::persist::from_json(&serde_json::from_str(&text).unwrap()).unwrap()
    }

    /// A fresh Dummy "restored" with the acked features of `s`, and a
    /// transport restored around it.
    fn restore_fixture(s: &MmioTransportState) -> Result<Fixture, PersistError> {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy::new()));
        dev.lock().unwrap().acked = s.acked_features;
        let irq = Arc::new(TestIrq::default());
        let t = MmioTransport::restore(dev.clone(), mem, irq.clone(), s)?;
        Ok(Fixture { t, dev, irq })
    }

    fn activated() -> Fixture {
        let mut f = fixture();
        bring_up(
            &mut f.t,
            V1 | F_B,
            &[(128, 0x1_0000), (256, 0x2_0000), (2, 0x3_0000)],
        );
        // The device made progress on its rings.
        {
            let mut d = f.dev.lock().unwrap();
            let st = &mut d.active.as_mut().unwrap().states;
            st[0].next_avail = 7;
            st[0].next_used = 5;
            st[1].next_avail = 0xffff;
            st[1].next_used = 0xffff;
            st[2].event_idx_enabled = true;
        }
        f.irq.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
        w32(&mut f.t, REG_QUEUE_SEL, 1);
        f
    }

    #[test]
    fn save_restore_before_activation() {
        let mut f = fixture();
        negotiate(&mut f.t, V1 | F_A);
        setup_queue(&mut f.t, 0, 64, 0x1_0000);
        w32(&mut f.t, REG_QUEUE_SEL, 1);
        w32(&mut f.t, REG_QUEUE_NUM, 32);
        w32(&mut f.t, REG_DEVICE_FEATURES_SEL, 1);
        let saved = f.t.save().unwrap();
        assert!(!saved.device_activated);
        assert_eq!(saved.acked_features, V1 | F_A);
        assert!(saved.queues.iter().all(|q| q.ring.is_none()));
        let back = json_round_trip(&saved);
        assert_eq!(back, saved);
        let mut r = restore_fixture(&back).unwrap();
        assert_eq!(r.t.save().unwrap(), saved);
        assert!(r.dev.lock().unwrap().active.is_none());
        // The driver carries on where it was: queue 1 half set up.
        assert_eq!(r32(&mut r.t, REG_DEVICE_FEATURES), 1);
        assert_eq!(r32(&mut r.t, REG_QUEUE_READY), 0);
        w32(&mut r.t, REG_QUEUE_DESC_LOW, 0x2_0000);
        w32(&mut r.t, REG_QUEUE_DRIVER_LOW, 0x2_1000);
        w32(&mut r.t, REG_QUEUE_DEVICE_LOW, 0x2_2000);
        w32(&mut r.t, REG_QUEUE_READY, 1);
        w32(&mut r.t, REG_STATUS, ACK | DRV | FOK | DOK);
        let d = r.dev.lock().unwrap();
        assert_eq!(d.active.as_ref().unwrap().sizes, vec![64, 32]);
    }

    #[test]
    fn save_restore_activated_reactivates_with_ring_indices() {
        let f = activated();
        let saved = f.t.save().unwrap();
        assert!(saved.device_activated);
        assert_eq!(saved.interrupt_status, VIRTIO_MMIO_INT_VRING);
        assert_eq!(
            saved.queues[0].ring,
            Some(QueueRingState {
                next_avail: 7,
                next_used: 5,
                event_idx_enabled: false
            })
        );
        let back = json_round_trip(&saved);
        let mut r = restore_fixture(&back).unwrap();
        {
            let d = r.dev.lock().unwrap();
            let a = d
                .active
                .as_ref()
                .expect("re-activated without guest writes");
            assert_eq!(a.sizes, vec![128, 256, 2]);
            assert_eq!(a.evts, 3);
            assert_eq!((a.states[0].next_avail, a.states[0].next_used), (7, 5));
            assert_eq!(a.states[1].next_used, 0xffff);
            assert!(a.states[2].event_idx_enabled);
            assert_eq!(a.states[2].desc_table, 0x3_0000);
        }
        assert_eq!(r.t.save().unwrap(), saved);
        assert_eq!(r32(&mut r.t, REG_STATUS), ACK | DRV | FOK | DOK);
        assert_eq!(r32(&mut r.t, REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(r.irq.triggers.load(Ordering::SeqCst), 1);
        assert_eq!(r32(&mut r.t, REG_QUEUE_READY), 1, "queue_sel kept");
        // Every served queue was kicked once.
        for evt in r.t.queue_evts() {
            assert_eq!(evt.read().unwrap(), 1);
        }
        // Queue registers stay frozen after DRIVER_OK, as before.
        w32(&mut r.t, REG_QUEUE_NUM, 4);
        assert_eq!(r.t.save().unwrap(), saved);
        // And a reset works as on the source.
        w32(&mut r.t, REG_STATUS, 0);
        assert!(r.dev.lock().unwrap().active.is_none());
    }

    #[test]
    fn restore_refuses_unknown_version_and_other_device() {
        let saved = activated().t.save().unwrap();
        let bad = MmioTransportState {
            version: 99,
            ..saved.clone()
        };
        assert!(matches!(
            restore_fixture(&bad),
            Err(PersistError::UnsupportedVersion { found: 99, .. })
        ));
        let bad = MmioTransportState {
            device_type: 2,
            ..saved.clone()
        };
        assert!(matches!(
            restore_fixture(&bad),
            Err(PersistError::DeviceTypeMismatch { saved: 2, given: 5 })
        ));
        // The device was restored with other features than the transport.
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let e = MmioTransport::restore(dev.clone(), mem, Arc::new(TestIrq::default()), &saved)
            .err()
            .unwrap();
        assert!(e.to_string().contains("acked features"), "{e}");
        assert!(dev.lock().unwrap().active.is_none());
    }

    #[test]
    fn restore_refuses_invalid_queue_without_panicking() {
        let saved = activated().t.save().unwrap();
        for (field, value) in [
            ("desc", 0xffff_0000u64),     // outside guest memory
            ("desc", 0x1_0001),           // misaligned
            ("driver", u64::MAX - 1),     // wraps
            ("device", 0x10_0000 - 0x10), // runs off the end of memory
            ("size", 100),                // not a power of two
            ("size", 512),                // above the maximum
        ] {
            let mut bad = saved.clone();
            let q = &mut bad.queues[1];
            match field {
                "desc" => q.desc = value,
                "driver" => q.driver = value,
                "device" => q.device = value,
                _ => q.size = value as u16,
            }
            let bad = json_round_trip(&bad);
            match restore_fixture(&bad) {
                Err(PersistError::BadQueue { index: 1, .. }) => {}
                Err(e) => panic!("{field}={value:#x}: unexpected error {e}"),
                Ok(_) => panic!("{field}={value:#x} was accepted"),
            }
        }
        // Ring indices missing for a served queue, or present for another.
        let mut bad = saved.clone();
        bad.queues[0].ring = None;
        assert!(matches!(
            restore_fixture(&bad),
            Err(PersistError::BadQueue { index: 0, .. })
        ));
        let mut bad = saved.clone();
        bad.device_activated = false;
        assert!(matches!(
            restore_fixture(&bad),
            Err(PersistError::BadQueue { index: 0, .. })
        ));
        let mut bad = saved.clone();
        bad.queues.pop();
        assert!(matches!(
            restore_fixture(&bad),
            Err(PersistError::Invalid { .. })
        ));
        // Impossible status or interrupt bits.
        for (status, irq) in [
            (DOK, 0),
            (ACK | DRV | FOK | DOK | 0x100, 0),
            (saved.status, 4),
        ] {
            let bad = MmioTransportState {
                status,
                interrupt_status: irq,
                ..saved.clone()
            };
            assert!(
                matches!(restore_fixture(&bad), Err(PersistError::Invalid { .. })),
                "status {status:#x} irq {irq:#x}"
            );
        }
        let bad = MmioTransportState {
            status: ACK | DRV | FOK,
            ..saved
        };
        assert!(matches!(
            restore_fixture(&bad),
            Err(PersistError::Invalid { .. })
        ));
    }

    #[test]
    fn activated_device_without_queue_state_cannot_be_saved() {
        let f = activated();
        f.dev.lock().unwrap().no_queue_states = true;
        assert!(matches!(
            f.t.save(),
            Err(PersistError::QueueStateUnavailable)
        ));
        // Before activation nothing needs to be asked of the device.
        let f = fixture();
        f.dev.lock().unwrap().no_queue_states = true;
        assert!(f.t.save().is_ok());
    }
}
