//! The API socket is never reachable by another user, whatever the umask.
//! Its own test binary: it sets the process-wide umask to 000.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::FakeVmm;

/// Whether user `nobody` (uid 65534) can connect to `sock`: a forked child
/// drops to that uid and tries. Only async-signal-safe calls after fork.
fn nobody_can_connect(sock: &Path) -> bool {
    let path = CString::new(sock.as_os_str().as_bytes()).unwrap();
    // SAFETY: plain sockaddr_un, zeroed then filled within bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    assert!(bytes.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child only calls setuid, socket, connect and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: see above; the child never returns into Rust code.
        unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(2);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd < 0 {
                libc::_exit(3);
            }
            let rc = libc::connect(
                fd,
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            );
            libc::_exit(if rc == 0 { 0 } else { 1 });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    assert!(libc::WIFEXITED(status));
    let code = libc::WEXITSTATUS(status);
    assert!(code <= 1, "child could not drop privileges (exit {code})");
    code == 0
}

#[test]
fn socket_is_0600_from_the_start_with_umask_000() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to switch to uid 65534");
        return;
    }
    // SAFETY: umask has no preconditions; this binary holds only this test.
    let old = unsafe { libc::umask(0) };
    // The probe works: a socket bound plainly under umask 000 is open to all.
    let open = common::sock_path();
    let l = std::os::unix::net::UnixListener::bind(&open).unwrap();
    assert!(
        nobody_can_connect(&open),
        "the probe cannot connect anywhere"
    );
    drop(l);
    std::fs::remove_file(&open).unwrap();
    for i in 0..50 {
        let vmm = FakeVmm::start();
        let mode = std::fs::metadata(&vmm.sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "start {i}: mode {mode:o}");
        assert!(
            !nobody_can_connect(&vmm.sock),
            "start {i}: nobody connected"
        );
        let parent = vmm.sock.parent().unwrap();
        let leftovers = std::fs::read_dir(parent)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!(".b{:x}.", std::process::id()))
            })
            .count();
        assert_eq!(leftovers, 0, "start {i}: private bind directory left");
        assert_eq!(vmm.client().get("/vm").unwrap().0, 200);
    }
    // SAFETY: as above.
    unsafe { libc::umask(old) };
}
