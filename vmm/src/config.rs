//! What a VM is made of, as the CLI (or a restore) describes it.

use std::path::PathBuf;

/// How guest RAM is backed on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum MemoryBackend {
    /// Private anonymous memory (`MAP_PRIVATE|MAP_ANONYMOUS`): released with `MADV_DONTNEED`.
    #[default]
    Anon,
    /// A memfd mapped shared: released with `fallocate(PUNCH_HOLE)`.
    Memfd,
    /// A memfd with `MFD_HUGETLB` (2 MiB pages): released a whole huge page at a time.
    Hugetlb,
    /// A shared mapping of a file (created if missing, sized to guest RAM).
    File(PathBuf),
}

pub use devices::virtio::balloon::BalloonConfig;

/// Everything needed to build and boot a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Command line given by the user; the VMM appends its device entries.
    pub cmdline: String,
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub memory_backend: MemoryBackend,
    /// Ask for transparent huge pages on guest RAM (`--memory-thp`).
    pub memory_thp: bool,
    /// Enable the debug-exit port 0xf4.
    pub debug_exit: bool,
    /// The virtio balloon, if any (its initial target is in pages).
    pub balloon: Option<BalloonConfig>,
    /// What a balloon target must leave the guest, in bytes (`None`: the
    /// default for the guest's size, [`api_types::types::balloon_floor_bytes`]).
    pub balloon_floor_bytes: Option<u64>,
    /// The automatic balloon policy (`--balloon-policy`): on or off, and
    /// its settings (`None`: off, with the defaults).
    pub balloon_policy: Option<(bool, api_types::policy::PolicySettings)>,
    /// Serve the REST API on this unix socket.
    pub api_socket: Option<PathBuf>,
    /// Forward stdin to the serial console (off in tests and daemons).
    pub serial_input: bool,
}

impl VmConfig {
    pub fn new(kernel: PathBuf) -> Self {
        Self {
            kernel,
            initrd: None,
            cmdline: String::new(),
            memory_bytes: 512 << 20,
            vcpus: 1,
            memory_backend: MemoryBackend::Anon,
            memory_thp: false,
            debug_exit: false,
            balloon: None,
            balloon_floor_bytes: None,
            balloon_policy: None,
            api_socket: None,
            serial_input: true,
        }
    }
}
