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

/// Balloon options (`--balloon k=v,...` and `--balloon-target`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonOptions {
    pub must_tell_host: bool,
    pub deflate_on_oom: bool,
    pub stats_polling_interval_s: u32,
    pub free_page_hint: bool,
    pub free_page_reporting: bool,
    pub page_poison: bool,
    pub hint_discard: bool,
    /// Initial balloon size (memory taken from the guest), in bytes.
    pub initial_target_bytes: u64,
}

impl Default for BalloonOptions {
    fn default() -> Self {
        Self {
            must_tell_host: true,
            deflate_on_oom: false,
            stats_polling_interval_s: 0,
            free_page_hint: false,
            free_page_reporting: false,
            page_poison: false,
            hint_discard: false,
            initial_target_bytes: 0,
        }
    }
}

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
    /// Enable the debug-exit port 0xf4.
    pub debug_exit: bool,
    pub balloon: Option<BalloonOptions>,
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
            debug_exit: false,
            balloon: None,
            api_socket: None,
            serial_input: true,
        }
    }
}
