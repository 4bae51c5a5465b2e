//! The chunked balloon (`--balloon sg=on`, VIRTIO_BALLOON_F_BLIMP_SG)
//! against a running test guest: the guest negotiates the bit, inflates and
//! deflates in ranges with a handful of kicks, the host gets the memory
//! back, deflate on OOM sends single pages, `testguest.sg=0` keeps PFN
//! arrays, hostile ranges are refused, and a snapshot/restore and a
//! migration carry the negotiated bit.

mod common;

use std::time::Duration;

use api::client::ApiClient;
use common::{Vm, resize_balloon};

const MIB: u64 = 1 << 20;
/// Generous: several guests share a loaded 2-core host in CI.
const T: Duration = Duration::from_secs(180);

/// A 1 GiB chunked-balloon guest on memfd RAM.
const MEMFD_SG_1G: [&str; 6] = [
    "--memory",
    "1G",
    "--memory-backend",
    "memfd",
    "--balloon",
    "sg=on",
];

fn m(api: &mut ApiClient, key: &str) -> u64 {
    common::metric(&common::metrics(api), key) as u64
}

/// 1 GiB guest, 768 MiB touched; inflate 512 MiB in ranges, then deflate.
/// `backend` is a `--memory-backend` kind, `+thp` adding `--memory-thp`.
fn chunked_inflate_and_deflate(backend: &str) {
    let (kind, mut args) = common::backend_args(backend);
    args.extend(["--memory", "1G", "--balloon", "sg=on"]);
    let (mut vm, mut api, _) = common::boot_with_api(
        &format!("sg-{}", backend.replace('+', "-")),
        "balloon;fill 768 1;free 512;touch 4096;echo TOUCHED",
        &args,
    );
    let started = vm.expect_line("balloon started", T);
    assert!(
        started.contains(" sg "),
        "the guest took the bit: {started}"
    );
    vm.expect_line("TOUCHED", T);
    let before = vm.rss_bytes();
    resize_balloon(&mut api, 512, T);
    std::thread::sleep(Duration::from_millis(200));
    let after = vm.rss_bytes();
    let pages = 512 * MIB / 4096;
    assert_eq!(m(&mut api, "inflate_pages"), pages);
    let ranges = m(&mut api, "inflate_ranges");
    let kicks = m(&mut api, "inflate_kicks");
    assert!(ranges >= 1, "inflated in ranges");
    assert!(
        kicks <= pages / 256 / 100 + 2,
        "{kicks} kicks for {pages} pages: PFN arrays would need {}",
        pages / 256
    );
    assert_eq!(m(&mut api, "invalid_ranges"), 0);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if kind == "anon" && cpus > 1 {
        // Ranges of 32 MiB and more are shared by the discard workers
        // (vmm/src/discard_workers.rs): more madvise calls than discards.
        let (calls, syscalls) = (
            m(&mut api, "discard_calls"),
            m(&mut api, "discard_syscalls"),
        );
        assert!(
            syscalls > calls,
            "{syscalls} madvise calls for {calls} discards of 512 MiB on {cpus} CPUs"
        );
    }
    let dropped = before.saturating_sub(after);
    eprintln!(
        "[{backend}] sg inflate 512 MiB: {ranges} ranges, {kicks} kicks, host RSS dropped {} MiB",
        dropped / MIB
    );
    assert!(
        dropped >= 512 * MIB * 95 / 100,
        "[{backend}] host memory dropped by only {} MiB",
        dropped / MIB
    );
    resize_balloon(&mut api, 0, T);
    assert_eq!(m(&mut api, "deflate_pages"), pages);
    assert!(m(&mut api, "deflate_kicks") <= pages / 256 / 100 + 2);
    vm.fill(512, 2, T);
    vm.verify("verify ok", T);
    vm.exit_with(0, T);
}

#[test]
fn chunked_inflate_releases_anon_memory() {
    chunked_inflate_and_deflate("anon");
}

#[test]
fn chunked_inflate_releases_memfd_memory() {
    chunked_inflate_and_deflate("memfd");
}

#[test]
fn chunked_inflate_releases_anon_thp_memory() {
    chunked_inflate_and_deflate("anon+thp");
}

#[test]
fn chunked_inflate_releases_memfd_thp_memory() {
    chunked_inflate_and_deflate("memfd+thp");
}

/// `--memory-thp` with PFN arrays: the guest's data shares huge pages with
/// 4 KiB balloon pages (`free 1` leaves the top half of the filled area's
/// last 2 MiB free, and the balloon takes the lowest free frames first), so
/// each discard splits a huge page. The data beside them survives, and the
/// pages come back zero and usable after the deflate.
fn thp_ram_around_4k_balloon_pages(kind: &str) {
    let spec = format!("{kind}+thp");
    let (_, mut args) = common::backend_args(&spec);
    args.extend(["--memory", "512M", "--balloon", "sg=off"]);
    let (mut vm, mut api, _) = common::boot_with_api(
        &format!("thp-4k-{kind}"),
        "balloon;fill 256 1;free 1;echo READY",
        &args,
    );
    vm.expect_line("READY", T);
    let backend = match kind {
        "anon" => vmm::MemoryBackend::Anon,
        _ => vmm::MemoryBackend::Memfd,
    };
    if let Some((true, _)) = vmm::memory::thp_honoured(&backend) {
        // The host did back the guest's data with huge pages.
        let key = if kind == "anon" {
            "AnonHugePages:"
        } else {
            "ShmemPmdMapped:"
        };
        let rollup = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", vm.pid())).unwrap();
        let kib: u64 = rollup
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        assert!(kib >= 2048, "{key} {kib} kB with --memory-thp");
    }
    resize_balloon(&mut api, 64, T);
    assert_eq!(m(&mut api, "inflate_pages"), 64 * MIB / 4096);
    assert_eq!(m(&mut api, "discard_errors"), 0);
    resize_balloon(&mut api, 0, T);
    vm.verify("verify ok 65280 pages", T);
    vm.fill(64, 2, T);
    vm.verify("verify ok 81664 pages", T);
    vm.exit_with(0, T);
}

#[test]
fn thp_anon_ram_keeps_its_data_around_4k_balloon_pages() {
    thp_ram_around_4k_balloon_pages("anon");
}

#[test]
fn thp_memfd_ram_keeps_its_data_around_4k_balloon_pages() {
    thp_ram_around_4k_balloon_pages("memfd");
}

/// `--memory-thp` on hugetlb RAM is refused, saying why.
#[test]
fn thp_on_hugetlb_is_refused() {
    common::require_kvm();
    let (code, _, err) = common::run_blimp(&[
        "run",
        "--kernel",
        &common::testguest().to_string_lossy(),
        "--memory-backend",
        "hugetlb",
        "--memory-thp",
    ]);
    assert_eq!(code, 2, "a usage error: {err}");
    assert!(
        err.contains("--memory-thp does not apply to the hugetlb backing"),
        "{err}"
    );
}

/// Deflate on OOM with the bit: one 4 KiB range per page
/// (leak_balloon_sg_oom()); `actual` and the device's count agree.
#[test]
fn deflate_on_oom_sends_single_pages() {
    let (mut vm, mut api) = common::start_with_api(
        "sg-oom",
        "512M",
        "sg=on,deflate_on_oom=on",
        "balloon;echo READY",
    );
    vm.expect_line("READY", T);
    resize_balloon(&mut api, 64, T);
    let ranges0 = m(&mut api, "deflate_ranges");
    vm.send("oom 1");
    let line = vm.expect_line("oom deflated", T);
    assert!(line.starts_with("oom deflated 256 pages"), "{line}");
    assert_eq!(m(&mut api, "deflate_ranges") - ranges0, 256);
    assert_eq!(m(&mut api, "deflate_pages"), 256);
    assert_eq!(
        m(&mut api, "inflate_pages") - m(&mut api, "deflate_pages"),
        63 * MIB / 4096
    );
    vm.exit_with(0, T);
}

/// `testguest.sg=0`: offered but not taken, the guest sends PFN arrays.
#[test]
fn a_driver_without_the_bit_keeps_pfn_arrays() {
    let (mut vm, mut api, _) = common::boot_with_api_cmdline(
        "sg-off",
        "testguest.sg=0 testguest.run=\"balloon;echo READY\"",
        &["--memory", "512M", "--balloon", "sg=on"],
    );
    let started = vm.expect_line("balloon started", T);
    assert!(!started.contains(" sg "), "{started}");
    vm.expect_line("READY", T);
    resize_balloon(&mut api, 32, T);
    assert_eq!(m(&mut api, "inflate_pages"), 32 * MIB / 4096);
    assert_eq!(m(&mut api, "inflate_ranges"), 0);
    assert_eq!(m(&mut api, "inflate_requests"), 32 * MIB / 4096 / 256);
    vm.exit_with(0, T);
}

/// `hostile sg-ranges`: 10 bad inflate ranges and 2 bad deflate ranges
/// are refused, both buffers come back, the device does not need a reset,
/// and it keeps inflating and deflating correctly afterwards.
#[test]
fn hostile_ranges_are_refused_and_the_device_keeps_working() {
    let (mut vm, mut api) =
        common::start_with_api("sg-hostile", "512M", "sg=on", "balloon;echo READY");
    vm.expect_line("READY", T);
    vm.send("hostile sg-ranges");
    vm.expect_line("hostile sg-ranges sent", T);
    assert_eq!(m(&mut api, "invalid_ranges"), 12);
    // The one real page the case inflated for its duplicates.
    assert_eq!(m(&mut api, "inflate_pages"), 1);
    assert_eq!(m(&mut api, "deflate_pages"), 0);
    assert_eq!(m(&mut api, "queue_errors"), 0, "no NEEDS_RESET");
    // Still serving: 32 MiB in ranges, then back to 0.
    resize_balloon(&mut api, 32, T);
    assert_eq!(m(&mut api, "inflate_pages"), 32 * MIB / 4096);
    resize_balloon(&mut api, 0, T);
    assert_eq!(m(&mut api, "deflate_pages"), 32 * MIB / 4096);
    assert_eq!(m(&mut api, "invalid_ranges"), 12);
    vm.fill(256, 3, T);
    vm.verify("verify ok", T);
    vm.exit_with(0, T);
}

/// Inflate 64 MiB in ranges, then migrate (to a file and restore, or live
/// over a unix socket): the destination's device has the bit negotiated
/// (it serves the guest's deflate ranges; none refused), with the
/// inflated pages and counters carried over.
fn sg_survives(live: bool) {
    let name = if live { "sg-live" } else { "sg-file" };
    let file = std::env::temp_dir().join(format!("blimp-{name}-{}", std::process::id()));
    let url = if live {
        format!("unix://{}", file.display())
    } else {
        format!("file://{}", file.display())
    };
    let dsock = common::sock_path(&format!("{name}-dst"));
    let dsock_s = dsock.to_str().unwrap().to_string();
    let mut dst = live.then(|| Vm::start_cmd("run", &["--incoming", &url, "--api-sock", &dsock_s]));
    if live {
        common::wait_for_path(&file);
    }
    let (mut vm, mut api) =
        common::start_with_api(name, "512M", "sg=on", "balloon;fill 128 3;echo MIGRATE NOW");
    vm.expect_line("MIGRATE NOW", T);
    resize_balloon(&mut api, 64, T);
    let ranges = m(&mut api, "inflate_ranges");
    assert!(ranges >= 1);
    let st = common::migrate(&api, &serde_json::json!({"destination": url}), T);
    assert_eq!(st["state"], "Completed", "{st}");
    assert_eq!(vm.wait(T).code(), Some(0));
    let mut dst = match dst.take() {
        Some(d) => d,
        None => Vm::start_cmd(
            "restore",
            &["--from", file.to_str().unwrap(), "--api-sock", &dsock_s],
        ),
    };
    common::wait_for_socket(&dsock);
    let mut dapi = ApiClient::new(&dsock).unwrap();
    assert_eq!(
        m(&mut dapi, "inflate_ranges"),
        ranges,
        "counters carried over"
    );
    assert_eq!(m(&mut dapi, "inflate_pages"), 64 * MIB / 4096);
    resize_balloon(&mut dapi, 0, T);
    assert!(m(&mut dapi, "deflate_ranges") >= 1, "deflated in ranges");
    assert_eq!(m(&mut dapi, "deflate_pages"), 64 * MIB / 4096);
    assert_eq!(m(&mut dapi, "invalid_ranges"), 0);
    assert_eq!(m(&mut dapi, "invalid_buffers"), 0);
    dst.fill(256, 4, T);
    dst.verify("verify ok", T);
    dst.exit_with(0, T);
    let _ = std::fs::remove_file(&file);
}

#[test]
fn restore_keeps_the_chunked_protocol() {
    sg_survives(false);
}

#[test]
fn live_migration_keeps_the_chunked_protocol() {
    sg_survives(true);
}

/// memfd RAM is striped over two files per discard thread
/// (vmm/src/ram_stripes.rs): data spread over several stripes survives a
/// chunked inflate (its long ranges punched by all discard threads, in
/// turns of idle files) and a live
/// migration to another memfd-backed blimp, which deflates, refills and
/// verifies.
#[test]
fn striped_memfd_ram_keeps_its_data_through_inflate_and_migration() {
    let path = std::env::temp_dir().join(format!("blimp-sg-memfd-{}", std::process::id()));
    let dsock = common::sock_path("sg-memfd-dst");
    let dsock_s = dsock.to_str().unwrap().to_string();
    // Not common::start_incoming: the destination's guest takes commands
    // on its stdin here.
    let url = format!("unix://{}", path.display());
    let mut dst = Vm::start_cmd(
        "run",
        &[
            "--incoming",
            &url,
            "--memory-backend",
            "memfd",
            "--api-sock",
            &dsock_s,
        ],
    );
    common::wait_for_path(&path);
    let (mut vm, mut api, _) = common::boot_with_api(
        "sg-memfd-src",
        "balloon;fill 768 5;free 256;verify;echo MIGRATE NOW",
        &MEMFD_SG_1G,
    );
    vm.expect_line("verify ok", T);
    vm.expect_line("MIGRATE NOW", T);
    resize_balloon(&mut api, 384, T);
    assert_eq!(m(&mut api, "inflate_pages"), 384 * MIB / 4096);
    assert!(m(&mut api, "inflate_ranges") >= 1, "inflated in ranges");
    assert_eq!(m(&mut api, "invalid_ranges"), 0);
    let st = common::migrate(&api, &serde_json::json!({"destination": url}), T);
    assert_eq!(st["state"], "Completed", "{st}");
    assert_eq!(vm.wait(T).code(), Some(0));
    common::wait_for_socket(&dsock);
    let mut dapi = ApiClient::new(&dsock).unwrap();
    dst.verify("verify ok", T);
    resize_balloon(&mut dapi, 0, T);
    assert_eq!(m(&mut dapi, "deflate_pages"), 384 * MIB / 4096);
    dst.fill(384, 6, T);
    dst.verify("verify ok", T);
    dst.exit_with(0, T);
    let _ = std::fs::remove_file(&path);
}

/// The pids of `pid`'s child processes named `comm`.
fn children_named(pid: u32, comm: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let children = std::fs::read_to_string(task.unwrap().path().join("children"));
        for c in children.unwrap_or_default().split_whitespace() {
            let c: i32 = c.parse().unwrap();
            let name = std::fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
            if name.trim() == comm {
                out.push(c);
            }
        }
    }
    out
}

/// A process's state letter (`S`, `Z`, ...), `None` once it is gone.
fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(") ")?.1.chars().next()
}

/// Long memfd punches go to the punch helper processes (vmm/src/punch.rs):
/// one per discard thread, forked at startup, confined, holding no file
/// between requests. A helper killed midway costs nothing (blimp punches
/// itself, logs it, and the memory still comes back), and the helpers end
/// with blimp, even when it is killed.
#[test]
fn memfd_punch_helpers_serve_long_discards_and_end_with_blimp() {
    let parts = vmm::discard_workers::host_parts();
    let (mut vm, mut api, _) = common::boot_with_api(
        "sg-punch-helpers",
        "balloon;fill 512 3;touch 4096;echo TOUCHED",
        &MEMFD_SG_1G,
    );
    vm.expect_line("TOUCHED", T);
    let helpers = children_named(vm.pid(), "blimp-punch");
    // One per discard thread; none on one CPU (nothing runs in parallel).
    let want = if parts > 1 { parts } else { 0 };
    assert_eq!(helpers.len(), want, "{helpers:?} for {parts} discard parts");
    for &h in &helpers {
        let fds: Vec<_> = std::fs::read_dir(format!("/proc/{h}/fd"))
            .unwrap()
            .collect();
        assert_eq!(fds.len(), 1, "helper {h} holds its socket only: {fds:?}");
        let status = std::fs::read_to_string(format!("/proc/{h}/status")).unwrap();
        assert!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "helper {h} runs under a seccomp filter"
        );
    }
    let inflate = |vm: &mut Vm, api: &mut ApiClient| {
        let before = vm.rss_bytes();
        resize_balloon(api, 384, T);
        std::thread::sleep(Duration::from_millis(200));
        let dropped = before.saturating_sub(vm.rss_bytes());
        assert!(
            dropped >= 384 * MIB * 95 / 100,
            "host memory dropped by only {} MiB",
            dropped / MIB
        );
        resize_balloon(api, 0, T);
        vm.send("touch 4096");
        vm.expect_line("touch done", T);
    };
    inflate(&mut vm, &mut api);
    let dropped = |vm: &Vm| vm.log_lines().iter().any(|l| l.contains("punch helper"));
    assert!(!dropped(&vm), "no helper was dropped yet");
    if let Some(&h) = helpers.first() {
        // SAFETY: kill(2) on a process of this test's child.
        assert_eq!(unsafe { libc::kill(h, libc::SIGKILL) }, 0);
        inflate(&mut vm, &mut api);
        assert!(dropped(&vm), "blimp says it punches itself now");
    }
    vm.verify("verify ok", T);
    vm.signal(libc::SIGKILL);
    vm.wait(T);
    // Reparented and ended (a zombie only until its new parent reaps it).
    let t0 = std::time::Instant::now();
    while helpers[1.min(helpers.len())..]
        .iter()
        .any(|&h| !matches!(proc_state(h), None | Some('Z')))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "helpers outlived blimp"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
