//! The VMM: builds a VM from a [`VmConfig`], runs the event loop on the
//! calling thread, and tears everything down when the VM ends.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arch::MemoryLayout;
use devices::legacy::Serial;
use devices::virtio::balloon::{Balloon, BalloonEvent};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::api_handler::{ApiContext, ApiHandler, balloon_event, policy_apply, stats_view};
use crate::boot;
use crate::bus::Bus;
use crate::config::VmConfig;
use crate::console::{self, Escape, EscapeDecoder, Input, RawTerminal};
use crate::device_manager::DeviceManager;
use crate::exit::{ExitReason, VmExit};
use crate::machine::{Machine, Subscriber};
use crate::memory::GuestRam;
use crate::migration::source::{DeviceCapture, SourceContext};
use crate::migration::state::StateSupport;
use crate::policy::{PolicyEvents, PolicyShared};
use crate::pvm::KvmBackend;
use crate::signals::{SignalEvent, TerminationSignals};
use crate::vcpu::{self, VcpuContext, Vcpus};
use crate::vm::Vm;
use api_types::ApiEvent;

pub use crate::error::Error;
use crate::error::io;

/// Errors building or running a VM.
/// A built VM, ready to run.
pub struct Vmm {
    config: VmConfig,
    // Field order matters for drop: vCPUs and the VM go before guest memory.
    vcpus: Option<Arc<Vcpus>>,
    vm: Arc<Mutex<Vm>>,
    state_support: Arc<StateSupport>,
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
    virtio: DeviceManager,
    balloon: Option<Arc<Mutex<Balloon>>>,
    /// The balloon policy's state (with a balloon).
    policy: Option<Arc<PolicyShared>>,
    api: Option<(EventFd, api_types::ApiReceiver)>,
    debug_exit: bool,
    /// Run once the vCPUs run (a restored VM tells its balloon DONE).
    on_start: Vec<OnStart>,
    /// How the console takes input (decided when the VM starts running).
    console: Input,
}

/// Work to do once the vCPUs run.
type OnStart = Box<dyn FnOnce(&Vmm) + Send>;

impl Vmm {
    /// A terminating signal that came before the VM runs (read, so
    /// taken: the caller is about to give up the VM).
    pub(crate) fn stop_requested(&self) -> Option<i32> {
        self.signals.read()
    }

    /// Create the VM, its memory and devices, and load the guest.
    pub fn build(config: VmConfig) -> Result<Self, Error> {
        let layout = MemoryLayout::new(config.memory_bytes)?;
        let mut m = Machine::new(
            &layout,
            config.vcpus,
            &config.memory_backend,
            config.memory_thp,
            None,
        )?;
        if config.debug_exit {
            m.add_debug_exit()?;
        }
        let balloon = match &config.balloon {
            None => None,
            Some(cfg) => {
                let discard: Arc<dyn devices::RamDiscard> = m.ram.clone();
                let b = Arc::new(Mutex::new(Balloon::new(*cfg, m.ram.ranges(), discard)?));
                m.virtio
                    .add_virtio(&m.vm, &mut m.mmio, m.ram.memory(), b.clone())?;
                Some(b)
            }
        };
        let pvm_extra = if m.backend.is_pvm() {
            arch::pvm::PVM_CMDLINE
        } else {
            ""
        };
        let cmdline = compose_cmdline(&[config.cmdline.as_str(), pvm_extra, &m.virtio.cmdline()]);
        log::info!("kernel command line: {cmdline}");
        let info = boot::load(
            m.ram.memory(),
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
                &m.vm,
                id,
                config.vcpus,
                info.entry,
                m.backend.is_pvm(),
            )?);
        }
        m.into_vmm(config, vcpu_fds, balloon)
    }

    /// Make the channel the API server sends requests through; they are
    /// served on this VM's event loop once it runs.
    pub fn api_channel(&mut self) -> Result<api_types::VmmChannel, Error> {
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(io("creating the API eventfd"))?;
        let theirs = wake.try_clone().map_err(io("cloning the API eventfd"))?;
        let (chan, rx) = api_types::channel(move || {
            if let Err(e) = theirs.write(1) {
                log::error!("api: cannot wake the VMM: {e}");
            }
        });
        self.api = Some((wake, rx));
        Ok(chan)
    }

    /// The kernel and initrd this VM was booted from (none for a restored
    /// VM, whose kernel came in the stream).
    fn boot_files(&self) -> Vec<(&'static str, std::path::PathBuf)> {
        let kernel = Some(&self.config.kernel).filter(|k| !k.as_os_str().is_empty());
        [
            ("--kernel", kernel),
            ("--initrd", self.config.initrd.as_ref()),
        ]
        .into_iter()
        .filter_map(|(flag, p)| p.map(|p| (flag, p.clone())))
        .collect()
    }

    /// How migration captures device state (serial, virtio transports, balloon).
    fn device_capture(&self) -> DeviceCapture {
        let debug_exit = self.debug_exit;
        let serial = self.serial.clone();
        // The balloon is the only virtio device, in the first slot.
        let transport = self
            .balloon
            .as_ref()
            .and_then(|_| self.virtio.devices().first().map(|d| d.transport.clone()));
        let policy = self.policy.clone();
        Arc::new(move |balloon: Option<&Balloon>| {
            let b = match (balloon, &transport) {
                (Some(dev), Some(t)) => Some((dev, &**t)),
                _ => None,
            };
            // The policy's saved copy is a leaf lock: safe under the device's.
            let saved = policy.as_ref().and_then(|p| p.saved());
            crate::device_state::capture(debug_exit, &serial, b, saved)
        })
    }

    /// A restored guest may still hold blocks it hinted free at the source:
    /// tell its balloon DONE once it runs, so it frees them.
    pub(crate) fn tell_balloon_done_on_start(&mut self) {
        self.on_start.push(Box::new(|vmm: &Vmm| {
            if let Some(b) = &vmm.balloon {
                let mut b = lock_balloon(b);
                if b.hinting_status().state != devices::virtio::balloon::HintingState::Idle
                    && let Err(e) = b.hinting_done()
                {
                    log::warn!("restored balloon: cannot tell the guest DONE: {e}");
                }
            }
        }));
    }

    /// A restored guest printed its prompt on the source's terminal: once
    /// it runs here with a terminal attached, send it one newline so that
    /// it prints the prompt again (a shell or the test guest does; a
    /// half-typed line on the source would be submitted, as Enter would).
    pub(crate) fn reprint_prompt_on_start(&mut self) {
        self.on_start.push(Box::new(|vmm: &Vmm| {
            if vmm.console == Input::Terminal {
                log::info!("console: restored VM on a terminal: sending a newline for a prompt");
                let mut serial = vmm.serial.lock().unwrap_or_else(|p| p.into_inner());
                if !serial.queue_input(b"\n") {
                    log::warn!("serial input backlog full, no newline for the prompt");
                }
            }
        }));
    }

    /// The balloon policy's state, if the VM has a balloon.
    pub fn policy(&self) -> Option<&Arc<PolicyShared>> {
        self.policy.as_ref()
    }

    fn floor_bytes(&self) -> u64 {
        api_types::types::balloon_floor_bytes(
            self.config.memory_bytes,
            self.config.balloon_floor_bytes,
        )
    }

    /// The balloon's observer: API events (with a server) and a kick for
    /// the policy's subscriber, which then runs with its own timer.
    fn watch_balloon(&mut self, hub: Option<&api_types::EventHub>) -> Result<(), Error> {
        let (Some(b), Some(policy)) = (&self.balloon, &self.policy) else {
            return Ok(());
        };
        let events = hub.cloned().unwrap_or_default();
        {
            let hub = hub.cloned();
            let policy = policy.clone();
            let mut balloon = lock_balloon(b);
            // The observer runs with the balloon locked: it keeps its own
            // copies of `target` and `actual`, and reads the counters
            // through their own handle.
            let mut actual = balloon.actual_pages();
            let mut target = balloon.target_pages();
            let metrics = balloon.metrics_handle();
            balloon.set_observer(Box::new(move |e| {
                policy.kick();
                let Some(hub) = &hub else {
                    return;
                };
                let ev = match e {
                    BalloonEvent::TargetChanged { target_pages } => {
                        target = target_pages;
                        balloon_event(u64::from(target), u64::from(actual))
                    }
                    BalloonEvent::ActualChanged {
                        actual_pages,
                        target_pages,
                    } => {
                        actual = actual_pages;
                        target = target_pages;
                        balloon_event(u64::from(target), u64::from(actual))
                    }
                    BalloonEvent::StatisticsUpdated(st) => ApiEvent::BalloonStatistics(stats_view(
                        u64::from(target),
                        u64::from(actual),
                        &metrics.snapshot(),
                        Some(&st),
                    )),
                    BalloonEvent::HintingChanged(h) => ApiEvent::HintingChanged(h),
                };
                hub.publish(ev);
            }));
        }
        let sub = PolicyEvents::new(
            policy.clone(),
            b.clone(),
            policy_apply(b.clone(), self.config.memory_bytes, self.floor_bytes()),
            events,
        )
        .map_err(io("creating the balloon policy timer"))?;
        let sub: Subscriber = Arc::new(Mutex::new(sub));
        self.events.add_subscriber(sub);
        Ok(())
    }

    /// The balloon device, if the VM has one.
    pub fn balloon(&self) -> Option<&Arc<Mutex<Balloon>>> {
        self.balloon.as_ref()
    }

    /// Start the vCPUs and run the event loop until the VM ends.
    pub fn run(mut self) -> Result<ExitReason, Error> {
        self.console = console::input_mode(self.config.serial_input);
        let _terminal = if self.console == Input::Off {
            None
        } else {
            let terminal = self.console == Input::Terminal;
            let stdin_sub: Subscriber = Arc::new(Mutex::new(StdinInput {
                serial: self.serial.clone(),
                escape: terminal.then(EscapeDecoder::default),
                exit: self.exit.clone(),
            }));
            self.events.add_subscriber(stdin_sub);
            if terminal {
                errln!("{}", console::HINT);
                RawTerminal::enter()
            } else {
                None
            }
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
        let vcpus = Arc::new(Vcpus::start(std::mem::take(&mut self.vcpu_fds), ctx)?);
        self.vcpus = Some(vcpus.clone());
        let api = self.api.take();
        self.watch_balloon(api.as_ref().map(|(_, rx)| rx.event_hub()).as_ref())?;
        if let Some((wake, rx)) = api {
            let hub = rx.event_hub();
            let handler = ApiHandler::new(
                wake,
                rx,
                ApiContext {
                    migration: Some(SourceContext {
                        vm: self.vm.clone(),
                        ram: self.ram.clone(),
                        vcpus: vcpus.clone(),
                        balloon: self.balloon.clone(),
                        exit: self.exit.clone(),
                        events: Some(hub.clone()),
                        capture_devices: self.device_capture(),
                        support: self.state_support.clone(),
                        boot_files: self.boot_files(),
                    }),
                    vcpus: vcpus.clone(),
                    balloon: self.balloon.clone(),
                    policy: self.policy.clone(),
                    exit: self.exit.clone(),
                    memory_bytes: self.config.memory_bytes,
                    balloon_floor_bytes: self.floor_bytes(),
                    vcpu_count: self.config.vcpus,
                    started: self.started,
                    vcpu_stats: vcpus.stats.clone(),
                },
            );
            let sub: Subscriber = Arc::new(Mutex::new(handler));
            self.events.add_subscriber(sub);
        }
        for f in std::mem::take(&mut self.on_start) {
            f(&self);
        }
        // Migration workers need syscalls the event loop gives up: start
        // their spawner, then narrow this thread to the event loop's list.
        crate::seccomp::start_spawner()?;
        crate::seccomp::enter(crate::seccomp::ThreadKind::EventLoop)?;
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

pub(crate) fn lock_balloon(b: &Mutex<Balloon>) -> std::sync::MutexGuard<'_, Balloon> {
    b.lock().unwrap_or_else(|p| p.into_inner())
}

/// The user's command line, then the PVM additions, then the device entries.
fn compose_cmdline(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

impl Machine {
    pub(crate) fn into_vmm(
        self,
        config: VmConfig,
        vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
        balloon: Option<Arc<Mutex<Balloon>>>,
    ) -> Result<Vmm, Error> {
        let policy = match &balloon {
            None => None,
            Some(_) => {
                let (enabled, settings) = config.balloon_policy.clone().unwrap_or_default();
                let floor = api_types::types::balloon_floor_bytes(
                    config.memory_bytes,
                    config.balloon_floor_bytes,
                );
                Some(
                    PolicyShared::new(enabled, settings, config.memory_bytes, floor)
                        .map_err(io("creating the balloon policy eventfd"))?,
                )
            }
        };
        let state_support = StateSupport::probe(self.vm.kvm())
            .map_err(|e| Error::EventLoop(format!("probing KVM state support: {e}")))?;
        let mut vmm = Vmm {
            config,
            vcpus: None,
            state_support: Arc::new(state_support),
            vm: Arc::new(Mutex::new(self.vm)),
            ram: self.ram,
            exit: self.exit,
            serial: self.serial,
            events: self.events,
            signals: self.signals,
            backend: self.backend,
            started: self.started,
            vcpu_fds,
            pio: Arc::new(self.pio),
            mmio: Arc::new(self.mmio),
            virtio: self.virtio,
            balloon,
            policy,
            api: None,
            debug_exit: self.debug_exit,
            on_start: Vec::new(),
            console: Input::Off,
        };
        if let Some(b) = &vmm.balloon {
            let sub: Subscriber = Arc::new(Mutex::new(
                devices::virtio::balloon::BalloonEvents::new(b.clone()),
            ));
            vmm.events.add_subscriber(sub);
        }
        Ok(vmm)
    }
}

/// The exit eventfd and the signals (the terminating ones, and SIGCONT
/// for the console).
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
            while let Some(ev) = self.signals.read_event() {
                match ev {
                    SignalEvent::Continued => console::continued(),
                    SignalEvent::Terminate(sig) => {
                        log::info!("received signal {sig}, shutting down");
                        self.exit.stop(ExitReason::Signal(sig));
                    }
                }
            }
        }
    }
}

/// Bytes from stdin go to the serial console; from a terminal through the
/// escape decoder (`Ctrl-A x` stops the VM).
struct StdinInput {
    serial: Arc<Mutex<Serial>>,
    escape: Option<EscapeDecoder>,
    exit: Arc<VmExit>,
}

impl MutEventSubscriber for StdinInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(libc::STDIN_FILENO, EventSet::IN)) {
            // stdin may be a regular file or /dev/null, which epoll refuses: no input then.
            log::debug!("not reading stdin: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // At least the size of std's stdin buffer (8 KiB), which a read
        // this large bypasses: a smaller read let std read ahead into its
        // buffer and hand out only part, and the rest, no longer in the
        // pipe, woke epoll no more (a paste or a script of over 4 KiB
        // stopped short until the next key).
        let mut buf = [0u8; 16 << 10];
        let n = std::io::stdin().lock().read(&mut buf).unwrap_or(0);
        if n == 0 {
            // EOF (or hang-up with nothing left): stop watching stdin.
            let _ = ops.remove(events);
            return;
        }
        let mut guest = Vec::new();
        let input = match &mut self.escape {
            None => &buf[..n],
            Some(d) => {
                if d.feed(&buf[..n], &mut guest) == Escape::Quit {
                    log::info!("Ctrl-A x on the console: stopping the VM");
                    self.exit.stop(ExitReason::ConsoleQuit);
                    let _ = ops.remove(events);
                }
                &guest[..]
            }
        };
        if input.is_empty() {
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        if !serial.queue_input(input) {
            // Rate-limited: input piped faster than the guest reads it
            // would warn once per 16 KiB read; each line says the total.
            static DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let total = DROPPED.fetch_add(input.len() as u64, std::sync::atomic::Ordering::Relaxed)
                + input.len() as u64;
            devices::warn_limited!(
                "serial input backlog full (the guest reads its console slower than stdin comes): dropped {} bytes ({total} since start)",
                input.len()
            );
        }
    }
}
