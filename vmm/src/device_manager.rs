//! Placing virtio devices: each gets a 4 KiB virtio-mmio slot in the MMIO
//! hole and a GSI, its queue notifications become KVM ioeventfds, its
//! interrupt a KVM irqfd, and the guest learns of it from a
//! `virtio_mmio.device=4K@BASE:GSI` command-line entry (how Linux with
//! CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, and the test guest, find devices).

use std::sync::{Arc, Mutex};

use arch::layout::{IOAPIC_PINS, VIRTIO_MMIO_FIRST_GSI, VIRTIO_MMIO_SLOT_SIZE, virtio_mmio_slot};
use devices::GuestMemory;
use devices::virtio::mmio::{MmioTransport, MmioTransportState};
use devices::virtio::{IrqfdInterrupt, VirtioDevice};
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Bus, BusError};
use crate::vm::{Vm, VmError};

/// Offset of QueueNotify in the virtio-mmio register window.
const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// Errors placing a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no free virtio-mmio slot: at most {0} devices")]
    NoSlot(u32),
    #[error("creating the virtio-mmio transport: {0}")]
    Transport(#[source] std::io::Error),
    #[error("restoring the virtio-mmio transport: {0}")]
    Restore(String),
    #[error("creating an interrupt eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// A virtio device placed on the MMIO bus.
pub struct PlacedDevice {
    pub base: u64,
    pub gsi: u32,
    pub transport: Arc<Mutex<MmioTransport>>,
}

impl PlacedDevice {
    /// The command-line entry that announces this device to the guest.
    pub fn cmdline_entry(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.gsi)
    }
}

/// Hands out virtio-mmio slots and GSIs in order.
#[derive(Default)]
pub struct DeviceManager {
    placed: Vec<PlacedDevice>,
}

impl DeviceManager {
    pub fn new() -> Self {
        Self::default()
    }

    /// Place `device` in the next slot.
    pub fn add_virtio(
        &mut self,
        vm: &Vm,
        mmio: &mut Bus,
        mem: &GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<&PlacedDevice, DeviceError> {
        self.place(vm, mmio, mem, device, None)
    }

    /// Place a restored `device` in the next slot, with its transport
    /// restored from `state` (re-activating it if the guest had).
    pub fn add_restored_virtio(
        &mut self,
        vm: &Vm,
        mmio: &mut Bus,
        mem: &GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
        state: &MmioTransportState,
    ) -> Result<&PlacedDevice, DeviceError> {
        self.place(vm, mmio, mem, device, Some(state))
    }

    fn place(
        &mut self,
        vm: &Vm,
        mmio: &mut Bus,
        mem: &GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
        state: Option<&MmioTransportState>,
    ) -> Result<&PlacedDevice, DeviceError> {
        let index = self.placed.len() as u32;
        let max = IOAPIC_PINS - VIRTIO_MMIO_FIRST_GSI;
        if index >= max {
            return Err(DeviceError::NoSlot(max));
        }
        let base = virtio_mmio_slot(index);
        let gsi = VIRTIO_MMIO_FIRST_GSI + index;
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let interrupt = Arc::new(IrqfdInterrupt::new(evt));
        vm.fd()
            .register_irqfd(interrupt.eventfd(), gsi)
            .map_err(|source| VmError::Ioctl {
                what: "KVM_IRQFD (virtio)",
                source,
            })?;
        let transport = match state {
            None => MmioTransport::new(device, mem.clone(), interrupt)
                .map_err(DeviceError::Transport)?,
            Some(st) => MmioTransport::restore(device, mem.clone(), interrupt, st)
                .map_err(|e| DeviceError::Restore(e.to_string()))?,
        };
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    queue as u32,
                )
                .map_err(|source| VmError::Ioctl {
                    what: "KVM_IOEVENTFD (virtio queue)",
                    source,
                })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(base, VIRTIO_MMIO_SLOT_SIZE, transport.clone())?;
        self.placed.push(PlacedDevice {
            base,
            gsi,
            transport,
        });
        Ok(self.placed.last().expect("just pushed"))
    }

    /// Command-line entries for every placed device, space-separated.
    pub fn cmdline(&self) -> String {
        self.placed
            .iter()
            .map(PlacedDevice::cmdline_entry)
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn devices(&self) -> &[PlacedDevice] {
        &self.placed
    }
}
