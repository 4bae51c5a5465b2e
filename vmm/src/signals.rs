//! The terminating signals as events: blocked in every thread and read
//! from a signalfd by the event loop, so the VM shuts down cleanly.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Every signal whose default action ends the process and that someone
/// sends on purpose (kill, a closed terminal, Ctrl-C, Ctrl-\, a timer):
/// each is a clean shutdown with exit status 128 + the signal. SIGQUIT too
/// (no core dump: the terminal and the API socket come first). Not the
/// ones the kernel raises for a fault of blimp itself (SIGSEGV, SIGBUS,
/// SIGSYS, ...), nor SIGPROF/SIGVTALRM (profilers), nor SIGKILL/SIGSTOP.
pub const SIGNALS: [libc::c_int; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
];

/// What the signalfd reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalEvent {
    /// One of [`SIGNALS`]: shut down.
    Terminate(i32),
    /// SIGCONT: blimp was stopped (SIGTSTP, SIGSTOP) and continues (`fg`).
    /// Blocking it does not keep it from continuing the process; read here,
    /// it tells the console to take its terminal back.
    Continued,
}

fn sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set we own; a zeroed
    // sigset_t is a valid value to start from.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        libc::sigaddset(&mut set, libc::SIGCONT);
        set
    }
}

/// A signalfd for the terminating signals. Create it on the main thread
/// before any other thread is spawned, so every thread inherits the mask.
/// The signals stay blocked after it is dropped (see below), so no exit
/// path of blimp skips its cleanup.
pub struct TerminationSignals {
    fd: OwnedFd,
}

impl TerminationSignals {
    pub fn new() -> std::io::Result<Self> {
        let set = sigset();
        // SAFETY: `set` is a valid, initialised signal set; the old mask is not requested.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        // SAFETY: `set` is valid; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just created by signalfd, is valid (checked above)
        // and owned by nobody else, so OwnedFd may close it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Read one pending terminating signal number, if any (a SIGCONT read
    /// meanwhile is passed over: see [`read_event`](Self::read_event)).
    pub fn read(&self) -> Option<i32> {
        loop {
            match self.read_event()? {
                SignalEvent::Terminate(sig) => return Some(sig),
                SignalEvent::Continued => {}
            }
        }
    }

    /// Read one pending signal, if any.
    pub fn read_event(&self) -> Option<SignalEvent> {
        let mut info: libc::signalfd_siginfo = unsafe_zeroed_siginfo();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: we read at most `size` bytes into `info`, which is that large.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n != size as isize {
            return None;
        }
        Some(match info.ssi_signo as i32 {
            libc::SIGCONT => SignalEvent::Continued,
            sig => SignalEvent::Terminate(sig),
        })
    }
}

fn unsafe_zeroed_siginfo() -> libc::signalfd_siginfo {
    // SAFETY: signalfd_siginfo is plain integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

// No Drop that unblocks the signals: a SIGTERM that arrives after the event
// loop read the first one (two quick SIGTERMs, as `timeout` sends) would
// then be delivered with its default action while the VM is torn down,
// killing blimp before the API server removed its socket. The signals stay
// blocked until the process exits; later ones are simply not read.

impl AsRawFd for TerminationSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
