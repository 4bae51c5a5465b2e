//! The source's connection to a migration destination: a file, or a unix or
//! TCP socket to another blimp. Every write can be cancelled and gives up on
//! a destination that stopped reading, so a migration never blocks forever.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use api_types::types::MigrationDestination;

use super::file_dest::AtomicFile;

/// How long one blocking socket call may wait before the cancel flag and
/// the stall deadline are looked at again.
pub const POLL: Duration = Duration::from_millis(50);

/// How long to keep retrying a destination that refuses the connection (a
/// destination blimp that is still starting up, between bind and listen).
pub const CONNECT_RETRY: Duration = Duration::from_secs(3);

/// Marks the I/O error a cancelled write returns.
#[derive(Debug)]
pub struct CancelledIo;

impl std::fmt::Display for CancelledIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for CancelledIo {}

/// Whether `e` only says a socket call's [`POLL`] timeout ran out (or a
/// signal interrupted it): nothing failed, call again.
pub fn is_poll_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Whether `e` is the error of a cancelled write.
pub fn is_cancelled(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<CancelledIo>())
}

/// A connected socket to a destination blimp.
pub enum Peer {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Peer {
    pub fn try_clone(&self) -> io::Result<Peer> {
        Ok(match self {
            Peer::Unix(s) => Peer::Unix(s.try_clone()?),
            Peer::Tcp(s) => Peer::Tcp(s.try_clone()?),
        })
    }

    /// Bound every blocking read and write by `t`.
    pub fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Peer::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Peer::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Peer::Unix(s) => s.set_nonblocking(on),
            Peer::Tcp(s) => s.set_nonblocking(on),
        }
    }

    /// Shut both directions down: the peer reads end of stream, and any
    /// call blocked on this socket in another thread returns.
    pub fn shutdown(&self) {
        let _ = match self {
            Peer::Unix(s) => s.shutdown(Shutdown::Both),
            Peer::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

/// Either kind of socket, as a byte stream.
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

impl Peer {
    fn stream(&mut self) -> &mut dyn Stream {
        match self {
            Peer::Unix(s) => s,
            Peer::Tcp(s) => s,
        }
    }
}

impl Read for Peer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream().read(buf)
    }
}

impl Write for Peer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How long one TCP connection attempt may take (a cancel waits at most this).
const CONNECT_ATTEMPT: Duration = Duration::from_millis(900);

/// Connect with `connect`, retrying refused, not-yet-existing or silent
/// endpoints for [`CONNECT_RETRY`] unless `cancel` is set.
pub fn connect_retrying<T>(
    cancel: &AtomicBool,
    mut connect: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let deadline = Instant::now() + CONNECT_RETRY;
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err(io::Error::other(CancelledIo));
        }
        match connect() {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::NotFound
                        | io::ErrorKind::TimedOut
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Connect to a socket destination (`None` for a file destination).
pub fn connect(dest: &MigrationDestination, cancel: &AtomicBool) -> io::Result<Option<Peer>> {
    let peer = match dest {
        MigrationDestination::File(_) => return Ok(None),
        MigrationDestination::Unix(p) => {
            Peer::Unix(connect_retrying(cancel, || UnixStream::connect(p))?)
        }
        MigrationDestination::Tcp(a) => {
            let s = connect_retrying(cancel, || TcpStream::connect_timeout(a, CONNECT_ATTEMPT))?;
            s.set_nodelay(true)?;
            Peer::Tcp(s)
        }
    };
    peer.set_timeouts(POLL)?;
    Ok(Some(peer))
}

/// What a [`Guarded`] writer writes to. A file goes to a temporary file
/// next to the target and replaces it only on [`AtomicFile::commit`];
/// dropped uncommitted (a failure, a cancel), only the temporary file goes.
pub enum Sink {
    File(AtomicFile),
    Peer(Peer),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::File(f) => f.write(buf),
            Sink::Peer(p) => p.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::File(f) => f.flush(),
            Sink::Peer(p) => p.flush(),
        }
    }
}

/// A writer that stops at once when the migration is cancelled and fails
/// when the destination accepts nothing for `stall` (socket writes wait at
/// most [`POLL`] each, so both are noticed quickly), and counts the bytes
/// written for progress reports. Once a write failed, every later write
/// and flush fails at once the same way: the buffered writers above it
/// flush when they are dropped, which waited out a second `stall` (twice
/// `write_timeout_ms`, with the guest paused in the final round).
pub struct Guarded<W> {
    inner: W,
    cancel: Arc<AtomicBool>,
    stall: Duration,
    written: Arc<AtomicU64>,
    failed: Option<(io::ErrorKind, String)>,
}

impl<W: Write> Guarded<W> {
    pub fn new(
        inner: W,
        cancel: Arc<AtomicBool>,
        stall: Duration,
        written: Arc<AtomicU64>,
    ) -> Self {
        Self {
            inner,
            cancel,
            stall,
            written,
            failed: None,
        }
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    /// The error a failed write ended with, again.
    fn failed_before(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|(kind, msg)| io::Error::new(*kind, msg.clone()))
    }
}

impl<W: Write> Write for Guarded<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(e) = self.failed_before() {
            return Err(e);
        }
        let r = self.write_once(buf);
        if let Err(e) = &r
            && !is_cancelled(e)
            && e.kind() != io::ErrorKind::Interrupted
        {
            self.failed = Some((e.kind(), e.to_string()));
        }
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(io::Error::other(CancelledIo));
        }
        if let Some(e) = self.failed_before() {
            return Err(e);
        }
        self.inner.flush()
    }
}

impl<W: Write> Guarded<W> {
    fn write_once(&mut self, buf: &[u8]) -> io::Result<usize> {
        let start = Instant::now();
        loop {
            if self.cancel.load(Ordering::SeqCst) {
                return Err(io::Error::other(CancelledIo));
            }
            match self.inner.write(buf) {
                Ok(n) => {
                    self.written.fetch_add(n as u64, Ordering::Relaxed);
                    return Ok(n);
                }
                Err(e) if is_poll_timeout(&e) => {
                    if start.elapsed() >= self.stall {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "the destination accepted no data for {} ms (write_timeout_ms)",
                                self.stall.as_millis()
                            ),
                        ));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_that_starts_listening_late_is_reached() {
        let path = std::env::temp_dir().join(format!("blimp-late-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let p2 = path.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let l = std::os::unix::net::UnixListener::bind(&p2).unwrap();
            l.accept().map(|_| ()).unwrap();
        });
        let never = AtomicBool::new(false);
        let dest = MigrationDestination::Unix(path.clone());
        assert!(
            connect(&dest, &never).unwrap().is_some(),
            "connect retried until the listener was up"
        );
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
        // Nobody ever listens: a clear error after the retry window.
        let nowhere = MigrationDestination::Unix("/nonexistent/blimp.sock".into());
        let refused = |cancel| connect(&nowhere, cancel).err().expect("no listener");
        let t = Instant::now();
        let e = refused(&never);
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(t.elapsed() >= CONNECT_RETRY);
        // A cancel ends the retries at once.
        let cancel = AtomicBool::new(true);
        let t = Instant::now();
        let e = refused(&cancel);
        assert!(is_cancelled(&e), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    fn stalled_pair() -> (Guarded<Peer>, UnixStream, Arc<AtomicBool>) {
        let (a, b) = UnixStream::pair().unwrap();
        let peer = Peer::Unix(a);
        peer.set_timeouts(POLL).unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let w = Guarded::new(
            peer,
            cancel.clone(),
            Duration::from_millis(300),
            Arc::new(AtomicU64::new(0)),
        );
        (w, b, cancel)
    }

    #[test]
    fn a_destination_that_stops_reading_fails_the_write_after_the_stall_timeout() {
        let (mut w, _reader, _) = stalled_pair();
        let t = Instant::now();
        let chunk = vec![0u8; 1 << 20];
        let e = loop {
            if let Err(e) = w.write_all(&chunk) {
                break e;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "never blocked");
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("accepted no data for 300 ms"), "{e}");
        assert!(w.written.load(Ordering::Relaxed) > 0);
    }

    /// After the stall error, the writers above give up at once: a
    /// `BufWriter` dropped with bytes in it flushed them through another
    /// whole stall (a failed migration took twice `write_timeout_ms`).
    #[test]
    fn after_a_stall_the_buffered_writer_above_is_dropped_at_once() {
        let (w, _reader, _) = stalled_pair();
        let mut buffered = io::BufWriter::with_capacity(1 << 16, w);
        let chunk = vec![0u8; 1 << 20];
        let t = Instant::now();
        let e = loop {
            if let Err(e) = buffered.write_all(&chunk) {
                break e;
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        buffered.write_all(&[1; 100]).unwrap(); // buffered, not written
        let failed_at = t.elapsed();
        let e = buffered.flush().unwrap_err();
        assert!(e.to_string().contains("accepted no data for 300 ms"), "{e}");
        drop(buffered);
        assert!(
            t.elapsed() < failed_at + Duration::from_millis(100),
            "failed after {failed_at:?}, dropped after {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_cancel_ends_a_blocked_write_within_the_poll_interval() {
        let (mut w, _reader, cancel) = stalled_pair();
        w.stall = Duration::from_secs(3600);
        let chunk = vec![0u8; 1 << 20];
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                cancel.store(true, Ordering::SeqCst);
            });
            let t = Instant::now();
            let e = loop {
                if let Err(e) = w.write_all(&chunk) {
                    break e;
                }
            };
            assert!(is_cancelled(&e), "{e}");
            assert!(
                t.elapsed() < Duration::from_millis(1300),
                "{:?}",
                t.elapsed()
            );
        });
    }
}
