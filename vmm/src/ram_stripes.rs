//! memfd guest RAM striped over several files, so that a long discard can
//! be punched by several threads at once.
//!
//! Freeing a memfd's pages is the host kernel removing each 4 KiB page from
//! the file's page cache, under the file's inode lock: one file is freed by
//! one CPU at a time (measured here: 7 GiB in 468-493 ms on one thread,
//! slower on two threads punching the same file, 330-349 ms on two files).
//! So the RAM's byte offsets (the regions one after another, as for a
//! single backing file) are cut into [`STRIPE`]-sized stripes dealt round
//! the files: stripe `k` lives in file `k % n` at `(k / n) * STRIPE`. A
//! long range then has about the same number of bytes in every file.
//!
//! There are two files per discard thread ([`files_for`]): the threads
//! take turns of the files no other thread is punching
//! (`crate::punch::Shared`), so one that runs faster, or has a CPU to
//! itself, takes more of the work instead of waiting for the others at
//! the end (with one file per thread, 7 GiB on 2 CPUs: the two threads
//! ended 4-14 ms apart per range).

use std::fs::File;
use std::os::fd::AsRawFd;

/// Bytes of one stripe: a multiple of 2 MiB (so huge pages line up in
/// every file), long enough that a 4 KiB discard rarely spans two.
pub const STRIPE: u64 = 256 << 20;

/// How many files memfd RAM shared by `threads` discard threads is striped
/// over: two per thread, one for a single thread.
pub fn files_for(threads: usize) -> usize {
    if threads > 1 { 2 * threads } else { 1 }
}

/// The files of one striped guest RAM.
pub struct Stripes {
    files: Vec<File>,
}

/// One piece of a range of RAM offsets, inside one stripe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Which file.
    pub file: usize,
    /// Offset in that file.
    pub offset: u64,
    /// Offset in the RAM (as for a single backing file).
    pub ram_offset: u64,
    pub len: u64,
}

impl Stripes {
    /// `files` (at least one), sized for `total` bytes of RAM.
    pub fn new(files: Vec<File>, total: u64) -> std::io::Result<Self> {
        if files.is_empty() {
            return Err(std::io::Error::other("striped RAM needs at least one file"));
        }
        let stripes = Self { files };
        let n = stripes.files.len() as u64;
        let count = total.div_ceil(STRIPE);
        for (i, f) in stripes.files.iter().enumerate() {
            // Stripes i, i + n, i + 2n, ... below `count`.
            let mine = (count + n - 1 - i as u64) / n;
            f.set_len(mine * STRIPE)?;
        }
        Ok(stripes)
    }

    pub fn count(&self) -> usize {
        self.files.len()
    }

    /// The pieces of RAM offsets `[offset, offset + len)`, in order, cut
    /// at stripe boundaries.
    pub fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = Piece> + '_ {
        let n = self.files.len() as u64;
        let end = offset.saturating_add(len);
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let k = at / STRIPE;
            let within = at % STRIPE;
            let len = (STRIPE - within).min(end - at);
            let piece = Piece {
                file: (k % n) as usize,
                offset: (k / n) * STRIPE + within,
                ram_offset: at,
                len,
            };
            at += len;
            Some(piece)
        })
    }

    /// Maps RAM offsets `[offset, offset + len)` shared at `host`, over
    /// whatever is mapped there, one `mmap` per piece.
    ///
    /// # Safety
    /// `[host, host + len)` must be a mapping this process owns and nothing
    /// reads or writes while this runs (it is replaced).
    pub unsafe fn map_at(&self, host: *mut u8, offset: u64, len: u64) -> std::io::Result<()> {
        for p in self.pieces(offset, len) {
            let at = host.wrapping_add((p.ram_offset - offset) as usize);
            // SAFETY: `at` and `p.len` lie inside the caller's mapping
            // (pieces cover exactly [offset, offset + len)); MAP_FIXED
            // replaces that part of it with the file's pages, as the
            // caller's contract allows; the file is ours and open.
            let r = unsafe {
                libc::mmap(
                    at.cast(),
                    p.len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    self.files[p.file].as_raw_fd(),
                    p.offset as libc::off_t,
                )
            };
            if r == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Bytes of host memory each file holds (its allocated blocks).
    #[cfg(test)]
    pub fn allocated(&self) -> Vec<u64> {
        use std::os::unix::fs::MetadataExt;
        self.files
            .iter()
            .map(|f| f.metadata().map_or(0, |m| m.blocks() * 512))
            .collect()
    }

    /// Reads `buf.len()` bytes of file `i` at `offset` (tests: guest code
    /// reads RAM through its mapping).
    #[cfg(test)]
    pub fn read_at(&self, i: usize, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.files[i].read_exact_at(buf, offset)
    }

    /// The raw descriptor of file `i`, for a punch on a discard thread.
    pub fn fd(&self, i: usize) -> std::os::fd::RawFd {
        self.files[i].as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stripes(n: usize, total: u64) -> Stripes {
        let files = (0..n).map(|_| tempfile()).collect();
        Stripes::new(files, total).unwrap()
    }

    fn tempfile() -> File {
        let name = std::ffi::CString::new("blimp-stripes-test").unwrap();
        // SAFETY: a valid NUL-terminated name; memfd_create touches nothing else.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor owned by nobody else.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
    }

    /// Every RAM offset lands in exactly one place, the pieces cover the
    /// range in order, and every place lies inside its file.
    #[test]
    fn pieces_cover_the_range_and_never_overlap() {
        for n in 1..=4 {
            let total = 5 * STRIPE + (6 << 20);
            let s = stripes(n, total);
            let sizes: Vec<u64> = s
                .files
                .iter()
                .map(|f| f.metadata().unwrap().len())
                .collect();
            let mut seen = std::collections::HashSet::new();
            for (off, len) in [(0, total), (STRIPE - 4096, 8192), (3 * STRIPE + 4096, 4096)] {
                let pieces: Vec<Piece> = s.pieces(off, len).collect();
                assert_eq!(pieces.iter().map(|p| p.len).sum::<u64>(), len);
                let mut at = off;
                for p in &pieces {
                    assert_eq!(p.ram_offset, at, "in order, no gap");
                    assert!(p.len > 0 && p.offset % STRIPE + p.len <= STRIPE);
                    assert!(p.offset + p.len <= sizes[p.file], "{p:?} in file {sizes:?}");
                    at += p.len;
                    if (off, len) == (0, total) {
                        assert!(seen.insert((p.file, p.offset)), "{p:?} placed twice");
                    }
                }
            }
            // Whole stripes go round the files.
            let first: Vec<usize> = s.pieces(0, total).map(|p| p.file).collect();
            assert_eq!(first, (0..6).map(|k| k % n).collect::<Vec<_>>());
        }
    }
}
