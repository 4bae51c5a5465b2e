//! Command-line errors: each names the bad file or value and exits with
//! status 2 for usage errors, 1 for runtime errors.

mod common;

use common::{run_blimp, testguest};

fn assert_usage(args: &[&str], needle: &str) {
    let (code, _out, err) = run_blimp(args);
    assert_eq!(
        code, 2,
        "args {args:?}: expected exit status 2, stderr: {err}"
    );
    assert!(
        err.contains(needle),
        "args {args:?}: stderr does not mention '{needle}': {err}"
    );
}

#[test]
fn missing_kernel() {
    assert_usage(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "/nonexistent/vmlinux",
    );
    assert_usage(&["run", "--kernel", "/nonexistent/vmlinux"], "No such file");
}

#[test]
fn kernel_that_is_not_a_kernel() {
    let f = std::env::temp_dir().join(format!("blimp-not-a-kernel-{}", std::process::id()));
    std::fs::write(&f, b"just text, not an ELF or bzImage").unwrap();
    let p = f.to_str().unwrap();
    assert_usage(
        &["run", "--kernel", p, "--no-stdin"],
        "neither an ELF vmlinux nor a bzImage",
    );
    std::fs::remove_file(&f).unwrap();
}

#[test]
fn unreadable_initrd() {
    let k = testguest().to_str().unwrap();
    assert_usage(
        &["run", "--kernel", k, "--initrd", "/nonexistent/initrd"],
        "initrd /nonexistent/initrd",
    );
    assert_usage(
        &["run", "--kernel", k, "--initrd", "/"],
        "not a regular file",
    );
}

#[test]
fn bad_memory_sizes() {
    let k = testguest().to_str().unwrap();
    assert_usage(&["run", "--kernel", k, "--memory", "0"], "cannot be 0");
    assert_usage(
        &["run", "--kernel", k, "--memory", "100T"],
        "larger than this host's RAM",
    );
    assert_usage(&["run", "--kernel", k, "--memory", "12X"], "\"12X\"");
    assert_usage(&["run", "--kernel", k, "--memory", "1M"], "at least 16 MiB");
}

#[test]
fn bad_vcpu_counts() {
    let k = testguest().to_str().unwrap();
    assert_usage(&["run", "--kernel", k, "--vcpus", "0"], "--vcpus 0");
    assert_usage(
        &["run", "--kernel", k, "--vcpus", "255"],
        "between 1 and 254",
    );
    assert_usage(&["run", "--kernel", k, "--vcpus", "300"], "--vcpus 300");
}

#[test]
fn unknown_arguments_are_usage_errors() {
    let (code, _, err) = run_blimp(&["run", "--kernal", "x"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run_blimp(&["run", "--kernel", "x", "--memory-backend", "tmpfs"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown memory backend 'tmpfs'"), "{err}");
}

#[test]
fn no_permission_on_dev_kvm_is_a_runtime_error() {
    // Run as an unprivileged user, who cannot open root's /dev/kvm (mode 0600).
    let meta = std::fs::metadata("/dev/kvm").expect("/dev/kvm must exist for this test");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        meta.permissions().mode() & 0o006,
        0,
        "/dev/kvm is world-accessible here; this test needs it not to be"
    );
    let k = testguest();
    // A copy the unprivileged user can read.
    let copy = std::env::temp_dir().join(format!("blimp-testguest-{}.elf", std::process::id()));
    std::fs::copy(k, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(common::blimp())
        .args(["run", "--kernel", copy.to_str().unwrap(), "--no-stdin"])
        .output()
        .expect("setpriv (util-linux) is needed for this test");
    std::fs::remove_file(&copy).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/dev/kvm") && err.contains("Permission denied"),
        "{err}"
    );
}

#[test]
fn help_teaches() {
    let (code, out, _) = run_blimp(&["run", "--help"]);
    assert_eq!(code, 0);
    for needle in [
        "--kernel",
        "--memory",
        "512M",
        "--debug-exit",
        "0xf4",
        "--vcpus",
        "--memory-backend",
    ] {
        assert!(out.contains(needle), "run --help lacks {needle}");
    }
}

/// A file's bytes, to show it was not touched.
fn contents(p: &std::path::Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// `--memory-backend file=PATH` puts guest RAM in PATH: a run refused for
/// its kernel leaves PATH as it was, the kernel (or initrd) itself is
/// never taken as the backing, and a file longer than the RAM is not cut.
#[test]
fn a_ram_file_is_not_touched_by_a_refused_run_nor_taken_from_the_kernel() {
    let dir = std::env::temp_dir().join(format!("blimp-cli-ramfile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let data: Vec<u8> = (0..(80u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let ram = dir.join("disk.img");
    std::fs::write(&ram, &data).unwrap();
    let ram_arg = format!("file={}", ram.display());
    let text = dir.join("kpath");
    std::fs::write(&text, b"a text file, not a kernel").unwrap();
    assert_usage(
        &[
            "run",
            "--kernel",
            text.to_str().unwrap(),
            "--memory",
            "64M",
            "--memory-backend",
            &ram_arg,
            "--no-stdin",
        ],
        "no ELF magic and no bzImage header",
    );
    assert!(
        contents(&ram) == data,
        "a refused run left the RAM file as it was"
    );

    // The kernel (and an initrd) as the backing: refused, left whole.
    let kernel = dir.join("vmlinux");
    std::fs::copy(testguest(), &kernel).unwrap();
    let before = contents(&kernel);
    let k = kernel.to_str().unwrap();
    let as_backing = format!("file={k}");
    assert_usage(
        &[
            "run",
            "--kernel",
            k,
            "--memory",
            "64M",
            "--memory-backend",
            &as_backing,
            "--no-stdin",
        ],
        "is the --kernel file itself",
    );
    assert_usage(
        &[
            "run",
            "--kernel",
            k,
            "--initrd",
            text.to_str().unwrap(),
            "--memory",
            "64M",
            "--memory-backend",
            &format!("file={}", text.display()),
            "--no-stdin",
        ],
        "is the --initrd file itself",
    );
    assert!(contents(&kernel) == before, "the kernel is unchanged");

    // A file longer than the RAM: the guest runs on its first 64 MiB, and
    // the rest is still there afterwards.
    let (code, _, err) = run_blimp(&[
        "run",
        "--kernel",
        k,
        "--memory",
        "64M",
        "--memory-backend",
        &ram_arg,
        "--no-stdin",
        "--debug-exit",
        "--cmdline",
        "testguest.balloon=0 testguest.run=\"exit 7\"",
    ]);
    assert_eq!(code, 7, "{err}");
    let after = contents(&ram);
    assert_eq!(
        after.len(),
        data.len(),
        "the RAM file was not cut to 64 MiB"
    );
    assert!(
        after[64 << 20..] == data[64 << 20..],
        "bytes past the RAM are kept"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
