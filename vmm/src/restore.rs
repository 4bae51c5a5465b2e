//! Building a VM from a migration stream (a file, or a connection from
//! another Blimp): guest memory, KVM vCPU/VM state and device state. The VM
//! only runs once every part was read, verified and applied; a damaged
//! stream is refused with the place and reason, and nothing resumes.

use std::io::{BufReader, Read};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use api_types::types::MigrationDestination;

use crate::config::{MemoryBackend, VmConfig};
pub use crate::error::RestoreError;
use crate::error::{Error, error_chain};
use crate::machine::Machine;
use crate::migration::file_dest::FileKind;
use crate::migration::handshake::{self, HandshakeError, Message, Waiter};
use crate::migration::link::{self, Peer};
use crate::migration::state::{self, StateSupport, VmState};
use crate::migration::stream::{Destination, HANDSHAKE_VERSION, MAGIC, StreamReader};
use crate::signals::TerminationSignals;
use crate::vcpu;
use crate::vmm::Vmm;

/// How to build the restored VM on this host.
#[derive(Clone, Debug, Default)]
pub struct RestoreConfig {
    pub memory_backend: MemoryBackend,
    /// Transparent huge pages on guest RAM here (`--memory-thp`).
    pub memory_thp: bool,
    pub serial_input: bool,
}

/// How long an incoming migration may go without a byte from the source
/// (or wait for its GO after the ACK) before it is refused.
pub const INCOMING_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// An accepted incoming migration: the stream comes in over `peer`, and the
/// switchover handshake ([`crate::migration::handshake`]) goes both ways on it.
pub struct Incoming {
    url: String,
    peer: Option<Peer>,
    input: Box<dyn Read + Send>,
    /// The signal that stopped the stream's reads (0: none).
    stopped: Arc<AtomicI32>,
}

impl Incoming {
    /// Where it came in, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A live migration from a source blimp (not a file): once it is
    /// restored, the source has handed the VM over and no other copy runs.
    pub fn is_live(&self) -> bool {
        self.peer.is_some()
    }
}

/// Remove a socket left by an earlier listener at `path`; a socket
/// something still listens on (another blimp's API, say) and anything
/// else there are refused, never removed.
fn clear_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if socket_is_live(path) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process listens on this socket; not taking it over",
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "something other than a socket is there; not removing it",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether something listens on the Unix socket at `path`: a connect that
/// is not refused within 1 s. The connect runs on a thread of its own, as
/// one to a live listener with a full backlog blocks.
fn socket_is_live(path: &Path) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    let probe = std::thread::Builder::new()
        .name("blimp-probe".into())
        .spawn(move || {
            let _ = tx.send(std::os::unix::net::UnixStream::connect(&p));
        });
    if probe.is_err() {
        // Cannot tell: leave it alone.
        return true;
    }
    match rx.recv_timeout(Duration::from_secs(1)) {
        Ok(Err(e)) => !matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
        ),
        _ => true,
    }
}

/// A terminating signal (SIGTERM, SIGINT, SIGHUP, ...) while waiting for a
/// migration.
fn interrupted(url: &str, signals: &TerminationSignals) -> Result<(), RestoreError> {
    match signals.read() {
        Some(signal) => Err(RestoreError::Interrupted {
            url: url.to_string(),
            signal,
        }),
        None => Ok(()),
    }
}

/// Connections waited on at once; past that, the one that has sent the
/// least for the longest is refused. Also the most accepted in one burst.
const MAX_CANDIDATES: usize = 8;

/// A connection that may be the source: what it sent so far (less than
/// the stream's magic) and since when it is here.
struct Candidate {
    peer: Peer,
    since: Instant,
    got: Vec<u8>,
}

/// What one look at a candidate found.
enum Look {
    /// Nothing yet.
    Wait,
    /// It sent the stream's magic: the source.
    Source,
    /// Not a source: closed, or refused with this reason (a NAK).
    Drop(Option<String>),
}

impl Candidate {
    fn look(&mut self) -> Look {
        let mut buf = [0u8; 4096];
        match self.peer.read(&mut buf) {
            Ok(0) => Look::Drop(None),
            Ok(n) => {
                self.got.extend_from_slice(&buf[..n]);
                let m = self.got.len().min(MAGIC.len());
                if self.got[..m] != MAGIC[..m] {
                    Look::Drop(Some(
                        "not a Blimp migration stream (bad magic): refused; still waiting for a source"
                            .to_string(),
                    ))
                } else if m == MAGIC.len() {
                    Look::Source
                } else {
                    Look::Wait
                }
            }
            Err(e) if link::is_poll_timeout(&e) => {
                if self.since.elapsed() >= INCOMING_IDLE_TIMEOUT {
                    Look::Drop(Some(format!(
                        "connected but did not send the start of a migration stream (BLIMPMIG) within {} s: refused",
                        INCOMING_IDLE_TIMEOUT.as_secs()
                    )))
                } else {
                    Look::Wait
                }
            }
            Err(_) => Look::Drop(None),
        }
    }
}

/// Wait for a source on the non-blocking listener behind `accept`: the
/// first connection that sends the stream's magic, with what it sent. Up
/// to [`MAX_CANDIDATES`] connections are watched at once, so a peer that
/// is no source cannot hold the destination: one that closes before it
/// sent anything (another blimp checking whether the socket is live), that
/// sends something else (a port scanner's probe) or that sends nothing for
/// 60 s is dropped (told why, as a NAK) and waiting goes on. The others
/// still waiting when the source is found are told the destination is
/// taken ([`BUSY`]). A signal ends the wait, so that the caller removes
/// its socket before it exits.
fn wait_for_source(
    url: &str,
    signals: &TerminationSignals,
    mut accept: impl FnMut() -> std::io::Result<Peer>,
) -> Result<(Peer, Vec<u8>), RestoreError> {
    let open = |source| RestoreError::Open {
        what: url.to_string(),
        source,
    };
    let mut waiting: Vec<Candidate> = Vec::new();
    loop {
        interrupted(url, signals)?;
        if let Some(i) = look_all(url, &mut waiting) {
            let c = waiting.swap_remove(i);
            for other in waiting {
                refuse(url, other.peer, BUSY);
            }
            refuse_others(url, &mut accept);
            // Blocking again, its reads timing out every POLL.
            c.peer.set_nonblocking(false).map_err(open)?;
            c.peer.set_timeouts(link::POLL).map_err(open)?;
            return Ok((c.peer, c.got));
        }
        // A bounded burst: under a connect flood the candidates are still
        // looked at and signals still heard between bursts.
        let mut accepted = 0;
        while accepted < MAX_CANDIDATES {
            let peer = match accept() {
                Ok(peer) => peer,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(open(e)),
            };
            accepted += 1;
            peer.set_nonblocking(true).map_err(open)?;
            if waiting.len() == MAX_CANDIDATES {
                // The one that has sent the least for longest goes: never
                // one that has begun the magic while a silent one waits.
                let oldest = (0..waiting.len())
                    .min_by_key(|&i| (waiting[i].got.len(), waiting[i].since))
                    .unwrap_or(0);
                let c = waiting.remove(oldest);
                refuse(url, c.peer, "too many connections waiting: refused");
            }
            waiting.push(Candidate {
                peer,
                since: Instant::now(),
                got: Vec::new(),
            });
        }
        if accepted == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Look at every candidate once: drops those that are no source (told
/// why) and returns the index of the first that sent the magic.
fn look_all(url: &str, waiting: &mut Vec<Candidate>) -> Option<usize> {
    let mut i = 0;
    while i < waiting.len() {
        match waiting[i].look() {
            Look::Wait => i += 1,
            Look::Source => return Some(i),
            Look::Drop(why) => {
                let c = waiting.swap_remove(i);
                match why {
                    Some(why) => refuse(url, c.peer, &why),
                    None => log::debug!(
                        "a connection on {url} closed before sending a migration stream: not a source, still waiting"
                    ),
                }
            }
        }
    }
    None
}

/// Tell a connection that is not (or not this destination's) source why,
/// as a NAK (best effort), and close it.
fn refuse(url: &str, mut peer: Peer, why: &str) {
    // Rate-limited: a connect flood would write one line per connection.
    devices::warn_limited!("a connection on {url}: {why}");
    let _ = peer.set_nonblocking(false);
    let _ = peer.set_timeouts(link::POLL);
    let _ = handshake::send(&mut peer, &Message::Nak(why.to_string()));
}

/// Why a destination refuses every connection but its source's.
pub const BUSY: &str = "this destination is already receiving a VM from another source";

/// Tell each connection already waiting on the listener behind `accept`
/// (another source that came at the same time) that this destination is
/// taken ([`BUSY`], as a NAK: its source keeps its VM and says so), instead
/// of dropping it with the listener without a word, which that source
/// could only report as a destination that closed the connection.
fn refuse_others(url: &str, accept: &mut impl FnMut() -> std::io::Result<Peer>) {
    // Those queued now (a listen backlog's worth), not a flood for ever.
    for _ in 0..128 {
        match accept() {
            Ok(other) => refuse(url, other, BUSY),
            Err(_) => break,
        }
    }
}

/// Wait for one incoming migration on `url` (unix:///path or tcp://IP:PORT;
/// file:///path reads a file) and return the connection.
pub fn accept_incoming(url: &str) -> Result<Incoming, RestoreError> {
    let dest = MigrationDestination::parse(url).map_err(|e| RestoreError::Open {
        what: url.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    let open = |what: &str| {
        let what = what.to_string();
        move |source| RestoreError::Open { what, source }
    };
    // Blocked from before the socket exists, so a signal never finds it
    // there with nobody left to remove it.
    let signals = TerminationSignals::new().map_err(open(url))?;
    let (peer, first) = match dest {
        MigrationDestination::Unix(path) => {
            clear_stale_socket(&path).map_err(open(url))?;
            let l = UnixListener::bind(&path).map_err(open(url))?;
            log::info!("waiting for an incoming migration on {url}");
            let got = l.set_nonblocking(true).map_err(open(url)).and_then(|()| {
                wait_for_source(url, &signals, || l.accept().map(|(s, _)| Peer::Unix(s)))
            });
            let _ = std::fs::remove_file(&path);
            got?
        }
        MigrationDestination::Tcp(addr) => {
            let l = TcpListener::bind(addr).map_err(open(url))?;
            log::info!("waiting for an incoming migration on {url}");
            l.set_nonblocking(true).map_err(open(url))?;
            wait_for_source(url, &signals, || {
                l.accept().map(|(s, from)| {
                    log::info!("incoming migration from {from}");
                    Peer::Tcp(s)
                })
            })?
        }
        MigrationDestination::File(path) => {
            return Ok(Incoming {
                url: url.to_string(),
                peer: None,
                input: open_file(&path)?,
                stopped: Arc::default(),
            });
        }
    };
    let reader = peer.try_clone().map_err(open(url))?;
    let stopped = Arc::new(AtomicI32::new(0));
    Ok(Incoming {
        url: url.to_string(),
        peer: Some(peer),
        input: Box::new(std::io::Cursor::new(first).chain(IdleLimit {
            inner: reader,
            limit: INCOMING_IDLE_TIMEOUT,
            signals,
            checked: Instant::now(),
            stopped: stopped.clone(),
        })),
        stopped,
    })
}

/// Reads from a socket whose reads time out every [`link::POLL`]; fails
/// with a clear error once nothing came for `limit`, or once a terminating
/// signal came (looked for every [`link::POLL`], also while bytes flow),
/// which it records in `stopped`.
struct IdleLimit<R> {
    inner: R,
    limit: Duration,
    signals: TerminationSignals,
    checked: Instant,
    stopped: Arc<AtomicI32>,
}

impl<R> IdleLimit<R> {
    fn check_signals(&mut self) -> std::io::Result<()> {
        self.checked = Instant::now();
        match self.signals.read() {
            Some(signal) => {
                self.stopped.store(signal, Ordering::Release);
                // Not ErrorKind::Interrupted: `read_exact` would try again.
                Err(std::io::Error::other(format!(
                    "the destination was stopped (signal {signal})"
                )))
            }
            None => Ok(()),
        }
    }
}

impl<R: Read> Read for IdleLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = Instant::now();
        if self.checked.elapsed() >= link::POLL {
            self.check_signals()?;
        }
        loop {
            match self.inner.read(buf) {
                Err(e) if link::is_poll_timeout(&e) => {
                    self.check_signals()?;
                    if start.elapsed() >= self.limit {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("the source sent nothing for {} s", self.limit.as_secs()),
                        ));
                    }
                }
                other => return other,
            }
        }
    }
}

/// Open a migration file. Anything but a regular file (a FIFO, a device,
/// a directory, a socket) is refused without blocking: it is opened
/// non-blocking, checked, and only then switched to blocking reads.
pub fn open_file(path: &std::path::Path) -> Result<Box<dyn Read + Send>, RestoreError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let open_err = |source| RestoreError::Open {
        what: path.display().to_string(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    if let Some(kind) = FileKind::of_type(f.metadata().map_err(open_err)?.file_type()) {
        return Err(RestoreError::NotAFile {
            path: path.to_path_buf(),
            kind,
        });
    }
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL touch no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(open_err(std::io::Error::last_os_error()));
    }
    Ok(Box::new(f))
}

/// What must follow the stream's trailer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// Nothing: the end of the file.
    Eof,
    /// The source's handshake messages, which it sends only after our ACK:
    /// nothing may have arrived yet.
    Handshake,
}

/// A restore onto `--memory-backend file=PATH` builds guest RAM in a new,
/// unnamed file in PATH's directory (`O_TMPFILE`, see
/// [`crate::migration::file_dest`]) and puts it in PATH's place only once
/// the VM is restored (from a file) or taken over (a live migration): a
/// refused or failed restore, or a `kill -9` meanwhile, leaves PATH as it
/// was and no file behind. PATH stays locked meanwhile (a running VM on it
/// refuses the restore; no blimp starts on it while it runs), and the VM's
/// backing is PATH from the start (what a snapshot onto PATH is checked
/// against). The RAM is not fsynced on the way: a host crash ends the VM
/// anyway, and syncing gigabytes would stretch the migration's downtime.
struct PendingBacking {
    path: PathBuf,
    file: Option<crate::migration::file_dest::AtomicFile>,
    claim: crate::memory::ClaimedFile,
    committed: bool,
}

impl PendingBacking {
    fn new(backend: &MemoryBackend) -> Result<Option<Self>, Error> {
        let MemoryBackend::File(path) = backend else {
            return Ok(None);
        };
        let claim = crate::memory::claim_backing_file(path)?;
        // As `blimp run` maps the file a symlink leads to, a restore
        // replaces that file, not the link.
        let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        let target = match is_link {
            true => std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()),
            false => path.clone(),
        };
        let mut pending = Self {
            path: path.clone(),
            file: None,
            claim,
            committed: false,
        };
        pending.file = Some(
            crate::migration::file_dest::AtomicFile::create_rw(&target)
                .map_err(RestoreError::RamFile)?,
        );
        Ok(Some(pending))
    }

    /// The file the restored VM's RAM is built in (a duplicate descriptor,
    /// which the RAM keeps open, and locked, after the commit).
    fn ram_file(&self) -> Result<std::fs::File, Error> {
        let dup = self
            .file
            .as_ref()
            .and_then(|f| f.file())
            .map(std::fs::File::try_clone)
            .unwrap_or_else(|| Err(std::io::Error::other("already committed")));
        dup.map_err(|source| {
            RestoreError::Open {
                what: "the restored guest RAM's file (a duplicate descriptor)".into(),
                source,
            }
            .into()
        })
    }

    /// Put the restored RAM in PATH's place.
    fn commit(mut self) -> Result<(), Error> {
        if let Some(f) = self.file.take() {
            f.commit_unsynced().map_err(RestoreError::RamFile)?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for PendingBacking {
    /// A restore that did not replace PATH removes the empty file it made
    /// there to hold the lock (if it is still that file, and still empty).
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let Some(id) = self.claim.created else {
            return;
        };
        if self.committed {
            return;
        }
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == id && m.len() == 0);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Vmm {
    /// Build a VM from a migration file. Nothing runs until [`Vmm::run`].
    pub fn restore(cfg: RestoreConfig, input: Box<dyn Read + Send>) -> Result<Vmm, Error> {
        let (vmm, backing) = Self::restore_stream(cfg, input, End::Eof)?;
        if let Some(backing) = backing {
            backing.commit()?;
        }
        Ok(vmm)
    }

    /// Build a VM from an incoming migration and take it over: verify the
    /// whole stream and build the VM, acknowledge (or refuse, with the reason),
    /// and return the VM once the source handed it over (GO) and was told it
    /// runs here (RUN). The caller runs it at once. A refused stream, or a
    /// source that never hands over, returns an error: the VM must not run.
    pub fn restore_incoming(cfg: RestoreConfig, incoming: Incoming) -> Result<Vmm, Error> {
        let Incoming {
            url,
            peer,
            input,
            stopped,
        } = incoming;
        let Some(mut peer) = peer else {
            return Self::restore(cfg, input);
        };
        // A stop asked for (SIGTERM, Ctrl-C) would end the VM the moment
        // it runs, after the source let it go: the VM is refused instead,
        // and the source keeps it.
        let refuse = |peer: &mut Peer, signal: i32| {
            let why =
                format!("the destination was stopped (signal {signal}) before it took the VM over");
            if let Err(send) = handshake::send(peer, &Message::Nak(why)) {
                log::warn!("{url}: cannot tell the source why: {send}");
            }
            Error::from(RestoreError::Interrupted {
                url: url.clone(),
                signal,
            })
        };
        let (vmm, backing) = match Self::restore_stream(cfg, input, End::Handshake) {
            Ok(v) => v,
            Err(_) if stopped.load(Ordering::Acquire) != 0 => {
                return Err(refuse(&mut peer, stopped.load(Ordering::Acquire)));
            }
            Err(e) => {
                // Best effort: the source resumes its guest either way.
                if let Err(send) = handshake::send(&mut peer, &Message::Nak(error_chain(&e))) {
                    log::warn!("{url}: cannot tell the source why: {send}");
                }
                return Err(e);
            }
        };
        let no_handover = |e| Error::from(RestoreError::NoHandover(e));
        if let Some(signal) = vmm.stop_requested() {
            return Err(refuse(&mut peer, signal));
        }
        handshake::send(&mut peer, &Message::Ack).map_err(no_handover)?;
        log::info!("{url}: stream verified and VM built; waiting for the source to hand it over");
        // Stopped while waiting for GO: NAK (no RUN), so the source resumes.
        let signal = std::cell::Cell::new(None);
        let asked_to_stop = || {
            signal.set(signal.get().or_else(|| vmm.stop_requested()));
            signal.get().is_some()
        };
        let go = Waiter {
            cancelled: &asked_to_stop,
            timeout: INCOMING_IDLE_TIMEOUT,
        };
        match go.recv(&mut peer, "GO") {
            Ok(Message::Go) => {}
            Err(HandshakeError::Cancelled { .. }) if signal.get().is_some() => {
                return Err(refuse(&mut peer, signal.get().unwrap_or(0)));
            }
            Err(e) => return Err(no_handover(e)),
            Ok(other) => {
                return Err(no_handover(HandshakeError::Unexpected {
                    expected: "GO",
                    got: other.name(),
                }));
            }
        }
        // Stopped since the ACK: no RUN, so the source resumes its guest.
        if let Some(signal) = signal.get().or_else(|| vmm.stop_requested()) {
            return Err(refuse(&mut peer, signal));
        }
        // The restored RAM takes the backing file's name now, before RUN:
        // if it cannot, the source keeps the VM.
        if let Some(backing) = backing {
            backing.commit()?;
        }
        // RUN goes out before any vCPU starts: if it cannot be sent, the
        // source may resume its guest, so this one must not run.
        handshake::send(&mut peer, &Message::Run).map_err(no_handover)?;
        log::info!(target: "console", "{url}: the source handed the VM over; it runs here now");
        Ok(vmm)
    }

    fn restore_stream(
        cfg: RestoreConfig,
        input: Box<dyn Read + Send>,
        end: End,
    ) -> Result<(Vmm, Option<PendingBacking>), Error> {
        let mut reader = StreamReader::new(BufReader::with_capacity(4 << 20, input));
        let header = reader.read_header().map_err(RestoreError::from)?;
        if end == End::Handshake && header.version < HANDSHAKE_VERSION {
            // Such a source would report success without waiting for us.
            return Err(RestoreError::NoHandshake {
                version: header.version,
            }
            .into());
        }
        // Nothing is allocated for the guest before its layout is known to
        // be one this host could build.
        let layout = header
            .memory_layout(crate::memory::host_ram_bytes())
            .map_err(RestoreError::from)?;
        let size = layout.size();
        let backing = PendingBacking::new(&cfg.memory_backend)?;
        let ram_file = backing.as_ref().map(PendingBacking::ram_file).transpose()?;
        let mut m = Machine::new(&layout, 1, &cfg.memory_backend, cfg.memory_thp, ram_file)?;
        // The stream writes only the pages it carries: the rest must read
        // zero, also over an existing backing file.
        m.ram.ensure_zeroed().map_err(RestoreError::from)?;
        let ram = m.ram.clone();
        reader.reserve_with(Box::new(move |gpa, len| {
            ram.reserve(devices::GpaRange::new(gpa, len))
        }));
        let restored = reader
            .restore(m.ram.memory(), &layout, Destination::Fresh)
            .map_err(RestoreError::from)?;
        match end {
            End::Eof => reader.expect_end().map_err(RestoreError::from)?,
            End::Handshake => {
                // The source sends nothing more before our ACK.
                let (input, rest) = reader.into_inner();
                let len = rest.len() + input.buffer().len();
                if len != 0 {
                    return Err(RestoreError::TrailingBytes { len }.into());
                }
            }
        }
        // Check everything, then apply: the whole state is typed and
        // checked (sizes, ids, counts, devices) before the machine changes.
        let state = VmState::from_bytes(&restored.state).map_err(RestoreError::from)?;
        let last_round = restored.last_round;
        drop(restored);
        let count = u8::try_from(state.vcpus.len())
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                RestoreError::Devices(format!("{} vCPUs in the stream", state.vcpus.len()))
            })?;
        state
            .check_destination(&layout, usize::from(count))
            .map_err(RestoreError::from)?;
        let devices = crate::device_state::parse(&state.devices)?;
        devices.check_policy(size)?;
        let balloon = crate::device_state::restore(&mut m, &devices)?;
        let mut fds = Vec::new();
        for id in 0..count {
            fds.push(vcpu::create_vcpu(&m.vm, id, count, 0, m.backend.is_pvm())?);
        }
        let support = StateSupport::probe(m.vm.kvm()).map_err(RestoreError::from)?;
        let reports = state::restore(m.vm.fd(), &support, &fds, &layout, &state)
            .map_err(RestoreError::from)?;
        for (id, r) in reports.iter().enumerate() {
            log::debug!("vCPU {id} restored: {r:?}");
        }
        log::info!(
            "restored {} MiB of guest memory, {} vCPU(s) from the stream (last round {last_round})",
            size >> 20,
            count,
        );
        let mut config = VmConfig::new(PathBuf::new());
        config.memory_bytes = size;
        config.vcpus = count;
        config.memory_backend = cfg.memory_backend;
        config.memory_thp = cfg.memory_thp;
        config.serial_input = cfg.serial_input;
        config.debug_exit = m.debug_exit;
        config.balloon = balloon
            .as_ref()
            .map(|b| *crate::vmm::lock_balloon(b).config());
        config.balloon_policy = devices.policy().map(|p| (p.enabled, p.settings.clone()));
        let mut vmm = m.into_vmm(config, fds, balloon)?;
        if let (Some(saved), Some(policy)) = (devices.policy(), vmm.policy()) {
            policy.restore(saved.clone());
        }
        vmm.tell_balloon_done_on_start();
        vmm.reprint_prompt_on_start();
        Ok((vmm, backing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// Under a connect flood (accept never runs dry) the connection that
    /// sent the magic is still found among the silent ones, at once: the
    /// wait accepted until the flood stopped, looking at nobody (nor at
    /// signals), and refused the oldest each time, the source among them.
    #[test]
    fn a_connect_flood_does_not_hide_the_source() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let signals = TerminationSignals::new().unwrap();
            let mut silent = Vec::new();
            let mut n = 0u64;
            let r = wait_for_source("unix:///flood", &signals, || {
                n += 1;
                if n > 20_000 {
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                let (mut client, server) = UnixStream::pair()?;
                if n == 3 {
                    client.write_all(b"BLIMPMIG and the rest")?;
                }
                silent.push(client);
                Ok(Peer::Unix(server))
            });
            let _ = tx.send(r.map(|(_, got)| (got, n)).map_err(|e| e.to_string()));
        });
        let (got, n) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the wait ended")
            .unwrap();
        assert_eq!(got, b"BLIMPMIG and the rest");
        assert!(
            n < 500,
            "{n} connections accepted before the source was seen"
        );
    }
}
