//! Hole punching in shared guest RAM, and the helper processes that punch
//! long memfd discards.
//!
//! Why processes: punching a page out of a file that blimp maps also
//! removes it from blimp's page tables, and for a dirty shared page the
//! kernel flushes the TLB of every CPU running a blimp thread, once per
//! 2 MiB of range (an inter-processor interrupt each). When two blimp
//! threads punch at once on two CPUs, each one's flushes interrupt the
//! other. Measured here with a standalone C program (7 GiB of touched
//! memfd over two files, no KVM): two threads of one process 301-336 ms,
//! two processes 235-241 ms; `perf` put 15% of the threads' time in those
//! flushes. A helper is its own process and maps no guest RAM: while the
//! helpers punch, blimp's threads sleep, and no CPU runs blimp's address
//! space, so no CPU has to be interrupted.
//!
//! The helpers are forked by `blimp run`/`restore` with memfd RAM before
//! anything else happens (no other thread, no VM, no peer, before seccomp)
//! and confine themselves at once ([`ThreadKind::PunchHelper`]: receive,
//! punch holes, close, reply). A request carries the file (`SCM_RIGHTS`)
//! and up to [`MAX_PIECES`] ranges; the helper closes the file before it
//! answers, so it holds nothing between requests. A helper that is gone,
//! stuck or answers nonsense is dropped for good (logged once) and its
//! punches run on blimp's own threads as before: a discard never fails or
//! waits on a helper for more than [`REPLY_TIMEOUT`]. A helper ends when
//! blimp does (end of file on its socket).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::seccomp::{self, ThreadKind};

/// Most bytes one `fallocate(PUNCH_HOLE)` covers: one 7 GiB punch of a
/// mapped memfd measured about twice the time of the same bytes in 1 MiB
/// punches on this host.
pub const MAX_PUNCH: u64 = 16 << 20;

/// Most ranges in one request.
pub const MAX_PIECES: usize = 64;

/// How long blimp waits for a helper's answer (a 7 GiB punch takes about
/// half a second) before it drops the helper and punches itself.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// `fallocate(PUNCH_HOLE|KEEP_SIZE)` of `[offset, offset + len)` in `fd`.
pub fn punch_hole(fd: RawFd, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate on a descriptor the caller keeps open for the call;
    // it touches no memory of this process.
    let rc = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// [`punch_hole`] of each `(offset, len)` of `pieces` in `fd`, in pieces of
/// at most [`MAX_PUNCH`]: the calls made, and the first error (which ends
/// the punching). Allocates nothing (a helper process runs it).
pub fn punch_pieces(fd: RawFd, pieces: &[(u64, u64)]) -> (u64, std::io::Result<()>) {
    let mut calls = 0;
    for &(offset, len) in pieces {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_PUNCH);
            calls += 1;
            if let Err(e) = punch_hole(fd, offset.saturating_add(done), n) {
                return (calls, Err(e));
            }
            done += n;
        }
    }
    (calls, Ok(()))
}

/// [`punch_pieces`] by `helper` when there is one and it answers, else
/// here.
pub fn punch_pieces_by(
    helper: Option<&Helper>,
    fd: RawFd,
    pieces: &[(u64, u64)],
) -> (u64, std::io::Result<()>) {
    helper
        .and_then(|h| h.punch(fd, pieces))
        .unwrap_or_else(|| punch_pieces(fd, pieces))
}

/// Most bytes one turn of [`Shared::serve`] punches before it picks a file
/// again: short enough that the threads end within a few milliseconds of
/// each other.
pub const TURN: u64 = 64 << 20;

/// The pieces of one long discard of striped memfd RAM, shared by the
/// threads that punch them. Two punches of one file wait for each other
/// (its inode lock), so a thread takes its next turn from a file no other
/// thread is punching, the one with the most bytes left: the files run out
/// together, and a thread that is faster than the others (or has a CPU to
/// itself) simply does more turns.
pub struct Shared {
    fds: Vec<RawFd>,
    state: Mutex<SharedState>,
    wake: std::sync::Condvar,
}

struct SharedState {
    /// Per file: the pieces left, in order.
    left: Vec<std::collections::VecDeque<(u64, u64)>>,
    busy: Vec<bool>,
}

impl SharedState {
    /// Bytes left in file `i`.
    fn bytes_left(&self, i: usize) -> u64 {
        self.left[i].iter().map(|&(_, n)| n).sum()
    }
}

impl Shared {
    /// `pieces[i]` lies in `fds[i]`.
    pub fn new(fds: Vec<RawFd>, pieces: Vec<Vec<(u64, u64)>>) -> Self {
        let left = pieces
            .into_iter()
            .map(Vec::into_iter)
            .map(Iterator::collect)
            .collect::<Vec<_>>();
        let busy = vec![false; left.len()];
        Self {
            fds,
            state: Mutex::new(SharedState { left, busy }),
            wake: std::sync::Condvar::new(),
        }
    }

    /// Punch turns (through `helper` when there is one) until nothing is
    /// left: the calls made and the first error (later turns still run).
    pub fn serve(&self, helper: Option<&Helper>) -> (u64, std::io::Result<()>) {
        let (mut calls, mut result) = (0, Ok(()));
        while let Some((file, turn)) = self.next_turn() {
            let (c, r) = punch_pieces_by(helper, self.fds[file], &turn);
            calls += c;
            if result.is_ok() {
                result = r;
            }
            self.done(file);
        }
        (calls, result)
    }

    /// `file`'s turn is over: another thread may take it.
    fn done(&self, file: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.busy[file] = false;
        drop(st);
        self.wake.notify_all();
    }

    /// The next turn: up to [`TURN`] bytes from the idle file with the
    /// most left; waits while every file with bytes left is busy; `None`
    /// when nothing is left to take.
    fn next_turn(&self) -> Option<(usize, Vec<(u64, u64)>)> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let idle = (0..st.left.len())
                .filter(|&i| !st.busy[i] && !st.left[i].is_empty())
                .max_by_key(|&i| st.bytes_left(i));
            if let Some(i) = idle {
                let mut turn = Vec::new();
                let mut bytes = 0;
                while bytes < TURN
                    && let Some((off, len)) = st.left[i].pop_front()
                {
                    let n = len.min(TURN - bytes);
                    if n < len {
                        st.left[i].push_front((off + n, len - n));
                    }
                    turn.push((off, n));
                    bytes += n;
                }
                st.busy[i] = true;
                return Some((i, turn));
            }
            // Nothing left to take, or only files being punched by others:
            // end, or wait until one comes free.
            if st.left.iter().all(std::collections::VecDeque::is_empty) {
                return None;
            }
            st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// One helper process, seen from blimp.
pub struct Helper {
    index: usize,
    pid: libc::pid_t,
    /// `None` once the helper was dropped.
    sock: Mutex<Option<UnixDatagram>>,
}

static HELPERS: OnceLock<Vec<Helper>> = OnceLock::new();

/// Fork `n` helpers for this process (once; later calls do nothing),
/// confined by `mode`. Call before any other thread exists. Returns how
/// many run; one that cannot be started is logged and left out.
pub fn start(n: usize, mode: seccomp::Mode) -> usize {
    let helpers = HELPERS.get_or_init(|| {
        // One filter for all of them.
        let filter = match filter_for(mode) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("memory: punch helpers not started ({e}); blimp punches itself");
                return Vec::new();
            }
        };
        (0..n)
            .filter_map(|i| match Helper::fork_with(i, filter.as_deref()) {
                Ok(h) => Some(h),
                Err(e) => {
                    log::warn!("memory: punch helper {i} not started ({e}); blimp punches itself");
                    None
                }
            })
            .collect()
    });
    helpers.len()
}

/// Helper `i` of this process (modulo their number), if any were started.
pub fn helper(i: usize) -> Option<&'static Helper> {
    let helpers = HELPERS.get()?;
    if helpers.is_empty() {
        return None;
    }
    helpers.get(i % helpers.len())
}

impl Helper {
    /// Fork one helper confined by `mode`'s [`ThreadKind::PunchHelper`]
    /// filter. Safe to call with other threads running (the child makes
    /// raw system calls only), but meant for startup, where the child's
    /// copy of this process is smallest.
    pub fn fork(index: usize, mode: seccomp::Mode) -> std::io::Result<Self> {
        Self::fork_with(index, filter_for(mode)?.as_deref())
    }

    /// [`Helper::fork`] with `filter` already compiled (`None`: no filter).
    fn fork_with(
        index: usize,
        filter: Option<&[seccompiler::sock_filter]>,
    ) -> std::io::Result<Self> {
        let (ours, theirs) = seqpacket_pair()?;
        let theirs_fd = theirs.as_raw_fd();
        // SAFETY: a plain fork (clone with only SIGCHLD: no shared memory,
        // no new stack). The child runs `serve`, which makes raw system
        // calls only and never returns, so it touches no lock or allocator
        // state another thread of the parent may have held at the fork.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::SIGCHLD as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            serve(theirs_fd, filter);
        }
        drop(theirs);
        let sock = UnixDatagram::from(ours);
        sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Helper {
            index,
            pid: pid as libc::pid_t,
            sock: Mutex::new(Some(sock)),
        })
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Is this helper still used?
    pub fn alive(&self) -> bool {
        self.sock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Has the helper punch `pieces` of `fd`: the calls it made and its
    /// first error, or `None` when it did not answer properly (it is then
    /// dropped, and the caller punches; a punch is safe to repeat).
    pub fn punch(&self, fd: RawFd, pieces: &[(u64, u64)]) -> Option<(u64, std::io::Result<()>)> {
        let mut guard = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        let sock = guard.as_ref()?;
        let mut calls = 0;
        for batch in pieces.chunks(MAX_PIECES) {
            match exchange(sock, fd, batch) {
                Ok((c, 0)) => calls += c,
                Ok((c, errno)) => {
                    return Some((calls + c, Err(std::io::Error::from_raw_os_error(errno))));
                }
                Err(why) => {
                    log::warn!(
                        "memory: punch helper {} (pid {}) dropped: {why}; blimp punches memfd RAM itself from now on",
                        self.index,
                        self.pid
                    );
                    *guard = None;
                    return None;
                }
            }
        }
        Some((calls, Ok(())))
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // End of file tells it to end; then reap it.
        drop(self.sock.lock().unwrap_or_else(|p| p.into_inner()).take());
        // SAFETY: waitpid on our own child; no memory is passed.
        unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
    }
}

/// One request and its answer: `(calls, errno)`, or why the helper is no
/// longer trusted.
fn exchange(sock: &UnixDatagram, fd: RawFd, pieces: &[(u64, u64)]) -> Result<(u64, i32), String> {
    let mut req = [0u64; 1 + 2 * MAX_PIECES];
    req[0] = pieces.len() as u64;
    for (i, &(off, len)) in pieces.iter().enumerate() {
        req[1 + 2 * i] = off;
        req[2 + 2 * i] = len;
    }
    let bytes: Vec<u8> = req[..1 + 2 * pieces.len()]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    match sock.send_with_fd(&bytes[..], fd) {
        Ok(n) if n == bytes.len() => {}
        Ok(n) => return Err(format!("sent {n} of {} bytes", bytes.len())),
        Err(e) => return Err(format!("sending a request: {e}")),
    }
    let mut reply = [0u8; 17];
    let n = sock
        .recv(&mut reply)
        .map_err(|e| format!("waiting for its answer: {e}"))?;
    if n != 16 {
        return Err(if n == 0 {
            "it ended".to_string()
        } else {
            format!("a {n}-byte answer (16 expected)")
        });
    }
    let calls = u64::from_ne_bytes(reply[..8].try_into().expect("8 bytes"));
    let errno = u64::from_ne_bytes(reply[8..16].try_into().expect("8 bytes"));
    let most_calls = pieces
        .iter()
        .map(|&(_, len)| len.div_ceil(MAX_PUNCH).max(1))
        .sum::<u64>();
    match i32::try_from(errno) {
        Ok(e) if e < 4096 && calls <= most_calls => Ok((calls, e)),
        _ => Err(format!("a nonsense answer ({calls} calls, errno {errno})")),
    }
}

/// The helpers' filter for `mode` (`None` when seccomp is off).
fn filter_for(mode: seccomp::Mode) -> std::io::Result<Option<seccompiler::BpfProgram>> {
    match mode {
        seccomp::Mode::Off => Ok(None),
        m => seccomp::compile(ThreadKind::PunchHelper, m)
            .map(Some)
            .map_err(std::io::Error::other),
    }
}

fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, which is large
    // enough; on success both are new and owned by nothing else.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: see above: fresh descriptors, each wrapped once.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The helper process. Raw system calls only (it is a fork of a process
/// whose other threads may have held locks): no allocation, no panic;
/// never returns.
fn serve(sock: RawFd, filter: Option<&[seccompiler::sock_filter]>) -> ! {
    block_signals();
    close_all_but(sock);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string that outlives the call.
    unsafe {
        libc::prctl(
            libc::PR_SET_NAME,
            c"blimp-punch".as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if let Some(f) = filter
        && seccompiler::apply_filter(f).is_err()
    {
        exit_now(1);
    }
    loop {
        let mut req = [0u64; 1 + 2 * MAX_PIECES];
        let Some((len, file, valid_fds)) = receive(sock, &mut req) else {
            exit_now(0); // blimp ended (or the socket broke)
        };
        let count = req[0] as usize;
        let (calls, errno) = match &file {
            Some(f) if valid_fds && count <= MAX_PIECES && len == 8 * (1 + 2 * count) => {
                let mut pieces = [(0u64, 0u64); MAX_PIECES];
                for (i, p) in pieces.iter_mut().enumerate().take(count) {
                    *p = (req[1 + 2 * i], req[2 + 2 * i]);
                }
                let (calls, r) = punch_pieces(f.as_raw_fd(), &pieces[..count]);
                (
                    calls,
                    r.err().map_or(0, |e| e.raw_os_error().unwrap_or(libc::EIO)),
                )
            }
            _ => (0, libc::EINVAL),
        };
        // The file is closed before the answer: nothing is kept.
        drop(file);
        if !answer(sock, calls, errno) {
            exit_now(0);
        }
    }
}

/// Signals are blimp's to handle (Ctrl-C reaches the whole foreground
/// group); a helper ends with blimp, on end of file. SIGKILL still works.
fn block_signals() {
    // SAFETY: an all-zero sigset_t is valid storage for sigfillset.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigfillset and sigprocmask only read and write `all`, which
    // lives on this stack.
    unsafe {
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    }
}

/// Close every descriptor but `keep`: no terminal, no KVM, no other file.
fn close_all_but(keep: RawFd) {
    let keep = keep as libc::c_uint;
    // SAFETY: close_range only closes descriptors of this process, none of
    // which anything in it uses but `keep`.
    unsafe {
        if keep > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, keep - 1, 0u32);
        }
        libc::syscall(libc::SYS_close_range, keep + 1, libc::c_uint::MAX, 0u32);
    }
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process at once, running nothing of the
    // parent's copied state.
    unsafe { libc::_exit(code) }
}

/// One request into `req`: its length in bytes, the first descriptor it
/// carried (every other one is closed), and whether it carried exactly one
/// and nothing was cut off. `None` at end of file or on an error.
fn receive(
    sock: RawFd,
    req: &mut [u64; 1 + 2 * MAX_PIECES],
) -> Option<(usize, Option<OwnedFd>, bool)> {
    let mut iov = libc::iovec {
        iov_base: req.as_mut_ptr().cast(),
        iov_len: std::mem::size_of_val(req),
    };
    // Room for a few descriptors, so that extra ones arrive (and are
    // closed) rather than being dropped silently.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is a valid, empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at `iov` (into `req`) and `control`, both on
    // this stack and as long as it says.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n <= 0 {
        return None;
    }
    let mut first = None;
    let mut fds = 0;
    // SAFETY: the CMSG_* walk stays inside `control`, bounded by the
    // kernel's msg_controllen; each SCM_RIGHTS entry holds as many
    // descriptors as its length says, new ones this process now owns.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for k in 0..count {
                    let fd = OwnedFd::from_raw_fd(data.add(k).read_unaligned());
                    if first.is_none() {
                        first = Some(fd);
                    }
                    fds += 1;
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let whole = msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) == 0;
    Some((n as usize, first, fds == 1 && whole))
}

/// Write the answer; false when blimp is gone. Signals are blocked, so a
/// closed socket is EPIPE, not SIGPIPE.
fn answer(sock: RawFd, calls: u64, errno: i32) -> bool {
    let reply = [calls, errno as u64];
    let len = std::mem::size_of_val(&reply);
    // SAFETY: write reads `len` bytes of `reply`, on this stack.
    let sent = unsafe { libc::write(sock, reply.as_ptr().cast(), len) };
    sent == len as isize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    /// A memfd of `mib` MiB with every page written.
    fn filled(mib: u64) -> std::fs::File {
        use std::io::Write;
        // SAFETY: a fresh memfd, wrapped once.
        let fd = unsafe { libc::memfd_create(c"punch-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: see above.
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        let chunk = vec![0x5au8; MIB as usize];
        for _ in 0..mib {
            f.write_all(&chunk).unwrap();
        }
        f
    }

    fn allocated(f: &std::fs::File) -> u64 {
        f.metadata().unwrap().blocks() * 512
    }

    fn state(pid: libc::pid_t) -> Option<char> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        s.rsplit_once(") ")?.1.chars().next()
    }

    /// Turns of a [`Shared`] discard: each at most [`TURN`] bytes, from the
    /// idle file with the most left, never from a file being punched; all
    /// of them together are exactly the pieces given, each byte once.
    #[test]
    fn shared_turns_take_the_idle_file_with_most_left_and_cover_every_piece_once() {
        let pieces = vec![
            vec![(0, 100 * MIB), (300 * MIB, 4096)],
            vec![(8 * MIB, 30 * MIB)],
            vec![(0, 150 * MIB)],
        ];
        let s = Shared::new(vec![-1, -1, -1], pieces.clone());
        let (a, ta) = s.next_turn().unwrap();
        assert_eq!(
            (a, ta.clone()),
            (2, vec![(0, TURN)]),
            "the file with most left"
        );
        let (b, tb) = s.next_turn().unwrap();
        assert_eq!((b, tb.clone()), (0, vec![(0, TURN)]), "file 2 is busy");
        let mut got: Vec<Vec<(u64, u64)>> = vec![Vec::new(); 3];
        got[a].extend(ta);
        got[b].extend(tb);
        s.done(a);
        s.done(b);
        while let Some((f, turn)) = s.next_turn() {
            assert!(turn.iter().map(|&(_, n)| n).sum::<u64>() <= TURN);
            got[f].extend(turn);
            s.done(f);
        }
        // Merge adjacent pieces back: the same ranges as given.
        for (f, want) in pieces.iter().enumerate() {
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for &(off, n) in &got[f] {
                match merged.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += n,
                    _ => merged.push((off, n)),
                }
            }
            assert_eq!(&merged, want, "file {f}");
        }
    }

    /// A thread whose only work left is a file another thread is punching
    /// waits for it; once nothing is left to take, a thread ends even
    /// while another is still punching.
    #[test]
    fn shared_waits_for_a_busy_file_and_ends_when_nothing_is_left() {
        let s = std::sync::Arc::new(Shared::new(vec![-1], vec![vec![(0, 2 * TURN)]]));
        let (f, _) = s.next_turn().unwrap();
        let s2 = s.clone();
        let waiter = std::thread::spawn(move || s2.next_turn());
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "the only file is busy: wait");
        s.done(f);
        let (g, turn) = waiter.join().unwrap().expect("the second turn");
        assert_eq!((g, turn), (0, vec![(TURN, TURN)]));
        assert_eq!(s.next_turn(), None, "nothing left, though file 0 is busy");
    }

    /// Two threads serving one [`Shared`] discard over four files punch
    /// every piece (here, without helpers) and count their calls.
    #[test]
    fn two_threads_serving_shared_turns_punch_every_piece() {
        let files: Vec<_> = (0..4).map(|_| filled(80)).collect();
        let pieces: Vec<Vec<(u64, u64)>> = (0..4u64)
            .map(|i| vec![(0, 4096), (MIB, (10 + 15 * i) * MIB)])
            .collect();
        let s = std::sync::Arc::new(Shared::new(
            files.iter().map(|f| f.as_raw_fd()).collect(),
            pieces.clone(),
        ));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || s.serve(None))
            })
            .collect();
        let mut calls = 0;
        for t in threads {
            let (c, r) = t.join().unwrap();
            r.unwrap();
            calls += c;
        }
        for (f, p) in files.iter().zip(&pieces) {
            let punched: u64 = p.iter().map(|&(_, n)| n).sum();
            assert_eq!(allocated(f), 80 * MIB - punched);
        }
        // Per file: the 4 KiB piece, and the long one in 16 MiB calls
        // (cut where a 64 MiB turn ends).
        assert!((12..=16).contains(&calls), "{calls} calls");
    }

    #[test]
    fn a_helper_punches_exactly_the_ranges_it_is_sent_and_keeps_no_file() {
        let f = filled(48);
        let h = Helper::fork(0, seccomp::Mode::Kill).unwrap();
        let pieces = [(4 * MIB, 20 * MIB), (40 * MIB, 4096)];
        let (calls, r) = h.punch(f.as_raw_fd(), &pieces).expect("the helper answers");
        r.unwrap();
        assert_eq!(calls, 3, "20 MiB is two punches, 4 KiB one");
        assert_eq!(allocated(&f), 48 * MIB - 20 * MIB - 4096);
        // The helper holds its socket and nothing else (the file was closed).
        let fds: Vec<_> = std::fs::read_dir(format!("/proc/{}/fd", h.pid()))
            .unwrap()
            .collect();
        assert_eq!(fds.len(), 1, "{fds:?}");
        assert!(h.alive());
        // An error of the punch itself comes back as that error.
        let ro = std::fs::File::open("/proc/self/cmdline").unwrap();
        let (_, r) = h.punch(ro.as_raw_fd(), &[(0, 4096)]).expect("answers");
        assert!(r.is_err());
        assert!(
            h.alive(),
            "a failed punch is an answer, not a broken helper"
        );
        let pid = h.pid();
        drop(h);
        assert_eq!(state(pid), None, "reaped on drop");
    }

    #[test]
    fn a_killed_or_stopped_helper_is_dropped_and_the_punch_runs_here() {
        let f = filled(8);
        let h = Helper::fork(1, seccomp::Mode::Kill).unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(h.pid(), libc::SIGKILL) };
        while state(h.pid()) != Some('Z') {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(h.punch(f.as_raw_fd(), &[(0, MIB)]).is_none());
        assert!(!h.alive());
        let (calls, r) = punch_pieces_by(Some(&h), f.as_raw_fd(), &[(0, 2 * MIB)]);
        r.unwrap();
        assert_eq!((calls, allocated(&f)), (1, 6 * MIB));
        drop(h);

        // Stopped: no answer within the timeout.
        let h = Helper::fork(2, seccomp::Mode::Kill).unwrap();
        h.sock
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(h.pid(), libc::SIGSTOP) };
        while state(h.pid()) != Some('T') {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (calls, r) = punch_pieces_by(Some(&h), f.as_raw_fd(), &[(2 * MIB, MIB)]);
        r.unwrap();
        assert_eq!((calls, allocated(&f)), (1, 5 * MIB));
        assert!(!h.alive());
        // SAFETY: signalling our own child.
        unsafe { libc::kill(h.pid(), libc::SIGCONT) };
        drop(h); // it sees end of file and ends
    }

    #[test]
    fn a_malformed_request_is_refused_and_the_helper_carries_on() {
        let f = filled(4);
        let h = Helper::fork(3, seccomp::Mode::Kill).unwrap();
        {
            let guard = h.sock.lock().unwrap();
            let sock = guard.as_ref().unwrap();
            // No descriptor.
            sock.send(&[1u64, 0, 4096].map(u64::to_ne_bytes).concat())
                .unwrap();
            let mut reply = [0u8; 16];
            assert_eq!(sock.recv(&mut reply).unwrap(), 16);
            assert_eq!(reply[8..], (libc::EINVAL as u64).to_ne_bytes());
            // A count that does not match the length.
            sock.send_with_fd(
                &[5u64, 0, 4096].map(u64::to_ne_bytes).concat()[..],
                f.as_raw_fd(),
            )
            .unwrap();
            assert_eq!(sock.recv(&mut reply).unwrap(), 16);
            assert_eq!(reply[8..], (libc::EINVAL as u64).to_ne_bytes());
        }
        assert_eq!(allocated(&f), 4 * MIB, "nothing punched");
        let (_, r) = h.punch(f.as_raw_fd(), &[(0, 4096)]).expect("still answers");
        r.unwrap();
        assert_eq!(allocated(&f), 4 * MIB - 4096);
    }

    #[test]
    fn more_pieces_than_one_request_holds_go_in_several() {
        let f = filled(2 * MAX_PIECES as u64 / 16 + 1);
        let h = Helper::fork(4, seccomp::Mode::Kill).unwrap();
        // Every other 4 KiB page of the first 2 * MAX_PIECES + 1 pairs.
        let pieces: Vec<_> = (0..2 * MAX_PIECES as u64 + 1)
            .map(|i| (i * 8192, 4096))
            .collect();
        let before = allocated(&f);
        let (calls, r) = h.punch(f.as_raw_fd(), &pieces).expect("answers");
        r.unwrap();
        assert_eq!(calls, pieces.len() as u64);
        assert_eq!(before - allocated(&f), pieces.len() as u64 * 4096);
    }
}
