//! Unit tests of the allow-lists; the per-thread SIGSYS tests, which need a
//! child process, are in tests/seccomp.rs.

use super::*;

#[test]
fn every_filter_compiles_in_both_modes() {
    for kind in ThreadKind::ALL {
        for mode in [Mode::Kill, Mode::Log] {
            let prog = compile(kind, mode).unwrap();
            assert!(!prog.is_empty(), "{kind:?}");
            // The kernel refuses programs longer than BPF_MAXINSNS.
            assert!(prog.len() < 4096, "{kind:?}: {} instructions", prog.len());
        }
    }
}

#[test]
fn no_thread_may_exec_trace_or_load_code() {
    for kind in ThreadKind::ALL {
        let a = allowed(kind);
        for sys in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_process_vm_writev,
            libc::SYS_process_vm_readv,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_bpf,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_mount,
            libc::SYS_setuid,
            libc::SYS_keyctl,
            libc::SYS_userfaultfd,
        ] {
            assert!(!a.contains(sys), "{kind:?} allows syscall {sys}");
        }
    }
}

#[test]
fn only_main_and_migration_open_network_sockets() {
    for kind in [ThreadKind::Vcpu, ThreadKind::EventLoop, ThreadKind::Api] {
        let a = allowed(kind);
        assert!(!a.contains(libc::SYS_socket), "{kind:?}");
        assert!(!a.contains(libc::SYS_connect), "{kind:?}");
        assert!(!a.contains(libc::SYS_bind), "{kind:?}");
    }
    for kind in [ThreadKind::Main, ThreadKind::Migration] {
        assert!(allowed(kind).contains(libc::SYS_socket), "{kind:?}");
    }
}

#[test]
fn every_entry_says_why() {
    for kind in ThreadKind::ALL {
        let a = allowed(kind);
        for sys in a.syscalls() {
            assert!(
                a.why(sys).iter().all(|w| !w.trim().is_empty()) && !a.why(sys).is_empty(),
                "{kind:?}: syscall {sys} has no reason"
            );
        }
    }
}

#[test]
fn main_holds_what_every_thread_it_starts_needs() {
    // Filters stack: a thread started by main gets main's list AND its own.
    let main = allowed(ThreadKind::Main);
    for kind in ThreadKind::ALL {
        for sys in allowed(kind).syscalls() {
            assert!(main.contains(sys), "{kind:?} needs {sys}, main lacks it");
        }
    }
    let spawner = allowed(ThreadKind::Spawner);
    for sys in allowed(ThreadKind::Migration).syscalls() {
        assert!(
            spawner.contains(sys),
            "migration needs {sys}, spawner lacks it"
        );
    }
}

/// `clone3` is on no list (its flags cannot be read by BPF): every
/// compiled filter starts by answering it with ENOSYS, and `clone` is
/// allowed only with exactly a thread's flags.
#[test]
fn clone3_is_enosys_and_clone_is_thread_only() {
    for kind in ThreadKind::ALL {
        assert!(!allowed(kind).contains(libc::SYS_clone3), "{kind:?}");
        for mode in [Mode::Kill, Mode::Log] {
            let prog = compile(kind, mode).unwrap();
            assert_eq!(prog[1].k, libc::SYS_clone3 as u32, "{kind:?}");
            assert_eq!(prog[2].k, 0x0005_0000 | libc::ENOSYS as u32, "{kind:?}");
        }
    }
    for kind in [ThreadKind::Main, ThreadKind::Spawner, ThreadKind::Migration] {
        assert!(allowed(kind).contains(libc::SYS_clone), "{kind:?}");
    }
    for kind in [ThreadKind::Vcpu, ThreadKind::EventLoop, ThreadKind::Api] {
        assert!(!allowed(kind).contains(libc::SYS_clone), "{kind:?}");
    }
    assert_eq!(filters::THREAD_CLONE_FLAGS, 0x3d0f00);
}

#[test]
fn modes_parse() {
    assert_eq!("kill".parse::<Mode>().unwrap(), Mode::Kill);
    assert_eq!("log".parse::<Mode>().unwrap(), Mode::Log);
    assert_eq!("off".parse::<Mode>().unwrap(), Mode::Off);
    let e = "strict".parse::<Mode>().unwrap_err().to_string();
    assert!(e.contains("strict"), "{e}");
}
