//! The chunked balloon protocol (VIRTIO_BALLOON_F_BLIMP_SG, bit 23) with the
//! real Linux driver: the guest kernel carries
//! `resources/linux/patches/0003-virtio-balloon-blimp-sg.patch`, which
//! negotiates the bit when `blimp run --balloon sg=on` offers it and then
//! sends each physically contiguous run of balloon pages as one
//! guest-physical range instead of a PFN array (docs/linux-guest.md).
//!
//! Each test boots the minimal Linux 6.12 guest (256 MiB, 1 vCPU). On this
//! project's PVM hosts the guest kernel is emulated (~1000x slower), so the
//! balloon sizes stay small (32 MiB inflates). Every figure is printed
//! (`cargo test --release --test linux_sg -- --nocapture`).

mod common;

use std::time::{Duration, Instant};

use common::linux::{
    F_BLIMP_SG, LinuxVm, LinuxVmConfig, MIB, assert_negotiated_all, negotiated_features,
    offered_features, suite_clock,
};

const MIN: Duration = Duration::from_secs(60);

fn done(test: &str, started: Instant) {
    eprintln!(
        "linux sg: {test} took {:.1} s (suite wall clock so far {:.1} s)",
        started.elapsed().as_secs_f64(),
        suite_clock().elapsed().as_secs_f64()
    );
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// A `balloon_NAME` counter from `GET /metrics`.
fn counter(vm: &LinuxVm, name: &str) -> u64 {
    let m = vm.api.metrics().expect("GET /metrics");
    let key = format!("balloon_{name}");
    m.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(key.as_str())).then(|| w.next())?
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("[{}] no counter {key} in GET /metrics:\n{m}", vm.name))
}

/// Boot with `balloon` (which must contain `sg=on`) and check that both
/// sides use the chunked protocol: Linux negotiated every offered feature,
/// bit 23 included (sysfs), and nothing else.
fn boot_sg(name: &'static str, balloon: &str, cmdline_extra: &str) -> LinuxVm {
    assert!(balloon.contains("sg=on"), "{balloon}");
    let mut vm = LinuxVm::boot(&LinuxVmConfig {
        name,
        balloon: Some(balloon),
        cmdline_extra,
        ..Default::default()
    });
    let (negotiated, _, _) = negotiated_features(&mut vm);
    // GET /balloon does not describe `sg`; `--balloon sg=on` offers bit 23.
    let offered = offered_features(&vm.balloon()) | 1 << F_BLIMP_SG;
    assert_negotiated_all(name, offered, negotiated, false);
    vm
}

/// Inflate the balloon to `target` MiB; returns (seconds, inflate-queue
/// notifications it took, ranges the device received for it).
fn inflate(vm: &LinuxVm, target: u64) -> (f64, u64, u64) {
    let (k0, r0) = (counter(vm, "inflate_kicks"), counter(vm, "inflate_ranges"));
    vm.set_target(target);
    let took = vm.wait_actual(&format!("{target} MiB"), 5 * MIN, |a| a == target);
    (
        took.as_secs_f64(),
        counter(vm, "inflate_kicks") - k0,
        counter(vm, "inflate_ranges") - r0,
    )
}

/// The guest's view of a 32 MiB inflate and deflate, and the host's.
struct Round {
    inflate_s: f64,
    inflate_kicks: u64,
    inflate_ranges: u64,
    deflate_kicks: u64,
    deflate_ranges: u64,
    memtotal_drop_kib: u64,
    memtotal_restored: bool,
    rss_drop: u64,
    vmstat_inflate: u64,
}

/// Touch and free 64 MiB (so the balloon's pages are mostly resident on the
/// host), inflate 32 MiB, deflate to 0; check that the memory given back is
/// usable.
fn round_32_mib(vm: &mut LinuxVm) -> Round {
    vm.cmd("tmpfs-write t 64 1", 5 * MIN).ok();
    vm.cmd("tmpfs-rm t", 5 * MIN).ok();
    let (total0, _, _) = vm.meminfo();
    let rss0 = vm.rss();
    let (inflate_s, inflate_kicks, inflate_ranges) = inflate(vm, 32);
    std::thread::sleep(Duration::from_millis(300));
    let rss1 = vm.rss();
    let (total1, _, _) = vm.meminfo();
    let vmstat_inflate = vm.cmd("balloon", MIN).ok().num("balloon_inflate");
    let (k0, r0) = (counter(vm, "deflate_kicks"), counter(vm, "deflate_ranges"));
    vm.set_target(0);
    vm.wait_actual("0", 5 * MIN, |a| a == 0);
    let (deflate_kicks, deflate_ranges) = (
        counter(vm, "deflate_kicks") - k0,
        counter(vm, "deflate_ranges") - r0,
    );
    let (total2, _, _) = vm.meminfo();
    let w = vm.cmd("tmpfs-write d 8 3", 5 * MIN).ok();
    let s = vm.cmd("sha256 d", 5 * MIN).ok();
    assert_eq!(w.value("sha256"), s.value("sha256"), "[{}]", vm.name);
    Round {
        inflate_s,
        inflate_kicks,
        inflate_ranges,
        deflate_kicks,
        deflate_ranges,
        memtotal_drop_kib: total0.saturating_sub(total1),
        memtotal_restored: total2 == total0,
        rss_drop: rss0.saturating_sub(rss1),
        vmstat_inflate,
    }
}

/// With `sg=on` the patched driver negotiates bit 23 and inflates/deflates
/// 32 MiB in ranges: Linux's MemTotal drops by exactly 32 MiB and comes
/// back, the host's RSS drops by at least 30 MiB, the device takes the 8192
/// pages as ranges (no invalid one), statistics still flow and match
/// /proc/meminfo. A twin guest without `sg=on` does the same with PFN
/// arrays; both notification counts are printed and the chunked one must be
/// at most a tenth of the PFN one (it is 1 against 32 here: one kick per
/// 256-PFN array, against one queue's worth of ranges).
#[test]
fn sg_inflate_deflate_32_mib_with_far_fewer_notifications_than_pfn_arrays() {
    let t = Instant::now();
    // The PFN twin boots alongside; the two rounds then run one after the
    // other (PFN arrays first, with the chunked guest idle), so their times
    // compare (the host has two cores to share).
    let twin = std::thread::spawn(|| {
        let mut vm = LinuxVm::boot(&LinuxVmConfig {
            name: "sg-twin-pfn",
            balloon: Some("stats_interval=1"),
            ..Default::default()
        });
        let (negotiated, _, _) = negotiated_features(&mut vm);
        assert_eq!(
            negotiated & (1 << F_BLIMP_SG),
            0,
            "bit 23 negotiated without sg=on"
        );
        vm
    });
    let mut vm = boot_sg("sg-inflate", "sg=on,stats_interval=1", "");
    let mut twin = twin.join().expect("the PFN-array twin did not boot");
    let p = round_32_mib(&mut twin);
    assert_eq!(counter(&twin, "inflate_ranges"), 0, "ranges without sg=on");
    twin.poweroff();

    let (pages0, discards0) = (counter(&vm, "inflate_pages"), counter(&vm, "discard_calls"));
    let r = round_32_mib(&mut vm);
    let pages = counter(&vm, "inflate_pages") - pages0;
    let discards = counter(&vm, "discard_calls") - discards0;
    eprintln!(
        "linux sg: [sg] inflate 32 MiB in {:.2} s: {} inflate notifications, {} ranges \
         (vmstat balloon_inflate {}); deflate: {} notifications, {} ranges; MemTotal -{} KiB \
         (restored: {}); host RSS dropped {:.1} MiB",
        r.inflate_s,
        r.inflate_kicks,
        r.inflate_ranges,
        r.vmstat_inflate,
        r.deflate_kicks,
        r.deflate_ranges,
        r.memtotal_drop_kib,
        r.memtotal_restored,
        mib(r.rss_drop)
    );
    assert_eq!(
        r.memtotal_drop_kib,
        32 * 1024,
        "MemTotal must drop by exactly 32 MiB"
    );
    assert!(r.memtotal_restored, "deflate must restore MemTotal");
    assert!(
        r.rss_drop >= 30 * MIB,
        "host RSS dropped by only {:.1} MiB after inflating 32 MiB in ranges",
        mib(r.rss_drop)
    );
    assert_eq!(r.vmstat_inflate, 8192, "Linux's balloon_inflate");
    assert!(
        r.inflate_ranges >= 1 && r.inflate_ranges <= 8192,
        "{} inflate ranges for 8192 pages",
        r.inflate_ranges
    );
    assert!(r.deflate_ranges >= 1, "no deflate ranges");
    assert_eq!(counter(&vm, "invalid_ranges"), 0, "refused ranges");
    eprintln!(
        "linux sg: [sg] the device took {pages} pages in {} ranges, {discards} discard calls",
        r.inflate_ranges
    );
    assert_eq!(pages, 8192, "the device's inflate_pages");

    // Statistics still flow with the bit negotiated and agree with meminfo
    // (a few tries: a report may predate the deflate).
    let deadline = Instant::now() + MIN;
    loop {
        let (status, s) = vm.api.get("/balloon/statistics").expect("GET stats");
        assert_eq!(status, 200, "{s}");
        let (Some(total), Some(free)) = (s["total_memory"].as_u64(), s["free_memory"].as_u64())
        else {
            assert!(
                Instant::now() < deadline,
                "no guest statistics in 60 s: {s}"
            );
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let (mem_total, mem_free, _) = vm.meminfo();
        let (mem_total, mem_free) = (mem_total * 1024, mem_free * 1024);
        let diff = (free as f64 - mem_free as f64).abs() / mem_free as f64;
        eprintln!(
            "linux sg: [sg] stats total {:.1} MiB free {:.1} MiB; meminfo {:.1} / {:.1} MiB",
            mib(total),
            mib(free),
            mib(mem_total),
            mib(mem_free)
        );
        if total == mem_total && diff <= 0.05 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "statistics disagree with meminfo: total {total} vs {mem_total}, free {free} vs \
             {mem_free}: {s}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    vm.poweroff();

    eprintln!(
        "linux sg: inflate-queue notifications for 32 MiB: PFN arrays {} (in {:.2} s), \
         ranges {} (in {:.2} s); deflate: PFN arrays {}, ranges {}; PFN twin MemTotal -{} KiB, \
         host RSS dropped {:.1} MiB",
        p.inflate_kicks,
        p.inflate_s,
        r.inflate_kicks,
        r.inflate_s,
        p.deflate_kicks,
        r.deflate_kicks,
        p.memtotal_drop_kib,
        mib(p.rss_drop)
    );
    assert_eq!(p.memtotal_drop_kib, 32 * 1024, "PFN twin MemTotal");
    assert!(
        p.memtotal_restored,
        "PFN twin: deflate must restore MemTotal"
    );
    assert_eq!(p.inflate_ranges, 0);
    assert!(
        p.inflate_kicks >= 32,
        "8192 PFNs in arrays of 256 need 32 notifications, the device counted {}",
        p.inflate_kicks
    );
    assert!(
        r.inflate_kicks >= 1 && r.inflate_kicks * 10 <= p.inflate_kicks,
        "chunked inflate took {} notifications against {} with PFN arrays",
        r.inflate_kicks,
        p.inflate_kicks
    );
    assert!(
        r.deflate_kicks >= 1 && r.deflate_kicks * 10 <= p.deflate_kicks,
        "chunked deflate took {} notifications against {} with PFN arrays",
        r.deflate_kicks,
        p.deflate_kicks
    );
    done("sg inflate/deflate + notifications + statistics", t);
}

/// Deflate on OOM with the bit negotiated: with the balloon at 160 MiB of
/// 256 MiB (~60 MiB left free), a 100 MiB allocation succeeds because the
/// OOM notifier gives pages back, each as its own single-page range
/// (leak_balloon_sg_oom): the device's deflate range and page counts are
/// equal. (Balloon compaction may migrate pages meanwhile; each migration
/// is a single-page inflate and deflate range too.)
#[test]
fn sg_deflate_on_oom_returns_single_page_ranges() {
    let t = Instant::now();
    let mut vm = boot_sg("sg-oom", "sg=on,deflate_on_oom=on,stats_interval=1", "");
    let (took, kicks, ranges) = inflate(&vm, 160);
    eprintln!("linux sg: inflate 160 MiB in {took:.1} s: {kicks} notifications, {ranges} ranges");
    let before = vm.cmd("balloon", MIN).ok();
    let (d0, p0) = (
        counter(&vm, "deflate_ranges"),
        counter(&vm, "deflate_pages"),
    );
    let r = vm.cmd("alloc 100 100", 10 * MIN);
    let after = vm.balloon();
    let actual = after["actual_mib"].as_u64().expect("actual_mib");
    let b = vm.cmd("balloon", MIN).ok();
    let deflated = b.num("balloon_deflate") - before.num("balloon_deflate");
    let migrated = b.num("balloon_migrate") - before.num("balloon_migrate");
    let d = counter(&vm, "deflate_ranges") - d0;
    let pages = counter(&vm, "deflate_pages") - p0;
    eprintln!(
        "linux sg: deflate on OOM: alloc 100 MiB rc={} in {:.1} s; actual 160 -> {actual} MiB; \
         Linux deflated {deflated} pages and migrated {migrated}; the device got {d} deflate \
         ranges holding {pages} pages",
        r.rc,
        r.took.as_secs_f64()
    );
    assert_eq!(r.rc, 0, "100 MiB allocation failed: {:?}", r.lines);
    assert!(actual < 160, "the balloon did not deflate: {after}");
    assert!(deflated > 0);
    assert_eq!(d, pages, "on OOM every deflate range must be one page");
    assert_eq!(
        d,
        deflated + migrated,
        "one deflate range per page deflated or migrated"
    );
    assert_eq!(counter(&vm, "invalid_ranges"), 0, "refused ranges");
    vm.poweroff();
    done("sg deflate on OOM", t);
}

/// Hint-aware migration with the bit negotiated: a guest with 16 MiB in its
/// balloon (inflated in ranges) writes and deletes a 96 MiB file and keeps
/// a 16 MiB one; a migration to a file with free page hints skips at least
/// 64 MiB; the restored guest still has the file, its balloon is still
/// 16 MiB, and its driver keeps talking ranges to the restored device
/// (which still has bit 23 negotiated).
#[test]
fn sg_hint_aware_migration_restores_with_ranges() {
    let t = Instant::now();
    let dir = std::env::temp_dir().join(format!("blimp-linux-sg-mig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut vm = boot_sg(
        "sg-mig",
        "sg=on,free_page_hint=on,stats_interval=1",
        "sysctl.vm.percpu_pagelist_high_fraction=100000",
    );
    let (_, _, ranges) = inflate(&vm, 16);
    assert!(ranges >= 1, "16 MiB inflated without ranges");
    vm.cmd("tmpfs-write big 96 5", 5 * MIN).ok();
    vm.cmd("tmpfs-rm big", 5 * MIN).ok();
    let keep = vm.cmd("tmpfs-write keep 16 7", 5 * MIN).ok();
    let sha = keep.value("sha256").expect("sha256").to_string();
    let path = dir.join("sg.mig");
    let m = common::migrate(
        &vm.api,
        &serde_json::json!({
            "destination": format!("file://{}", path.display()),
            "free_page_hints": true,
        }),
        5 * MIN,
    );
    assert_eq!(m["state"], "Completed", "{m}");
    let sent = m["bytes_sent"].as_u64().unwrap_or(u64::MAX);
    let hinted = m["pages_hinted"].as_u64().unwrap_or(0);
    eprintln!(
        "linux sg: migration with hints: {:.1} MiB sent of 256 MiB, {hinted} pages ({:.1} MiB) \
         hinted: {m}",
        mib(sent),
        hinted as f64 / 256.0
    );
    assert!(hinted * 4096 >= 64 * MIB, "only {hinted} pages hinted");
    // The 16 MiB balloon and the hinted pages are not sent.
    assert!(
        sent + 64 * MIB <= 256 * MIB,
        "{:.1} MiB of page data sent",
        mib(sent)
    );
    drop(vm);

    let sock = common::sock_path("sg-mig-restored");
    let _ = std::fs::remove_file(&sock);
    let restored = common::Vm::spawn(
        "restore",
        &[
            "--from",
            path.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    let mut vm = LinuxVm::attach(restored, "sg-mig-restored", sock);
    let s = vm.cmd("sha256 keep", 5 * MIN).ok();
    assert_eq!(s.value("sha256"), Some(sha.as_str()), "{:?}", s.lines);
    let b = vm.balloon();
    assert_eq!(b["actual_mib"].as_u64(), Some(16), "{b}");
    let (negotiated, _, _) = negotiated_features(&mut vm);
    assert_ne!(negotiated & (1 << F_BLIMP_SG), 0, "bit 23 lost");
    let (took, kicks, ranges) = inflate(&vm, 32);
    let d0 = counter(&vm, "deflate_ranges");
    vm.set_target(0);
    vm.wait_actual("0", 5 * MIN, |a| a == 0);
    let d = counter(&vm, "deflate_ranges") - d0;
    eprintln!(
        "linux sg: restored guest: 16 -> 32 MiB in {took:.1} s ({kicks} notifications, \
         {ranges} ranges), deflated to 0 in {d} ranges"
    );
    assert!(ranges >= 1 && d >= 1, "the restored device got no ranges");
    assert_eq!(counter(&vm, "invalid_ranges"), 0, "refused ranges");
    vm.poweroff();
    let _ = std::fs::remove_dir_all(&dir);
    done("sg hint-aware migration", t);
}
