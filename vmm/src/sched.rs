//! A scheduler hint for threads that must answer quickly: the API server
//! thread asks the kernel for a short time slice (EEVDF's per-task custom
//! slice, `sched_setattr` with `sched_runtime`, Linux 6.12+), so that when a
//! request wakes it while the vCPU and event-loop threads keep both CPUs
//! busy (an inflate), it preempts them at once instead of waiting for their
//! slices to end. It needs no privilege and changes neither the policy nor
//! the nice value; older kernels ignore the field.

use std::io;
use std::time::Duration;

/// The API thread's slice: its work per request is tens of microseconds.
pub const API_SLICE: Duration = Duration::from_micros(100);

/// `struct sched_attr` (include/uapi/linux/sched/types.h, version 1).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// Ask for `slice` as the calling thread's time slice (the kernel clamps it
/// to 0.1-100 ms). Only for threads of the normal (fair) policies; the
/// thread keeps its policy and nice value.
pub fn request_slice(slice: Duration) -> io::Result<()> {
    let size = std::mem::size_of::<SchedAttr>() as u32;
    let mut attr = SchedAttr::default();
    // SAFETY: sched_getattr writes at most `size` bytes into `attr`, a
    // #[repr(C)] struct of exactly that size that lives across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            size,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let policy = attr.sched_policy as libc::c_int;
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the thread's scheduling policy {policy} has no fair-class slice"),
        ));
    }
    attr.size = size;
    attr.sched_flags = 0;
    attr.sched_runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: sched_setattr only reads `attr`, a valid sched_attr of `size`
    // bytes; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// [`request_slice`] with [`API_SLICE`], logging (not failing) when the
/// kernel refuses: the API works either way, only its latency under load
/// differs.
pub fn api_thread() {
    if let Err(e) = request_slice(API_SLICE) {
        log::debug!("API thread: cannot ask for a short scheduler slice: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slice_is_set_and_read_back() {
        std::thread::spawn(|| {
            request_slice(Duration::from_micros(300)).unwrap();
            let mut attr = SchedAttr::default();
            let size = std::mem::size_of::<SchedAttr>() as u32;
            // SAFETY: as in request_slice.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_sched_getattr,
                    0,
                    &mut attr as *mut SchedAttr,
                    size,
                    0,
                )
            };
            assert_eq!(rc, 0);
            // Kernels before 6.12 have no custom slice and report the default.
            if attr.sched_runtime != 0 {
                assert_eq!(attr.sched_runtime, 300_000, "slice read back");
            }
        })
        .join()
        .unwrap();
    }
}
