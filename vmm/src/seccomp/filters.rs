//! The seccomp allow-lists, one per thread kind. Review every change here:
//! each entry says why the thread needs the syscall. Lists were found by
//! running the test suite under `--seccomp log` (violations in `dmesg`) and
//! `strace -f` over the integration tests; see docs/seccomp.md.
//!
//! Arguments are filtered where it matters: `ioctl` request numbers (exact
//! lists for the vCPU, event-loop and migration threads, "a KVM ioctl" for
//! the main thread, which creates or restores the VM), `mmap`/`mprotect` never with `PROT_EXEC` (and
//! only anonymous mappings outside the main thread), `socket` only for the
//! families a thread uses (none on the vCPU, event-loop and API threads;
//! `AF_INET`/`AF_INET6` only on the main thread, which accepts an incoming
//! migration, and on the migration worker, which connects to its
//! destination).

#![allow(non_snake_case)] // the ioctl_*_nr! macros name functions like the C macros

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_irq_level, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use super::ThreadKind;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);

/// One argument test; all tests of a rule must hold.
type Cond = (u8, SeccompCmpOp, u64);

/// A thread's allow-list: syscall number -> (why, alternatives). An empty
/// alternative list allows the syscall whatever its arguments.
#[derive(Clone, Default)]
pub struct Allowed {
    entries: BTreeMap<i64, Entry>,
}

#[derive(Clone)]
struct Entry {
    why: Vec<&'static str>,
    /// `None`: any arguments. `Some`: one of these rules (each a conjunction).
    rules: Option<Vec<Vec<Cond>>>,
}

impl Allowed {
    /// Allow `sys` whatever its arguments.
    fn allow(&mut self, sys: i64, why: &'static str) -> &mut Self {
        let e = self.entries.entry(sys).or_insert(Entry {
            why: Vec::new(),
            rules: None,
        });
        e.why.push(why);
        e.rules = None;
        self
    }

    /// Allow each of `calls`, whatever its arguments: variants of one
    /// operation (`rename`/`renameat`/`renameat2`) that libc may pick from,
    /// which a thread needs for the same reason.
    fn allow_each(&mut self, calls: &[i64], why: &'static str) -> &mut Self {
        for sys in calls {
            self.allow(*sys, why);
        }
        self
    }

    /// Allow `sys` when its arguments pass one of `rules` (added to the
    /// rules it may already have).
    fn allow_if(&mut self, sys: i64, rules: Vec<Vec<Cond>>, why: &'static str) -> &mut Self {
        match self.entries.get_mut(&sys) {
            Some(e) => {
                e.why.push(why);
                if let Some(r) = &mut e.rules {
                    r.extend(rules);
                }
            }
            None => {
                self.entries.insert(
                    sys,
                    Entry {
                        why: vec![why],
                        rules: Some(rules),
                    },
                );
            }
        }
        self
    }

    /// Everything `other` allows, too.
    fn merge(&mut self, other: &Allowed) -> &mut Self {
        for (sys, e) in &other.entries {
            for w in &e.why {
                match &e.rules {
                    None => self.allow(*sys, w),
                    Some(r) => self.allow_if(*sys, r.clone(), w),
                };
            }
        }
        self
    }

    /// Whether `sys` is on the list at all (with or without argument tests).
    pub fn contains(&self, sys: i64) -> bool {
        self.entries.contains_key(&sys)
    }

    /// The syscall numbers on the list.
    pub fn syscalls(&self) -> impl Iterator<Item = i64> + '_ {
        self.entries.keys().copied()
    }

    /// Why `sys` is on the list (empty when it is not).
    pub fn why(&self, sys: i64) -> &[&'static str] {
        self.entries.get(&sys).map_or(&[], |e| &e.why)
    }

    /// The list as seccompiler rules.
    pub(crate) fn into_rules(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.entries
            .into_iter()
            .map(|(sys, e)| {
                let rules = e
                    .rules
                    .unwrap_or_default()
                    .into_iter()
                    .map(|conds| {
                        let conds = conds
                            .into_iter()
                            .map(|(arg, op, val)| {
                                SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, val)
                                    .expect("argument index below 6")
                            })
                            .collect();
                        SeccompRule::new(conds).expect("a rule has at least one condition")
                    })
                    .collect();
                (sys, rules)
            })
            .collect()
    }
}

fn eq(arg: u8, val: u64) -> Cond {
    (arg, SeccompCmpOp::Eq, val)
}

/// `(arg & mask) == val`.
fn masked(arg: u8, mask: u64, val: u64) -> Cond {
    (arg, SeccompCmpOp::MaskedEq(mask), val)
}

fn ioctls(reqs: &[std::os::raw::c_ulong]) -> Vec<Vec<Cond>> {
    reqs.iter().map(|r| vec![eq(1, *r)]).collect()
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
const MAP_ANON: u64 = libc::MAP_ANONYMOUS as u64;

/// What every Rust thread of blimp does: allocate, lock, log, sleep, end.
fn thread_basics() -> Allowed {
    let mut a = Allowed::default();
    a.allow(libc::SYS_futex, "std Mutex/Condvar/channels, thread join")
        .allow(libc::SYS_read, "eventfds, signalfd, sockets, files")
        .allow(
            libc::SYS_write,
            "stderr logging, eventfd wakeups, serial output",
        )
        .allow(libc::SYS_writev, "stderr logging through std")
        .allow_if(
            libc::SYS_rt_sigaction,
            vec![
                vec![eq(0, libc::SIGBUS as u64)],
                vec![eq(0, libc::SIGSEGV as u64)],
            ],
            "std's SIGBUS/SIGSEGV handler puts the default action back before the fault \
             repeats: without it a bus error (file=PATH RAM cut short under the VM) died as \
             a seccomp kill (SIGSYS), hiding the real fault",
        )
        .allow(libc::SYS_close, "dropping descriptors")
        .allow(libc::SYS_brk, "malloc on the main arena")
        .allow_if(
            libc::SYS_mmap,
            vec![vec![masked(2, PROT_EXEC, 0), masked(3, MAP_ANON, MAP_ANON)]],
            "malloc arenas and large allocations: anonymous, never executable",
        )
        .allow_if(
            libc::SYS_mprotect,
            vec![vec![masked(2, PROT_EXEC, 0)]],
            "malloc growing an arena: never executable",
        )
        .allow_if(
            libc::SYS_ioctl,
            vec![
                vec![eq(0, 0), eq(1, libc::TCSETS)],
                vec![eq(0, 2), eq(1, libc::TCGETS)],
            ],
            "the panic hook puts the console's terminal (stdin) back as it was; \
             the logger asks whether stderr is a terminal (isatty) before each message",
        )
        .allow(libc::SYS_munmap, "freeing large allocations, thread stacks")
        .allow(libc::SYS_mremap, "realloc of large allocations")
        .allow(
            libc::SYS_madvise,
            "glibc frees an ended thread's stack (MADV_DONTNEED)",
        )
        .allow(
            libc::SYS_rt_sigprocmask,
            "glibc/std mask signals around thread start and exit",
        )
        .allow(
            libc::SYS_rt_sigreturn,
            "return from the vCPU kick signal handler",
        )
        .allow(
            libc::SYS_sigaltstack,
            "std's stack-overflow guard for each thread",
        )
        .allow(libc::SYS_exit, "a thread ends")
        .allow(
            libc::SYS_exit_group,
            "the process ends (also from a panic or an error)",
        )
        .allow(libc::SYS_gettid, "logging and glibc")
        .allow(libc::SYS_getpid, "glibc (raise on abort)")
        .allow(libc::SYS_tgkill, "kicking a vCPU out of KVM_RUN; abort()")
        .allow_if(
            libc::SYS_prctl,
            vec![vec![eq(0, libc::PR_SET_NAME as u64)]],
            "std names a thread (PR_SET_NAME)",
        )
        .allow(
            libc::SYS_sched_getaffinity,
            "std::thread::available_parallelism",
        )
        .allow(libc::SYS_sched_yield, "spin loops in std/tokio")
        .allow(
            libc::SYS_clock_gettime,
            "Instant/SystemTime when the vDSO is not used",
        )
        .allow(libc::SYS_clock_nanosleep, "thread::sleep, pacing")
        .allow(libc::SYS_nanosleep, "thread::sleep on older glibc")
        .allow(libc::SYS_getrandom, "HashMap seeds")
        .allow(
            libc::SYS_restart_syscall,
            "a sleep interrupted by the kick signal",
        )
        .allow(
            libc::SYS_rseq,
            "glibc registers restartable sequences per thread",
        )
        .allow(libc::SYS_set_robust_list, "glibc, at thread start")
        .allow(
            libc::SYS_fcntl,
            "F_GETFL/F_SETFL/F_DUPFD_CLOEXEC on own descriptors",
        )
        .allow(libc::SYS_poll, "std/tokio waiting on a descriptor")
        .allow(libc::SYS_ppoll, "waiting on a descriptor");
    a
}

/// The `clone` flags glibc's `pthread_create` passes (what
/// `std::thread::spawn` ends in): a thread sharing memory, files and signal
/// handlers with this process. Firecracker allows `clone` with exactly
/// these flags, too.
pub const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

/// Starting threads: only for the threads that do.
///
/// `clone3` is not on any list: its flags sit in a struct BPF cannot read,
/// so every filter answers it with ENOSYS (see [`super::compile`]) and
/// glibc falls back to `clone`, whose flags are checked here: a thread,
/// never a new process (no fork, vfork or namespaces).
fn thread_spawning() -> Allowed {
    let mut a = Allowed::default();
    a.allow_if(
        libc::SYS_clone,
        vec![vec![eq(0, THREAD_CLONE_FLAGS)]],
        "std::thread::spawn (glibc's pthread_create, after clone3 said ENOSYS): exactly a thread's flags",
    )
    .allow(libc::SYS_set_robust_list, "new thread setup")
    .allow(libc::SYS_rseq, "new thread setup");
    a
}

/// Guest RAM discard (balloon inflate, free page reporting, hint discard)
/// and its accounting, on whichever thread serves the balloon queue.
fn ram_discard() -> Allowed {
    let mut a = Allowed::default();
    a.allow(
        libc::SYS_madvise,
        "MADV_DONTNEED/MADV_REMOVE on guest RAM the balloon took",
    )
    .allow(
        libc::SYS_fallocate,
        "FALLOC_FL_PUNCH_HOLE on memfd/hugetlb/file backings the balloon took",
    )
    .allow(libc::SYS_mincore, "resident-page counts for /metrics")
    .merge(&punch_helper_client());
    a
}

/// Handing a long memfd punch to a punch helper process (`crate::punch`).
fn punch_helper_client() -> Allowed {
    let mut a = Allowed::default();
    a.allow(
        libc::SYS_sendmsg,
        "a long memfd punch handed to a punch helper process (the file goes with it, SCM_RIGHTS)",
    )
    .allow(libc::SYS_recvfrom, "the punch helper's answer");
    a
}

/// `fallocate` that punches holes and does nothing else.
fn punch_only(why: &'static str) -> Allowed {
    let mut a = Allowed::default();
    a.allow_if(
        libc::SYS_fallocate,
        vec![vec![eq(
            1,
            (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64,
        )]],
        why,
    );
    a
}

/// Waiting on several descriptors (event-manager, tokio).
fn epoll() -> Allowed {
    let mut a = Allowed::default();
    a.allow_each(
        &[libc::SYS_epoll_wait, libc::SYS_epoll_pwait],
        "event loop / tokio reactor",
    )
    .allow(libc::SYS_epoll_ctl, "adding and removing descriptors")
    .allow(
        libc::SYS_timerfd_settime,
        "balloon statistics timer, tokio timers",
    );
    a
}

/// Talking over a connected socket (the API's connections, the migration
/// stream and its handshake).
fn socket_io() -> Allowed {
    let mut a = Allowed::default();
    a.allow_each(
        &[libc::SYS_recvfrom, libc::SYS_recvmsg],
        "reading API requests, migration handshake replies",
    )
    .allow_each(
        &[libc::SYS_sendto, libc::SYS_sendmsg],
        "writing API responses, the migration stream and handshake",
    )
    .allow(
        libc::SYS_shutdown,
        "closing a connection, ending the stream",
    )
    .allow(
        libc::SYS_getsockopt,
        "SO_ERROR after a non-blocking connect, peer credentials",
    )
    .allow(
        libc::SYS_setsockopt,
        "per-connection options: timeouts (SO_SNDTIMEO/SO_RCVTIMEO), TCP_NODELAY",
    )
    .allow_each(
        &[libc::SYS_getsockname, libc::SYS_getpeername],
        "std::net and tokio addresses",
    );
    a
}

/// Looking at files through std::fs metadata (the target of a snapshot or
/// of a file:// migration, the open temporary file).
fn file_metadata() -> Allowed {
    let mut a = Allowed::default();
    a.allow_each(
        &[libc::SYS_newfstatat, libc::SYS_statx],
        "std::fs (l)stat checks of a target path",
    )
    .allow(libc::SYS_fstat, "std::fs metadata of an open file");
    a
}

/// The KVM ioctls a vCPU thread makes: KVM_RUN, the emulation fix-ups and,
/// while paused for the final migration round, reading its state.
fn vcpu_ioctls() -> Vec<std::os::raw::c_ulong> {
    vec![
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_VCPU_EVENTS(),
        KVM_SET_VCPU_EVENTS(),
        KVM_GET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_GET_FPU(),
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_GET_LAPIC(),
        KVM_GET_MSRS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_TSC_KHZ(),
    ]
}

/// Any KVM ioctl (type 0xAE): for the threads that save or restore state.
fn any_kvm_ioctl() -> Vec<Cond> {
    vec![masked(1, 0xff00, u64::from(KVMIO) << 8)]
}

fn vcpu() -> Allowed {
    let mut a = thread_basics();
    a.allow_if(
        libc::SYS_ioctl,
        ioctls(&vcpu_ioctls()),
        "KVM_RUN, PVM emulation fix-ups (regs, events), state capture while paused",
    );
    // MMIO/PIO exits run the devices on this thread: a balloon queue
    // notification may discard guest RAM.
    a.merge(&ram_discard());
    a
}

/// A discard worker: `madvise` on the part of an anonymous range it is
/// handed (already in `thread_basics`), hole punches in its memfd file,
/// channels (futex) and nothing else.
fn discard() -> Allowed {
    let mut a = thread_basics();
    a.merge(&punch_only(
        "FALLOC_FL_PUNCH_HOLE|KEEP_SIZE of its part of memfd RAM: never a write or a resize",
    ))
    .merge(&punch_helper_client());
    a
}

/// A punch helper process (`crate::punch`), forked at startup: receive a
/// request (ranges and one file), punch holes, close the file, answer.
/// Nothing else: no memory management, no threads, no other file.
fn punch_helper() -> Allowed {
    let mut a =
        punch_only("FALLOC_FL_PUNCH_HOLE|KEEP_SIZE of the ranges: never a write or a resize");
    a.allow(
        libc::SYS_recvmsg,
        "a request: ranges, and the file (SCM_RIGHTS)",
    )
    .allow(
        libc::SYS_close,
        "the request's file, once punched (or refused)",
    )
    .allow(libc::SYS_write, "the answer")
    .allow(
        libc::SYS_exit_group,
        "blimp ended (end of file on the socket)",
    );
    a
}

fn event_loop() -> Allowed {
    let mut a = thread_basics();
    a.merge(&epoll())
        .merge(&ram_discard())
        .allow_if(
            libc::SYS_ioctl,
            ioctls(&[
                KVM_IRQ_LINE(),
                KVM_GET_DIRTY_LOG(),
                KVM_SET_USER_MEMORY_REGION(),
                libc::TCGETS,
                libc::TCSETS,
                libc::TCSETSW,
                libc::FIONBIO,
                libc::TIOCGPGRP,
            ]),
            "interrupt lines; dirty-log sync for hinting; the console's terminal mode \
             (raw again after SIGCONT, if blimp is the terminal's foreground job)",
        )
        .allow(
            libc::SYS_getpgrp,
            "is blimp the terminal's foreground job (raw again after SIGCONT)",
        )
        .merge(&file_metadata())
        .allow(libc::SYS_lseek, "reading the console")
        .allow(
            libc::SYS_flock,
            "PUT /snapshot, file:// migrations: a target another process holds a lock on \
             (a running VM's file=PATH RAM) is refused",
        )
        .allow_if(
            libc::SYS_openat,
            vec![vec![masked(
                2,
                (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64,
                libc::O_RDONLY as u64,
            )]],
            "read-only, no create: the balloon policy reads host PSI (psi_path) and /proc/meminfo",
        )
        .allow_each(
            &[libc::SYS_unlink, libc::SYS_unlinkat],
            "removing the API socket at exit",
        )
        .allow(
            libc::SYS_sendto,
            "answering on an API channel pipe/socketpair",
        )
        .allow(libc::SYS_recvfrom, "API channel")
        .allow(libc::SYS_shutdown, "API channel");
    a
}

fn api() -> Allowed {
    let mut a = thread_basics();
    a.merge(&epoll())
        .merge(&socket_io())
        .allow(
            libc::SYS_accept4,
            "accepting API connections on the bound socket",
        )
        .allow_if(
            libc::SYS_openat,
            vec![vec![masked(
                2,
                (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64,
                libc::O_RDONLY as u64,
            )]],
            "read-only, no create: std::thread::available_parallelism reads the cgroup \
             CPU quota (seen under --seccomp log)",
        )
        .allow_if(
            libc::SYS_ioctl,
            ioctls(&[libc::FIONBIO]),
            "non-blocking accepted sockets",
        );
    a
}

fn socket_families() -> Vec<Vec<Cond>> {
    [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]
        .iter()
        .map(|f| vec![eq(0, *f as u64)])
        .collect()
}

/// Sockets, files and KVM state: the migration worker and the helpers it
/// starts (switchover handshake, the thread that stops the VM afterwards).
fn migration() -> Allowed {
    let mut a = thread_basics();
    a.merge(&thread_spawning())
        .merge(&ram_discard())
        .merge(&epoll())
        .merge(&socket_io())
        .merge(&file_metadata())
        .allow_if(
            libc::SYS_socket,
            socket_families(),
            "unix:// and tcp:// destinations (AF_UNIX, AF_INET, AF_INET6)",
        )
        .allow(libc::SYS_connect, "connecting to the destination")
        .allow(libc::SYS_pread64, "reading back the stream / files")
        .allow(libc::SYS_pwrite64, "writing files")
        .allow(libc::SYS_lseek, "files")
        .allow(
            libc::SYS_openat,
            "file:// destinations: the temporary file, the directory",
        )
        .allow(libc::SYS_open, "file:// destinations")
        .allow(libc::SYS_fsync, "committing the file and its directory")
        .allow(libc::SYS_fdatasync, "committing the file")
        .allow(libc::SYS_ftruncate, "files")
        .allow(
            libc::SYS_openat,
            "file:// destinations: an unnamed O_TMPFILE file in the target's directory",
        )
        .allow_each(
            &[libc::SYS_link, libc::SYS_linkat],
            "naming the complete O_TMPFILE file (linkat of /proc/self/fd/N)",
        )
        .allow(
            libc::SYS_getdents64,
            "listing the target's directory for stale temporary files",
        )
        .allow(
            libc::SYS_flock,
            "locking the file being written; a stale temporary file is one nobody locks",
        )
        .allow_each(
            &[libc::SYS_rename, libc::SYS_renameat, libc::SYS_renameat2],
            "renaming the complete file over the target",
        )
        .allow_each(
            &[libc::SYS_unlink, libc::SYS_unlinkat],
            "removing an aborted temporary file",
        )
        .allow_if(
            libc::SYS_ioctl,
            ioctls(&[
                KVM_SET_USER_MEMORY_REGION(),
                KVM_GET_DIRTY_LOG(),
                KVM_GET_IRQCHIP(),
                KVM_GET_PIT2(),
                KVM_GET_CLOCK(),
                libc::FIONBIO,
            ]),
            "dirty logging on/off and its sync, the VM's interrupt controller, PIT and \
             clock state (the vCPUs' state is read on the vCPU threads); non-blocking sockets",
        );
    a
}

/// Installing a (narrower) filter on a thread this thread starts: the
/// new thread calls seccomp(2) under the filter it inherited.
fn filter_installing() -> Allowed {
    let mut a = Allowed::default();
    a.allow(
        libc::SYS_seccomp,
        "a thread started here installs its own, narrower filter",
    )
    .allow_if(
        libc::SYS_prctl,
        vec![vec![eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)]],
        "required before seccomp(2) by an unprivileged process",
    );
    a
}

fn spawner() -> Allowed {
    // It can hand a migration worker no more than it holds itself.
    let mut a = migration();
    a.merge(&thread_basics())
        .merge(&thread_spawning())
        .merge(&filter_installing());
    a
}

/// The main thread before the event loop: building or restoring the VM,
/// accepting an incoming migration, binding the API socket, starting every
/// other thread. It holds the union of their lists, since they inherit it.
fn main_thread() -> Allowed {
    let mut a = Allowed::default();
    for k in [
        ThreadKind::EventLoop,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::Migration,
        ThreadKind::Spawner,
        ThreadKind::Discard,
    ] {
        a.merge(&allowed(k));
    }
    a.merge(&filter_installing())
        .allow_if(
            libc::SYS_mmap,
            vec![vec![masked(2, PROT_EXEC, 0)]],
            "guest RAM (shared memfd/file mappings), the vCPUs' kvm_run areas: never executable",
        )
        .allow_if(
            libc::SYS_ioctl,
            vec![
                any_kvm_ioctl(),
                vec![eq(1, libc::TCGETS)],
                vec![eq(1, libc::TCSETS)],
                vec![eq(1, libc::TCSETSW)],
                vec![eq(1, libc::FIONBIO)],
                vec![eq(1, libc::FIOCLEX)],
                vec![eq(0, 0), eq(1, libc::TIOCGPGRP)],
            ],
            "creating and restoring the VM (KVM ioctls), the console's terminal mode; \
             whether blimp is the terminal's foreground job (tcgetpgrp on stdin)",
        )
        .allow(
            libc::SYS_getpgrp,
            "whether blimp is the terminal's foreground job (job control)",
        )
        .allow_each(
            &[libc::SYS_bind, libc::SYS_listen],
            "the API socket, the incoming migration listener",
        )
        .allow_each(
            &[libc::SYS_accept4, libc::SYS_accept],
            "the incoming migration connection",
        )
        .allow_each(
            &[libc::SYS_mkdir, libc::SYS_mkdirat, libc::SYS_rmdir],
            "the private directory the API socket is bound in",
        )
        .allow_each(
            &[libc::SYS_chmod, libc::SYS_fchmodat],
            "the API socket's mode (0600)",
        )
        .allow_each(
            &[libc::SYS_link, libc::SYS_linkat],
            "the API socket, linked into place (a rename would replace another blimp's)",
        )
        .allow(
            libc::SYS_flock,
            "file=PATH guest RAM: its exclusive lock, so no second process maps it",
        )
        .allow(libc::SYS_memfd_create, "memfd and hugetlb guest RAM")
        .allow(libc::SYS_ftruncate, "sizing memfd/file guest RAM")
        .allow(
            libc::SYS_eventfd2,
            "device and API wakeups, ioeventfd/irqfd",
        )
        .allow(libc::SYS_epoll_create1, "the event loop, the API runtime")
        .allow(libc::SYS_timerfd_create, "the balloon statistics timer")
        .allow(libc::SYS_signalfd4, "the terminating signals as events")
        .allow(libc::SYS_rt_sigaction, "the vCPU kick signal handler")
        .allow(libc::SYS_access, "probing files")
        .allow(libc::SYS_readlink, "std::env::current_exe")
        .allow(libc::SYS_pipe2, "internal wakeups")
        .allow(libc::SYS_prlimit64, "reading limits")
        .allow(libc::SYS_sysinfo, "host RAM")
        .allow_each(
            &[libc::SYS_sched_getattr, libc::SYS_sched_setattr],
            "the API thread's short scheduler slice (vmm::sched), before its own filter",
        );
    a
}

/// The allow-list of one thread kind.
pub fn allowed(kind: ThreadKind) -> Allowed {
    match kind {
        ThreadKind::Main => main_thread(),
        ThreadKind::EventLoop => event_loop(),
        ThreadKind::Vcpu => vcpu(),
        ThreadKind::Api => api(),
        ThreadKind::Migration => migration(),
        ThreadKind::Spawner => spawner(),
        ThreadKind::Discard => discard(),
        ThreadKind::PunchHelper => punch_helper(),
    }
}
