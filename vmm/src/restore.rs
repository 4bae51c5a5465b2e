//! Building a VM from a migration stream (a file, or a connection from
//! another Blimp): guest memory, KVM vCPU/VM state and device state. The VM
//! only runs once every part was read, verified and applied; a damaged
//! stream is refused with the place and reason, and nothing resumes.

use std::io::{BufReader, Read};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use api::types::MigrationDestination;

use crate::config::{MemoryBackend, VmConfig};
use crate::migration::state::{self, StateSupport, VmState};
use crate::migration::stream::{Destination, StreamReader};
use crate::vcpu;
use crate::vmm::{Error, Machine, Vmm};

/// What may follow the stream's trailer on the input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamEnd {
    /// Nothing: the input ends there (a file); anything more is refused.
    #[default]
    Eof,
    /// More follows that the caller reads (a connection with a handshake
    /// after the stream); the restore does not look past the trailer.
    MoreFollows,
}

/// How to build the restored VM on this host.
#[derive(Clone, Debug, Default)]
pub struct RestoreConfig {
    pub memory_backend: MemoryBackend,
    pub serial_input: bool,
    pub end: StreamEnd,
}

/// Errors specific to restoring.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Stream(#[from] crate::migration::stream::StreamError),
    #[error("the migration stream's state section: {0}")]
    State(#[from] crate::migration::state::StateError),
    #[error("the migration stream's device state: {0}")]
    Devices(String),
    #[error("cannot open {what}: {source}")]
    Open {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a regular file ({kind}); a migration file is needed")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("cannot prepare guest memory for the restore: {0}")]
    Memory(#[from] crate::memory::MemoryError),
}

fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a plain file"
    }
}

/// Wait for one incoming migration on `url` (unix:///path or tcp://IP:PORT)
/// and return the connection.
pub fn accept_incoming(url: &str) -> Result<Box<dyn Read + Send>, RestoreError> {
    let dest = MigrationDestination::parse(url).map_err(|e| RestoreError::Open {
        what: url.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    let open = |what: &str| {
        let what = what.to_string();
        move |source| RestoreError::Open { what, source }
    };
    match dest {
        MigrationDestination::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path).map_err(open(url))?;
            log::info!("waiting for an incoming migration on {url}");
            let (s, _) = l.accept().map_err(open(url))?;
            let _ = std::fs::remove_file(&path);
            Ok(Box::new(s))
        }
        MigrationDestination::Tcp(addr) => {
            let l = TcpListener::bind(addr).map_err(open(url))?;
            log::info!("waiting for an incoming migration on {url}");
            let (s, _) = l.accept().map_err(open(url))?;
            Ok(Box::new(s))
        }
        MigrationDestination::File(path) => Ok(Box::new(
            std::fs::File::open(&path).map_err(open(&path.display().to_string()))?,
        )),
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
    let t = f.metadata().map_err(open_err)?.file_type();
    if !t.is_file() {
        return Err(RestoreError::NotAFile {
            path: path.to_path_buf(),
            kind: file_kind(t),
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

impl Vmm {
    /// Build a VM from a migration stream. Nothing runs until [`Vmm::run`].
    pub fn restore(cfg: RestoreConfig, input: Box<dyn Read + Send>) -> Result<Vmm, Error> {
        let mut reader = StreamReader::new(BufReader::with_capacity(4 << 20, input));
        let header = reader.read_header().map_err(RestoreError::from)?;
        // Nothing is allocated for the guest before its layout is known to
        // be one this host could build.
        let layout = header
            .memory_layout(crate::memory::host_ram_bytes())
            .map_err(RestoreError::from)?;
        let size = layout.size();
        let mut m = Machine::new(&layout, 1, &cfg.memory_backend)?;
        // The stream writes only the pages it carries: the rest must read
        // zero, also over an existing backing file.
        m.ram.ensure_zeroed().map_err(RestoreError::from)?;
        let restored = reader
            .restore(m.ram.memory(), &layout, Destination::Fresh)
            .map_err(RestoreError::from)?;
        if cfg.end == StreamEnd::Eof {
            reader.expect_end().map_err(RestoreError::from)?;
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
        config.serial_input = cfg.serial_input;
        config.debug_exit = m.debug_exit;
        config.balloon = balloon
            .as_ref()
            .map(|b| *crate::vmm::lock_balloon(b).config());
        let mut vmm = m.into_vmm(config, fds, balloon)?;
        vmm.tell_balloon_done_on_start();
        Ok(vmm)
    }
}
