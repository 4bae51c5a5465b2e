//! The VMM: builds a VM from a [`VmConfig`], runs the event loop on the
//! calling thread, and tears everything down when the VM ends.

use std::io::{IsTerminal, Read};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arch::MemoryLayout;
use devices::bus::BusDevice;
use devices::legacy::{self, DebugExit, I8042, Serial};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;

use crate::boot::{self, BootError};
use crate::bus::{Bus, BusError};
use crate::config::VmConfig;
use crate::exit::{ExitReason, VmExit};
use crate::memory::{GuestRam, MemoryError};
use crate::pvm::KvmBackend;
use crate::signals::TerminationSignals;
use crate::vcpu::{self, VcpuContext, VcpuError, Vcpus};
use crate::vm::{Vm, VmError};

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Layout(#[from] arch::layout::LayoutError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("placing a device: {0}")]
    Bus(#[from] BusError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("event loop: {0}")]
    EventLoop(String),
}

impl Error {
    /// True when the error comes from what the user asked for (a file that is
    /// not a kernel, an initrd that does not fit, a backing that cannot be
    /// had) rather than from the host failing at run time.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::Layout(_)
                | Error::Boot(_)
                | Error::Memory(MemoryError::NoHugePages { .. } | MemoryError::File { .. })
                | Error::Vm(VmError::TooManyVcpus { .. })
        )
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A built VM, ready to run.
pub struct Vmm {
    config: VmConfig,
    // Field order matters for drop: vCPUs and the VM go before guest memory.
    vcpus: Option<Vcpus>,
    #[allow(dead_code)] // Held so its fds live as long as the VM runs.
    vm: Vm,
    ram: Arc<GuestRam>,
    exit: Arc<VmExit>,
    serial: Arc<Mutex<Serial>>,
    events: EventManager<Subscriber>,
    signals: Arc<TerminationSignals>,
    backend: KvmBackend,
    started: Instant,
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
}

impl Vmm {
    /// Create the VM, its memory and devices, and load the guest.
    pub fn build(config: VmConfig) -> Result<Self, Error> {
        let started = Instant::now();
        // Block terminating signals before any thread exists, so all inherit the mask.
        let signals = Arc::new(TerminationSignals::new().map_err(io("creating the signalfd"))?);
        let backend = KvmBackend::detect();
        let layout = MemoryLayout::new(config.memory_bytes)?;
        let mut vm = Vm::new(usize::from(config.vcpus))?;
        let ram = Arc::new(GuestRam::new(&layout, &config.memory_backend)?);
        vm.register_memory(&ram, false)?;

        let exit = Arc::new(VmExit::new().map_err(io("creating the exit eventfd"))?);
        let mut pio = Bus::new("pio");
        let mmio = Bus::new("mmio");

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
            Box::new(legacy::serial::StdoutWriter),
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
        if config.debug_exit {
            let dbg: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(DebugExit::new(exit.clone())));
            pio.insert(u64::from(legacy::DEBUG_EXIT_PORT), 1, dbg)?;
        }

        let cmdline = config.cmdline.trim().to_string();
        let info = boot::load(
            ram.memory(),
            &layout,
            &config.kernel,
            config.initrd.as_deref(),
            &cmdline,
            config.vcpus,
        )?;
        log::debug!(
            "kernel entry {:#x}, ends at {:#x}",
            info.entry,
            info.kernel_end
        );

        let mut vcpu_fds = Vec::new();
        for id in 0..config.vcpus {
            vcpu_fds.push(vcpu::create_vcpu(
                &vm,
                id,
                config.vcpus,
                info.entry,
                backend.is_pvm(),
            )?);
        }

        let events = EventManager::new().map_err(|e| Error::EventLoop(e.to_string()))?;
        Ok(Self {
            config,
            vcpus: None,
            vm,
            ram,
            exit,
            serial,
            events,
            signals,
            backend,
            started,
            vcpu_fds,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
        })
    }

    /// Time since `build` started.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    pub fn guest_ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Start the vCPUs and run the event loop until the VM ends.
    pub fn run(mut self) -> Result<ExitReason, Error> {
        let _terminal = if self.config.serial_input {
            let stdin_sub: Subscriber = Arc::new(Mutex::new(StdinInput {
                serial: self.serial.clone(),
            }));
            self.events.add_subscriber(stdin_sub);
            RawTerminal::enter()
        } else {
            None
        };
        let control: Subscriber = Arc::new(Mutex::new(ControlEvents {
            exit: self.exit.clone(),
            signals: self.signals.clone(),
        }));
        self.events.add_subscriber(control);

        let ctx = VcpuContext {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            exit: self.exit.clone(),
            pvm: self.backend.is_pvm(),
        };
        self.vcpus = Some(Vcpus::start(std::mem::take(&mut self.vcpu_fds), ctx)?);
        log::info!(
            "VM started: {} MiB, {} vCPU(s), KVM backend {:?}, in {:?}",
            self.config.memory_bytes >> 20,
            self.config.vcpus,
            self.backend,
            self.started.elapsed()
        );

        let result = loop {
            if let Some(reason) = self.exit.reason() {
                break Ok(reason);
            }
            if let Err(e) = self.events.run() {
                break Err(Error::EventLoop(e.to_string()));
            }
        };
        if let Some(v) = self.vcpus.take() {
            v.stop();
        }
        log::info!("VM stopped after {:?}", self.started.elapsed());
        result
    }
}

/// The exit eventfd and the termination signals.
struct ControlEvents {
    exit: Arc<VmExit>,
    signals: Arc<TerminationSignals>,
}

impl MutEventSubscriber for ControlEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.exit.eventfd().as_raw_fd(), self.signals.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch control fd {fd}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.exit.eventfd().as_raw_fd() {
            let _ = self.exit.eventfd().read();
        } else if events.fd() == self.signals.as_raw_fd() {
            while let Some(sig) = self.signals.read() {
                log::info!("received signal {sig}, shutting down");
                self.exit.stop(ExitReason::Signal(sig));
            }
        }
    }
}

/// Bytes from stdin go to the serial console.
struct StdinInput {
    serial: Arc<Mutex<Serial>>,
}

impl MutEventSubscriber for StdinInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(libc::STDIN_FILENO, EventSet::IN)) {
            // stdin may be a regular file or /dev/null, which epoll refuses: no input then.
            log::debug!("not reading stdin: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 4096];
        let n = std::io::stdin().lock().read(&mut buf).unwrap_or(0);
        if n == 0 || events.event_set().contains(EventSet::HANG_UP) && n == 0 {
            let _ = ops.remove(events);
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        if !serial.queue_input(&buf[..n]) {
            log::warn!("serial input backlog full, dropped input");
        }
    }
}

/// Puts an interactive terminal in raw mode and restores it on drop (also
/// when the VMM leaves through an error).
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        match stdin.lock().set_raw_mode() {
            Ok(()) => Some(RawTerminal),
            Err(e) => {
                log::warn!("cannot put the terminal in raw mode: {e}");
                None
            }
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Err(e) = std::io::stdin().lock().set_canon_mode() {
            log::warn!("cannot restore the terminal: {e}");
        }
    }
}
