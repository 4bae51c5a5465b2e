//! Files written by migrate-to-file (`PUT /migration` with `file://`) and
//! `PUT /snapshot`: an existing file is replaced only by a complete stream;
//! a failed or cancelled job leaves it byte-identical and no temporary file
//! behind; a symlink, device node, FIFO, socket or directory is refused and
//! left as it was.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use api::client::ApiClient;
use common::{SmallTmpfs, TestDir, Vm};
use serde_json::{Value, json};

const BOOT: Duration = Duration::from_secs(30);
/// 32 MiB filled: a stream of a bit more than 32 MiB.
const PROGRAM: &str = "fill 32 2;echo MIGRATE NOW";
const MAGIC: &[u8] = b"BLIMPMIG";
/// What the guest killed in the middle of a snapshot fills: enough that
/// writing the snapshot takes a while.
const KILL_FILL_MIB: u64 = 640;

/// Recognisable contents for the file a job must not damage.
fn old_contents() -> Vec<u8> {
    // A stream's magic: only a stream (or an empty file) is replaced.
    let mut v = b"BLIMPMIG AN OLDER SNAPSHOT\n".to_vec();
    v.extend((0..64 * 1024u32).map(|i| (i.wrapping_mul(7) >> 3) as u8));
    v
}

/// Names in `dir` that look like a Blimp temporary file.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".blimp-tmp."))
        .collect()
}

fn file_url(p: &Path) -> String {
    format!("file://{}", p.display())
}

/// The two ways to write a file: a live migration to `file://`, a snapshot.
#[derive(Clone, Copy, Debug)]
enum Job {
    Migration,
    Snapshot,
}

impl Job {
    fn start(self, api: &ApiClient, path: &Path) -> (u16, Value) {
        match self {
            Job::Migration => api.put("/migration", &json!({"destination": file_url(path)})),
            Job::Snapshot => api.put("/snapshot", &json!({"path": path})),
        }
        .expect("PUT")
    }

    fn start_ok(self, api: &ApiClient, path: &Path) {
        let (s, b) = self.start(api, path);
        assert_eq!(s, 200, "{self:?} to {}: {b}", path.display());
    }

    /// Start the job, wait for it to complete; `path` now holds the whole
    /// stream of the 32 MiB the guest filled.
    fn run_to_completion(self, api: &ApiClient, path: &Path) {
        self.start_ok(api, path);
        let st = wait_job(api);
        assert_eq!(st["state"], "Completed", "{self:?}: {st}");
        let new = std::fs::read(path).unwrap();
        assert!(
            new.starts_with(MAGIC),
            "{self:?}: a migration stream replaced the old file"
        );
        assert!(new.len() > 32 << 20, "{self:?}: {} bytes", new.len());
    }
}

/// After a failed or cancelled `job`: `file` still holds `old` and `dir`
/// has no temporary file left.
fn assert_untouched(job: Job, file: &Path, old: &[u8], dir: &Path) {
    assert_eq!(
        std::fs::read(file).unwrap(),
        old,
        "{job:?}: the old file is byte-identical"
    );
    assert!(temp_files(dir).is_empty(), "{job:?}: {:?}", temp_files(dir));
}

/// Poll `GET /migration` until the job finished; returns its status.
fn wait_job(api: &ApiClient) -> Value {
    common::wait_migration_end(api, Duration::from_secs(120))
}

fn assert_running(api: &ApiClient) {
    let (s, info) = api.get("/vm").expect("GET /vm");
    assert_eq!(s, 200, "{info}");
    assert_eq!(info["state"], "Running", "{info}");
}

fn set_state(api: &ApiClient, state: &str) {
    let (s, b) = api
        .patch("/vm", &json!({ "state": state }))
        .expect("PATCH /vm");
    assert_eq!(s, 204, "PATCH /vm {state}: {b}");
}

fn boot(name: &str, extra: &[&str]) -> (Vm, ApiClient) {
    let mut args = vec!["--memory", "256M"];
    args.extend_from_slice(extra);
    let (mut vm, api, _) = common::boot_with_api(name, PROGRAM, &args);
    vm.expect_line("MIGRATE NOW", BOOT);
    (vm, api)
}

/// The guest still holds the 32 MiB it filled; then it exits with `code`.
fn verify_and_exit(vm: &mut Vm, code: i32) {
    vm.verify("verify ok 8192 pages", BOOT);
    vm.exit_with(code, BOOT);
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

#[test]
fn a_snapshot_replaces_an_existing_file_with_one_that_restores() {
    let dir = TestDir::new("snap-ok");
    let file = dir.join("vm.snap");
    std::fs::write(&file, old_contents()).unwrap();
    let old_ino = std::fs::metadata(&file).unwrap().ino();
    let (mut vm, api) = boot("files-snap-ok", &[]);
    Job::Snapshot.run_to_completion(&api, &file);
    let meta = std::fs::metadata(&file).unwrap();
    assert_ne!(
        meta.ino(),
        old_ino,
        "replaced by rename, not rewritten in place"
    );
    assert_eq!(meta.mode() & 0o077, 0, "mode {:o}", meta.mode());
    assert!(temp_files(&dir.0).is_empty(), "{:?}", temp_files(&dir.0));
    // A snapshot leaves the source running.
    assert_running(&api);
    vm.exit_with(0, BOOT);

    let mut dst = Vm::start_cmd("restore", &["--from", file.to_str().unwrap()]);
    verify_and_exit(&mut dst, 3);
}

#[test]
fn a_migration_to_file_replaces_an_existing_file() {
    let dir = TestDir::new("mig-ok");
    let file = dir.join("vm.mig");
    std::fs::write(&file, old_contents()).unwrap();
    let (mut vm, api) = boot("files-mig-ok", &[]);
    Job::Migration.run_to_completion(&api, &file);
    assert!(temp_files(&dir.0).is_empty(), "{:?}", temp_files(&dir.0));
    // A completed live migration ends the source.
    assert_eq!(vm.wait(BOOT).code(), Some(0));
}

#[test]
fn a_failed_job_leaves_the_old_file_untouched() {
    let fs = SmallTmpfs::mount("enospc", "2m");
    let dir = &fs.0.0;
    let file = dir.join("vm.snap");
    let old = old_contents();
    std::fs::write(&file, &old).unwrap();
    let (mut vm, api) = boot("files-enospc", &[]);
    for job in [Job::Migration, Job::Snapshot] {
        job.start_ok(&api, &file);
        let st = wait_job(&api);
        assert_eq!(st["state"], "Failed", "{job:?}: {st}");
        let err = st["error"].as_str().unwrap_or("");
        assert!(err.contains("No space left"), "{job:?}: {err}");
        // The byte it failed at is the status's count of bytes written.
        let at = format!("at byte {}:", st["stream_bytes"]);
        assert!(
            err.contains(&at),
            "{job:?}: '{err}' should say '{at}': {st}"
        );
        assert_untouched(job, &file, &old, dir);
        assert_running(&api);
    }
    verify_and_exit(&mut vm, 0);
}

/// Cancelling deterministically: while the guest is busy in a command
/// (`spin 4`), its balloon driver cannot answer the job's
/// first free page hint round, which waits up to 10 s, or until
/// cancelled; only then is anything but the stream header written.
#[test]
fn a_cancelled_job_leaves_the_old_file_untouched() {
    let dir = TestDir::new("cancel");
    let file = dir.join("vm.snap");
    let old = old_contents();
    std::fs::write(&file, &old).unwrap();
    let (mut vm, api, _) = common::boot_with_api(
        "files-cancel",
        PROGRAM,
        &["--memory", "256M", "--balloon", "free_page_hint=on"],
    );
    vm.expect_line("MIGRATE NOW", BOOT);
    for job in [Job::Migration, Job::Snapshot] {
        vm.send("spin 4");
        std::thread::sleep(Duration::from_millis(200));
        job.start_ok(&api, &file);
        std::thread::sleep(Duration::from_millis(300));
        let (s, st) = api.get("/migration").unwrap();
        assert_eq!(s, 200);
        assert_eq!(st["state"], "Active", "{job:?}: still running: {st}");
        // The clock runs while the job waits for hints.
        let elapsed = st["elapsed_ms"].as_u64().unwrap();
        assert!(elapsed >= 300, "{job:?}: elapsed_ms {elapsed}: {st}");
        // Written to an unnamed file (O_TMPFILE): nothing shows.
        let temps = temp_files(&dir.0);
        assert!(temps.is_empty(), "{job:?}: {temps:?}");
        assert_eq!(std::fs::read(&file).unwrap(), old, "{job:?}");
        let (s, b) = api.delete("/migration").unwrap();
        assert_eq!(s, 204, "{job:?}: {b}");
        let st = wait_job(&api);
        assert_eq!(st["state"], "Cancelled", "{job:?}: {st}");
        assert_untouched(job, &file, &old, &dir.0);
        assert_running(&api);
        vm.expect_line("spin done", BOOT);
    }
    verify_and_exit(&mut vm, 0);
}

/// A paused VM's guest cannot answer free page hints: a snapshot of it
/// does not ask (it used to wait out the 10 s first hint round), and
/// leaves it paused.
#[test]
fn a_paused_vms_snapshot_does_not_wait_for_hints() {
    let dir = TestDir::new("paused-snap");
    let file = dir.join("vm.snap");
    let (mut vm, api) = boot("files-paused-snap", &["--balloon", "free_page_hint=on"]);
    set_state(&api, "Paused");
    let t = std::time::Instant::now();
    Job::Snapshot.run_to_completion(&api, &file);
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let (_, st) = api.get("/migration").unwrap();
    assert_eq!(st["pages_hinted"], 0, "{st}");
    let (_, info) = api.get("/vm").unwrap();
    assert_eq!(info["state"], "Paused", "{info}");
    set_state(&api, "Running");
    verify_and_exit(&mut vm, 0);
}

#[test]
fn non_regular_destinations_are_refused_and_left_unchanged() {
    let dir = TestDir::new("refuse");
    let real = dir.join("real");
    std::fs::write(&real, b"the symlink's target").unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let null = dir.join("null");
    // SAFETY: mknod(2) with a valid NUL-terminated path.
    let rc = unsafe {
        libc::mknod(
            cstr(&null).as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(1, 3),
        )
    };
    assert_eq!(
        rc,
        0,
        "mknod (this test runs as root): {}",
        std::io::Error::last_os_error()
    );
    let fifo = dir.join("fifo");
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(cstr(&fifo).as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
    let sub = dir.join("dir");
    std::fs::create_dir(&sub).unwrap();
    let sock = dir.join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let cases = [
        (&link, "a symbolic link"),
        (&null, "a character device"),
        (&fifo, "a FIFO"),
        (&sub, "a directory"),
        (&sock, "a socket"),
    ];
    let before: Vec<_> = cases
        .iter()
        .map(|(p, _)| {
            let m = std::fs::symlink_metadata(p).unwrap();
            (m.ino(), m.mode(), m.rdev())
        })
        .collect();

    let (mut vm, api) = boot("files-refuse", &[]);
    for job in [Job::Migration, Job::Snapshot] {
        for (p, kind) in &cases {
            let (s, b) = job.start(&api, p);
            assert_eq!(s, 400, "{job:?} to {}: {b}", p.display());
            let err = b["error"].as_str().unwrap_or("");
            assert!(
                err.contains(&p.display().to_string()) && err.contains(kind),
                "{job:?}: unclear error for {kind}: {err}"
            );
            eprintln!("{job:?}: {err}");
        }
        let missing = dir.join("no/such/dir/vm.snap");
        let (s, b) = job.start(&api, &missing);
        assert_eq!(s, 400, "{b}");
        assert!(
            b["error"].as_str().unwrap_or("").contains("does not exist"),
            "{b}"
        );
    }
    let (_, st) = api.get("/migration").unwrap();
    assert_eq!(st["state"], "Idle", "no job started: {st}");
    assert_running(&api);
    for ((p, kind), was) in cases.iter().zip(&before) {
        let m = std::fs::symlink_metadata(p).unwrap();
        assert_eq!((m.ino(), m.mode(), m.rdev()), *was, "{kind} unchanged");
    }
    assert!(
        std::fs::symlink_metadata(&null)
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(std::fs::read(&real).unwrap(), b"the symlink's target");
    assert!(std::fs::read_dir(&sub).unwrap().next().is_none());
    assert!(temp_files(&dir.0).is_empty());
    vm.exit_with(0, BOOT);
}

#[test]
fn the_vms_own_memory_file_is_never_a_destination() {
    let dir = TestDir::new("own-ram");
    let ram = dir.join("ram");
    let ram_arg = format!("file={}", ram.display());
    let (mut vm, api) = boot("own-ram", &["--memory-backend", &ram_arg]);
    let before = std::fs::metadata(&ram).unwrap();
    // Through another name for the same file, too.
    let link = dir.join("ram-link");
    std::fs::hard_link(&ram, &link).unwrap();
    for job in [Job::Migration, Job::Snapshot] {
        for path in [&ram, &link] {
            let (s, b) = job.start(&api, path);
            assert_eq!(s, 400, "{job:?} to {}: {b}", path.display());
            assert!(
                b["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("this VM's memory backing file"),
                "{b}"
            );
        }
    }
    let after = std::fs::metadata(&ram).unwrap();
    assert_eq!((before.ino(), before.len()), (after.ino(), after.len()));
    assert_running(&api);
    // A snapshot elsewhere works; restoring it onto itself as the backing
    // file is refused before anything is written.
    let snap = dir.join("snap");
    Job::Snapshot.start_ok(&api, &snap);
    assert_eq!(wait_job(&api)["state"], "Completed");
    let size = std::fs::metadata(&snap).unwrap().len();
    let snap_arg = format!("file={}", snap.display());
    let (code, _, stderr) = common::run_blimp(&[
        "restore",
        "--from",
        snap.to_str().unwrap(),
        "--memory-backend",
        &snap_arg,
        "--no-stdin",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is the migration file itself"), "{stderr}");
    assert_eq!(std::fs::metadata(&snap).unwrap().len(), size);
    assert!(std::fs::read(&snap).unwrap().starts_with(MAGIC));
    // Likewise `run --incoming file://…`, through the hard link too.
    let link = dir.join("snap-link");
    std::fs::hard_link(&snap, &link).unwrap();
    let url = format!("file://{}", snap.display());
    let link_arg = format!("file={}", link.display());
    let (code, _, stderr) = common::run_blimp(&[
        "run",
        "--incoming",
        &url,
        "--memory-backend",
        &link_arg,
        "--no-stdin",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("is the migration file itself (--incoming)"),
        "{stderr}"
    );
    assert_eq!(std::fs::metadata(&snap).unwrap().len(), size);
    assert!(std::fs::read(&snap).unwrap().starts_with(MAGIC));
    vm.signal(libc::SIGTERM);
    let _ = vm.wait(BOOT);
}

/// A guest in a loop of `rep outsb` (each byte an exit to the VMM; see
/// `rep-outs` in docs/testguest.md) is snapshotted again and again, so
/// pauses land in the middle of the instruction: every snapshot succeeds,
/// and the last one restores a guest that finishes the loop with every
/// instruction whole. (On VMX and SVM, KVM serves up to 1024 iterations
/// before it enters the guest again, so a pause there must serve exits
/// until KVM is done; on this host's PVM each iteration enters the guest.)
#[test]
fn snapshots_in_the_middle_of_a_string_io_instruction_restore_whole() {
    const COUNT: u64 = 30;
    let dir = TestDir::new("rep-outs");
    let file = dir.join("vm.snap");
    let program = format!("echo OUTS START;rep-outs 4096 {COUNT};echo OUTS END");
    let (mut vm, api, _) =
        common::boot_with_api_manual_balloon("files-rep-outs", &program, &["--memory", "256M"]);
    vm.expect_line("OUTS START", BOOT);
    for taken in 0..10 {
        let (s, b) = Job::Snapshot.start(&api, &file);
        assert_eq!(s, 200, "snapshot {taken}: {b}");
        let st = wait_job(&api);
        assert_eq!(st["state"], "Completed", "snapshot {taken}: {st}");
    }
    let want = format!("rep-outs {COUNT} x 4096 ok");
    let line = vm.expect_line("rep-outs", Duration::from_secs(300));
    assert_eq!(line.trim(), want);
    vm.expect_line("OUTS END", BOOT);
    vm.exit_with(0, BOOT);
    // The last snapshot was taken mid-loop: the restored guest finishes it.
    let mut dst = Vm::start_cmd("restore", &["--from", file.to_str().unwrap()]);
    let line = dst.expect_line("rep-outs", Duration::from_secs(300));
    assert_eq!(line.trim(), want);
    dst.exit_with(0, BOOT);
}

/// The kernel and initrd the VM was booted from are never a destination,
/// under another name either (a hard link, a path through a symlinked
/// directory): the stream renamed over one would replace it. The API
/// answers 400 naming the path and the option, and `blimp snapshot` says
/// the same; both files stay byte-identical.
#[test]
fn the_vms_own_kernel_and_initrd_are_never_destinations() {
    let dir = TestDir::new("own-kernel");
    let kernel = dir.join("kernel");
    std::fs::copy(common::testguest(), &kernel).unwrap();
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, old_contents()).unwrap();
    let (kernel_was, initrd_was) = (std::fs::read(&kernel).unwrap(), old_contents());
    let (mut vm, api, sock) = common::boot_with_api(
        "own-kernel",
        PROGRAM,
        &[
            "--memory",
            "256M",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
        ],
    );
    vm.expect_line("MIGRATE NOW", BOOT);
    let kernel_link = dir.join("kernel-link");
    std::fs::hard_link(&kernel, &kernel_link).unwrap();
    let initrd_link = dir.join("initrd-link");
    std::fs::hard_link(&initrd, &initrd_link).unwrap();
    let dir_link = dir.join("dir-link");
    std::os::unix::fs::symlink(&dir.0, &dir_link).unwrap();
    let cases = [
        (kernel.clone(), "--kernel"),
        (kernel_link, "--kernel"),
        (dir_link.join("kernel"), "--kernel"),
        (initrd.clone(), "--initrd"),
        (initrd_link, "--initrd"),
        (dir_link.join("initrd"), "--initrd"),
    ];
    for job in [Job::Migration, Job::Snapshot] {
        for (path, flag) in &cases {
            let (s, b) = job.start(&api, path);
            assert_eq!(s, 400, "{job:?} to {}: {b}", path.display());
            let err = b["error"].as_str().unwrap_or("");
            assert!(
                err.contains(&path.display().to_string())
                    && err.contains("booted from")
                    && err.contains(flag),
                "{job:?} to {}: {err}",
                path.display()
            );
        }
    }
    let (code, _, stderr) = common::run_blimp(&[
        "snapshot",
        "--api-sock",
        sock.to_str().unwrap(),
        kernel.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("booted from (--kernel"), "{stderr}");
    let (_, st) = api.get("/migration").unwrap();
    assert_eq!(st["state"], "Idle", "no job started: {st}");
    assert_eq!(std::fs::read(&kernel).unwrap(), kernel_was, "kernel");
    assert_eq!(std::fs::read(&initrd).unwrap(), initrd_was, "initrd");
    assert!(temp_files(&dir.0).is_empty(), "{:?}", temp_files(&dir.0));
    assert_running(&api);
    // A snapshot elsewhere in the same directory still works.
    Job::Snapshot.run_to_completion(&api, &dir.join("vm.snap"));
    assert_eq!(std::fs::read(&kernel).unwrap(), kernel_was, "kernel");
    verify_and_exit(&mut vm, 0);
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// blimp killed with SIGKILL in the middle of a snapshot, while it writes
/// the guest's pages, leaves no file behind (the stream goes to an unnamed
/// O_TMPFILE file until it is complete; it used to leave a
/// `.NAME.blimp-tmp.PID.N` of up to the guest's size, forever), and an
/// older snapshot at the path stays byte-identical. A `.vm.snap.blimp-tmp`
/// file of a process that is gone is removed by the next job. Both
/// snapshots run under the default seccomp filter (kill).
#[test]
fn a_snapshot_killed_with_sigkill_leaves_nothing_behind() {
    let dir = TestDir::new("sigkill");
    let file = dir.join("vm.snap");
    let (mut vm, api, _) = common::boot_with_api(
        "files-sigkill",
        &format!("fill {KILL_FILL_MIB} 4;echo MIGRATE NOW"),
        &["--memory", "1G"],
    );
    vm.expect_line("MIGRATE NOW", Duration::from_secs(120));
    // What an older blimp killed while writing left: removed by the next
    // job writing vm.snap, since that process is gone; a live process's
    // (pid 1) is kept.
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let stale = dir.join(&format!(".vm.snap.blimp-tmp.{}.0", gone.id()));
    std::fs::write(&stale, old_contents()).unwrap();
    let live = dir.join(".vm.snap.blimp-tmp.1.0");
    std::fs::write(&live, old_contents()).unwrap();
    // The older snapshot: a real one (to a new name: linked into place).
    Job::Snapshot.start_ok(&api, &file);
    assert_eq!(wait_job(&api)["state"], "Completed");
    let old = std::fs::read(&file).unwrap();
    assert!(
        old.len() as u64 > KILL_FILL_MIB << 20,
        "{} bytes",
        old.len()
    );
    assert!(
        !stale.exists(),
        "a dead process's temporary file is removed"
    );
    assert_eq!(std::fs::read(&live).unwrap(), old_contents());
    std::fs::remove_file(&live).unwrap();
    assert_eq!(names(&dir.0), vec!["vm.snap".to_string()]);
    Job::Snapshot.start_ok(&api, &file);
    // Kill it once some of the pages are written, well before the end.
    let t = std::time::Instant::now();
    let st = loop {
        let (s, st) = api.get("/migration").unwrap();
        assert_eq!(s, 200, "{st}");
        let state = st["state"].as_str().unwrap_or("");
        assert!(
            ["Setup", "Active", "Completing"].contains(&state),
            "to be killed before it ends: {st}"
        );
        if st["stream_bytes"].as_u64().unwrap_or(0) >= 8 << 20 {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{st}");
        std::thread::sleep(Duration::from_millis(2));
    };
    vm.signal(libc::SIGKILL);
    let status = vm.wait(BOOT);
    eprintln!("killed at {st}: {status:?}");
    assert!(
        (st["stream_bytes"].as_u64().unwrap()) < old.len() as u64 / 2,
        "{st}"
    );
    assert_eq!(
        names(&dir.0),
        vec!["vm.snap".to_string()],
        "only the old snapshot is left"
    );
    assert!(
        std::fs::read(&file).unwrap() == old,
        "the old snapshot is byte-identical"
    );
}

/// A snapshot of a VM whose `file=PATH` RAM is on a full tmpfs: the job
/// reads only the pages the file holds (the rest are holes, sent as zero
/// pages), so it completes and the VM runs on. It read every page through
/// the mapping, which made tmpfs allocate the holes: with no room left
/// that was a SIGBUS, and the VM (with its RAM) was gone.
#[test]
fn a_snapshot_of_a_vm_on_a_full_tmpfs_keeps_the_vm() {
    let fs = SmallTmpfs::mount("full-ram", "48m");
    let ram = fs.0.join("ram");
    let backing = format!("file={}", ram.display());
    let (mut vm, api) = boot("files-full-ram", &["--memory-backend", &backing]);
    let held = std::fs::metadata(&ram).unwrap().blocks() * 512;
    // Whatever room is left is taken.
    let filler = fs.0.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let mib = vec![1u8; 1 << 20];
    while std::io::Write::write_all(&mut f, &mib).is_ok() {}
    drop(f);
    let dir = TestDir::new("full-ram-snap");
    let file = dir.join("vm.snap");
    Job::Snapshot.run_to_completion(&api, &file);
    assert_running(&api);
    assert_eq!(
        std::fs::metadata(&ram).unwrap().blocks() * 512,
        held,
        "the snapshot allocated none of the RAM file's holes"
    );
    verify_and_exit(&mut vm, 0);
    let mut dst = Vm::start_cmd("restore", &["--from", file.to_str().unwrap()]);
    verify_and_exit(&mut dst, 3);
}

/// A snapshot of a memfd-backed guest does not make the host allocate the
/// RAM the guest never touched (nor what a balloon took): blimp's shared
/// memory (RssShmem) stays near what the guest used. It grew to all of the
/// guest's 256 MiB, read page by page through the mapping.
#[test]
fn a_snapshot_of_a_memfd_guest_allocates_nothing_more() {
    let (mut vm, api) = boot("files-memfd", &["--memory-backend", "memfd"]);
    let shmem = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("RssShmem:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            << 10
    };
    let before = shmem(vm.pid());
    let dir = TestDir::new("memfd-snap");
    Job::Snapshot.run_to_completion(&api, &dir.join("vm.snap"));
    let after = shmem(vm.pid());
    assert!(
        after < before + (16 << 20),
        "shared memory {} MiB before the snapshot, {} MiB after",
        before >> 20,
        after >> 20
    );
    verify_and_exit(&mut vm, 0);
}

/// The same for hugetlb RAM: the huge pages the guest never touched stay
/// in the host's pool through a snapshot (reading them allocated them all,
/// and with none left in the pool the read was a SIGBUS that ended the VM).
#[test]
fn a_snapshot_of_a_hugetlb_guest_allocates_no_huge_page() {
    // 256 MiB of guest RAM = 128 huge pages, plus slack.
    let _huge = common::reserve_huge_pages(140)
        .unwrap_or_else(|why| panic!("this test needs 140 free 2 MiB huge pages: {why}"));
    let (mut vm, api) = boot("files-hugetlb", &["--memory-backend", "hugetlb"]);
    let before = common::huge_pages_in_use_bytes();
    let dir = TestDir::new("hugetlb-snap");
    Job::Snapshot.run_to_completion(&api, &dir.join("vm.snap"));
    let after = common::huge_pages_in_use_bytes();
    assert_eq!(
        after >> 20,
        before >> 20,
        "huge pages in use (MiB) before and after the snapshot"
    );
    verify_and_exit(&mut vm, 0);
}

/// A snapshot or `file://` migration never replaces a file that is not a
/// stream (a wrong path, or an API client naming a user's file): 400,
/// the file byte-identical. It was replaced by the stream.
#[test]
fn a_file_that_is_not_a_stream_is_never_replaced() {
    let dir = TestDir::new("not-a-stream");
    let file = dir.join("notes.txt");
    std::fs::write(&file, b"a user's notes\n").unwrap();
    let (mut vm, api) = boot("files-not-a-stream", &[]);
    for job in [Job::Migration, Job::Snapshot] {
        let (s, b) = job.start(&api, &file);
        assert_eq!(s, 400, "{job:?}: {b}");
        assert!(
            b["error"]
                .as_str()
                .unwrap_or("")
                .contains("not a Blimp snapshot or migration stream"),
            "{job:?}: {b}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"a user's notes\n");
    }
    assert_running(&api);
    assert_eq!(names(&dir.0), vec!["notes.txt".to_string()]);
    vm.exit_with(0, BOOT);
}
