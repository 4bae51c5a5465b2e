//! Seccomp filters, one per kind of thread (issue #17).
//!
//! Every thread of `blimp run` / `blimp restore` runs under a seccomp-BPF
//! allow-list compiled with rust-vmm's `seccompiler` (pure Rust, no
//! libseccomp). The lists live in [`filters`], one reviewed file with a
//! comment per syscall.
//!
//! Filters stack: a thread inherits the filters of the thread that created
//! it and can only narrow them. So the main thread installs the broad
//! [`ThreadKind::Main`] list first (before it reads anything a peer or a file
//! controls), and every thread it starts narrows that at its entry point:
//!
//! | thread | installs | where |
//! | --- | --- | --- |
//! | main | `Main` | `blimp run`/`restore`, right after parsing the CLI |
//! | `blimp-api` | `Api` | first thing on the API server thread |
//! | `vcpuN` | `Vcpu` | first thing in the vCPU thread, before `KVM_RUN` |
//! | `blimp-spawner` | `Spawner` | started by `Vmm::run` before the event loop narrows |
//! | main, in `Vmm::run` | `EventLoop` | after the vCPUs and the spawner started |
//! | `migration` | `Migration` | first thing in the migration worker |
//! | `blimp-discardN` | `Discard` | first thing; started with anon or memfd guest RAM |
//! | `blimp-punch` (a process) | `PunchHelper` | forked first thing by `run`/`restore` with memfd RAM, before `Main` |
//!
//! The migration worker needs network syscalls the event loop must not have;
//! since the event loop cannot hand out more than it holds, migration
//! threads are created by a small spawner thread started before the event
//! loop narrows ([`spawn`]).

mod filters;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::mpsc;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch, sock_filter};

pub use filters::{Allowed, allowed};

/// What a thread's filter does with a syscall outside its list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Kill the whole process (SECCOMP_RET_KILL_PROCESS, SIGSYS). The default.
    Kill,
    /// Allow it but have the kernel log it (SECCOMP_RET_LOG): for finding
    /// missing syscalls in `dmesg`/the audit log.
    Log,
    /// No filters.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "kill" => Ok(Mode::Kill),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(Error::UnknownMode(s.to_string())),
        }
    }
}

/// The kinds of thread, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread while it sets the VM up (build, restore, incoming
    /// migration accept, API socket bind); the union of everything below.
    Main,
    /// The main thread once it runs the event loop (`Vmm::run`).
    EventLoop,
    /// A vCPU thread (`KVM_RUN` and MMIO/PIO exits).
    Vcpu,
    /// The API server's tokio runtime thread.
    Api,
    /// The migration worker (and the helpers it starts).
    Migration,
    /// The thread that starts migration workers on behalf of the event loop.
    Spawner,
    /// A thread sharing long anon or memfd RAM discards (`discard_workers`).
    Discard,
    /// Not a thread: a punch helper process (`crate::punch`), forked at
    /// startup before [`ThreadKind::Main`]'s filter, confining itself.
    PunchHelper,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Main,
        ThreadKind::EventLoop,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::Migration,
        ThreadKind::Spawner,
        ThreadKind::Discard,
        ThreadKind::PunchHelper,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::Migration => "migration",
            ThreadKind::Spawner => "spawner",
            ThreadKind::Discard => "discard",
            ThreadKind::PunchHelper => "punch-helper",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown seccomp mode '{0}': use kill, log or off")]
    UnknownMode(String),
    #[error("building the seccomp filter for the {kind} thread")]
    Build {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("compiling the seccomp filter for the {kind} thread")]
    Compile {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the seccomp filter for the {kind} thread")]
    Apply {
        kind: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error("seccomp is already set up (mode {0:?})")]
    AlreadySet(Mode),
    #[error("starting thread {name}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// The compiled filters of this process, set once by [`init`].
struct Filters {
    mode: Mode,
    programs: HashMap<ThreadKind, BpfProgram>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Compile one thread kind's filter for `mode` (not `Off`).
pub fn compile(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, Error> {
    let mismatch = match mode {
        Mode::Kill | Mode::Off => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(
        allowed(kind).into_rules(),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| Error::Build {
        kind: kind.name(),
        source,
    })?;
    let prog: BpfProgram = filter.try_into().map_err(|source| Error::Compile {
        kind: kind.name(),
        source,
    })?;
    Ok(with_clone3_enosys(prog))
}

/// `clone3` fails with ENOSYS under every filter, in every mode: its flags
/// are in a struct BPF cannot read, so it cannot be limited to threads;
/// glibc then falls back to `clone`, whose flags the lists check (as
/// Firecracker does). Three instructions in front of `prog`: load the
/// syscall number, skip the return unless it is `clone3`, return ENOSYS.
/// `prog`'s own jumps are relative, so they are unchanged; it checks the
/// architecture itself. (`clone3` is 435 on x86_64 and i386 alike, and an
/// x32 number has bit 30 set, so no other syscall matches.)
fn with_clone3_enosys(prog: BpfProgram) -> BpfProgram {
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
    const BPF_JMP_JEQ_K: u16 = 0x15; // BPF_JMP (5) | BPF_JEQ (0x10) | BPF_K (0)
    const BPF_RET_K: u16 = 0x06;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const NR_OFFSET: u32 = 0; // seccomp_data.nr
    let mut out = Vec::with_capacity(prog.len() + 3);
    out.push(sock_filter {
        code: BPF_LD_W_ABS,
        jt: 0,
        jf: 0,
        k: NR_OFFSET,
    });
    out.push(sock_filter {
        code: BPF_JMP_JEQ_K,
        jt: 0,
        jf: 1,
        k: libc::SYS_clone3 as u32,
    });
    out.push(sock_filter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k: SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
    });
    out.extend(prog);
    out
}

/// Choose the mode for this process and compile every filter. Call once, on
/// the main thread, before [`enter`]. Without it (library users, unit tests)
/// [`enter`] does nothing.
///
/// With [`Mode::Kill`] it also replaces std's panic hook by
/// [`confined_panic_hook`].
pub fn init(mode: Mode) -> Result<(), Error> {
    let mut programs = HashMap::new();
    if mode == Mode::Kill {
        std::panic::set_hook(Box::new(confined_panic_hook));
    }
    if mode != Mode::Off {
        for kind in ThreadKind::ALL {
            programs.insert(kind, compile(kind, mode)?);
        }
    }
    FILTERS
        .set(Filters { mode, programs })
        .map_err(|f| Error::AlreadySet(f.mode))
}

/// The panic hook under `--seccomp kill`: the thread, the location and
/// the message, as std's default hook prints them, but never a backtrace.
/// std's hook calls `getcwd` when RUST_BACKTRACE is set, and symbolizing a
/// backtrace opens and maps the binary: no thread's list allows those, so a
/// panic became a SIGSYS kill (no unwinding, no cleanup, API socket left).
/// This hook only formats and writes to stderr (a failed write is ignored).
pub fn confined_panic_hook(info: &std::panic::PanicHookInfo<'_>) {
    let payload = info.payload();
    let msg = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("Box<dyn Any>");
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("<unnamed>");
    let at = info
        .location()
        .map(|l| format!(" at {l}"))
        .unwrap_or_default();
    let wanted = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
    let note = if wanted {
        "\nnote: no backtrace under --seccomp kill (printing one needs syscalls no \
         thread may make); run with --seccomp log for one"
    } else {
        ""
    };
    errln!("\nthread '{name}' panicked{at}:\n{msg}{note}");
}

/// The mode chosen by [`init`]; `Off` before it.
pub fn mode() -> Mode {
    FILTERS.get().map_or(Mode::Off, |f| f.mode)
}

/// Install `kind`'s filter on the calling thread (stacked on what it
/// inherited). Does nothing when seccomp is off or not initialised.
pub fn enter(kind: ThreadKind) -> Result<(), Error> {
    let Some(prog) = FILTERS.get().and_then(|f| f.programs.get(&kind)) else {
        return Ok(());
    };
    seccompiler::apply_filter(prog).map_err(|source| Error::Apply {
        kind: kind.name(),
        source,
    })?;
    log::debug!("seccomp: {} filter installed", kind.name());
    Ok(())
}

/// Compile `kind`'s filter for `mode` and install it on the calling thread,
/// without [`init`] (tests apply one thread kind's list in a child process).
pub fn install(kind: ThreadKind, mode: Mode) -> Result<(), Error> {
    if mode == Mode::Off {
        return Ok(());
    }
    let prog = compile(kind, mode)?;
    seccompiler::apply_filter(&prog).map_err(|source| Error::Apply {
        kind: kind.name(),
        source,
    })
}

/// [`enter`] at a thread's entry point where an error cannot be returned:
/// a thread that cannot be confined does not run (the process exits).
pub fn enter_or_exit(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        log::error!("seccomp: {e}: {:?}", std::error::Error::source(&e));
        errln!("blimp: error: {e}");
        std::process::exit(1);
    }
}

type Job = (
    String,
    ThreadKind,
    Box<dyn FnOnce() + Send>,
    mpsc::Sender<std::io::Result<std::thread::JoinHandle<()>>>,
);

static SPAWNER: OnceLock<std::sync::Mutex<mpsc::Sender<Job>>> = OnceLock::new();

/// Start the spawner thread (once; later calls do nothing). The event loop
/// calls it before narrowing its own filter.
pub fn start_spawner() -> Result<(), Error> {
    if mode() == Mode::Off || SPAWNER.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("blimp-spawner".into())
        .spawn(move || {
            enter_or_exit(ThreadKind::Spawner);
            for (name, kind, f, reply) in rx {
                let _ = reply.send(spawn_here(name, kind, f));
            }
        })
        .map_err(|source| Error::Spawn {
            name: "blimp-spawner".into(),
            source,
        })?;
    let _ = SPAWNER.set(std::sync::Mutex::new(tx));
    Ok(())
}

fn spawn_here(
    name: String,
    kind: ThreadKind,
    f: Box<dyn FnOnce() + Send>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(move || {
        enter_or_exit(kind);
        f()
    })
}

/// Start a thread named `name` that runs `f` under `kind`'s filter. With a
/// spawner running, the thread is created by it, so it can hold syscalls the
/// caller does not.
pub fn spawn<F>(name: &str, kind: ThreadKind, f: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let Some(spawner) = SPAWNER.get() else {
        return spawn_here(name.to_string(), kind, Box::new(f));
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    let sent = spawner.lock().unwrap_or_else(|p| p.into_inner()).send((
        name.to_string(),
        kind,
        Box::new(f),
        reply_tx,
    ));
    if sent.is_err() {
        return Err(std::io::Error::other("the seccomp spawner thread is gone"));
    }
    reply_rx
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("the seccomp spawner thread is gone")))
}

#[cfg(test)]
mod tests;
