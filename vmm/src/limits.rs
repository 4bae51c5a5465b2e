//! Process resource limits blimp adjusts for itself at start.

/// Raise the soft limit on open files to the hard limit, as a server that
/// holds a descriptor per API connection, per vCPU and per device should
/// (the soft limit is often 1024 while the hard one is far higher). Returns
/// the limit now in force; on failure the old one stays, which blimp
/// works within (the API then closes idle connections to make room).
pub fn raise_open_files() -> u64 {
    // SAFETY: a zeroed rlimit is a valid value for getrlimit to fill.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes one rlimit into `lim`, a valid local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one valid rlimit; it touches no other memory.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}
