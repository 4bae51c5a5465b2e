//! Where guest RAM that lives in a shared file (`file=PATH`, memfd,
//! hugetlb) holds data, so that a reader of all of it (a migration's or a
//! snapshot's first round) can leave the holes alone: a read fault on a
//! hole of a shared tmpfs/memfd or hugetlb mapping makes the host allocate
//! the page (a snapshot of a ballooned memfd guest gave all the balloon's
//! memory back to the guest's side of the host), and where none is left
//! (a full tmpfs under `file=PATH`, no free huge page) the read is a
//! SIGBUS, and the VM is lost. Holes read as zero, so the reader records
//! them as zero pages without looking.

use std::os::fd::RawFd;

const PAGE: u64 = 4096;

/// Calls `part(offset, len)` for each piece of `[off, off + len)` of the
/// file `fd` that may hold data, in order, page-aligned (widened to whole
/// pages) and without overlap, found with `lseek(SEEK_DATA/SEEK_HOLE)`
/// (a swapped-out tmpfs page is data). All of it when the filesystem
/// cannot tell (an error other than "no data from here on"). Moves `fd`'s
/// file position.
pub fn file_data(fd: RawFd, off: u64, len: u64, part: &mut dyn FnMut(u64, u64)) {
    let end = off.saturating_add(len);
    let mut pos = off;
    while pos < end {
        let data = match seek(fd, pos, libc::SEEK_DATA) {
            Ok(d) => d.max(pos),
            // ENXIO: no data at or after `pos`.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return,
            Err(_) => {
                part(pos, end - pos);
                return;
            }
        };
        if data >= end {
            return;
        }
        let hole = seek(fd, data, libc::SEEK_HOLE).unwrap_or(end);
        let from = (data & !(PAGE - 1)).max(pos);
        let to = hole.max(data + 1).next_multiple_of(PAGE).min(end);
        part(from, to - from);
        pos = to;
    }
}

fn seek(fd: RawFd, at: u64, whence: libc::c_int) -> std::io::Result<u64> {
    let at =
        libc::off_t::try_from(at).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek(2) on a descriptor the caller owns; it moves only that
    // file's position and touches no memory.
    let r = unsafe { libc::lseek(fd, at, whence) };
    u64::try_from(r).map_err(|_| std::io::Error::last_os_error())
}

/// Calls `part(offset, len)` for each run of pages of `[host, host + len)`
/// (a hugetlb mapping: its pages are never swapped, so a page not mapped
/// here holds nothing) that `mincore` says are present, offsets relative
/// to `host`, in order. All of it when `mincore` fails. `host` and `len`
/// must be page-aligned, `len` at most a few MiB (one byte per page is
/// allocated).
pub fn resident(host: *mut u8, len: u64, part: &mut dyn FnMut(u64, u64)) {
    let pages = (len / PAGE) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: mincore(2) only reads the page tables of [host, host + len),
    // which the caller says is one of its mappings, and writes one byte
    // per page into `vec`, which has that many.
    let rc = unsafe { libc::mincore(host.cast(), len as usize, vec.as_mut_ptr()) };
    if rc != 0 {
        part(0, len);
        return;
    }
    let mut i = 0;
    while i < pages {
        if vec[i] & 1 == 0 {
            i += 1;
            continue;
        }
        let start = i;
        while i < pages && vec[i] & 1 != 0 {
            i += 1;
        }
        part(start as u64 * PAGE, (i - start) as u64 * PAGE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    fn parts_of(fd: RawFd, off: u64, len: u64) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        file_data(fd, off, len, &mut |o, l| v.push((o, l)));
        v
    }

    #[test]
    fn a_tmpfs_file_has_data_only_where_it_was_written() {
        let name = c"blimp-test-holes";
        // SAFETY: memfd_create with a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor nobody else owns.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(64 * PAGE).unwrap();
        let fd = f.as_raw_fd();
        assert_eq!(parts_of(fd, 0, 64 * PAGE), vec![]);
        f.write_all_at(&[1], 3 * PAGE + 17).unwrap();
        f.write_all_at(&[1; 4096 * 2], 10 * PAGE).unwrap();
        f.write_all_at(&[0; 4096], 12 * PAGE).unwrap(); // data, though zero
        assert_eq!(
            parts_of(fd, 0, 64 * PAGE),
            vec![(3 * PAGE, PAGE), (10 * PAGE, 3 * PAGE)]
        );
        // Clipped to the range asked for.
        assert_eq!(
            parts_of(fd, 11 * PAGE, 20 * PAGE),
            vec![(11 * PAGE, 2 * PAGE)]
        );
        assert_eq!(parts_of(fd, 4 * PAGE, 6 * PAGE), vec![]);
        // A punched page is a hole again.
        crate::punch::punch_hole(fd, 11 * PAGE, PAGE).unwrap();
        assert_eq!(
            parts_of(fd, 0, 64 * PAGE),
            vec![(3 * PAGE, PAGE), (10 * PAGE, PAGE), (12 * PAGE, PAGE)]
        );
    }

    #[test]
    fn a_descriptor_that_cannot_seek_counts_as_all_data() {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) into a two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        assert_eq!(parts_of(fds[0], PAGE, 8 * PAGE), vec![(PAGE, 8 * PAGE)]);
        for fd in fds {
            // SAFETY: the pipe's ends, opened above.
            unsafe { libc::close(fd) };
        }
    }

    #[test]
    fn resident_pages_come_in_runs() {
        let len = 16 * PAGE;
        // SAFETY: a new private anonymous mapping, unmapped below.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        let host = host.cast::<u8>();
        for p in [2u64, 3, 4, 9, 15] {
            // SAFETY: page `p` of the mapping above.
            unsafe { host.add((p * PAGE) as usize).write(1) };
        }
        let mut v = Vec::new();
        resident(host, len, &mut |o, l| v.push((o, l)));
        assert_eq!(
            v,
            vec![(2 * PAGE, 3 * PAGE), (9 * PAGE, PAGE), (15 * PAGE, PAGE)]
        );
        // SAFETY: the mapping made above, used no more.
        unsafe { libc::munmap(host.cast(), len as usize) };
    }
}
