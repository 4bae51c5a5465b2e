//! Writing a migration stream or snapshot to a file without ever damaging
//! what was there before.
//!
//! [`AtomicFile::create`] refuses a target that exists and is not a regular
//! file (checked with `lstat`, so a symlink is refused, not followed) and
//! writes into a new temporary file in the same directory
//! (`.NAME.blimp-tmp.PID.N`, `O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC`, mode
//! 0600). [`AtomicFile::commit`] fsyncs it, renames it over the target
//! (rename(2) replaces a regular file atomically: a reader sees the old or
//! the new file, never a mix) and fsyncs the directory. Dropping it, or
//! [`AtomicFile::abort`], removes the temporary file and nothing else: the
//! target is byte-identical to what it was before.
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

    fn temp_path(&self, n: u64) -> PathBuf {
        let name = self.name.as_bytes();
        let short = &name[..name.len().min(MAX_NAME_IN_TEMP)];
        let mut t = b".".to_vec();
        t.extend_from_slice(short);
        t.extend_from_slice(format!(".blimp-tmp.{}.{n}", std::process::id()).as_bytes());
        self.dir.join(OsString::from_vec(t))
    }
}

/// Checks, without writing anything, that `path` could be written by
/// Whether `a` and `b` both exist and are the same file (device and inode),
/// whatever the names or links that lead there.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// [`AtomicFile::create`]: its directory exists and the path itself is
/// missing or a regular file (not a symlink, directory, device, FIFO or
/// socket). For an early, clear refusal; `create` checks again.
pub fn check(path: &Path) -> Result<(), Error> {
    let t = Target::new(path)?;
    t.check_dir()?;
    t.check()?;
    Ok(())
}

/// A file being written to a temporary name, to replace its target on
/// [`AtomicFile::commit`].
pub struct AtomicFile {
    target: Target,
    temp: PathBuf,
    /// `None` once committed or removed.
    file: Option<File>,
    /// Device and inode of the temporary file, to touch only it.
    id: (u64, u64),
}

impl AtomicFile {
    /// Start writing `path`: refuses a non-regular target (see the module
    /// documentation) and creates the temporary file next to it.
    pub fn create(path: &Path) -> Result<AtomicFile, Error> {
        let target = Target::new(path)?;
        target.check_dir()?;
        target.check()?;
        let mut attempt = 0;
        loop {
            let temp = target.temp_path(TEMP_COUNTER.fetch_add(1, Ordering::Relaxed));
            let opened = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&temp);
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
                        temp,
                        file: Some(file),
                        id: (meta.dev(), meta.ino()),
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

    /// The temporary file being written.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Sync the data and rename it over the target; then sync the directory
    /// (a failure of that last step is logged, not returned: see below).
    pub fn commit(mut self) -> Result<(), Error> {
        let Some(mut file) = self.file.take() else {
            return Ok(());
        };
        let sync = |file: &mut File| file.flush().and_then(|()| file.sync_all());
        if let Err(source) = sync(&mut file) {
            self.remove_temp();
            return Err(Error::Sync {
                path: self.target.given.clone(),
                temp: self.temp.clone(),
                source,
            });
        }
        drop(file);
        if !self.temp_is_ours() {
            return Err(Error::TempReplaced {
                path: self.target.given.clone(),
                temp: self.temp.clone(),
            });
        }
        // The target may have changed since `create`: refuse it now too.
        if let Err(e) = self.target.check() {
            self.remove_temp();
            return Err(e);
        }
        if let Err(source) = std::fs::rename(&self.temp, &self.target.path) {
            self.remove_temp();
            return Err(Error::Rename {
                path: self.target.given.clone(),
                temp: self.temp.clone(),
                source,
            });
        }
        // The file is in place, complete and its data synced: the job has
        // succeeded, whatever the directory does now. Failing it here would
        // leave its stream at the path while a migrated guest resumed on
        // the source (two diverging copies), and the old file is gone
        // either way. Only the new name's surviving a host crash in the
        // next seconds is in doubt (a directory this user cannot read, an
        // I/O error): said, not failed.
        if let Err(e) = File::open(&self.target.dir).and_then(|d| d.sync_all()) {
            log::warn!(
                target: "console",
                "{} is written and in place, but its directory {} could not be synced ({e}): the new name may not survive a host crash in the next seconds",
                self.target.given.display(),
                self.target.dir.display()
            );
        }
        Ok(())
    }

    /// Give up: remove the temporary file, leave the target as it was.
    pub fn abort(mut self) {
        self.file = None;
        self.remove_temp();
    }

    /// The temporary name still holds the file we created.
    fn temp_is_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.temp)
            .is_ok_and(|m| m.file_type().is_file() && (m.dev(), m.ino()) == self.id)
    }

    fn remove_temp(&self) {
        if !self.temp_is_ours() {
            log::warn!(
                "{}: not removed, it is no longer the temporary file Blimp created",
                self.temp.display()
            );
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.temp) {
            log::warn!("cannot remove {}: {e}", self.temp.display());
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

    fn write_all(path: &Path, data: &[u8]) -> AtomicFile {
        let mut f = AtomicFile::create(path).unwrap();
        f.write_all(data).unwrap();
        f
    }

    #[test]
    fn a_new_file_appears_only_on_commit_with_mode_0600() {
        let d = TempDir::new("new");
        let p = d.join("snap");
        let f = write_all(&p, b"hello");
        assert!(!p.exists(), "nothing at the target before commit");
        let temp = f.temp_path().to_path_buf();
        let tname = temp.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            tname.starts_with(".snap.blimp-tmp.")
                && tname.contains(&std::process::id().to_string()),
            "{tname}"
        );
        assert_eq!(d.names(), vec![tname]);
        f.commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        let mode = std::fs::metadata(&p).unwrap().mode() & 0o777;
        assert_eq!(mode & !0o600, 0, "mode {mode:o}");
        assert_eq!(d.names(), vec!["snap".to_string()]);
    }

    #[test]
    fn a_regular_file_is_replaced_only_on_commit() {
        let d = TempDir::new("replace");
        let p = d.join("snap");
        std::fs::write(&p, b"old contents").unwrap();
        let f = write_all(&p, b"new");
        assert_eq!(std::fs::read(&p).unwrap(), b"old contents");
        f.commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(d.names(), vec!["snap".to_string()]);
    }

    #[test]
    fn abort_and_drop_leave_the_old_file_and_no_temporary() {
        let d = TempDir::new("abort");
        let p = d.join("snap");
        let old: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        std::fs::write(&p, &old).unwrap();
        write_all(&p, b"half a stream").abort();
        assert_eq!(std::fs::read(&p).unwrap(), old);
        assert_eq!(d.names(), vec!["snap".to_string()]);
        drop(write_all(&p, b"half a stream"));
        assert_eq!(std::fs::read(&p).unwrap(), old);
        assert_eq!(d.names(), vec!["snap".to_string()]);
        // A missing target stays missing.
        let q = d.join("never");
        drop(write_all(&q, b"x"));
        assert!(!q.exists());
        assert_eq!(d.names(), vec!["snap".to_string()]);
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
        for (what, make) in cases {
            std::fs::write(&p, b"old").unwrap();
            let f = write_all(&p, b"new");
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
        std::fs::write(&p, b"old").unwrap();
        let f = write_all(&p, b"new");
        let temp = f.temp_path().to_path_buf();
        std::fs::remove_file(&temp).unwrap();
        std::fs::write(&temp, b"someone else's").unwrap();
        let e = f.commit().unwrap_err();
        assert!(matches!(e, Error::TempReplaced { .. }), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read(&temp).unwrap(), b"someone else's");
        // Same on drop.
        let f = write_all(&p, b"new");
        let temp2 = f.temp_path().to_path_buf();
        std::fs::remove_file(&temp2).unwrap();
        std::fs::write(&temp2, b"theirs").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&temp2).unwrap(), b"theirs");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
    }

    #[test]
    fn a_taken_temporary_name_is_skipped_and_left_alone() {
        let d = TempDir::new("taken");
        let p = d.join("snap");
        let t = Target::new(&p).unwrap();
        // Squat the next names the counter hands out (other tests may take
        // some of them meanwhile; then fewer are skipped).
        let next = TEMP_COUNTER.load(Ordering::Relaxed);
        let squatted: Vec<PathBuf> = (next..next + 5).map(|n| t.temp_path(n)).collect();
        for s in &squatted {
            std::fs::write(s, b"squatter").unwrap();
        }
        write_all(&p, b"data").commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
        for s in &squatted {
            assert_eq!(std::fs::read(s).unwrap(), b"squatter");
        }
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
