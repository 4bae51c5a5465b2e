//! Writing a migration stream or snapshot to a file without ever damaging
//! what was there before, and without leaving a half-written file behind.
//!
//! [`AtomicFile::create`] refuses a target that exists and is not a regular
//! file (checked with `lstat`, so a symlink is refused, not followed), or
//! is a non-empty file that is not a stream (no `BLIMPMIG` at its start: a
//! user's file a wrong path named), and
//! writes into a new, unnamed file in the same directory (`O_TMPFILE`, mode
//! 0600): until it is complete no name leads to it, so a process killed
//! with SIGKILL (or a host crash) while writing leaves nothing behind; the
//! kernel frees it with its last descriptor. [`AtomicFile::commit`] fsyncs
//! it and names it: with linkat(2) (through `/proc/self/fd/N`) at the
//! target itself when nothing is there, else at a temporary name
//! (`.NAME.blimp-tmp.PID.N`) that is at once renamed over the target
//! (rename(2) replaces a regular file atomically: a reader sees the old or
//! the new file, never a mix); then it fsyncs the directory. Only a kill
//! in the microseconds between that linkat and the rename leaves a
//! (complete) temporary file. Dropping it, or [`AtomicFile::abort`],
//! leaves the target byte-identical to what it was before and no file.
//!
//! Where the filesystem has no `O_TMPFILE` (EOPNOTSUPP, EISDIR, EINVAL),
//! or `/proc` is not mounted, the file is written under the temporary name
//! from the start (`O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC`, mode 0600); a
//! failure or cancel removes it, but a SIGKILL while writing leaves it.
//! Such leftovers go with the next `create` for the same target (see
//! `Target::remove_stale_temps`): every writer locks its file (`flock`),
//! and only unlocked ones of processes that are gone are removed.
//!
//! A restore onto `--memory-backend file=PATH` builds the guest's RAM the
//! same way ([`AtomicFile::create_rw`], mapped while it is written, and
//! [`AtomicFile::commit_unsynced`]).
//!
//! The result always has mode 0600 (less the umask) and belongs to the VMM's
//! user: the mode and owner of a file it replaces are not carried over. A
//! snapshot holds guest memory; widening access is left to an explicit chmod.
//!
//! Left open: the target is checked again right before the rename, but
//! someone who can write the directory could still swap in a device node or
//! FIFO between that check and the rename; the rename would then replace
//! that directory entry (it never writes into the node, and a symlink put
//! there is replaced, not followed). Likewise the temporary file is checked
//! to still be ours (device and inode) before the rename and before its
//! removal, which narrows, but cannot close, the window for someone who
//! swaps it.

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::stream::MAGIC;

/// Longest part of the target's name kept in the temporary file's name, so
/// that the temporary name stays under NAME_MAX (255).
const MAX_NAME_IN_TEMP: usize = 200;
/// How many temporary names to try before giving up (each taken name is
/// someone else's file, left alone).
const TEMP_ATTEMPTS: u32 = 100;
/// The `N` of the next temporary name (`.NAME.blimp-tmp.PID.N`).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// What a path found where a file was to be written is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Symlink,
    Directory,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
    Unknown,
}

impl FileKind {
    fn of(meta: &Metadata) -> Option<FileKind> {
        Self::of_type(meta.file_type())
    }

    /// What `t` is, `None` for a regular file.
    pub fn of_type(t: std::fs::FileType) -> Option<FileKind> {
        if t.is_file() {
            return None;
        }
        Some(if t.is_symlink() {
            FileKind::Symlink
        } else if t.is_dir() {
            FileKind::Directory
        } else if t.is_char_device() {
            FileKind::CharDevice
        } else if t.is_block_device() {
            FileKind::BlockDevice
        } else if t.is_fifo() {
            FileKind::Fifo
        } else if t.is_socket() {
            FileKind::Socket
        } else {
            FileKind::Unknown
        })
    }
}

impl std::fmt::Display for FileKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileKind::Symlink => "a symbolic link",
            FileKind::Directory => "a directory",
            FileKind::CharDevice => "a character device",
            FileKind::BlockDevice => "a block device",
            FileKind::Fifo => "a FIFO",
            FileKind::Socket => "a socket",
            FileKind::Unknown => "not a regular file",
        })
    }
}

/// Why a file destination was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path} does not name a file (it ends with '/', '.' or '..')")]
    NoFileName { path: PathBuf },
    #[error("refusing to write {path}: it is {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: FileKind },
    #[error(
        "refusing to replace {path}: another process holds its lock (it is the guest RAM of a running VM, --memory-backend file=..., or otherwise in use)"
    )]
    InUse { path: PathBuf },
    #[error(
        "refusing to replace {path}: it is not a Blimp snapshot or migration stream (it does not start with BLIMPMIG), and a snapshot would destroy it; remove it first or choose another path"
    )]
    NotAStream { path: PathBuf },
    #[error("cannot inspect {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}: directory {dir} does not exist")]
    NoDirectory { path: PathBuf, dir: PathBuf },
    #[error("cannot write {path}: {dir} is not a directory")]
    ParentNotDirectory { path: PathBuf, dir: PathBuf },
    #[error("cannot create a temporary file {temp} for {path}: {source}")]
    CreateTemp {
        path: PathBuf,
        temp: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot sync {temp} (the new {path}): {source}")]
    Sync {
        path: PathBuf,
        temp: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("temporary file {temp} was replaced by someone else; {path} left unchanged")]
    TempReplaced { path: PathBuf, temp: PathBuf },
    #[error("cannot give the complete {path} the name {temp}: {source}")]
    Link {
        path: PathBuf,
        temp: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot rename {temp} over {path}: {source}")]
    Rename {
        path: PathBuf,
        temp: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where a target lives: its directory (`.` for a bare name) and the path
/// used for every operation (directory joined with the name, so that a
/// trailing slash never makes the kernel follow a symlink).
struct Target {
    /// The path as given, for messages.
    given: PathBuf,
    dir: PathBuf,
    name: OsString,
    path: PathBuf,
}

impl Target {
    fn new(given: &Path) -> Result<Target, Error> {
        let bytes = given.as_os_str().as_bytes();
        let last = bytes.rsplit(|b| *b == b'/').next().unwrap_or_default();
        if last.is_empty() || last == b"." || last == b".." {
            return Err(Error::NoFileName {
                path: given.to_path_buf(),
            });
        }
        let name = OsStr::from_bytes(last).to_os_string();
        let dir = match given.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let path = dir.join(&name);
        Ok(Target {
            given: given.to_path_buf(),
            dir,
            name,
            path,
        })
    }

    /// `lstat` the target: `None` when it does not exist, an error unless it
    /// is a regular file.
    fn check(&self) -> Result<Option<Metadata>, Error> {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) => match FileKind::of(&meta) {
                None => Ok(Some(meta)),
                Some(kind) => Err(Error::NotRegular {
                    path: self.given.clone(),
                    kind,
                }),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Stat {
                path: self.given.clone(),
                source,
            }),
        }
    }

    /// Refuse an existing target that another process holds a lock on:
    /// every `--memory-backend file=PATH` VM holds its file's (see
    /// `memory::lock_file`), and renaming a stream over it would leave
    /// that VM's RAM on a deleted file and its lock guarding nothing.
    /// A target that cannot be opened to probe is left to the rename.
    fn check_unlocked(&self) -> Result<(), Error> {
        let Some((file, _)) = open_regular(&self.path) else {
            return Ok(());
        };
        match file.try_lock_shared() {
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::InUse {
                path: self.given.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Refuse an existing target that is not empty and not a stream: a
    /// stream replaces an older stream (or an empty file), never a file
    /// of another kind that a wrong path (a typo, or an API client's
    /// request) named. A target that cannot be opened to look is left to
    /// the rename.
    fn check_replaceable(&self) -> Result<(), Error> {
        let Some((mut file, meta)) = open_regular(&self.path) else {
            return Ok(());
        };
        if meta.len() == 0 {
            return Ok(());
        }
        let mut head = [0u8; MAGIC.len()];
        match io::Read::read_exact(&mut file, &mut head) {
            Ok(()) if head == MAGIC => Ok(()),
            _ => Err(Error::NotAStream {
                path: self.given.clone(),
            }),
        }
    }

    /// Every check of a stream's target: [`Target::check`], not locked by
    /// another process, nothing but a stream to replace.
    fn check_stream_target(&self) -> Result<(), Error> {
        self.check()?;
        self.check_unlocked()?;
        self.check_replaceable()
    }

    fn check_dir(&self) -> Result<(), Error> {
        match std::fs::metadata(&self.dir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(Error::ParentNotDirectory {
                path: self.given.clone(),
                dir: self.dir.clone(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::NoDirectory {
                path: self.given.clone(),
                dir: self.dir.clone(),
            }),
            Err(source) => Err(Error::Stat {
                path: self.dir.clone(),
                source,
            }),
        }
    }

    /// `.NAME.blimp-tmp.`: what every temporary name of this target starts
    /// with.
    fn temp_prefix(&self) -> Vec<u8> {
        let name = self.name.as_bytes();
        let short = &name[..name.len().min(MAX_NAME_IN_TEMP)];
        let mut t = b".".to_vec();
        t.extend_from_slice(short);
        t.extend_from_slice(b".blimp-tmp.");
        t
    }

    fn temp_path(&self, n: u64) -> PathBuf {
        let mut t = self.temp_prefix();
        t.extend_from_slice(format!("{}.{n}", std::process::id()).as_bytes());
        self.dir.join(OsString::from_vec(t))
    }

    /// The PID in `name` if it is exactly one of this target's temporary
    /// names, `.NAME.blimp-tmp.PID.N` (PID and N decimal digits).
    fn temp_pid(&self, name: &[u8]) -> Option<u32> {
        let rest = name.strip_prefix(self.temp_prefix().as_slice())?;
        let (pid, n) = std::str::from_utf8(rest).ok()?.split_once('.')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(pid) || !digits(n) {
            return None;
        }
        pid.parse().ok()
    }

    /// Remove the temporary files of this target that a blimp killed while
    /// writing left behind (an older version, or a filesystem without
    /// `O_TMPFILE`). Conservative: only names of exactly this target's
    /// pattern, only regular files, only when their PID is no process here
    /// (`/proc/PID` missing; nothing is removed without `/proc`), and only
    /// when nobody holds a lock on the file (every writer holds one, which
    /// also covers a live writer in another PID namespace).
    fn remove_stale_temps(&self) {
        if std::fs::symlink_metadata("/proc/self").is_err() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = self.temp_pid(name.as_bytes()) else {
                continue;
            };
            if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let path = self.dir.join(&name);
            if remove_if_unlocked(&path) {
                log::info!(
                    "removed {}: a temporary file left by blimp process {pid}, which is gone",
                    path.display()
                );
            }
        }
    }
}

/// Remove `path` if it is a regular file nobody holds a lock on, and still
/// the file that was checked when it goes.
fn remove_if_unlocked(path: &Path) -> bool {
    let Some((file, meta)) = open_regular(path) else {
        return false;
    };
    if file.try_lock().is_err() {
        return false;
    }
    let same = std::fs::symlink_metadata(path)
        .is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()));
    same && std::fs::remove_file(path).is_ok()
}

/// `path` opened for reading (to take or probe its lock) if it is a regular
/// file, with its metadata: `lstat` first, so that a device node, FIFO or
/// symlink found there is never opened, and the open file checked again.
fn open_regular(path: &Path) -> Option<(File, Metadata)> {
    if !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file()) {
        return None;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    meta.file_type().is_file().then_some((file, meta))
}

/// Whether `a` and `b` both exist and are the same file (device and inode),
/// whatever the names or links that lead there.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Checks, without writing anything, that `path` could be written by
/// [`AtomicFile::create`]: its directory exists and the path itself is
/// missing or a regular file (not a symlink, directory, device, FIFO or
/// socket). For an early, clear refusal; `create` checks again.
pub fn check(path: &Path) -> Result<(), Error> {
    let t = Target::new(path)?;
    t.check_dir()?;
    t.check_stream_target()
}

/// A file being written where nobody sees it, to replace its target on
/// [`AtomicFile::commit`].
pub struct AtomicFile {
    target: Target,
    /// The temporary file's name: from the start for a named temporary
    /// file; for an unnamed one (`O_TMPFILE`) only once it is complete and
    /// linked there on its way to the target.
    temp: Option<PathBuf>,
    /// `None` once committed or removed.
    file: Option<File>,
    /// Device and inode of the temporary file, to touch only it.
    id: (u64, u64),
    /// A stream's target: refused when another process holds its lock
    /// or it is something other than a stream (see
    /// `Target::check_stream_target`); not for a restore's RAM, whose
    /// caller holds the target's lock itself and replaces a RAM file.
    stream_target: bool,
}

/// An `O_TMPFILE` open that failed because the filesystem (or the kernel)
/// has no unnamed files: the named temporary file is used instead.
fn tmpfile_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
    )
}

/// For messages: an unnamed temporary file in `dir`.
fn unnamed_in(dir: &Path) -> PathBuf {
    dir.join("(unnamed O_TMPFILE file)")
}

/// Lock the file being written for as long as it is open, so that no other
/// blimp takes it for a stale one (see `Target::remove_stale_temps`). A
/// filesystem without locks leaves it unlocked: only a blimp in another PID
/// namespace, to which this process looks gone, could then remove it, and
/// the job would fail at commit with the old file kept.
fn lock_ours(file: &File) {
    if let Err(e) = file.try_lock() {
        log::debug!("cannot lock the file being written: {e:?}");
    }
}

/// The name that reaches the open file `file` through /proc, for linkat.
fn proc_fd_path(file: &File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Give the unnamed (`O_TMPFILE`) `file` the name `to`; fails with
/// `AlreadyExists` if `to` exists (it is never replaced or followed).
fn link_unnamed(file: &File, to: &Path) -> io::Result<()> {
    let from = std::ffi::CString::new(proc_fd_path(file).into_os_string().into_vec())
        .map_err(io::Error::other)?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: linkat(2) with two valid NUL-terminated paths that outlive the
    // call; AT_SYMLINK_FOLLOW makes it link the file /proc's magic link
    // points to (the open file), not the link itself.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl AtomicFile {
    /// Start writing `path`: refuses a non-regular target (see the module
    /// documentation) and creates an unnamed temporary file in its
    /// directory (`O_TMPFILE`), or a named one next to it where the
    /// filesystem has no unnamed files.
    pub fn create(path: &Path) -> Result<AtomicFile, Error> {
        Self::create_with(path, false)
    }

    /// [`AtomicFile::create`], opened for reading too: for a file that is
    /// mapped shared while it is written (a restore's guest RAM, see
    /// [`AtomicFile::file`]).
    pub fn create_rw(path: &Path) -> Result<AtomicFile, Error> {
        Self::create_with(path, true)
    }

    fn create_with(path: &Path, read: bool) -> Result<AtomicFile, Error> {
        let target = Target::new(path)?;
        target.check_dir()?;
        if read {
            target.check()?;
        } else {
            target.check_stream_target()?;
        }
        target.remove_stale_temps();
        let opened = OpenOptions::new()
            .read(read)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .open(&target.dir)
            .inspect(lock_ours);
        match opened {
            // Naming it at commit goes through /proc/self/fd: without /proc
            // (a chroot), the named temporary file it is.
            Ok(file) if std::fs::symlink_metadata(proc_fd_path(&file)).is_ok() => {
                let meta = file.metadata().map_err(|source| Error::Stat {
                    path: target.dir.clone(),
                    source,
                })?;
                Ok(AtomicFile {
                    target,
                    temp: None,
                    file: Some(file),
                    id: (meta.dev(), meta.ino()),
                    stream_target: !read,
                })
            }
            Ok(_) => Self::create_named(target, read),
            Err(e) if tmpfile_unsupported(&e) => Self::create_named(target, read),
            Err(source) => Err(Error::CreateTemp {
                path: target.given.clone(),
                temp: unnamed_in(&target.dir),
                source,
            }),
        }
    }

    /// [`AtomicFile::create`] with a named temporary file
    /// (`.NAME.blimp-tmp.PID.N`): what a filesystem without `O_TMPFILE` gets.
    fn create_named(target: Target, read: bool) -> Result<AtomicFile, Error> {
        let mut attempt = 0;
        loop {
            let temp = target.temp_path(TEMP_COUNTER.fetch_add(1, Ordering::Relaxed));
            let opened = OpenOptions::new()
                .read(read)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&temp)
                .inspect(lock_ours);
            match opened {
                Ok(file) => {
                    let meta = file.metadata().map_err(|source| Error::Stat {
                        path: temp.clone(),
                        source,
                    });
                    let meta = match meta {
                        Ok(m) => m,
                        Err(e) => {
                            // Ours for sure: we just created it and hold it open.
                            let _ = std::fs::remove_file(&temp);
                            return Err(e);
                        }
                    };
                    return Ok(AtomicFile {
                        target,
                        temp: Some(temp),
                        file: Some(file),
                        id: (meta.dev(), meta.ino()),
                        stream_target: !read,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < TEMP_ATTEMPTS => {
                    attempt += 1;
                }
                Err(source) => {
                    return Err(Error::CreateTemp {
                        path: target.given.clone(),
                        temp,
                        source,
                    });
                }
            }
        }
    }

    /// The temporary file's name, `None` while it is an unnamed one.
    pub fn temp_path(&self) -> Option<&Path> {
        self.temp.as_deref()
    }

    /// The file being written, until it is committed: to map it or to
    /// hand a duplicate (`try_clone`) to whoever keeps it open after.
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// Sync the data and put it at the target; then sync the directory
    /// (a failure of that last step is logged, not returned: see below).
    pub fn commit(self) -> Result<(), Error> {
        self.commit_with(true)
    }

    /// [`AtomicFile::commit`] without syncing the data first: for a file
    /// whose contents are the running guest's RAM, which a host crash ends
    /// anyway; syncing gigabytes would only stretch a migration's downtime.
    pub fn commit_unsynced(self) -> Result<(), Error> {
        self.commit_with(false)
    }

    fn commit_with(mut self, sync_data: bool) -> Result<(), Error> {
        let Some(mut file) = self.file.take() else {
            return Ok(());
        };
        let sync = |file: &mut File| file.flush().and_then(|()| file.sync_all());
        if sync_data && let Err(source) = sync(&mut file) {
            self.remove_temp();
            return Err(Error::Sync {
                path: self.target.given.clone(),
                temp: self.temp_display(),
                source,
            });
        }
        if self.temp.is_none() && self.link_unnamed(&file)? {
            drop(file);
            self.sync_dir();
            return Ok(());
        }
        drop(file);
        let temp = self.temp.clone().unwrap_or_default();
        if !self.temp_is_ours() {
            return Err(Error::TempReplaced {
                path: self.target.given.clone(),
                temp,
            });
        }
        // The target may have changed since `create`: refuse it now too.
        let recheck = |t: &Target| match self.stream_target {
            true => t.check_stream_target(),
            false => t.check().map(|_| ()),
        };
        if let Err(e) = recheck(&self.target) {
            self.remove_temp();
            return Err(e);
        }
        if let Err(source) = std::fs::rename(&temp, &self.target.path) {
            self.remove_temp();
            return Err(Error::Rename {
                path: self.target.given.clone(),
                temp,
                source,
            });
        }
        self.sync_dir();
        Ok(())
    }

    /// Name the complete unnamed file: at the target itself when nothing is
    /// there (`Ok(true)`: done, atomically, nothing else ever named);
    /// else at a fresh temporary name (`Ok(false)`), to be renamed over the
    /// target. linkat never replaces nor follows what is at the new name.
    fn link_unnamed(&mut self, file: &File) -> Result<bool, Error> {
        let link_err = |s: &Self, temp: &Path, source: io::Error| Error::Link {
            path: s.target.given.clone(),
            temp: temp.to_path_buf(),
            source,
        };
        match link_unnamed(file, &self.target.path) {
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(link_err(self, &self.target.path, e)),
        }
        let mut attempt = 0;
        loop {
            let temp = self
                .target
                .temp_path(TEMP_COUNTER.fetch_add(1, Ordering::Relaxed));
            match link_unnamed(file, &temp) {
                Ok(()) => {
                    self.temp = Some(temp);
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < TEMP_ATTEMPTS => {
                    attempt += 1;
                }
                Err(e) => return Err(link_err(self, &temp, e)),
            }
        }
    }

    /// The file is in place, complete and its data synced: the job has
    /// succeeded, whatever the directory does now. Failing it here would
    /// leave its stream at the path while a migrated guest resumed on the
    /// source (two diverging copies), and the old file is gone either way.
    /// Only the new name's surviving a host crash in the next seconds is
    /// in doubt (a directory this user cannot read, an I/O error): said,
    /// not failed.
    fn sync_dir(&self) {
        if let Err(e) = File::open(&self.target.dir).and_then(|d| d.sync_all()) {
            log::warn!(
                target: "console",
                "{} is written and in place, but its directory {} could not be synced ({e}): the new name may not survive a host crash in the next seconds",
                self.target.given.display(),
                self.target.dir.display()
            );
        }
    }

    /// For messages: the temporary file's name, or where the unnamed one is.
    fn temp_display(&self) -> PathBuf {
        self.temp
            .clone()
            .unwrap_or_else(|| unnamed_in(&self.target.dir))
    }

    /// Give up: remove the temporary file, leave the target as it was.
    pub fn abort(mut self) {
        self.file = None;
        self.remove_temp();
    }

    /// The temporary name still holds the file we created.
    fn temp_is_ours(&self) -> bool {
        self.temp.as_ref().is_some_and(|t| {
            std::fs::symlink_metadata(t)
                .is_ok_and(|m| m.file_type().is_file() && (m.dev(), m.ino()) == self.id)
        })
    }

    /// Remove the named temporary file, if any (an unnamed one goes with its
    /// last descriptor).
    fn remove_temp(&self) {
        let Some(temp) = &self.temp else {
            return;
        };
        if !self.temp_is_ours() {
            log::warn!(
                "{}: not removed, it is no longer the temporary file Blimp created",
                temp.display()
            );
            return;
        }
        if let Err(e) = std::fs::remove_file(temp) {
            log::warn!("cannot remove {}: {e}", temp.display());
        }
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(io::Error::other("the file was already committed")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            self.remove_temp();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An older stream at a target (only a stream is ever replaced).
    const OLD: &[u8] = b"BLIMPMIG: an older stream";

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "blimp-filedest-{name}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir(&p).unwrap();
            TempDir(p)
        }

        fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }

        /// Names in the directory, sorted.
        fn names(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cstr(p: &Path) -> std::ffi::CString {
        std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
    }

    fn mkfifo(p: &Path) {
        // SAFETY: mkfifo(3) with a valid NUL-terminated path.
        let rc = unsafe { libc::mkfifo(cstr(p).as_ptr(), 0o600) };
        assert_eq!(
            rc,
            0,
            "mkfifo {}: {}",
            p.display(),
            io::Error::last_os_error()
        );
    }

    /// A character device like /dev/null (1, 3); needs root.
    fn mknod_null(p: &Path) {
        // SAFETY: mknod(2) with a valid NUL-terminated path.
        let rc =
            unsafe { libc::mknod(cstr(p).as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
        assert_eq!(
            rc,
            0,
            "mknod {} (these tests run as root): {}",
            p.display(),
            io::Error::last_os_error()
        );
    }

    /// How a file is written: unnamed (`O_TMPFILE`, what the system temp
    /// directory's filesystem gives here) or named from the start (the
    /// fallback where there is no `O_TMPFILE`).
    #[derive(Clone, Copy, Debug)]
    enum Way {
        Unnamed,
        Named,
    }

    const WAYS: [Way; 2] = [Way::Unnamed, Way::Named];

    fn create(way: Way, path: &Path) -> AtomicFile {
        match way {
            Way::Unnamed => {
                let f = AtomicFile::create(path).unwrap();
                assert!(
                    f.temp_path().is_none(),
                    "{}: this test needs a filesystem with O_TMPFILE",
                    path.display()
                );
                f
            }
            Way::Named => AtomicFile::create_named(Target::new(path).unwrap(), false).unwrap(),
        }
    }

    fn write_way(way: Way, path: &Path, data: &[u8]) -> AtomicFile {
        let mut f = create(way, path);
        f.write_all(data).unwrap();
        f
    }

    fn write_all(path: &Path, data: &[u8]) -> AtomicFile {
        write_way(Way::Unnamed, path, data)
    }

    #[test]
    fn a_new_file_appears_only_on_commit_with_mode_0600() {
        for way in WAYS {
            let d = TempDir::new("new");
            let p = d.join("snap");
            let f = write_way(way, &p, b"hello");
            assert!(!p.exists(), "{way:?}: nothing at the target before commit");
            match f.temp_path() {
                None => assert!(d.names().is_empty(), "{way:?}: {:?}", d.names()),
                Some(temp) => {
                    let tname = temp.file_name().unwrap().to_string_lossy().into_owned();
                    assert!(
                        tname.starts_with(".snap.blimp-tmp.")
                            && tname.contains(&std::process::id().to_string()),
                        "{tname}"
                    );
                    assert_eq!(d.names(), vec![tname]);
                }
            }
            f.commit().unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), b"hello", "{way:?}");
            let mode = std::fs::metadata(&p).unwrap().mode() & 0o777;
            assert_eq!(mode & !0o600, 0, "{way:?}: mode {mode:o}");
            assert_eq!(d.names(), vec!["snap".to_string()], "{way:?}");
        }
    }

    /// `create_rw` (a restore's guest RAM): the file being written reads
    /// back through the same descriptor, either way it is made, and
    /// `commit_unsynced` puts it in the target's place, over an old file
    /// too, with nothing else left in the directory.
    #[test]
    fn a_read_write_file_reads_back_and_commits_unsynced() {
        use std::os::unix::fs::FileExt;
        for way in WAYS {
            let d = TempDir::new("rw");
            let p = d.join("ram");
            std::fs::write(&p, OLD).unwrap();
            let f = match way {
                Way::Unnamed => AtomicFile::create_rw(&p).unwrap(),
                Way::Named => AtomicFile::create_named(Target::new(&p).unwrap(), true).unwrap(),
            };
            let file = f.file().unwrap().try_clone().unwrap();
            file.write_all_at(b"guest ram", 0).unwrap();
            let mut back = [0u8; 9];
            file.read_exact_at(&mut back, 0).unwrap();
            assert_eq!(&back, b"guest ram", "{way:?}");
            assert_eq!(std::fs::read(&p).unwrap(), OLD, "{way:?}");
            f.commit_unsynced().unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), b"guest ram", "{way:?}");
            assert_eq!(d.names(), vec!["ram".to_string()], "{way:?}");
            // The duplicate descriptor still reaches the file now at `p`.
            file.write_all_at(b"G", 0).unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), b"Guest ram", "{way:?}");
        }
    }

    /// While an unnamed file is written, the directory shows nothing new:
    /// a process killed then leaves no file (the kernel frees it).
    #[test]
    fn an_unnamed_file_is_invisible_until_commit() {
        let d = TempDir::new("unnamed");
        let p = d.join("snap");
        std::fs::write(&p, OLD).unwrap();
        let mut f = write_all(&p, &[7u8; 1 << 20]);
        f.write_all(&[8u8; 1 << 20]).unwrap();
        assert_eq!(d.names(), vec!["snap".to_string()]);
        assert_eq!(std::fs::read(&p).unwrap(), OLD);
        f.commit().unwrap();
        assert_eq!(d.names(), vec!["snap".to_string()]);
        assert_eq!(std::fs::read(&p).unwrap().len(), 2 << 20);
    }

    #[test]
    fn a_regular_file_is_replaced_only_on_commit() {
        for way in WAYS {
            let d = TempDir::new("replace");
            let p = d.join("snap");
            std::fs::write(&p, OLD).unwrap();
            let f = write_way(way, &p, b"new");
            assert_eq!(std::fs::read(&p).unwrap(), OLD, "{way:?}");
            f.commit().unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), b"new", "{way:?}");
            assert_eq!(d.names(), vec!["snap".to_string()], "{way:?}");
        }
    }

    /// Only a stream (or an empty file) is replaced: any other file at the
    /// target is refused by the early check, at create and at commit, and
    /// left as it was.
    #[test]
    fn a_file_that_is_not_a_stream_is_never_replaced() {
        for way in WAYS {
            let d = TempDir::new("not-a-stream");
            let p = d.join("notes.txt");
            std::fs::write(&p, b"a user's notes").unwrap();
            let refused = |e: Error| assert!(matches!(e, Error::NotAStream { .. }), "{e}");
            refused(check(&p).unwrap_err());
            refused(AtomicFile::create(&p).err().unwrap());
            // Turned into one while the stream was written: kept too.
            std::fs::write(&p, OLD).unwrap();
            let f = write_way(way, &p, b"new stream");
            std::fs::write(&p, b"a user's notes").unwrap();
            refused(f.commit().unwrap_err());
            assert_eq!(std::fs::read(&p).unwrap(), b"a user's notes", "{way:?}");
            assert_eq!(d.names(), vec!["notes.txt".to_string()], "{way:?}");
            // An empty file is taken.
            std::fs::write(&p, b"").unwrap();
            write_way(way, &p, b"new stream").commit().unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), b"new stream", "{way:?}");
        }
    }

    #[test]
    fn abort_and_drop_leave_the_old_file_and_no_temporary() {
        for way in WAYS {
            let d = TempDir::new("abort");
            let p = d.join("snap");
            let old: Vec<u8> = MAGIC
                .iter()
                .copied()
                .chain((0..10_000u32).map(|i| i as u8))
                .collect();
            std::fs::write(&p, &old).unwrap();
            write_way(way, &p, b"half a stream").abort();
            assert_eq!(std::fs::read(&p).unwrap(), old, "{way:?}");
            assert_eq!(d.names(), vec!["snap".to_string()], "{way:?}");
            drop(write_way(way, &p, b"half a stream"));
            assert_eq!(std::fs::read(&p).unwrap(), old, "{way:?}");
            assert_eq!(d.names(), vec!["snap".to_string()], "{way:?}");
            // A missing target stays missing.
            let q = d.join("never");
            drop(write_way(way, &q, b"x"));
            assert!(!q.exists(), "{way:?}");
            assert_eq!(d.names(), vec!["snap".to_string()], "{way:?}");
        }
    }

    #[test]
    fn non_regular_targets_are_refused_and_left_alone() {
        let d = TempDir::new("refuse");
        let real = d.join("real");
        std::fs::write(&real, b"pointed to").unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let dangling = d.join("dangling");
        std::os::unix::fs::symlink(d.join("nowhere"), &dangling).unwrap();
        let dir = d.join("dir");
        std::fs::create_dir(&dir).unwrap();
        let fifo = d.join("fifo");
        mkfifo(&fifo);
        let sock = d.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let dev = d.join("null");
        mknod_null(&dev);
        let before = d.names();
        for (p, kind) in [
            (&link, FileKind::Symlink),
            (&dangling, FileKind::Symlink),
            (&dir, FileKind::Directory),
            (&fifo, FileKind::Fifo),
            (&sock, FileKind::Socket),
            (&dev, FileKind::CharDevice),
        ] {
            for e in [check(p).unwrap_err(), AtomicFile::create(p).err().unwrap()] {
                assert!(
                    matches!(&e, Error::NotRegular { path, kind: k } if path == p && *k == kind),
                    "{}: {e}",
                    p.display()
                );
                let msg = e.to_string();
                assert!(msg.contains(&p.display().to_string()), "{msg}");
                assert!(msg.contains(&kind.to_string()), "{msg}");
            }
        }
        // A trailing slash does not make a symlink to a directory acceptable.
        let dirlink = d.join("dirlink");
        std::os::unix::fs::symlink(&dir, &dirlink).unwrap();
        let slash = PathBuf::from(format!("{}/", dirlink.display()));
        assert!(matches!(check(&slash), Err(Error::NoFileName { .. })));
        assert!(matches!(
            check(&dirlink),
            Err(Error::NotRegular {
                kind: FileKind::Symlink,
                ..
            })
        ));
        std::fs::remove_file(&dirlink).unwrap();
        assert_eq!(d.names(), before, "nothing created or removed");
        assert_eq!(std::fs::read(&real).unwrap(), b"pointed to");
        let m = std::fs::symlink_metadata(&dev).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), libc::makedev(1, 3));
        assert!(
            std::fs::symlink_metadata(&fifo)
                .unwrap()
                .file_type()
                .is_fifo()
        );
        assert!(
            std::fs::symlink_metadata(&sock)
                .unwrap()
                .file_type()
                .is_socket()
        );
        assert!(std::fs::symlink_metadata(&dir).unwrap().is_dir());
    }

    #[test]
    fn a_missing_or_non_directory_parent_is_refused() {
        let d = TempDir::new("parent");
        let missing = d.join("nope/snap");
        let e = AtomicFile::create(&missing).err().unwrap();
        assert!(matches!(e, Error::NoDirectory { .. }), "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");
        std::fs::write(d.join("file"), b"").unwrap();
        let e = check(&d.join("file/snap")).unwrap_err();
        assert!(matches!(e, Error::ParentNotDirectory { .. }), "{e}");
        for bad in ["", "/", "/tmp/.", "/tmp/.."] {
            assert!(
                matches!(check(Path::new(bad)), Err(Error::NoFileName { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(d.names(), vec!["file".to_string()]);
    }

    #[test]
    fn a_target_that_turns_into_something_else_before_commit_is_kept() {
        let d = TempDir::new("race");
        let p = d.join("snap");
        let real = d.join("real");
        std::fs::write(&real, b"precious").unwrap();
        type Make = fn(&Path, &Path);
        let cases: [(&str, Make); 4] = [
            ("symlink", |p, real| {
                std::os::unix::fs::symlink(real, p).unwrap()
            }),
            ("fifo", |p, _| mkfifo(p)),
            ("dir", |p, _| std::fs::create_dir(p).unwrap()),
            ("device", |p, _| mknod_null(p)),
        ];
        for ((what, make), way) in cases.into_iter().flat_map(|c| WAYS.map(|w| (c, w))) {
            std::fs::write(&p, OLD).unwrap();
            let f = write_way(way, &p, b"new");
            std::fs::remove_file(&p).unwrap();
            make(&p, &real);
            let before = std::fs::symlink_metadata(&p).unwrap();
            let e = f.commit().unwrap_err();
            assert!(matches!(e, Error::NotRegular { .. }), "{what}: {e}");
            let after = std::fs::symlink_metadata(&p).unwrap();
            assert_eq!(
                (before.ino(), before.mode()),
                (after.ino(), after.mode()),
                "{what}"
            );
            assert_eq!(std::fs::read(&real).unwrap(), b"precious", "{what}");
            let mut names = d.names();
            names.sort();
            assert_eq!(
                names,
                vec!["real".to_string(), "snap".to_string()],
                "{what}"
            );
            if after.is_dir() {
                std::fs::remove_dir(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }

    #[test]
    fn a_replaced_temporary_file_is_neither_renamed_nor_removed() {
        let d = TempDir::new("tempswap");
        let p = d.join("snap");
        std::fs::write(&p, OLD).unwrap();
        let f = write_way(Way::Named, &p, b"new");
        let temp = f.temp_path().unwrap().to_path_buf();
        std::fs::remove_file(&temp).unwrap();
        std::fs::write(&temp, b"someone else's").unwrap();
        let e = f.commit().unwrap_err();
        assert!(matches!(e, Error::TempReplaced { .. }), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), OLD);
        assert_eq!(std::fs::read(&temp).unwrap(), b"someone else's");
        // Same on drop.
        let f = write_way(Way::Named, &p, b"new");
        let temp2 = f.temp_path().unwrap().to_path_buf();
        std::fs::remove_file(&temp2).unwrap();
        std::fs::write(&temp2, b"theirs").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&temp2).unwrap(), b"theirs");
        assert_eq!(std::fs::read(&p).unwrap(), OLD);
    }

    #[test]
    fn a_taken_temporary_name_is_skipped_and_left_alone() {
        for way in WAYS {
            let d = TempDir::new("taken");
            let p = d.join("snap");
            // An existing target: the unnamed file, too, goes through a
            // temporary name.
            std::fs::write(&p, OLD).unwrap();
            let t = Target::new(&p).unwrap();
            // Squat the next names the counter hands out (other tests may take
            // some of them meanwhile; then fewer are skipped).
            let next = TEMP_COUNTER.load(Ordering::Relaxed);
            let squatted: Vec<PathBuf> = (next..next + 5).map(|n| t.temp_path(n)).collect();
            for s in &squatted {
                std::fs::write(s, b"squatter").unwrap();
            }
            write_way(way, &p, b"data").commit().unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), b"data", "{way:?}");
            for s in &squatted {
                assert_eq!(std::fs::read(s).unwrap(), b"squatter", "{way:?}");
            }
            assert_eq!(d.names().len(), 6, "{way:?}: {:?}", d.names());
        }
    }

    /// The PID of a process that has exited (and been reaped).
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        pid
    }

    #[test]
    fn temporary_names_are_recognised_exactly() {
        let t = Target::new(Path::new("/d/vm.snap")).unwrap();
        assert_eq!(t.temp_pid(b".vm.snap.blimp-tmp.123.0"), Some(123));
        assert_eq!(t.temp_pid(b".vm.snap.blimp-tmp.7.42"), Some(7));
        for other in [
            &b".vm.snap.blimp-tmp.123"[..],
            b".vm.snap.blimp-tmp.123.",
            b".vm.snap.blimp-tmp..0",
            b".vm.snap.blimp-tmp.12a.0",
            b".vm.snap.blimp-tmp.123.0.1",
            b".vm.snap.blimp-tmp.123.0~",
            b".vm.snap2.blimp-tmp.123.0",
            b".other.blimp-tmp.123.0",
            b"vm.snap.blimp-tmp.123.0",
            b"vm.snap",
        ] {
            assert_eq!(
                t.temp_pid(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        let n = t.temp_path(5);
        assert_eq!(
            t.temp_pid(n.file_name().unwrap().as_bytes()),
            Some(std::process::id())
        );
    }

    /// A temporary file a killed blimp left is removed when the next file
    /// is written to the same target; nothing else is: not another
    /// target's, not one of a live process, not one somebody locks, not a
    /// symlink or directory of that name.
    #[test]
    fn stale_temporary_files_of_dead_processes_are_removed() {
        let d = TempDir::new("stale");
        let p = d.join("snap");
        std::fs::write(&p, OLD).unwrap();
        let dead = dead_pid();
        let stale = d.join(&format!(".snap.blimp-tmp.{dead}.0"));
        std::fs::write(&stale, b"half a stream").unwrap();
        let kept = [
            ".snap.blimp-tmp.1.0".to_string(),
            format!(".snap.blimp-tmp.{}.999", std::process::id()),
            format!(".other.blimp-tmp.{dead}.0"),
            format!(".snap.blimp-tmp.{dead}.x"),
            format!("snap.blimp-tmp.{dead}.0"),
        ];
        for k in &kept {
            std::fs::write(d.join(k), b"keep").unwrap();
        }
        let locked = d.join(&format!(".snap.blimp-tmp.{dead}.1"));
        std::fs::write(&locked, b"being written").unwrap();
        let lock = File::open(&locked).unwrap();
        lock.try_lock().unwrap();
        let link = d.join(&format!(".snap.blimp-tmp.{dead}.2"));
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let dir = d.join(&format!(".snap.blimp-tmp.{dead}.3"));
        std::fs::create_dir(&dir).unwrap();
        for way in WAYS {
            std::fs::write(&p, OLD).unwrap();
            std::fs::write(&stale, b"half a stream").unwrap();
            let f = match way {
                Way::Unnamed => write_way(way, &p, b"new"),
                // The fallback cleans up as well (`create` decides which).
                Way::Named => {
                    Target::new(&p).unwrap().remove_stale_temps();
                    write_way(way, &p, b"new")
                }
            };
            assert!(!stale.exists(), "{way:?}: the dead process's file is gone");
            f.commit().unwrap();
            for k in &kept {
                assert_eq!(std::fs::read(d.join(k)).unwrap(), b"keep", "{way:?}: {k}");
            }
            assert_eq!(std::fs::read(&locked).unwrap(), b"being written");
            assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
            assert!(dir.is_dir());
            assert_eq!(std::fs::read(&p).unwrap(), b"new");
        }
        // Unlocked, it is stale like the other.
        drop(lock);
        std::fs::write(&p, OLD).unwrap();
        drop(write_all(&p, b"x"));
        assert!(!locked.exists());
    }

    #[test]
    fn relative_paths_use_the_current_directory() {
        let t = Target::new(Path::new("snap.mig")).unwrap();
        assert_eq!(t.dir, Path::new("."));
        assert_eq!(t.path, Path::new("./snap.mig"));
        let t = Target::new(Path::new("/a/b/snap.mig")).unwrap();
        assert_eq!(t.dir, Path::new("/a/b"));
        assert_eq!(t.name, OsStr::new("snap.mig"));
    }
}
