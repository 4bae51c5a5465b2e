//! What `blimp restore` and `blimp run --incoming` refuse, and at what
//! cost: crafted streams (valid checksums, a correct 256 MiB layout) whose
//! state section lists millions of entries are refused with the child's
//! peak RSS measured; non-regular files; options the stream overrides; and
//! restoring over a backing file full of old bytes.

mod common;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{SmallTmpfs, TestDir, Vm, require_kvm};
use serde_json::{Value, json};
use vmm::migration::stream::{StreamWriter, layout_ranges};

const MIB: u64 = 1 << 20;
const GUEST: u64 = 256 * MIB;
const BOOT: Duration = Duration::from_secs(60);
/// The bound the brief sets on a refused restore's peak RSS.
const MAX_RSS: u64 = 300 * MIB;

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("blimp-rc-{name}-{}", std::process::id()))
}

/// Removes a file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn record_header(tag: &[u8; 4], seq: u32, payload_len: u32, payload_crc: u32) -> [u8; 36] {
    let mut b = [0u8; 36];
    b[0..4].copy_from_slice(tag);
    b[4..8].copy_from_slice(&seq.to_le_bytes());
    // round 1, pages 0, gpa 0
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[24..28].copy_from_slice(&payload_len.to_le_bytes());
    b[28..32].copy_from_slice(&payload_crc.to_le_bytes());
    let crc = crc32c::crc32c(&b[..32]);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Write a stream for a 256 MiB guest to `path`: the header (the layout
/// `MemoryLayout::new` gives), every page as zero, then a state section of
/// `prefix`, `count` copies of `item` separated by commas, `suffix`
/// (streamed, never held whole), then a valid trailer.
fn craft(path: &Path, prefix: &str, item: &str, count: u64, suffix: &str) {
    let layout = arch::MemoryLayout::new(GUEST).unwrap();
    let mut head = Vec::new();
    {
        let mut w = StreamWriter::new(&mut head);
        w.header(&layout_ranges(&layout), 0).unwrap();
        w.zero_pages(1, 0, GUEST / 4096).unwrap();
        w.flush().unwrap();
    }
    let len = prefix.len() as u64
        + count * item.len() as u64
        + count.saturating_sub(1)
        + suffix.len() as u64;
    let len = u32::try_from(len).expect("state section fits the u32 length field");
    // The payload's checksum, computed piecewise.
    let chunk: String = {
        let n = (1 << 20) / (item.len() + 1);
        let mut c = String::new();
        for _ in 0..n {
            c.push(',');
            c.push_str(item);
        }
        c
    };
    let per_chunk = (chunk.len() / (item.len() + 1)) as u64;
    let body = |out: &mut dyn FnMut(&[u8])| {
        out(prefix.as_bytes());
        if count > 0 {
            out(item.as_bytes());
            let mut left = count - 1;
            while left >= per_chunk {
                out(chunk.as_bytes());
                left -= per_chunk;
            }
            out(&chunk.as_bytes()[..left as usize * (item.len() + 1)]);
        }
        out(suffix.as_bytes());
    };
    let mut crc = 0u32;
    let mut n = 0u64;
    body(&mut |b| {
        crc = crc32c::crc32c_append(crc, b);
        n += b.len() as u64;
    });
    assert_eq!(n, u64::from(len));
    let mut f = BufWriter::new(File::create(path).unwrap());
    f.write_all(&head).unwrap();
    // One ZERO record so far: the state is record 1, the trailer record 2.
    f.write_all(&record_header(b"STAT", 1, len, crc)).unwrap();
    body(&mut |b| f.write_all(b).unwrap());
    let mut t = 2u64.to_le_bytes().to_vec();
    t.extend_from_slice(&0u64.to_le_bytes());
    t.extend_from_slice(&(GUEST / 4096).to_le_bytes());
    f.write_all(&record_header(b"TEND", 2, 24, crc32c::crc32c(&t)))
        .unwrap();
    f.write_all(&t).unwrap();
    f.flush().unwrap();
}

/// Run `blimp args` to completion (at most `timeout`); returns its exit
/// code, stderr and peak RSS in bytes (wait4's ru_maxrss of that child).
/// Linux carries the spawning process's RSS at the moment of the spawn
/// into the child's ru_maxrss (the pre-exec address space counts), so the
/// tests of this file keep the test process itself small: files are
/// written and read in 1 MiB pieces, never held whole.
#[allow(
    clippy::zombie_processes,
    reason = "reaped by wait4 below, for its rusage"
)]
fn run_measured(args: &[&str], timeout: Duration) -> (i32, String, u64) {
    let mut child = Command::new(common::blimp())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning blimp");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let pid = child.id() as libc::pid_t;
    let deadline = Instant::now() + timeout;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 on our own child, with valid pointers to locals.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(rc >= 0, "wait4: {}", std::io::Error::last_os_error());
        if rc == pid {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("blimp {args:?} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    // ru_maxrss is in KiB on Linux.
    (code, reader.join().unwrap(), usage.ru_maxrss as u64 * 1024)
}

/// Each crafted stream is refused by `blimp restore`, with `expect` in the
/// error and a peak RSS under [`MAX_RSS`].
fn refused_cheaply(name: &str, prefix: &str, item: &str, count: u64, suffix: &str, expect: &str) {
    let file = TempFile(tmp(name));
    craft(&file.0, prefix, item, count, suffix);
    let size = std::fs::metadata(&file.0).unwrap().len();
    let (code, err, rss) = run_measured(
        &["restore", "--from", file.0.to_str().unwrap(), "--no-stdin"],
        Duration::from_secs(120),
    );
    eprintln!(
        "{name}: {count} entries, {} MiB stream: exit {code}, peak RSS {} MiB: {}",
        size >> 20,
        rss >> 20,
        err.trim()
    );
    assert_eq!(code, 1, "{name}: refused as a runtime error: {err}");
    assert!(
        err.contains(expect),
        "{name}: expected '{expect}' in: {err}"
    );
    assert!(rss > 0, "{name}: wait4 reported no RSS");
    assert!(
        rss < MAX_RSS,
        "{name}: peak RSS {} MiB, the bound is {} MiB",
        rss >> 20,
        MAX_RSS >> 20
    );
}

const STATE_HEAD: &str = r#"{"version":1,"memory_layout":[{"gpa":0,"size":268435456}],"#;

/// 10 million runs (270 MB), and 9 million (243 MB, under the format's
/// 256 MiB maximum, so the guest-derived limit is what refuses it).
#[test]
fn ten_million_balloon_runs_are_refused_at_the_state_header() {
    require_kvm();
    for count in [10_000_000, 9_000_000] {
        refused_cheaply(
            &format!("balloon-runs-{count}"),
            &format!(
                r#"{STATE_HEAD}"vcpus":[],"vm":{{}},"devices":{{"version":1,"debug_exit":false,"serial":{{}},"balloon":{{"device":{{"version":1,"inflated":["#
            ),
            r#"{"start_pfn":1,"npages":1}"#,
            count,
            r#"]},"transport":{}}}}"#,
            "exceeds the 28377088-byte limit for a guest of 256 MiB",
        );
    }
}

#[test]
fn millions_of_vcpus_cpuid_entries_msrs_and_stats_values_are_refused_cheaply() {
    require_kvm();
    let cpuid_entry = format!("[{}]", vec!["0"; 40].join(","));
    let over_limit: &[(&str, String, &str, u64, &str)] = &[
        (
            "vcpus",
            format!(r#"{STATE_HEAD}"vcpus":["#),
            r#"{"id":0}"#,
            4_000_000,
            "]}",
        ),
        (
            "cpuid",
            format!(r#"{STATE_HEAD}"vcpus":[{{"id":0,"cpuid":["#),
            &cpuid_entry,
            1_000_000,
            "]}]}",
        ),
        (
            "msrs",
            format!(r#"{STATE_HEAD}"vcpus":[{{"id":0,"msrs":["#),
            r#"{"index":16,"data":0}"#,
            2_000_000,
            "]}]}",
        ),
        (
            "stats",
            format!(
                r#"{STATE_HEAD}"vcpus":[],"vm":{{}},"devices":{{"version":1,"debug_exit":false,"serial":{{}},"balloon":{{"device":{{"version":1,"latest_stats":{{"updated_unix_ms":0,"values":["#
            ),
            "null",
            10_000_000,
            r#"]}},"transport":{}}}}"#,
        ),
    ];
    for (name, prefix, item, count, suffix) in over_limit {
        refused_cheaply(name, prefix, item, *count, suffix, "exceeds the");
    }
    // Within the length limit, the lists are refused at their bound while
    // being read.
    let within: &[(&str, String, &str, u64, &str, &str)] = &[
        (
            "cpuid-within",
            format!(r#"{STATE_HEAD}"vcpus":[{{"cpuid":["#),
            &cpuid_entry,
            200_000,
            "]}]}",
            "cpuid: more than 256 entries",
        ),
        (
            "msrs-within",
            format!(r#"{STATE_HEAD}"vcpus":[{{"msrs":["#),
            r#"{"index":16,"data":0}"#,
            500_000,
            "]}]}",
            "msrs: more than 256 entries",
        ),
    ];
    for (name, prefix, item, count, suffix, expect) in within {
        refused_cheaply(name, prefix, item, *count, suffix, expect);
    }
}

#[test]
fn a_fifo_is_refused_without_blocking() {
    let fifo = TempFile(tmp("fifo"));
    let c = std::ffi::CString::new(fifo.0.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let started = Instant::now();
    let (code, err, _) = run_measured(
        &["restore", "--from", fifo.0.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(fifo.0.to_str().unwrap()), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    let (code, err, _) = run_measured(&["restore", "--from", "/tmp"], Duration::from_secs(10));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("/tmp: not a regular file (a directory)"),
        "{err}"
    );
}

#[test]
fn run_incoming_refuses_the_options_the_stream_sets() {
    let cases: &[(&[&str], &str)] = &[
        (&["--memory", "1G"], "--memory"),
        (&["--vcpus", "2"], "--vcpus"),
        (&["--cmdline", "console=ttyS0"], "--cmdline"),
        (&["--initrd", "/bin/true"], "--initrd"),
        (&["--kernel", "/bin/true"], "--kernel"),
        (&["--balloon"], "--balloon"),
        (&["--balloon-target", "64M"], "--balloon-target"),
        (&["--debug-exit"], "--debug-exit"),
    ];
    let url = format!("unix://{}", tmp("never.sock").display());
    for (flags, name) in cases {
        let mut args = vec!["run", "--incoming", &url];
        args.extend_from_slice(flags);
        let (code, _, err) = common::run_blimp(&args);
        assert_eq!(code, 2, "{flags:?}: {err}");
        assert!(
            err.contains("cannot be used with") && err.contains(name),
            "{flags:?}: {err}"
        );
    }
}

/// A backing file of the guest's size filled with 0xAA (written in
/// pieces: this process stays small, see [`run_measured`]).
fn dirty_backing(name: &str) -> TempFile {
    let f = TempFile(tmp(name));
    let mut w = BufWriter::new(File::create(&f.0).unwrap());
    let piece = vec![0xaau8; MIB as usize];
    for _ in 0..GUEST / MIB {
        w.write_all(&piece).unwrap();
    }
    w.flush().unwrap();
    f
}

/// After the restored guest ended, its RAM (the backing file) holds no
/// page of the old 0xAA bytes: every page is the guest's or zero.
fn assert_no_old_pages(backing: &Path) {
    assert_eq!(std::fs::metadata(backing).unwrap().len(), GUEST);
    let mut f = File::open(backing).unwrap();
    let mut piece = vec![0u8; MIB as usize];
    let mut old = 0;
    for _ in 0..GUEST / MIB {
        std::io::Read::read_exact(&mut f, &mut piece).unwrap();
        old += piece
            .chunks_exact(4096)
            .filter(|p| p.iter().all(|b| *b == 0xaa))
            .count();
    }
    assert_eq!(old, 0, "{old} pages still hold the file's old bytes");
}

fn migrate(api: &mut api::client::ApiClient, destination: String) -> Value {
    common::migrate(
        api,
        &json!({ "destination": destination }),
        Duration::from_secs(120),
    )
}

/// The guest then waits at its prompt: the test's `verify` and `exit 7`
/// reach it on the destination, however long the migration took.
const PROGRAM: &str = "fill 64 1;echo MIGRATE NOW";

/// A real stream: a 256 MiB test guest running [`PROGRAM`] (VM `rc-NAME`)
/// migrated to the file `NAME-src`, its source exited.
fn migrated_to_file(name: &str) -> TempFile {
    let file = TempFile(tmp(&format!("{name}-src")));
    let (mut vm, mut api, _) = common::boot_with_api(
        &format!("rc-{name}"),
        PROGRAM,
        &["--memory", "256M", "--no-stdin"],
    );
    vm.expect_line("MIGRATE NOW", BOOT);
    let st = migrate(&mut api, format!("file://{}", file.0.display()));
    assert_eq!(st["state"], "Completed", "{st}");
    assert_eq!(vm.wait(BOOT).code(), Some(0));
    file
}

/// Also: the restored VM's backing is PATH itself, so a snapshot onto
/// PATH is refused (it used to be accepted after a restore, which built the
/// RAM under another name: the stream replaced the running guest's RAM file).
#[test]
fn restore_onto_an_existing_backing_file_does_not_keep_its_bytes() {
    require_kvm();
    let file = migrated_to_file("zero");

    let backing = dirty_backing("zero-ram");
    let arg = format!("file={}", backing.0.display());
    let sock = common::sock_path("rc-zero-dst");
    let mut dst = Vm::start_cmd(
        "restore",
        &[
            "--from",
            file.0.to_str().unwrap(),
            "--memory-backend",
            &arg,
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    dst.verify("verify ok 16384 pages", BOOT);
    common::wait_for_socket(&sock);
    let dapi = api::client::ApiClient::new(&sock).unwrap();
    let (status, body) = dapi
        .put("/snapshot", &json!({ "path": backing.0.to_str().unwrap() }))
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("this VM's memory backing file")),
        "{body}"
    );
    dst.verify("verify ok 16384 pages", BOOT);
    dst.exit_with(7, BOOT);
    assert_no_old_pages(&backing.0);
    assert!(restore_leftovers(&backing.0).is_empty());
}

/// A destination onto `file=PATH` killed with SIGKILL once it built the
/// guest's RAM (it acknowledged the whole stream) leaves PATH byte-identical
/// and no file beside it: the RAM is built in an unnamed file. It used to
/// leave `.NAME.blimp-restore.PID`, the guest's size, for good.
#[test]
fn a_restore_killed_with_sigkill_leaves_nothing_beside_the_backing_file() {
    require_kvm();
    let file = migrated_to_file("kill");
    let stream = std::fs::read(&file.0).unwrap();

    let dir = TestDir::new("kill-dir");
    let ram = dir.0.join("ram");
    std::fs::write(&ram, b"the user's file").unwrap();
    let arg = format!("file={}", ram.display());
    let sock = tmp("kill.sock");
    let (mut dst, _) = common::start_incoming(&sock, &["--memory-backend", &arg]);
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(&stream).unwrap();
    let waiter = vmm::migration::handshake::Waiter {
        cancelled: &|| false,
        timeout: Duration::from_secs(60),
    };
    let ack = waiter.recv(&mut s, "ACK").unwrap();
    assert_eq!(ack, vmm::migration::handshake::Message::Ack);
    dst.signal(libc::SIGKILL);
    let status = dst.wait(BOOT);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let _ = std::fs::remove_file(&sock);
    assert_eq!(std::fs::read(&ram).unwrap(), b"the user's file");
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [std::ffi::OsString::from("ram")], "left beside PATH");
}

#[test]
fn run_incoming_onto_an_existing_backing_file_does_not_keep_its_bytes() {
    require_kvm();
    let sock = tmp("zero-live.sock");
    let url = format!("unix://{}", sock.display());
    let backing = dirty_backing("zero-live-ram");
    let arg = format!("file={}", backing.0.display());
    let mut dst = Vm::start_cmd("run", &["--incoming", &url, "--memory-backend", &arg]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "destination did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (mut vm, mut api, _) =
        common::boot_with_api("rc-zero-live", PROGRAM, &["--memory", "256M", "--no-stdin"]);
    vm.expect_line("MIGRATE NOW", BOOT);
    let st = migrate(&mut api, url);
    assert_eq!(st["state"], "Completed", "{st}");
    dst.verify("verify ok 16384 pages", BOOT);
    dst.exit_with(7, BOOT);
    assert_eq!(vm.wait(BOOT).code(), Some(0));
    assert_no_old_pages(&backing.0);
    assert!(restore_leftovers(&backing.0).is_empty());
}

/// A user file with `len` bytes of a pattern no guest page holds.
fn user_file(name: &str, len: usize) -> (TempFile, Vec<u8>) {
    let f = TempFile(tmp(name));
    let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    std::fs::write(&f.0, &bytes).unwrap();
    (f, bytes)
}

/// Files `.NAME.blimp-tmp.*` (or `.NAME.blimp-restore.*`, the name older
/// versions used) beside `path`: a restore's RAM in the making.
fn restore_leftovers(path: &Path) -> Vec<PathBuf> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let prefixes = [
        format!(".{name}.blimp-tmp."),
        format!(".{name}.blimp-restore."),
    ];
    std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            prefixes.iter().any(|p| n.starts_with(p))
        })
        .map(|e| e.path())
        .collect()
}

/// A directory removed (with what is in it) when dropped.
/// A restore refused once guest RAM was built (its state section is not
/// a VM's) leaves `--memory-backend file=PATH` exactly as it was, and no
/// new file beside it: the RAM is built in a file of its own that takes
/// PATH's place only once the restore succeeded. It used to empty PATH
/// first (a user's file cut to 256 MiB of zeros and partial RAM).
#[test]
fn a_refused_restore_leaves_the_backing_file_as_it_was() {
    require_kvm();
    let stream = TempFile(tmp("refused-stream"));
    craft(&stream.0, "{\"not a vm\":[", "0", 16, "]}");
    let (backing, bytes) = user_file("refused-ram", 3 << 20);
    let arg = format!("file={}", backing.0.display());
    let (code, _, stderr) = common::run_blimp(&[
        "restore",
        "--from",
        stream.0.to_str().unwrap(),
        "--memory-backend",
        &arg,
        "--no-stdin",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(std::fs::read(&backing.0).unwrap() == bytes, "PATH changed");
    assert!(restore_leftovers(&backing.0).is_empty());
}

/// Two restores started together onto the same `file=PATH` that does not
/// exist yet: one runs, the other is refused (exit 2). Both used to run,
/// the second renaming its RAM over the first's: one VM then ran on a
/// deleted file and PATH's lock guarded nothing. A refused or failed
/// restore leaves no empty file behind at a PATH that did not exist.
#[test]
fn two_restores_onto_one_new_backing_file_run_one_vm() {
    require_kvm();
    let stream = migrated_to_file("two");

    let dir = TestDir::new("two-dir");
    let ram = dir.0.join("ram");
    let arg = format!("file={}", ram.display());
    let spawn = || {
        Command::new(common::blimp())
            .args(["restore", "--from", stream.0.to_str().unwrap()])
            .args(["--memory-backend", &arg, "--no-stdin"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut both = Reaped([spawn(), spawn()]);
    let both = &mut both.0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        if let Some(i) = (0..2).find(|&i| both[i].try_wait().unwrap().is_some()) {
            break i;
        }
        assert!(Instant::now() < deadline, "both restores run on {arg}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let runs = 1 - refused;
    let out = exit_and_stderr(&mut both[refused]);
    assert_eq!(out.0, Some(2), "{}", out.1);
    assert!(
        out.1.contains("is guest RAM of another running process"),
        "{}",
        out.1
    );
    // The other one runs on PATH itself.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        both[runs].try_wait().unwrap().is_none(),
        "the other restore ended too"
    );
    let pid = both[runs].id();
    // It maps the file now at PATH (by inode: a restore's RAM file was
    // made unnamed, so its mapping's name says "(deleted)" either way).
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&ram).unwrap());
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.lines()
            .any(|l| l.split_whitespace().nth(4) == Some(&ino.to_string())),
        "the running VM does not map the file at {} (inode {ino}):\n{maps}",
        ram.display()
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = both[runs].wait();
    assert_eq!(std::fs::metadata(&ram).unwrap().len(), GUEST);
    assert!(restore_leftovers(&ram).is_empty());

    // A refused restore onto a new PATH leaves nothing there.
    let new = dir.0.join("new");
    let bad = TempFile(tmp("two-bad-stream"));
    craft(&bad.0, "{\"not a vm\":[", "0", 16, "]}");
    let (code, stderr, _) = run_measured(
        &[
            "restore",
            "--from",
            bad.0.to_str().unwrap(),
            "--memory-backend",
            &format!("file={}", new.display()),
            "--no-stdin",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(!new.exists(), "a refused restore left {}", new.display());
}

/// A device node is no RAM backing: `blimp run` booted on `file=/dev/null`
/// and a restore renamed its RAM over /dev/null (the device was gone, a
/// regular file in its place). Both exit 2 now and the node stays. (A
/// private node with /dev/null's numbers: a regression replaces only it.)
#[test]
fn a_device_node_is_no_ram_backing() {
    require_kvm();
    let dir = TestDir::new("devnode");
    let node = dir.0.join("null");
    let c = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
    // SAFETY: mknod(2) with a valid NUL-terminated path.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
    let stream = TempFile(tmp("devnode-stream"));
    craft(&stream.0, "{\"not a vm\":[", "0", 16, "]}");
    let arg = format!("file={}", node.display());
    let kernel = common::testguest().to_str().unwrap();
    let attempts: [&[&str]; 2] = [
        &["run", "--kernel", kernel, "--memory", "128M"],
        &["restore", "--from", stream.0.to_str().unwrap()],
    ];
    for args in attempts {
        let all = [args, &["--memory-backend", &arg, "--no-stdin"]].concat();
        let (code, stderr, _) = run_measured(&all, Duration::from_secs(20));
        assert_eq!(code, 2, "{all:?}: {stderr}");
        assert!(stderr.contains("not a regular file"), "{all:?}: {stderr}");
        let kind = std::fs::symlink_metadata(&node).unwrap().file_type();
        assert!(
            std::os::unix::fs::FileTypeExt::is_char_device(&kind),
            "{all:?} replaced the device node"
        );
    }
}

/// A restore onto `file=PATH` on a filesystem without room for the guest's
/// pages (an 8 MiB tmpfs, 64 MiB of pattern in the stream) is refused with
/// the reason (exit 1) and leaves the filesystem empty. It died of SIGBUS
/// (exit 135), writing a page through the mapping that the filesystem
/// could not provide. Needs root (mount), as the suite does for /dev/kvm.
#[test]
fn a_restore_onto_a_full_filesystem_says_so() {
    require_kvm();
    let stream = migrated_to_file("full");

    let fs = SmallTmpfs::mount("full-fs", "8m");
    let dir = &fs.0;
    let ram = dir.0.join("ram");
    let (code, stderr, _) = run_measured(
        &[
            "restore",
            "--from",
            stream.0.to_str().unwrap(),
            "--memory-backend",
            &format!("file={}", ram.display()),
            "--no-stdin",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
    assert!(left.is_empty(), "left on the filesystem: {left:?}");
}

/// Children killed (and reaped) when dropped, also when a test fails
/// while they run: a restored VM waits at its prompt for ever.
struct Reaped<const N: usize>([std::process::Child; N]);

impl<const N: usize> Drop for Reaped<N> {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The exit code and stderr (piped) of a child that ended.
fn exit_and_stderr(c: &mut std::process::Child) -> (Option<i32>, String) {
    let status = c.wait().unwrap();
    let mut err = String::new();
    if let Some(mut e) = c.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    (status.code(), err)
}

/// `file=PATH` is locked while its VM runs: a second blimp that would map
/// the same file as its RAM (a run, a restore, the destination of a
/// migration on this host) is refused before it writes anything, and the
/// running guest's memory stays whole. A destination given the source's
/// own file used to empty it while the source ran: the VM was lost.
#[test]
fn a_backing_file_in_use_is_refused_to_a_second_blimp() {
    require_kvm();
    let ram = TempFile(tmp("in-use-ram"));
    let arg = format!("file={}", ram.0.display());
    let (mut vm, _api, _) = common::boot_with_api(
        "rc-in-use",
        "fill 32 5;echo FILLED",
        &["--memory", "256M", "--memory-backend", &arg],
    );
    vm.expect_line("FILLED", BOOT);
    let stream = TempFile(tmp("in-use-stream"));
    craft(&stream.0, "{\"not a vm\":[", "0", 16, "]}");
    let sock = tmp("in-use.sock");
    let url = format!("unix://{}", sock.display());
    let kernel = common::testguest().to_str().unwrap();
    let attempts: [&[&str]; 3] = [
        &["run", "--kernel", kernel, "--memory", "256M"],
        &["restore", "--from", stream.0.to_str().unwrap()],
        &["run", "--incoming", &url],
    ];
    for args in attempts {
        let all = [args, &["--memory-backend", &arg, "--no-stdin"]].concat();
        // One that runs instead of being refused fails here, not hangs.
        let (code, stderr, _) = run_measured(&all, Duration::from_secs(20));
        assert_eq!(code, 2, "{all:?}: {stderr}");
        assert!(
            stderr.contains("is guest RAM of another running process"),
            "{all:?}: {stderr}"
        );
        assert!(!sock.exists(), "the destination listened");
        assert!(restore_leftovers(&ram.0).is_empty());
    }
    // Nor is it a snapshot's (or file:// migration's) destination of
    // another VM: the stream renamed over it left the running VM's RAM on
    // a deleted file (and its lock guarding nothing). It was answered 200.
    let (mut other, other_api, _) =
        common::boot_with_api("rc-in-use-other", "echo UP", &["--memory", "128M"]);
    other.expect_line("UP", BOOT);
    for (route, body) in [
        ("/snapshot", json!({ "path": ram.0.to_str().unwrap() })),
        (
            "/migration",
            json!({ "destination": format!("file://{}", ram.0.display()) }),
        ),
    ] {
        let (s, b) = other_api.put(route, &body).unwrap();
        assert_eq!(s, 400, "PUT {route}: {b}");
        assert!(
            b["error"]
                .as_str()
                .is_some_and(|e| e.contains("another process holds its lock")),
            "PUT {route}: {b}"
        );
    }
    other.exit_with(0, BOOT);
    assert_eq!(std::fs::metadata(&ram.0).unwrap().len(), GUEST);
    vm.verify("verify ok 8192 pages", BOOT);
    vm.exit_with(0, BOOT);
}
