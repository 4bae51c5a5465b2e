//! [`Machine`]: the parts every VM has (KVM VM, guest RAM, buses, serial,
//! i8042, event loop), built the same way whether the VM boots a kernel
//! (`vmm.rs`) or is restored (`restore.rs`); both turn it into a `Vmm`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use arch::MemoryLayout;
use devices::bus::BusDevice;
use devices::legacy::{self, DebugExit, I8042, Serial};
use event_manager::{EventManager, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::device_manager::DeviceManager;
use crate::error::{Error, io};
use crate::exit::VmExit;
use crate::memory::GuestRam;
use crate::pvm::KvmBackend;
use crate::signals::TerminationSignals;
use crate::vm::{Vm, VmError};

pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The parts every VM has, built the same way whether it boots a kernel or
/// is restored from a migration stream.
pub(crate) struct Machine {
    pub(crate) started: Instant,
    pub(crate) signals: Arc<TerminationSignals>,
    pub(crate) backend: KvmBackend,
    pub(crate) vm: Vm,
    pub(crate) ram: Arc<GuestRam>,
    pub(crate) exit: Arc<VmExit>,
    pub(crate) pio: Bus,
    pub(crate) mmio: Bus,
    pub(crate) virtio: DeviceManager,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) events: EventManager<Subscriber>,
    pub(crate) debug_exit: bool,
}

impl Machine {
    /// KVM VM, guest RAM, serial console and i8042. `ram_file`: for a
    /// `file=PATH` backing, the file to map in PATH's stead (see
    /// [`GuestRam::with_file`]).
    pub(crate) fn new(
        layout: &MemoryLayout,
        vcpus: u8,
        backing: &crate::config::MemoryBackend,
        thp: bool,
        ram_file: Option<std::fs::File>,
    ) -> Result<Self, Error> {
        let started = Instant::now();
        // Block terminating signals before any thread exists, so all inherit the mask.
        let signals = Arc::new(TerminationSignals::new().map_err(io("creating the signalfd"))?);
        let backend = KvmBackend::detect();
        let mut vm = Vm::new(usize::from(vcpus))?;
        let ram = Arc::new(GuestRam::with_file(layout, backing, thp, ram_file)?);
        vm.register_memory(&ram, false)?;
        let exit = Arc::new(VmExit::new().map_err(io("creating the exit eventfd"))?);
        let mut pio = Bus::new("pio");
        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(io("creating the serial irqfd"))?;
        vm.fd()
            .register_irqfd(&serial_irq, legacy::COM1_IRQ)
            .map_err(|source| VmError::Ioctl {
                what: "KVM_IRQFD (serial)",
                source,
            })?;
        let serial = Arc::new(Mutex::new(Serial::new(
            serial_irq,
            Box::new(crate::console::StdoutWriter::default()),
        )));
        pio.insert(
            u64::from(legacy::COM1_PORT_BASE),
            u64::from(legacy::serial::COM1_PORT_COUNT),
            serial.clone(),
        )?;
        let i8042: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(I8042::new(exit.clone())));
        pio.insert(
            u64::from(legacy::I8042_PORT_BASE),
            u64::from(legacy::i8042::I8042_PORT_COUNT),
            i8042,
        )?;
        let events = EventManager::new().map_err(|e| Error::EventLoop(e.to_string()))?;
        Ok(Self {
            started,
            signals,
            backend,
            vm,
            ram,
            exit,
            pio,
            mmio: Bus::new("mmio"),
            virtio: DeviceManager::new(),
            serial,
            events,
            debug_exit: false,
        })
    }

    /// The debug-exit port 0xf4.
    pub(crate) fn add_debug_exit(&mut self) -> Result<(), Error> {
        let dbg: Arc<Mutex<dyn BusDevice>> =
            Arc::new(Mutex::new(DebugExit::new(self.exit.clone())));
        self.pio
            .insert(u64::from(legacy::DEBUG_EXIT_PORT), 1, dbg)?;
        self.debug_exit = true;
        Ok(())
    }
}
