//! Guest RAM: one vm-memory region per RAM range of the layout, over the
//! chosen backing, with the VMM's own dirty bitmap, and the one place in
//! Blimp that releases guest memory to the host ([`RamDiscard`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use arch::MemoryLayout;
use devices::{
    DirtyBitmap, DiscardError, DiscardOutcome, GpaRange, GuestMemory, PAGE_SIZE, RamDiscard,
};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use crate::config::MemoryBackend;
use crate::discard_workers::{self, DiscardWorkers, Part};
use crate::punch::{punch_hole, punch_pieces};
use crate::ram_holes;
use crate::ram_stripes::Stripes;

/// Size of a huge page for the hugetlb backing.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create a memfd for guest memory: {0}")]
    Memfd(#[source] std::io::Error),
    #[error(
        "no huge pages for a {size_mib} MiB hugetlb guest: {free} free 2 MiB pages, {needed} needed (reserve them with `echo {needed} > /proc/sys/vm/nr_hugepages`)"
    )]
    NoHugePages {
        size_mib: u64,
        free: u64,
        needed: u64,
    },
    #[error("cannot open memory file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "memory file {path} is guest RAM of another running process (it holds the file's lock): back this guest with another file"
    )]
    FileInUse { path: PathBuf },
    #[error("cannot size guest memory backing to {size} bytes: {source}")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {size} bytes of guest memory at {gpa:#x}: {source}")]
    Mmap {
        gpa: u64,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot map {size} bytes of memfd guest memory at {gpa:#x}: {source}")]
    MapShared {
        gpa: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory regions are invalid: {0}")]
    Regions(String),
    #[error(
        "--memory-thp does not apply to the hugetlb backing: its pages are 2 MiB already (use one or the other)"
    )]
    ThpOnHugetlb,
    #[error("cannot ask for transparent huge pages on guest memory at {gpa:#x}: {source}")]
    Thp {
        gpa: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Whether this host backs a `MADV_HUGEPAGE` mapping of `backing` with
/// transparent huge pages, and the sysfs file that says so: anonymous
/// memory follows `enabled`, shared memory (memfd) `shmem_enabled`. A
/// regular file's page cache follows its filesystem; `None` for it.
pub fn thp_honoured(backing: &MemoryBackend) -> Option<(bool, &'static str)> {
    let (file, ok): (&str, &[&str]) = match backing {
        MemoryBackend::Anon => (
            "/sys/kernel/mm/transparent_hugepage/enabled",
            &["always", "madvise"],
        ),
        MemoryBackend::Memfd => (
            "/sys/kernel/mm/transparent_hugepage/shmem_enabled",
            &["always", "within_size", "advise", "force"],
        ),
        _ => return None,
    };
    Some((ok.contains(&thp_setting(file)?.as_str()), file))
}

/// The setting in force in a THP sysfs `file`: its bracketed word
/// ("always [madvise] never" → "madvise"); `None` if it cannot be read.
pub fn thp_setting(file: &str) -> Option<String> {
    let s = std::fs::read_to_string(file).ok()?;
    let chosen = s.split_whitespace().find(|w| w.starts_with('['))?;
    Some(chosen.trim_matches(|c| c == '[' || c == ']').to_string())
}

/// How one region's host memory is released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DiscardKind {
    /// MADV_DONTNEED on the private mapping.
    PrivateAnon,
    /// fallocate(PUNCH_HOLE|KEEP_SIZE) at `file_offset` in the backing file.
    PunchHole,
    /// The same, on memfd RAM striped over two files per discard thread.
    StripedPunch,
    /// Punch whole huge pages only.
    HugePunch,
}

/// One bit per 4 KiB page of a 2 MiB huge page.
type HugePageBits = [u64; 8];

/// Mark pages `[lo, hi)` (byte offsets inside the huge page) in `bits`;
/// returns true once every page of the huge page is marked.
fn mark_small_pages(bits: &mut HugePageBits, lo: u64, hi: u64) -> bool {
    for page in lo / PAGE_SIZE..hi / PAGE_SIZE {
        bits[(page / 64) as usize] |= 1 << (page % 64);
    }
    bits.iter().all(|w| *w == u64::MAX)
}

/// Where a RAM region lives on the host.
struct RegionBacking {
    gpa: u64,
    size: u64,
    host: *mut u8,
    /// Offset of this region in `GuestRam::file` (or in the striped RAM's
    /// offsets), for shared backings.
    file_offset: u64,
}

// SAFETY: `host` is the address of a mapping owned by `GuestRam::mem` for the
// whole life of `GuestRam`; it is only used as an address for madvise.
unsafe impl Send for RegionBacking {}
// SAFETY: as above; no data is read or written through the pointer.
unsafe impl Sync for RegionBacking {}

/// Guest RAM.
pub struct GuestRam {
    mem: GuestMemory,
    layout: MemoryLayout,
    kind: DiscardKind,
    backing: MemoryBackend,
    regions: Vec<RegionBacking>,
    /// The shared backing file (hugetlb memfd or user file), if any.
    file: Option<File>,
    /// memfd RAM's files (see [`crate::ram_stripes`]).
    stripes: Option<Stripes>,
    /// The backing was an existing file with data in it: RAM may not read zero.
    opened_with_data: AtomicBool,
    /// For hugetlb: which 4 KiB pages of each partially discarded huge page
    /// (indexed by huge page number in the backing file) were discarded so far.
    partial_huge: Mutex<HashMap<u64, HugePageBits>>,
    /// Threads that share long discards (anon and memfd RAM).
    workers: Option<DiscardWorkers>,
}

fn memfd(name: &str, flags: libc::c_uint) -> std::io::Result<File> {
    let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: cname is a valid NUL-terminated string; memfd_create has no
    // other memory-safety requirements.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// This host's RAM in bytes (MemTotal), if /proc/meminfo says.
pub fn host_ram_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = s
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

fn free_huge_pages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("HugePages_Free:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

impl GuestRam {
    /// Map guest RAM for `layout` over `backing`.
    pub fn new(layout: &MemoryLayout, backing: &MemoryBackend) -> Result<Self, MemoryError> {
        Self::with_thp(layout, backing, false)
    }

    /// [`GuestRam::new`], with `MADV_HUGEPAGE` on every region when `thp`
    /// (`--memory-thp`): the host then backs it with 2 MiB pages where its
    /// THP settings allow (see [`thp_honoured`]; a warning says when not).
    pub fn with_thp(
        layout: &MemoryLayout,
        backing: &MemoryBackend,
        thp: bool,
    ) -> Result<Self, MemoryError> {
        Self::with_file(layout, backing, thp, None)
    }

    /// [`GuestRam::with_thp`]; for `file=PATH`, `opened` (when given) is
    /// the file mapped instead of PATH, which it is to become (a restore
    /// builds its RAM in a file that replaces PATH once it succeeded):
    /// opened for reading and writing, locked here as PATH would be.
    pub fn with_file(
        layout: &MemoryLayout,
        backing: &MemoryBackend,
        thp: bool,
        opened: Option<File>,
    ) -> Result<Self, MemoryError> {
        if thp {
            if *backing == MemoryBackend::Hugetlb {
                return Err(MemoryError::ThpOnHugetlb);
            }
            match thp_honoured(backing) {
                Some((false, file)) => log::warn!(
                    "memory: --memory-thp asked for, but {file} rules transparent huge pages out on this host: guest RAM stays on 4 KiB pages"
                ),
                Some((true, _)) => log::info!("memory: transparent huge pages on guest RAM"),
                None => log::info!(
                    "memory: transparent huge pages asked for on {backing:?} (its filesystem decides)"
                ),
            }
        }
        let ram = Self::map(layout, backing, opened)?;
        if thp {
            for r in &ram.regions {
                // SAFETY: [host, +size) is this region's mapping, owned by
                // `ram`; MADV_HUGEPAGE changes how the kernel backs it,
                // never its contents.
                let rc =
                    unsafe { libc::madvise(r.host.cast(), r.size as usize, libc::MADV_HUGEPAGE) };
                if rc != 0 {
                    return Err(MemoryError::Thp {
                        gpa: r.gpa,
                        source: std::io::Error::last_os_error(),
                    });
                }
            }
        }
        Ok(ram)
    }

    fn map(
        layout: &MemoryLayout,
        backing: &MemoryBackend,
        opened: Option<File>,
    ) -> Result<Self, MemoryError> {
        let total = layout.size();
        let workers = matches!(backing, MemoryBackend::Anon | MemoryBackend::Memfd)
            .then(DiscardWorkers::start);
        let (kind, file, stripes) = backing_files(backing, total, workers.as_ref(), opened)?;
        let opened_with_data = match (&file, backing) {
            (Some(f), MemoryBackend::File(path)) => {
                f.metadata()
                    .map_err(|source| MemoryError::File {
                        path: path.clone(),
                        source,
                    })?
                    .len()
                    > 0
            }
            _ => false,
        };
        if let Some(f) = &file {
            // Grown to the RAM's size, not cut: a `file=PATH` longer than
            // the RAM keeps what lies past it (a restore empties it all, see
            // `ensure_zeroed`).
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < total {
                f.set_len(total).map_err(|source| MemoryError::Truncate {
                    size: total,
                    source,
                })?;
            }
        }

        let mut regions = Vec::new();
        let mut backings = Vec::new();
        let mut offset = 0u64;
        for r in layout.regions() {
            let size = r.size as usize;
            let page = std::num::NonZeroUsize::new(PAGE_SIZE as usize).expect("PAGE_SIZE > 0");
            let bitmap = DirtyBitmap::new(size, page);
            let mut builder = MmapRegionBuilder::new_with_bitmap(size, bitmap)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
            builder = match &file {
                None => builder
                    // memfd RAM replaces this with its files below.
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
                Some(f) => {
                    let dup = f.try_clone().map_err(MemoryError::Memfd)?;
                    builder
                        .with_mmap_flags(libc::MAP_SHARED)
                        .with_file_offset(FileOffset::new(dup, offset))
                        .with_hugetlbfs(kind == DiscardKind::HugePunch)
                }
            };
            let mapping = builder.build().map_err(|source| MemoryError::Mmap {
                gpa: r.start,
                size: r.size,
                source,
            })?;
            if let Some(st) = &stripes {
                // SAFETY: `mapping` is this region's new mapping, owned by
                // it and not yet used by anyone; its files replace it.
                unsafe { st.map_at(mapping.as_ptr(), offset, r.size) }.map_err(|source| {
                    MemoryError::MapShared {
                        gpa: r.start,
                        size: r.size,
                        source,
                    }
                })?;
            }
            backings.push(RegionBacking {
                gpa: r.start,
                size: r.size,
                host: mapping.as_ptr(),
                file_offset: offset,
            });
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.start)).ok_or_else(|| {
                MemoryError::Regions(format!("region at {:#x} overflows", r.start))
            })?;
            regions.push(region);
            offset += r.size;
        }
        let mem =
            GuestMemory::from_regions(regions).map_err(|e| MemoryError::Regions(e.to_string()))?;
        Ok(Self {
            mem,
            layout: layout.clone(),
            kind,
            backing: backing.clone(),
            regions: backings,
            file,
            stripes,
            opened_with_data: AtomicBool::new(opened_with_data),
            partial_huge: Mutex::new(HashMap::new()),
            workers,
        })
    }

    /// Does all of guest RAM read zero, as far as this process knows?
    /// False for a `file=PATH` backing that held data when opened, until
    /// [`GuestRam::ensure_zeroed`].
    pub fn is_zeroed(&self) -> bool {
        !self.opened_with_data.load(Ordering::Acquire)
    }

    /// Make all of guest RAM read zero if it may not (see
    /// [`GuestRam::is_zeroed`]): the backing file is cut to nothing and
    /// extended again, which drops its old pages from the mappings too.
    /// For a restore, which writes only the pages its stream carries. Call
    /// before any vCPU runs and while nothing else touches guest memory.
    pub fn ensure_zeroed(&self) -> Result<(), MemoryError> {
        if self.is_zeroed() {
            return Ok(());
        }
        let Some(f) = &self.file else {
            return Ok(());
        };
        let total = self.layout.size();
        for size in [0, total] {
            f.set_len(size)
                .map_err(|source| MemoryError::Truncate { size, source })?;
        }
        self.forget_all();
        self.opened_with_data.store(false, Ordering::Release);
        Ok(())
    }

    /// The vm-memory view every device uses (cheap to clone: regions are shared).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    pub fn backing(&self) -> &MemoryBackend {
        &self.backing
    }

    /// (guest address, size, host address) of each region, for KVM memslots.
    pub fn slots(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.regions.iter().map(|r| (r.gpa, r.size, r.host as u64))
    }

    /// RAM ranges in guest-physical order.
    pub fn ranges(&self) -> Vec<GpaRange> {
        self.regions
            .iter()
            .map(|r| GpaRange::new(r.gpa, r.size))
            .collect()
    }

    fn region_of(&self, range: GpaRange) -> Option<&RegionBacking> {
        let end = range.end()?;
        self.regions
            .iter()
            .find(|r| range.start >= r.gpa && end <= r.gpa + r.size)
    }

    fn punch(&self, file_offset: u64, len: u64, range: GpaRange) -> Result<(), DiscardError> {
        let Some(f) = &self.file else {
            return Err(DiscardError::OutOfRange(range));
        };
        punch_hole(f.as_raw_fd(), file_offset, len)
            .map_err(|source| DiscardError::Syscall { range, source })
    }

    /// A discard of memfd RAM: its pieces, grouped by file, are punched
    /// by all discard threads when the range is long (each taking turns of
    /// files no other thread is punching, see `crate::punch::Shared`),
    /// else here, file after file.
    fn discard_striped(
        &self,
        region: &RegionBacking,
        range: GpaRange,
    ) -> Result<DiscardOutcome, DiscardError> {
        let stripes = self
            .stripes
            .as_ref()
            .ok_or(DiscardError::OutOfRange(range))?;
        let offset = region.file_offset + (range.start - region.gpa);
        let mut per_file = vec![Vec::new(); stripes.count()];
        for p in stripes.pieces(offset, range.len) {
            per_file[p.file].push((p.offset, p.len));
        }
        // A long discard is punched by every discard thread, each through
        // its punch helper process where there is one (see `crate::punch`:
        // blimp's threads then sleep, and no CPU is interrupted to flush
        // its TLB).
        let long = range.len >= discard_workers::PARALLEL_MIN;
        let (syscalls, r) = match &self.workers {
            Some(w) if long => {
                let fds: Vec<_> = (0..stripes.count()).map(|i| stripes.fd(i)).collect();
                let sched = std::sync::Arc::new(crate::punch::Shared::new(fds, per_file));
                let parts: Vec<Part> = (0..w.parts())
                    .map(|i| {
                        let sched = sched.clone();
                        Box::new(move || sched.serve(crate::punch::helper(i))) as Part
                    })
                    .collect();
                w.run(parts)
            }
            _ => {
                let parts: Vec<Part> = per_file
                    .into_iter()
                    .enumerate()
                    .filter(|(_, pieces)| !pieces.is_empty())
                    .map(|(i, pieces)| {
                        let fd = stripes.fd(i);
                        Box::new(move || crate::punch::punch_pieces(fd, &pieces)) as Part
                    })
                    .collect();
                discard_workers::run_here(parts)
            }
        };
        r.map_err(|source| DiscardError::Syscall { range, source })?;
        Ok(DiscardOutcome {
            bytes_released: range.len,
            syscalls,
        })
    }

    fn discard_huge(
        &self,
        region: &RegionBacking,
        range: GpaRange,
        remember_partial: bool,
    ) -> Result<DiscardOutcome, DiscardError> {
        let mut out = DiscardOutcome::default();
        let start_off = region.file_offset + (range.start - region.gpa);
        let end_off = start_off + range.len;
        let first_huge = start_off / HUGE_PAGE_SIZE;
        let last_huge = (end_off - 1) / HUGE_PAGE_SIZE;
        let mut partial = self.partial_huge.lock().unwrap_or_else(|p| p.into_inner());
        // Whole huge pages inside the range are punched together; partial ones are
        // tracked until all their 4 KiB pages have been discarded.
        let mut run: Option<(u64, u64)> = None; // (first, count) of complete huge pages
        for h in first_huge..=last_huge {
            let hs = h * HUGE_PAGE_SIZE;
            let lo = start_off.max(hs);
            let hi = end_off.min(hs + HUGE_PAGE_SIZE);
            let complete = if hi - lo == HUGE_PAGE_SIZE {
                partial.remove(&h);
                true
            } else if !remember_partial {
                false
            } else {
                let bits = partial.entry(h).or_insert([0; 8]);
                let done = mark_small_pages(bits, lo - hs, hi - hs);
                if done {
                    partial.remove(&h);
                }
                done
            };
            if complete {
                run = match run {
                    Some((f, c)) if f + c == h => Some((f, c + 1)),
                    Some((f, c)) => {
                        self.punch(f * HUGE_PAGE_SIZE, c * HUGE_PAGE_SIZE, range)?;
                        out += DiscardOutcome {
                            bytes_released: c * HUGE_PAGE_SIZE,
                            syscalls: 1,
                        };
                        Some((h, 1))
                    }
                    None => Some((h, 1)),
                };
            }
        }
        if let Some((f, c)) = run {
            self.punch(f * HUGE_PAGE_SIZE, c * HUGE_PAGE_SIZE, range)?;
            out += DiscardOutcome {
                bytes_released: c * HUGE_PAGE_SIZE,
                syscalls: 1,
            };
        }
        Ok(out)
    }
}

/// How `backing` releases memory, and its file(s): a shared file for
/// hugetlb and `file=PATH` (`opened` in PATH's stead when given), striped
/// memfds (two per discard thread) for memfd, none for anon.
fn backing_files(
    backing: &MemoryBackend,
    total: u64,
    workers: Option<&DiscardWorkers>,
    opened: Option<File>,
) -> Result<(DiscardKind, Option<File>, Option<Stripes>), MemoryError> {
    Ok(match backing {
        MemoryBackend::Anon => (DiscardKind::PrivateAnon, None, None),
        MemoryBackend::Memfd => {
            let threads = workers.map_or(1, DiscardWorkers::parts);
            let stripes = striped_memfd(crate::ram_stripes::files_for(threads), total)?;
            (DiscardKind::StripedPunch, None, Some(stripes))
        }
        MemoryBackend::Hugetlb => {
            let needed = total.div_ceil(HUGE_PAGE_SIZE);
            let free = free_huge_pages();
            if free < needed || !total.is_multiple_of(HUGE_PAGE_SIZE) {
                return Err(MemoryError::NoHugePages {
                    size_mib: total >> 20,
                    free,
                    needed,
                });
            }
            let f = memfd(
                "blimp-guest-ram",
                libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            )
            .map_err(MemoryError::Memfd)?;
            (DiscardKind::HugePunch, Some(f), None)
        }
        MemoryBackend::File(path) => {
            let f = match opened {
                Some(f) => {
                    lock_file(&f, path)?;
                    f
                }
                None => open_file(path)?,
            };
            (DiscardKind::PunchHole, Some(f), None)
        }
    })
}

/// memfd RAM of `total` bytes over `n` files.
fn striped_memfd(n: usize, total: u64) -> Result<Stripes, MemoryError> {
    let files = (0..n)
        .map(|i| memfd(&format!("blimp-guest-ram{i}"), libc::MFD_CLOEXEC))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(MemoryError::Memfd)?;
    Stripes::new(files, total).map_err(|source| MemoryError::Truncate {
        size: total,
        source,
    })
}

fn open_file(path: &Path) -> Result<File, MemoryError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| MemoryError::File {
            path: path.to_path_buf(),
            source,
        })?;
    // A device node (/dev/null, /dev/zero, a disk) is no RAM backing.
    let kind = f
        .metadata()
        .map(|m| m.file_type())
        .map_err(|source| MemoryError::File {
            path: path.to_path_buf(),
            source,
        })?;
    if !kind.is_file() {
        return Err(not_regular(path));
    }
    lock_file(&f, path)?;
    Ok(f)
}

/// A `file=PATH` that is a device node, FIFO, socket or directory.
fn not_regular(path: &Path) -> MemoryError {
    MemoryError::File {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a device node, FIFO, socket or directory cannot back guest RAM)",
        ),
    }
}

/// Take `path`'s exclusive lock (flock), held while `f` stays open: every
/// `file=PATH` backing holds it, so a second blimp (a run, a restore, a
/// migration's destination on this host) cannot map the same file as its
/// guest's RAM and write its guest over a running one.
fn lock_file(f: &File, path: &Path) -> Result<(), MemoryError> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function's caller owns; it touches
    // no memory.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let source = std::io::Error::last_os_error();
    Err(if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
        MemoryError::FileInUse {
            path: path.to_path_buf(),
        }
    } else {
        MemoryError::File {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Lock an existing `file=PATH` backing without using it (see
/// [`lock_file`]): refused when a running VM uses it, or when it is no
/// regular file (looked at before it is opened: opening a FIFO would
/// block). `None` when there is no such file yet. Held as long as the
/// returned file stays open.
pub fn hold_backing_file(path: &Path) -> Result<Option<File>, MemoryError> {
    if std::fs::metadata(path).is_ok_and(|m| !m.file_type().is_file()) {
        return Err(not_regular(path));
    }
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(MemoryError::File {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    lock_file(&f, path)?;
    Ok(Some(f))
}

/// A `file=PATH` backing claimed for a restore (see [`claim_backing_file`]).
pub struct ClaimedFile {
    /// Holds PATH's lock while it stays open.
    pub file: File,
    /// Device and inode of the empty file created at PATH when nothing
    /// was there (to be removed if the restore does not replace it).
    pub created: Option<(u64, u64)>,
}

/// Lock `path` for a restore that will replace it: the existing file's
/// lock (refused when a running VM holds it), or, when nothing is there, a
/// new empty file (`O_EXCL`, mode 0600) made only to hold the lock, so that
/// two restores onto one new PATH cannot both go ahead and the second
/// rename the first one's RAM away. A dangling symlink is refused.
pub fn claim_backing_file(path: &Path) -> Result<ClaimedFile, MemoryError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file_err = |source| MemoryError::File {
        path: path.to_path_buf(),
        source,
    };
    // Created here, or found by another's O_EXCL: a file removed in
    // between (a failed restore's placeholder) is tried again, a few times.
    for _ in 0..3 {
        let created = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path);
        match created {
            Ok(f) => {
                lock_file(&f, path)?;
                let meta = f.metadata().map_err(file_err)?;
                return Ok(ClaimedFile {
                    file: f,
                    created: Some((meta.dev(), meta.ino())),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if let Some(f) = hold_backing_file(path)? {
                    return Ok(ClaimedFile {
                        file: f,
                        created: None,
                    });
                }
            }
            Err(source) => return Err(file_err(source)),
        }
    }
    Err(file_err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "it names nothing that can be opened (a symbolic link to nothing?)",
    )))
}

impl GuestRam {
    /// A discard of `range`: of the balloon's pages when `remember_partial`,
    /// else of free pages the guest keeps (see `RamDiscard::discard_free`),
    /// where a huge page only partly given up is left as it is and not
    /// remembered, since the guest may be using those 4 KiB pages again by
    /// the time the rest of the huge page comes.
    fn release(
        &self,
        range: GpaRange,
        remember_partial: bool,
    ) -> Result<DiscardOutcome, DiscardError> {
        if range.len == 0
            || !range.start.is_multiple_of(PAGE_SIZE)
            || !range.len.is_multiple_of(PAGE_SIZE)
        {
            return Err(DiscardError::OutOfRange(range));
        }
        let region = self
            .region_of(range)
            .ok_or(DiscardError::OutOfRange(range))?;
        match self.kind {
            DiscardKind::PrivateAnon => {
                let addr = region.host as usize + (range.start - region.gpa) as usize;
                let len = range.len as usize;
                // SAFETY: [addr, +len) lies inside this region's private
                // anonymous mapping (checked by region_of), which lives as
                // long as self; MADV_DONTNEED only replaces its pages with
                // zero pages, which is what the guest agreed to by giving
                // them up.
                let (syscalls, r) = unsafe {
                    match &self.workers {
                        Some(w) => w.madvise_dontneed(addr, len),
                        None => (1, discard_workers::dontneed(addr, len)),
                    }
                };
                r.map_err(|source| DiscardError::Syscall { range, source })?;
                Ok(DiscardOutcome {
                    bytes_released: range.len,
                    syscalls,
                })
            }
            DiscardKind::PunchHole => {
                // Long ranges (chunked inflates) are punched in pieces: one
                // 7 GiB punch of a mapped memfd measured about twice the
                // time of the same bytes in 1 MiB punches on this host.
                let Some(f) = &self.file else {
                    return Err(DiscardError::OutOfRange(range));
                };
                let off = region.file_offset + (range.start - region.gpa);
                let (syscalls, r) = punch_pieces(f.as_raw_fd(), &[(off, range.len)]);
                r.map_err(|source| DiscardError::Syscall { range, source })?;
                Ok(DiscardOutcome {
                    bytes_released: range.len,
                    syscalls,
                })
            }
            DiscardKind::StripedPunch => self.discard_striped(region, range),
            DiscardKind::HugePunch => self.discard_huge(region, range, remember_partial),
        }
    }
}

impl GuestRam {
    /// Allocate the backing file's blocks under `range` (a `file=PATH`
    /// backing; the others have nothing to allocate ahead), for a restore
    /// about to write those pages: a filesystem without room says ENOSPC
    /// here, where the write through the mapping would be a SIGBUS.
    pub fn reserve(&self, range: GpaRange) -> std::io::Result<()> {
        if self.kind != DiscardKind::PunchHole {
            return Ok(());
        }
        let Some(f) = &self.file else {
            return Ok(());
        };
        let region = self
            .region_of(range)
            .ok_or_else(|| std::io::Error::other(format!("{range} is not in guest RAM")))?;
        let off = region.file_offset + (range.start - region.gpa);
        let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(range.len)) else {
            return Err(std::io::Error::other("offset out of range"));
        };
        // SAFETY: fallocate(2) on a descriptor this RAM owns, mode 0 (it
        // only allocates blocks, never changes bytes); no memory is passed.
        if unsafe { libc::fallocate(f.as_raw_fd(), 0, off, len) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl GuestRam {
    /// Calls `part(gpa, len)` for each piece of `[gpa, gpa + len)` (inside
    /// one RAM region, else all of it) that may hold data, in order,
    /// page-aligned; the rest reads as zero. Anon RAM: all of it (a read
    /// of a page it never had maps the zero page). A shared backing (memfd,
    /// hugetlb, `file=PATH`): only what its files hold, as a read through
    /// the mapping would allocate the rest (see `crate::ram_holes`).
    pub fn data_parts(&self, gpa: u64, len: u64, part: &mut dyn FnMut(u64, u64)) {
        let Some(region) = self.region_of(GpaRange::new(gpa, len)) else {
            part(gpa, len);
            return;
        };
        let within = gpa - region.gpa;
        let ram_off = region.file_offset + within;
        match (self.kind, &self.file, &self.stripes) {
            (DiscardKind::PunchHole, Some(f), _) => {
                ram_holes::file_data(f.as_raw_fd(), ram_off, len, &mut |o, l| {
                    part(gpa + (o - ram_off), l);
                });
            }
            (DiscardKind::StripedPunch, _, Some(st)) => {
                for p in st.pieces(ram_off, len) {
                    let at = gpa + (p.ram_offset - ram_off);
                    ram_holes::file_data(st.fd(p.file), p.offset, p.len, &mut |o, l| {
                        part(at + (o - p.offset), l);
                    });
                }
            }
            (DiscardKind::HugePunch, _, _) if gpa.is_multiple_of(PAGE_SIZE) => {
                let host = region.host.wrapping_add(within as usize);
                ram_holes::resident(host, len, &mut |o, l| part(gpa + o, l));
            }
            _ => part(gpa, len),
        }
    }
}

#[cfg(test)]
impl GuestRam {
    /// Bytes of host memory the backing's files hold (their allocated
    /// blocks); 0 for anon RAM.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let file = self
            .file
            .as_ref()
            .map_or(0, |f| f.metadata().map_or(0, |m| m.blocks() * 512));
        file + self
            .stripes
            .as_ref()
            .map_or(0, |s| s.allocated().iter().sum())
    }
}

impl RamDiscard for GuestRam {
    fn discard(&self, range: GpaRange) -> Result<DiscardOutcome, DiscardError> {
        self.release(range, true)
    }

    fn discard_free(&self, range: GpaRange) -> Result<DiscardOutcome, DiscardError> {
        self.release(range, false)
    }

    fn forget_all(&self) {
        self.partial_huge
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn will_need(&self, range: GpaRange) {
        if self.kind != DiscardKind::HugePunch || range.len == 0 {
            return;
        }
        // Pages given back to the guest no longer count towards a partial huge page.
        let Some(region) = self.region_of(range) else {
            return;
        };
        let start = region.file_offset + (range.start - region.gpa);
        let end = start + range.len;
        let mut partial = self.partial_huge.lock().unwrap_or_else(|p| p.into_inner());
        for h in start / HUGE_PAGE_SIZE..=(end - 1) / HUGE_PAGE_SIZE {
            let hs = h * HUGE_PAGE_SIZE;
            if let Some(bits) = partial.get_mut(&h) {
                for page in (start.max(hs) - hs) / PAGE_SIZE
                    ..(end.min(hs + HUGE_PAGE_SIZE) - hs) / PAGE_SIZE
                {
                    bits[(page / 64) as usize] &= !(1 << (page % 64));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn rss_of(ram: &GuestRam) -> u64 {
        // Resident bytes of our mappings, from mincore.
        let mut total = 0;
        for r in &ram.regions {
            let pages = (r.size / PAGE_SIZE) as usize;
            let mut vec = vec![0u8; pages];
            // SAFETY: host/size describe a live mapping owned by `ram`; vec has one
            // byte per page as mincore requires.
            let rc = unsafe { libc::mincore(r.host.cast(), r.size as usize, vec.as_mut_ptr()) };
            assert_eq!(rc, 0);
            total += vec.iter().filter(|b| *b & 1 != 0).count() as u64 * PAGE_SIZE;
        }
        total
    }

    fn touch(ram: &GuestRam, start: u64, len: u64) {
        let mut a = start;
        while a < start + len {
            ram.memory().write_obj(0xabu8, GuestAddress(a)).unwrap();
            a += PAGE_SIZE;
        }
    }

    /// Every page of `range` reads zero; the pages either side keep the
    /// data [`touch`] wrote.
    fn assert_discarded_alone(ram: &GuestRam, range: GpaRange) {
        let mut buf = vec![1u8; range.len as usize];
        ram.memory()
            .read_slice(&mut buf, GuestAddress(range.start))
            .unwrap();
        assert!(
            buf.iter().all(|b| *b == 0),
            "every page of the range reads zero"
        );
        for a in [range.start - PAGE_SIZE, range.start + range.len] {
            let v: u8 = ram.memory().read_obj(GuestAddress(a)).unwrap();
            assert_eq!(v, 0xab, "page at {a:#x} outside the range keeps its data");
        }
    }

    #[test]
    fn an_existing_file_backing_is_zeroed_on_request() {
        let path = std::env::temp_dir().join(format!("blimp-ram-zero-{}", std::process::id()));
        let size = 16u64 << 20;
        std::fs::write(&path, vec![0xaau8; size as usize]).unwrap();
        let layout = MemoryLayout::new(size).unwrap();
        let ram = GuestRam::new(&layout, &MemoryBackend::File(path.clone())).unwrap();
        assert!(!ram.is_zeroed());
        assert_eq!(
            ram.memory().read_obj::<u8>(GuestAddress(0x5000)).unwrap(),
            0xaa
        );
        ram.ensure_zeroed().unwrap();
        assert!(ram.is_zeroed());
        let mut buf = vec![1u8; size as usize];
        ram.memory().read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert!(
            buf.iter().all(|b| *b == 0),
            "RAM reads zero after ensure_zeroed"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        // Still a working shared mapping of the file.
        ram.memory()
            .write_obj(0x5au8, GuestAddress(0x3000))
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[0x3000], 0x5a);
        drop(ram);
        // A new (empty) file and the anonymous backings are zero from the start.
        std::fs::remove_file(&path).unwrap();
        let ram = GuestRam::new(&layout, &MemoryBackend::File(path.clone())).unwrap();
        assert!(ram.is_zeroed());
        drop(ram);
        std::fs::remove_file(&path).unwrap();
        for b in [MemoryBackend::Anon, MemoryBackend::Memfd] {
            assert!(GuestRam::new(&layout, &b).unwrap().is_zeroed());
        }
    }

    #[test]
    fn anon_discard_releases_and_zeroes() {
        let layout = MemoryLayout::new(32 << 20).unwrap();
        let ram = GuestRam::new(&layout, &MemoryBackend::Anon).unwrap();
        touch(&ram, 8 << 20, 8 << 20);
        let before = rss_of(&ram);
        let out = ram.discard(GpaRange::new(8 << 20, 8 << 20)).unwrap();
        assert_eq!(
            out,
            DiscardOutcome {
                bytes_released: 8 << 20,
                syscalls: 1
            }
        );
        assert!(before - rss_of(&ram) >= 8 << 20);
        let v: u8 = ram.memory().read_obj(GuestAddress(8 << 20)).unwrap();
        assert_eq!(v, 0);
    }

    /// A long anonymous discard is cut into one piece per discard thread;
    /// every page of the range reads zero and is released, and the pages
    /// either side (a length that does not divide evenly included) keep
    /// their data.
    #[test]
    fn a_long_anon_discard_is_shared_by_the_workers_and_misses_no_page() {
        let layout = MemoryLayout::new(128 << 20).unwrap();
        let ram = GuestRam::new(&layout, &MemoryBackend::Anon).unwrap();
        let parts = ram.workers.as_ref().map_or(1, |w| w.parts()) as u64;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        assert_eq!(
            parts,
            cpus.clamp(1, 4),
            "one discard thread per CPU, at most 4"
        );
        // 32 MiB + 3 pages from 8 MiB - 1 page: odd pieces, odd ends.
        let range = GpaRange::new(
            (8 << 20) - PAGE_SIZE,
            discard_workers::PARALLEL_MIN + 3 * PAGE_SIZE,
        );
        touch(&ram, 0, 64 << 20);
        let before = rss_of(&ram);
        let out = ram.discard(range).unwrap();
        assert_eq!(out.bytes_released, range.len);
        assert_eq!(out.syscalls, parts, "one madvise call per thread");
        assert_eq!(
            before - rss_of(&ram),
            range.len,
            "exactly the range released"
        );
        assert_discarded_alone(&ram, range);
        // Shorter than PARALLEL_MIN: one call, here.
        touch(&ram, 48 << 20, 1 << 20);
        let out = ram.discard(GpaRange::new(48 << 20, 1 << 20)).unwrap();
        assert_eq!(out.syscalls, 1);
    }

    /// memfd RAM lies in its files as `ram_stripes` says, in both regions
    /// of a guest above 4 GiB.
    #[test]
    fn memfd_ram_lands_in_its_stripes() {
        use crate::ram_stripes::STRIPE;
        let layout = MemoryLayout::new(5 << 30).unwrap();
        let ram = GuestRam::new(&layout, &MemoryBackend::Memfd).unwrap();
        let stripes = ram.stripes.as_ref().expect("memfd RAM is striped");
        let parts = ram.workers.as_ref().map_or(1, |w| w.parts());
        assert_eq!(
            stripes.count(),
            crate::ram_stripes::files_for(parts),
            "two files per discard thread"
        );
        for r in &ram.regions {
            for at in [0, STRIPE - 8, STRIPE, 3 * STRIPE + 4096, r.size - 8] {
                let gpa = r.gpa + at;
                let marker = gpa ^ 0x5a5a_5a5a_5a5a_5a5a;
                ram.memory().write_obj(marker, GuestAddress(gpa)).unwrap();
                let p = stripes.pieces(r.file_offset + at, 8).next().unwrap();
                let mut buf = [0u8; 8];
                stripes.read_at(p.file, &mut buf, p.offset).unwrap();
                assert_eq!(u64::from_ne_bytes(buf), marker, "gpa {gpa:#x} in {p:?}");
            }
        }
    }

    /// A long memfd discard spanning stripes is punched by the discard
    /// threads in turns of idle files: exactly the range's pages leave the
    /// files, read zero, and the pages either side keep their data.
    #[test]
    fn a_long_memfd_discard_is_punched_per_file_and_misses_no_page() {
        let layout = MemoryLayout::new(640 << 20).unwrap();
        let ram = GuestRam::new(&layout, &MemoryBackend::Memfd).unwrap();
        let stripes = ram.stripes.as_ref().unwrap();
        let range = GpaRange::new((200 << 20) - PAGE_SIZE, (400 << 20) + 3 * PAGE_SIZE);
        touch(&ram, 192 << 20, 416 << 20);
        let before: u64 = stripes.allocated().iter().sum();
        let out = ram.discard(range).unwrap();
        assert_eq!(out.bytes_released, range.len);
        // 56 + 256 + 88 MiB pieces (and a page each side), 16 MiB a call.
        assert!(out.syscalls >= 26, "{out:?}");
        let after: u64 = stripes.allocated().iter().sum();
        assert_eq!(before - after, range.len, "exactly the range released");
        assert_discarded_alone(&ram, range);
    }

    /// The `THPeligible:` line of the mapping holding `host` in
    /// /proc/self/smaps (the kernel may have merged it with a neighbour).
    fn thp_eligible(host: *mut u8) -> bool {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let addr = host as usize;
        let holds = |l: &str| {
            let Some((range, _)) = l.split_once(' ') else {
                return false;
            };
            let Some((a, b)) = range.split_once('-') else {
                return false;
            };
            match (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                (Ok(a), Ok(b)) => a <= addr && addr < b,
                _ => false,
            }
        };
        let mut lines = smaps.lines().skip_while(|l| !holds(l));
        assert!(lines.next().is_some(), "mapping of {addr:#x} in smaps");
        let line = lines
            .find(|l| l.starts_with("THPeligible:"))
            .expect("THPeligible in smaps");
        line.split_whitespace().nth(1) == Some("1")
    }

    /// `--memory-thp`: every region of anon and memfd RAM is MADV_HUGEPAGE
    /// and the kernel holds it eligible exactly where the host's THP
    /// setting says it should; hugetlb refuses it.
    #[test]
    fn thp_is_asked_for_on_every_region_and_refused_on_hugetlb() {
        // Above 4 GiB too: two regions.
        let layout = MemoryLayout::new(5 << 30).unwrap();
        for backing in [MemoryBackend::Anon, MemoryBackend::Memfd] {
            let (honoured, file) = thp_honoured(&backing).expect("this host has THP sysfs");
            let ram = GuestRam::with_thp(&layout, &backing, true).unwrap();
            assert_eq!(ram.regions.len(), 2);
            for r in &ram.regions {
                assert_eq!(
                    thp_eligible(r.host),
                    honoured,
                    "{backing:?} region at {:#x} with {file} honoured={honoured}",
                    r.gpa
                );
            }
            let plain = GuestRam::new(&layout, &backing).unwrap();
            let setting = std::fs::read_to_string(file).unwrap();
            if setting.contains("[madvise]") || setting.contains("[advise]") {
                // Only asked-for mappings get huge pages on such a host.
                assert!(
                    !thp_eligible(plain.regions[0].host),
                    "{backing:?} without --memory-thp"
                );
            }
        }
        assert!(matches!(
            GuestRam::with_thp(&layout, &MemoryBackend::Hugetlb, true),
            Err(MemoryError::ThpOnHugetlb)
        ));
    }

    #[test]
    fn memfd_discard_punches_holes() {
        let layout = MemoryLayout::new(32 << 20).unwrap();
        let ram = GuestRam::new(&layout, &MemoryBackend::Memfd).unwrap();
        touch(&ram, 0, 4 << 20);
        let out = ram.discard(GpaRange::new(0, 4 << 20)).unwrap();
        assert_eq!(out.syscalls, 1);
        let v: u8 = ram.memory().read_obj(GuestAddress(4096)).unwrap();
        assert_eq!(v, 0, "punched pages read back as zero");
    }

    #[test]
    fn huge_page_bits_need_every_small_page() {
        let mut bits = [0u64; 8];
        assert!(!mark_small_pages(&mut bits, 0, 4096));
        // Discarding the same page again does not complete the huge page.
        assert!(!mark_small_pages(&mut bits, 0, 4096));
        assert!(!mark_small_pages(&mut bits, 4096, HUGE_PAGE_SIZE - 4096));
        assert!(mark_small_pages(
            &mut bits,
            HUGE_PAGE_SIZE - 4096,
            HUGE_PAGE_SIZE
        ));
    }

    /// Free pages the guest keeps (reported or hinted) never count towards
    /// a partly given-up huge page, and a reset forgets the balloon's: else
    /// the huge page would be punched when its last 4 KiB page comes,
    /// zeroing the pages the guest had taken back meanwhile.
    #[test]
    fn a_huge_page_is_punched_only_once_the_balloon_holds_all_of_it() {
        let path = std::env::temp_dir().join(format!("blimp-huge-test-{}", std::process::id()));
        let layout = MemoryLayout::new(32 << 20).unwrap();
        let mut ram = GuestRam::new(&layout, &MemoryBackend::File(path.clone())).unwrap();
        // hugetlbfs's rules over a plain file: this host may have no huge pages.
        ram.kind = DiscardKind::HugePunch;
        let h = HUGE_PAGE_SIZE;
        let half = |at: u64| GpaRange::new(at, h / 2);
        let put = |at: u64| ram.memory().write_obj(7u8, GuestAddress(at)).unwrap();
        let get = |at: u64| ram.memory().read_obj::<u8>(GuestAddress(at)).unwrap();
        let released = |r: Result<DiscardOutcome, DiscardError>| r.unwrap().bytes_released;
        // Half of huge page 0 is reported free; the guest uses it again;
        // the balloon takes the other half: nothing may be punched.
        assert_eq!(released(ram.discard_free(half(0))), 0);
        put(0);
        assert_eq!(released(ram.discard(half(h / 2))), 0);
        assert_eq!(get(0), 7, "the guest's page survives");
        // Once the balloon holds the first half too, the huge page goes.
        assert_eq!(released(ram.discard(half(0))), h);
        assert_eq!(get(0), 0);
        // Half of huge page 1 in the balloon, then a device reset: the
        // guest has it all back, and a later inflate of the other half
        // leaves the first alone.
        assert_eq!(released(ram.discard(half(h))), 0);
        ram.forget_all();
        put(h);
        assert_eq!(released(ram.discard(half(h + h / 2))), 0);
        assert_eq!(get(h), 7, "the guest's page survives the reset");
        // A whole huge page reported free is released at once.
        put(2 * h);
        assert_eq!(released(ram.discard_free(GpaRange::new(2 * h, h))), h);
        assert_eq!(get(2 * h), 0);
        drop(ram);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn discard_outside_ram_is_refused() {
        let layout = MemoryLayout::new(32 << 20).unwrap();
        let ram = GuestRam::new(&layout, &MemoryBackend::Anon).unwrap();
        for r in [
            GpaRange::new(32 << 20, 4096),
            GpaRange::new((32 << 20) - 4096, 8192),
            GpaRange::new(0xd000_0000, 4096),
            GpaRange::new(u64::MAX - 4095, 4096),
            GpaRange::new(4096, 0),
            GpaRange::new(100, 4096),
        ] {
            assert!(ram.discard(r).is_err(), "{r} must be refused");
        }
    }

    #[test]
    fn file_backing_and_high_memory_slots() {
        let dir = std::env::temp_dir().join(format!("blimp-mem-test-{}", std::process::id()));
        let layout = MemoryLayout::new(32 << 20).unwrap();
        let ram = GuestRam::new(&layout, &MemoryBackend::File(dir.clone())).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().len(), 32 << 20);
        touch(&ram, 0, 1 << 20);
        ram.discard(GpaRange::new(0, 1 << 20)).unwrap();
        drop(ram);
        std::fs::remove_file(&dir).unwrap();
        // An unopenable path names itself in the error.
        let e = GuestRam::new(&layout, &MemoryBackend::File("/nonexistent/dir/x".into()))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/nonexistent/dir/x"), "{e}");
    }
}
