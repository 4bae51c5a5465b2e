//! vCPUs: register setup for the 64-bit boot protocol, and one thread per
//! vCPU running KVM_RUN and dispatching exits to the buses.
//!
//! Pausing and stopping: the VMM thread sets the wanted state in
//! [`VcpuControl`] and kicks each thread with a signal until it acknowledges
//! (a kick that lands just before KVM_RUN is missed, hence the repetition).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_msr_entry};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, register_signal_handler};

use crate::bus::Bus;
use crate::exit::{ExitReason, VmExit};
use crate::vm::{Vm, VmError};

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {what} failed: {source}")]
    Ioctl {
        id: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM accepted only {set} of {total} boot MSRs")]
    Msrs { id: u8, set: usize, total: usize },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot spawn vCPU thread {id}: {source}")]
    Spawn {
        id: u8,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// Signal used to kick a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the (empty) kick handler once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(|e| VcpuError::Signal(vmm_sys_util::errno::Error::new(e)))
}

/// Create and configure vCPU `id` of `count` for entering the kernel at `entry`.
pub fn create_vcpu(vm: &Vm, id: u8, count: u8, entry: u64, pvm: bool) -> Result<VcpuFd, VcpuError> {
    let e = |what| move |source| VcpuError::Ioctl { id, what, source };
    let fd = vm
        .fd()
        .create_vcpu(u64::from(id))
        .map_err(e("KVM_CREATE_VCPU"))?;

    let mut cpuid: CpuId = vm
        .kvm()
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(e("KVM_GET_SUPPORTED_CPUID"))?;
    arch::cpuid::sanitise(
        cpuid.as_mut_slice(),
        &arch::cpuid::CpuidConfig {
            vcpu_id: id,
            vcpu_count: count,
            pvm,
        },
    );
    fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;

    let entries: Vec<kvm_msr_entry> = arch::msrs::boot_msrs()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
        id,
        set: 0,
        total: entries.len(),
    })?;
    let set = fd.set_msrs(&msrs).map_err(e("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(VcpuError::Msrs {
            id,
            set,
            total: entries.len(),
        });
    }

    fd.set_regs(&arch::regs::boot_regs(entry))
        .map_err(e("KVM_SET_REGS"))?;
    let mut sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    arch::regs::set_long_mode(&mut sregs);
    fd.set_sregs(&sregs).map_err(e("KVM_SET_SREGS"))?;
    fd.set_fpu(&arch::regs::boot_fpu())
        .map_err(e("KVM_SET_FPU"))?;
    let mut lapic = fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
    arch::lapic::set_lint(&mut lapic);
    fd.set_lapic(&lapic).map_err(e("KVM_SET_LAPIC"))?;
    Ok(fd)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

/// Work for a paused vCPU thread, which owns its `VcpuFd` (state capture).
type VcpuTask = Box<dyn FnOnce(&mut VcpuFd) + Send>;

struct CtlState {
    want: Want,
    paused: usize,
    /// One slot per vCPU for a task to run while paused.
    tasks: Vec<Option<VcpuTask>>,
}

/// Shared run/pause/stop switch for all vCPU threads.
pub struct VcpuControl {
    state: Mutex<CtlState>,
    cv: Condvar,
}

impl VcpuControl {
    fn new(vcpus: usize) -> Self {
        Self {
            state: Mutex::new(CtlState {
                want: Want::Run,
                paused: 0,
                tasks: (0..vcpus).map(|_| None).collect(),
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a vCPU thread between runs: blocks while paused; returns
    /// false when the thread must end. Before it parks for a pause, `flush`
    /// completes the instruction whose exit was served last (see
    /// [`complete_pending_exit`]).
    fn checkpoint(&self, id: usize, fd: &mut VcpuFd, flush: &mut dyn FnMut(&mut VcpuFd)) -> bool {
        let mut s = self.lock();
        let mut flushed = false;
        loop {
            match s.want {
                Want::Run => return true,
                Want::Stop => return false,
                Want::Pause if !flushed => {
                    drop(s);
                    flush(fd);
                    flushed = true;
                    s = self.lock();
                }
                Want::Pause => {
                    s.paused += 1;
                    self.cv.notify_all();
                    while s.want == Want::Pause {
                        if let Some(task) = s.tasks.get_mut(id).and_then(Option::take) {
                            drop(s);
                            task(fd);
                            s = self.lock();
                            self.cv.notify_all();
                            continue;
                        }
                        s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
                    }
                    s.paused -= 1;
                }
            }
        }
    }

    fn wants(&self) -> Want {
        self.lock().want
    }
}

/// Counters a vCPU thread keeps (read by benchmarks and metrics).
#[derive(Default)]
pub struct VcpuStats {
    pub io_exits: AtomicU64,
    pub mmio_exits: AtomicU64,
}

/// The running vCPU threads.
pub struct Vcpus {
    ctl: Arc<VcpuControl>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    pub stats: Arc<VcpuStats>,
}

/// What every vCPU thread needs.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<VmExit>,
    pub pvm: bool,
}

impl Vcpus {
    /// Start one thread per vCPU fd.
    pub fn start(fds: Vec<VcpuFd>, ctx: VcpuContext) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let ctl = Arc::new(VcpuControl::new(fds.len()));
        let stats = Arc::new(VcpuStats::default());
        let mut threads = Vec::new();
        for (id, fd) in fds.into_iter().enumerate() {
            let (ctl, ctx, stats) = (ctl.clone(), ctx.clone(), stats.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Vcpu);
                    vcpu_loop(id as u8, fd, ctx, ctl, stats)
                })
                .map_err(|source| VcpuError::Spawn {
                    id: id as u8,
                    source,
                })?;
            threads.push(t);
        }
        Ok(Self {
            ctl,
            threads: Mutex::new(threads),
            stats,
        })
    }

    fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self) -> usize {
        self.threads().iter().filter(|t| !t.is_finished()).count()
    }

    fn kick_all(&self) {
        for t in self.threads().iter() {
            if !t.is_finished() {
                // A failure means the thread is gone, which is what we want anyway.
                let _ = t.kill(kick_signal());
            }
        }
    }

    fn set_want(&self, want: Want) {
        self.ctl.lock().want = want;
        self.ctl.cv.notify_all();
    }

    /// Pause every vCPU; returns once all are out of KVM_RUN and parked.
    pub fn pause(&self) {
        self.set_want(Want::Pause);
        loop {
            self.kick_all();
            let live = self.live();
            let s = self.ctl.lock();
            if s.paused >= live || s.want != Want::Pause {
                return;
            }
            let _ = self
                .ctl
                .cv
                .wait_timeout(s, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn resume(&self) {
        if self.ctl.wants() == Want::Pause {
            self.set_want(Want::Run);
        }
    }

    pub fn is_paused(&self) -> bool {
        self.ctl.wants() == Want::Pause
    }

    /// Number of vCPUs.
    pub fn count(&self) -> usize {
        self.ctl.lock().tasks.len()
    }

    /// Run `f` on vCPU `id`'s own thread while the VM is paused (the thread
    /// owns the vCPU fd). Returns None if the VM is not paused or the vCPU
    /// did not answer within 10 s.
    pub fn run_paused<R: Send + 'static>(
        &self,
        id: usize,
        f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut s = self.ctl.lock();
            if s.want != Want::Pause || id >= s.tasks.len() {
                return None;
            }
            s.tasks[id] = Some(Box::new(move |fd: &mut VcpuFd| {
                let _ = tx.send(f(fd));
            }));
        }
        self.ctl.cv.notify_all();
        rx.recv_timeout(Duration::from_secs(10)).ok()
    }

    /// Stop every vCPU thread and join it.
    pub fn stop(&self) {
        self.set_want(Want::Stop);
        while self.live() > 0 {
            self.kick_all();
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in self.threads().drain(..) {
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    }
}

/// How many exits completing one instruction before a pause may take: an
/// MMIO access that crosses a page takes two, a 16-byte one up to four;
/// a string I/O instruction that KVM emulates returns to the guest, and so
/// to the pause, after at most 1024 iterations. No guest code runs while
/// `immediate_exit` is set, so the bound is only a guard against a KVM
/// that keeps asking; past it the pause goes ahead, and a state capture
/// reports the exit still pending.
const MAX_FLUSH_EXITS: usize = 4096;

/// What serving one exit left to do.
enum Served<'a> {
    /// Nothing: it was an MMIO access, served on the MMIO bus.
    Done,
    /// Port I/O, for [`serve_pio`] once the exit no longer borrows the vCPU.
    Pio(PendingPio),
    /// Not an access: for the caller.
    Other(VcpuExit<'a>),
}

/// A port-I/O exit: its port, direction and the data buffer KVM gave with
/// it, which lies in the vCPU's `kvm_run` mapping.
struct PendingPio {
    port: u16,
    write: bool,
    data: *mut u8,
    len: usize,
}

/// Serve an MMIO exit on the bus; port I/O is handed to [`serve_pio`], any
/// other exit back to the caller.
fn serve_io<'a>(exit: VcpuExit<'a>, ctx: &VcpuContext, stats: &VcpuStats) -> Served<'a> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            stats.io_exits.fetch_add(1, Ordering::Relaxed);
            return Served::Pio(PendingPio {
                port,
                write: false,
                data: data.as_mut_ptr(),
                len: data.len(),
            });
        }
        VcpuExit::IoOut(port, data) => {
            stats.io_exits.fetch_add(1, Ordering::Relaxed);
            return Served::Pio(PendingPio {
                port,
                write: true,
                data: data.as_ptr().cast_mut(),
                len: data.len(),
            });
        }
        VcpuExit::MmioRead(addr, data) => {
            stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
            ctx.mmio.read(addr, data);
        }
        VcpuExit::MmioWrite(addr, data) => {
            stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
            ctx.mmio.write(addr, data);
        }
        other => return Served::Other(other),
    }
    Served::Done
}

/// Serve a port-I/O exit on the bus, one access per iteration. KVM hands
/// a string instruction (`rep insb`, `rep outsw`, ...) over as `count`
/// accesses of `size` bytes in one buffer: on VMX/SVM up to a page of them
/// in one exit (PVM here exits once per iteration). Each is its own access
/// to the same port, as the instruction makes them, so a 4 KiB `rep outsb`
/// to the UART sends 4096 characters, not the first one.
fn serve_pio(fd: &mut VcpuFd, pio: PendingPio, pio_bus: &Bus) {
    // SAFETY: the last KVM_RUN returned KVM_EXIT_IO (that is where `pio`
    // came from) and none ran since, so `io` is the union member KVM filled.
    let size = unsafe { fd.get_kvm_run().__bindgen_anon_1.io.size };
    // SAFETY: `data`/`len` is the buffer kvm-ioctls sliced for this exit
    // out of the vCPU's `kvm_run` mapping (at `io.data_offset`, a page past
    // the `kvm_run` struct that `get_kvm_run` borrowed above, so the two do
    // not overlap). The mapping lives as long as `fd`, which this thread
    // holds, and no KVM_RUN has run since, so it still holds this exit.
    let data = unsafe { std::slice::from_raw_parts_mut(pio.data, pio.len) };
    for access in pio_accesses(data, size) {
        if pio.write {
            pio_bus.write(u64::from(pio.port), access);
        } else {
            pio_bus.read(u64::from(pio.port), access);
        }
    }
}

/// The accesses of a port-I/O exit's buffer: `size`-byte pieces (1, 2 or
/// 4 bytes; anything else KVM never sends, and is served as one access).
fn pio_accesses(data: &mut [u8], size: u8) -> std::slice::ChunksMut<'_, u8> {
    let whole = data.len().max(1);
    let size = match usize::from(size) {
        s @ (1 | 2 | 4) if data.len().is_multiple_of(s) => s,
        _ => whole,
    };
    data.chunks_mut(size)
}

/// Before the thread parks for a pause: finish the instruction whose exit
/// was served last. KVM completes it on the next KVM_RUN, which with
/// `immediate_exit` set then returns EINTR without running guest code,
/// unless completing it takes another exit: the second half of an MMIO
/// access that crosses a page, the next chunk of a string I/O. Those are
/// served here like any other, so a paused vCPU never holds half an
/// instruction and a state captured while paused is whole.
fn complete_pending_exit(id: u8, fd: &mut VcpuFd, ctx: &VcpuContext, stats: &VcpuStats) {
    fd.set_kvm_immediate_exit(1);
    for _ in 0..MAX_FLUSH_EXITS {
        match fd.run() {
            Ok(exit) => {
                let other = match serve_io(exit, ctx, stats) {
                    Served::Done => continue,
                    Served::Pio(pio) => {
                        serve_pio(fd, pio, &ctx.pio);
                        continue;
                    }
                    Served::Other(other) => other,
                };
                log::warn!("vCPU {id}: exit {other:?} while completing an instruction for a pause");
                break;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => break,
            Err(e) => {
                log::warn!(
                    "vCPU {id}: KVM_RUN failed while completing an instruction for a pause: {e}"
                );
                break;
            }
        }
    }
    fd.set_kvm_immediate_exit(0);
}

fn vcpu_loop(
    id: u8,
    mut fd: VcpuFd,
    ctx: VcpuContext,
    ctl: Arc<VcpuControl>,
    stats: Arc<VcpuStats>,
) {
    let fail = |msg: String| {
        ctx.exit
            .stop(ExitReason::Error(format!("vCPU {id}: {msg}")))
    };
    let mut flush = |fd: &mut VcpuFd| complete_pending_exit(id, fd, &ctx, &stats);
    while ctl.checkpoint(usize::from(id), &mut fd, &mut flush) {
        let exit = match fd.run() {
            Ok(exit) => match serve_io(exit, &ctx, &stats) {
                Served::Done => None,
                Served::Pio(pio) => {
                    serve_pio(&mut fd, pio, &ctx.pio);
                    None
                }
                Served::Other(other) => Some(other),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                continue;
            }
            Err(e) => {
                fail(format!("KVM_RUN failed: {e}"));
                break;
            }
        };
        match exit {
            None | Some(VcpuExit::Intr) => {}
            Some(VcpuExit::Hlt) => {
                // Only reached without an in-kernel irqchip: the guest stopped for good.
                log::info!("vCPU {id} halted");
                ctx.exit.stop(ExitReason::GuestReset);
                break;
            }
            Some(VcpuExit::Shutdown) => {
                log::info!("vCPU {id}: triple fault or shutdown, resetting");
                ctx.exit.stop(ExitReason::GuestReset);
                break;
            }
            Some(VcpuExit::SystemEvent(kind, _)) => {
                log::info!("vCPU {id}: system event {kind}");
                ctx.exit.stop(ExitReason::GuestReset);
                break;
            }
            Some(VcpuExit::InternalError) => {
                if let Err(msg) = crate::emulation::handle_internal_error(&mut fd, ctx.pvm) {
                    fail(msg);
                    break;
                }
            }
            Some(VcpuExit::FailEntry(reason, cpu)) => {
                fail(format!(
                    "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on CPU {cpu}"
                ));
                break;
            }
            Some(other) => {
                log::debug!("vCPU {id}: ignoring exit {other:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pio_accesses;

    fn shapes(len: usize, size: u8) -> Vec<usize> {
        let mut data = vec![0u8; len];
        pio_accesses(&mut data, size).map(|a| a.len()).collect()
    }

    #[test]
    fn a_string_io_exit_is_served_one_access_per_iteration() {
        // `rep outsb` of 4096 bytes in one exit: 4096 one-byte accesses.
        assert_eq!(shapes(4096, 1), vec![1; 4096]);
        // `rep insw` of 3 words, `rep outsd` of 2 dwords.
        assert_eq!(shapes(6, 2), vec![2; 3]);
        assert_eq!(shapes(8, 4), vec![4; 2]);
        // A plain `in al`/`out dx, eax`: one access of its size.
        assert_eq!(shapes(1, 1), vec![1]);
        assert_eq!(shapes(4, 4), vec![4]);
    }

    #[test]
    fn a_port_io_exit_of_an_odd_shape_is_served_whole() {
        // Sizes KVM never sends, or a buffer that is not whole accesses:
        // one access of the whole buffer, never a panic or a lost byte.
        assert_eq!(shapes(8, 8), vec![8]);
        assert_eq!(shapes(8, 0), vec![8]);
        assert_eq!(shapes(5, 2), vec![5]);
        assert_eq!(shapes(3, 3), vec![3]);
        assert!(shapes(0, 1).is_empty());
        assert!(shapes(0, 0).is_empty());
    }
}
