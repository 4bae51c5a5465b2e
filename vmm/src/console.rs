//! The serial console on blimp's own terminal: whether stdin may be read
//! at all (job control), the terminal's mode and its restoration on every
//! exit path, and the escape key (`Ctrl-A x`, as QEMU's `-nographic`).

use std::io::IsTerminal;
use std::sync::{Mutex, Once};

/// How the serial console takes its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// No input: `--no-stdin`, or stdin is a terminal this process does not
    /// own (a background job), which it must not read or reconfigure.
    Off,
    /// stdin is not a terminal (a pipe, a file): read as is, no escape key.
    Stream,
    /// stdin is the terminal and blimp is in its foreground process group:
    /// raw mode, the escape key, the terminal restored at exit.
    Terminal,
}

/// Decides how to take console input: `requested` is false with
/// `--no-stdin`. A terminal is only used when this process is in its
/// foreground process group (`tcgetpgrp(0) == getpgrp()`): a job started
/// with `&` is not, and reading or reconfiguring the terminal would stop it
/// (SIGTTIN/SIGTTOU) and with it the VM and its API.
pub fn input_mode(requested: bool) -> Input {
    if !requested {
        return Input::Off;
    }
    if !std::io::stdin().is_terminal() {
        return Input::Stream;
    }
    // SAFETY: plain syscalls on fd 0 and this process; no memory involved.
    let (fg, own) = unsafe { (libc::tcgetpgrp(libc::STDIN_FILENO), libc::getpgrp()) };
    if fg == own {
        return Input::Terminal;
    }
    if fg < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTTY) {
            // A terminal that is not this session's controlling terminal:
            // no job control applies to it, so it is blimp's to use.
            return Input::Terminal;
        }
        log::warn!(
            "console: cannot tell whether blimp is the terminal's foreground job ({e}): \
             the console is output-only"
        );
        return Input::Off;
    }
    log::info!(
        "console: stdin is a terminal whose foreground process group ({fg}) is not blimp's ({own}), \
         e.g. blimp was started with `&`: the console is output-only (as with --no-stdin), \
         the terminal is left alone"
    );
    Input::Off
}

/// The escape-key hint, printed once when the console is a terminal.
pub const HINT: &str = "blimp: console on this terminal: Ctrl-A x quits (the VM stops, exit status 0), Ctrl-A Ctrl-A sends Ctrl-A";

/// Ctrl-A, the escape key.
const CTRL_A: u8 = 0x01;

/// What the console's escape decoder found in the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Escape {
    /// Only bytes for the guest.
    None,
    /// `Ctrl-A x`: quit (bytes before it still go to the guest).
    Quit,
}

/// Splits terminal input into bytes for the guest and escape commands:
/// `Ctrl-A x` quits, `Ctrl-A Ctrl-A` is one Ctrl-A for the guest, `Ctrl-A`
/// followed by anything else passes both bytes on. A Ctrl-A at the end of
/// one read waits for the next byte.
#[derive(Debug, Default)]
pub struct EscapeDecoder {
    pending: bool,
}

impl EscapeDecoder {
    /// Appends the guest's bytes of `input` to `out`; stops at `Ctrl-A x`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Escape {
        for &b in input {
            if self.pending {
                self.pending = false;
                match b {
                    b'x' | b'X' => return Escape::Quit,
                    CTRL_A => out.push(CTRL_A),
                    _ => out.extend_from_slice(&[CTRL_A, b]),
                }
            } else if b == CTRL_A {
                self.pending = true;
            } else {
                out.push(b);
            }
        }
        Escape::None
    }
}

/// The terminal's settings before blimp changed them.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);
static HOOK: Once = Once::new();

/// Puts the controlling terminal (stdin) in raw mode and restores its
/// original settings exactly (the saved `termios`) when dropped: on a normal
/// exit, an error, a termination signal (the event loop turns those into an
/// orderly exit) and a guest debug-exit. A panic hook restores them too, on
/// whichever thread panics, before the default hook prints the message.
pub struct RawTerminal(());

impl RawTerminal {
    /// Only for [`Input::Terminal`].
    pub fn enter() -> Option<Self> {
        // SAFETY: an all-zero termios is a valid value to be overwritten.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into `t`, which lives for the call.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            log::warn!(
                "console: cannot read the terminal's settings: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        let raw = raw_of(t);
        // SAFETY: tcsetattr reads `raw`, which lives for the call.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            log::warn!(
                "console: cannot put the terminal in raw mode: {}",
                std::io::Error::last_os_error()
            );
            SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
            return None;
        }
        Some(RawTerminal(()))
    }
}

/// The flags raw mode clears: keystrokes go to the guest as typed (no line
/// editing), no local echo (the guest echoes), Ctrl-C/Ctrl-Z/Ctrl-\ are
/// bytes for the guest, not signals.
const COOKED: libc::tcflag_t = libc::ICANON | libc::ECHO | libc::ISIG;

/// `t` in raw mode (the rest of the settings kept).
fn raw_of(mut t: libc::termios) -> libc::termios {
    t.c_lflag &= !COOKED;
    t
}

/// Whether an error says the terminal is gone (hung up) or not one.
fn terminal_gone(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO | libc::ENOTTY))
}

/// blimp continued (SIGCONT) after a stop (SIGTSTP or SIGSTOP from another
/// terminal). A job-control shell puts its own terminal settings back when
/// its foreground job stops, so the console was no longer raw after `fg`:
/// typed lines were echoed twice, and a Ctrl-C meant for the guest stopped
/// the VM. Take the terminal's settings now as the ones to restore at exit
/// and put it in raw mode again (as vim, less and QEMU do). Nothing when
/// blimp does not own a raw terminal, when it is not the foreground job
/// (continued with `bg`: changing the terminal would stop it again with
/// SIGTTOU; the next `fg` continues it again), when the terminal is still
/// raw (a SIGCONT without a stop) or when it was hung up.
pub fn continued() {
    let mut saved = SAVED.lock().unwrap_or_else(|p| p.into_inner());
    if saved.is_none() {
        return;
    }
    // SAFETY: plain syscalls on fd 0 and this process; no memory involved.
    let (fg, own) = unsafe { (libc::tcgetpgrp(libc::STDIN_FILENO), libc::getpgrp()) };
    if fg != own
        && !(fg < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOTTY))
    {
        log::debug!(
            "console: continued, but not as the terminal's foreground job: not raw again yet"
        );
        return;
    }
    // SAFETY: an all-zero termios is a valid value to be overwritten.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes into `t`, which lives for the call.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
        let e = std::io::Error::last_os_error();
        if !terminal_gone(&e) {
            log::warn!("console: continued: cannot read the terminal's settings: {e}");
        }
        return;
    }
    if t.c_lflag & COOKED == 0 {
        return;
    }
    let raw = raw_of(t);
    // SAFETY: tcsetattr reads `raw`, which lives for the call.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
        let e = std::io::Error::last_os_error();
        if !terminal_gone(&e) {
            log::warn!("console: continued: cannot put the terminal in raw mode again: {e}");
        }
        return;
    }
    *saved = Some(t);
    log::info!("console: continued: the terminal is raw again");
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts back the saved terminal settings, once; nothing if none are saved.
fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(t) = saved {
        // SAFETY: tcsetattr reads `t`, which lives for the call.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) } != 0 {
            let e = std::io::Error::last_os_error();
            // EIO/ENOTTY: the terminal was hung up (its window closed, the
            // ssh session dropped): there is nothing left to restore, and
            // nobody to tell.
            if !terminal_gone(&e) {
                errln!("blimp: cannot restore the terminal: {e} (run `stty sane`)");
            }
        }
    }
}

/// How long a console write waits for stdout to take bytes before the
/// console counts as unread (see [`StdoutWriter`]).
const STALL: std::time::Duration = std::time::Duration::from_secs(1);

/// The serial console's output: the VMM's stdout, unbuffered (interactive
/// echo shows at once). The write happens on a vCPU thread holding the
/// UART's lock, which the event loop also takes (for console input), so it
/// must not block for ever: when stdout takes nothing for [`STALL`] (a pipe
/// nobody reads, a terminal stopped with Ctrl-S), the console counts as
/// unread, a warning says so once, and guest output is dropped, as a UART
/// with nobody at the other end loses it, until stdout takes bytes again.
/// A blocked write is also given up when the VMM kicks the vCPU (EINTR).
#[derive(Default)]
pub struct StdoutWriter {
    /// stdout took nothing for STALL and has not since.
    unread: bool,
    /// The warning was given (once per process).
    warned: bool,
    /// A write error was reported (once per process).
    failed: bool,
}

impl StdoutWriter {
    /// Whether fd 1 takes bytes within `wait` (or at once).
    fn writable(wait: std::time::Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: 1,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: poll(2) on one pollfd, a local.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        n > 0
    }

    /// A write to stdout failed (a full disk: ENOSPC; a reader gone: EPIPE;
    /// a hung-up terminal: EIO): the guest's output is lost, as a UART's
    /// with nobody at the other end. Said once, through the `console` log
    /// target (shown at any log level); not for a write given up because
    /// the VMM kicked the vCPU (EINTR) or a stdout that would block.
    fn failed_write(&mut self, e: std::io::Error) -> std::io::Error {
        let transient = matches!(
            e.kind(),
            std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
        );
        if !transient && !std::mem::replace(&mut self.failed, true) {
            log::warn!(
                target: "console",
                "the console's output (stdout): {e}: guest output is dropped"
            );
        }
        e
    }
}

/// Whether stdout is a pipe or socket whose reader has gone (poll says
/// POLLERR), so that a command waiting for something to print can end
/// instead of finding out at its next write. False for anything else (a
/// file, a terminal, a live pipe).
pub fn stdout_reader_gone() -> bool {
    let mut pfd = libc::pollfd {
        fd: 1,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd, a local; no wait.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

impl std::io::Write for StdoutWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let wait = if self.unread {
            std::time::Duration::ZERO
        } else {
            STALL
        };
        if !Self::writable(wait) {
            if !std::mem::replace(&mut self.warned, true) {
                log::warn!(
                    target: "console",
                    "the console's output (stdout) has taken nothing for {} s: guest output is dropped until it is read again",
                    STALL.as_secs()
                );
            }
            self.unread = true;
            // Dropped, as said: not an error of the guest's UART.
            return Ok(buf.len());
        }
        self.unread = false;
        let mut done = 0;
        while done < buf.len() {
            let rest = &buf[done..];
            // SAFETY: write(2) to fd 1 from `rest`, a live slice of
            // `rest.len()` bytes.
            let n = unsafe { libc::write(1, rest.as_ptr().cast(), rest.len()) };
            match usize::try_from(n) {
                Ok(n) => done += n,
                Err(_) if done > 0 => break,
                Err(_) => return Err(self.failed_write(std::io::Error::last_os_error())),
            }
        }
        Ok(done)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(d: &mut EscapeDecoder, input: &[u8]) -> (Vec<u8>, Escape) {
        let mut out = Vec::new();
        let e = d.feed(input, &mut out);
        (out, e)
    }

    #[test]
    fn escape_sequences() {
        let mut d = EscapeDecoder::default();
        assert_eq!(feed(&mut d, b"ls\n"), (b"ls\n".to_vec(), Escape::None));
        assert_eq!(
            feed(&mut d, b"a\x01\x01b"),
            (b"a\x01b".to_vec(), Escape::None)
        );
        assert_eq!(feed(&mut d, b"\x01c"), (b"\x01c".to_vec(), Escape::None));
        assert_eq!(feed(&mut d, b"ab\x01xcd"), (b"ab".to_vec(), Escape::Quit));
    }

    #[test]
    fn an_escape_split_across_reads() {
        let mut d = EscapeDecoder::default();
        assert_eq!(feed(&mut d, b"q\x01"), (b"q".to_vec(), Escape::None));
        assert_eq!(feed(&mut d, b"x"), (Vec::new(), Escape::Quit));
        let mut d = EscapeDecoder::default();
        assert_eq!(feed(&mut d, b"\x01"), (Vec::new(), Escape::None));
        assert_eq!(feed(&mut d, b"\x01"), (b"\x01".to_vec(), Escape::None));
    }
}
