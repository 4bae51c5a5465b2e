//! A pseudo-terminal for tests that need blimp (or a shell) on a real
//! terminal: the child becomes a session leader with the pty's slave as its
//! controlling terminal (so it is the foreground job, as in an interactive
//! shell); the test writes keystrokes to the master and reads the screen.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Pty {
    master: File,
    slave: OwnedFd,
    screen: Arc<Mutex<Vec<u8>>>,
    /// Tells the reader thread to let go of its copy of the master.
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Pty {
    pub fn new() -> Pty {
        let (mut m, mut s) = (-1, -1);
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 200,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two fds into m and s; the name pointer is
        // null and the termios default; ws lives for the call.
        let rc =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        for fd in [m, s] {
            // SAFETY: fcntl(2) on the fds openpty just made. Not inherited
            // by the processes spawned on the pty: a child holding the
            // master would keep the terminal from being hung up.
            let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            assert_eq!(rc, 0, "FD_CLOEXEC: {}", std::io::Error::last_os_error());
        }
        // SAFETY: openpty succeeded: m and s are fresh fds owned by nobody else.
        let (master, slave) = unsafe { (File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        let screen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut reader = master.try_clone().expect("dup pty master");
        let (sink, stopped) = (screen.clone(), stop.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: reader.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll(2) on one pollfd, a local.
                if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                    continue;
                }
                // Ends with EIO once no process holds the slave open.
                match reader.read(&mut buf) {
                    Ok(n) if n > 0 => sink.lock().unwrap().extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
        });
        Pty {
            master,
            slave,
            screen,
            stop,
            reader: Some(reader),
        }
    }

    /// Closes the master, as a terminal window that is closed or an ssh
    /// session that drops: the kernel hangs the terminal up (SIGHUP to its
    /// session's foreground job; reads and writes on the slave fail).
    pub fn hang_up(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            r.join().expect("the pty reader");
        }
        drop(self.master);
    }

    /// Spawns `cmd` with the slave as stdin, stdout and stderr, in a new
    /// session whose controlling terminal is the slave.
    pub fn spawn(&self, cmd: &mut Command) -> Child {
        let io = || Stdio::from(self.slave.try_clone().expect("dup pty slave"));
        cmd.stdin(io()).stdout(io()).stderr(io());
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().expect("spawning on the pty")
    }

    /// The terminal's current settings.
    pub fn termios(&self) -> libc::termios {
        // SAFETY: an all-zero termios is a valid value to be overwritten.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into t, which lives for the call.
        let rc = unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) };
        assert_eq!(rc, 0, "tcgetattr: {}", std::io::Error::last_os_error());
        t
    }

    /// Sets the terminal's settings (as a job-control shell puts its own
    /// back when its foreground job stops).
    pub fn set_termios(&self, t: &libc::termios) {
        // SAFETY: tcsetattr reads `t`, which lives for the call.
        let rc = unsafe { libc::tcsetattr(self.slave.as_raw_fd(), libc::TCSANOW, t) };
        assert_eq!(rc, 0, "tcsetattr: {}", std::io::Error::last_os_error());
    }

    /// Types `bytes` on the terminal.
    pub fn type_bytes(&self, bytes: &[u8]) {
        (&self.master).write_all(bytes).expect("writing to the pty");
    }

    /// Everything shown on the terminal so far.
    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    /// Waits until the screen, after byte `from`, shows `needle`; returns
    /// the screen length after it.
    pub fn wait_for(&self, from: usize, needle: &str, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if let Some(i) = screen.get(from..).and_then(|s| s.find(needle)) {
                return from + i + needle.len();
            }
            assert!(
                Instant::now() < deadline,
                "'{needle}' not on the terminal within {timeout:?} (host {}); screen:\n{screen}",
                super::load_average()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether two terminal settings are the same (flags, line discipline and
/// control characters).
pub fn same_termios(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_cflag == b.c_cflag
        && a.c_lflag == b.c_lflag
        && a.c_line == b.c_line
        && a.c_cc == b.c_cc
}

/// Waits for `child` to exit (up to `timeout`); kills it and fails if not.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("waiting for the child") {
            return st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "process {} did not exit within {timeout:?} (host {})",
                child.id(),
                super::load_average()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
