//! The chunked balloon protocol (VIRTIO_BALLOON_F_BLIMP_SG, bit 23) with the
//! real Linux driver: the guest kernel carries
//! `resources/linux/patches/0003-virtio-balloon-blimp-sg.patch`, which
//! negotiates the bit when `blimp run --balloon sg=on` offers it and then
//! sends each physically contiguous run of balloon pages as one
//! guest-physical range instead of a PFN array (docs/linux-guest.md).
//!
//! Each test boots the minimal Linux 6.12 guest (256 MiB, 1 vCPU; 128 MiB
//! for deflate on OOM). On this project's PVM hosts the guest kernel is
//! emulated (~1000x slower), so every test moves as few pages as its
//! property needs (the costs per MiB are in `linux_e2e.rs`'s header), and
//! each says why its sizes are what they are. Every figure is printed
//! (`cargo test --release --test linux_sg -- --nocapture`).

mod common;

use std::time::{Duration, Instant};

use common::linux::{
    F_BLIMP_SG, LinuxVm, LinuxVmConfig, MIB, MIN, OOM_BALLOON_MIB, OOM_GUEST_MEMORY,
    OOM_MIN_DEFLATE_MIB, assert_negotiated_all, mib, negotiated_features, offered_features,
    oom_alloc_mib,
};

fn done(test: &str, started: Instant) {
    common::linux::done("linux sg", test, started);
}

/// Boot with `balloon` (which must contain `sg=on`) and check that both
/// sides use the chunked protocol: Linux negotiated every offered feature,
/// bit 23 included (sysfs), and nothing else.
fn boot_sg(name: &'static str, balloon: &str, cmdline_extra: &str) -> LinuxVm {
    boot_sg_with(&LinuxVmConfig {
        name,
        balloon: Some(balloon),
        cmdline_extra,
        ..Default::default()
    })
}

/// [`boot_sg`] with a whole configuration.
fn boot_sg_with(cfg: &LinuxVmConfig) -> LinuxVm {
    let (name, balloon) = (cfg.name, cfg.balloon.unwrap_or(""));
    assert!(balloon.contains("sg=on"), "{balloon}");
    let mut vm = LinuxVm::boot(cfg);
    let (negotiated, _, _) = negotiated_features(&mut vm);
    // GET /balloon does not describe `sg`; `--balloon sg=on` offers bit 23.
    let offered = offered_features(&vm.balloon()) | 1 << F_BLIMP_SG;
    assert_negotiated_all(name, offered, negotiated, false);
    vm
}

/// Inflate the balloon to `target` MiB; returns (seconds, inflate-queue
/// notifications it took, ranges the device received for it).
fn inflate(vm: &LinuxVm, target: u64) -> (f64, u64, u64) {
    let (k0, r0) = (vm.counter("inflate_kicks"), vm.counter("inflate_ranges"));
    vm.set_target(target);
    let took = vm.wait_actual(&format!("{target} MiB"), 5 * MIN, |a| a == target);
    (
        took.as_secs_f64(),
        vm.counter("inflate_kicks") - k0,
        vm.counter("inflate_ranges") - r0,
    )
}

/// The inflate of the chunked-vs-PFN test (see its sizes).
const ROUND_MIB: u64 = 16;
const ROUND_PAGES: u64 = ROUND_MIB * 256;

/// The guest's view of a [`ROUND_MIB`] inflate and deflate, and the host's.
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

/// Touch and free `touch_mib` (so the balloon's pages are mostly resident
/// on the host; 0: skip, when the RSS drop is not checked), inflate
/// [`ROUND_MIB`], deflate to 0; check that the memory given back is usable.
fn round(vm: &mut LinuxVm, touch_mib: u64) -> Round {
    if touch_mib > 0 {
        vm.cmd(&format!("tmpfs-write t {touch_mib} 1"), 5 * MIN)
            .ok();
        vm.cmd("tmpfs-rm t", 5 * MIN).ok();
    }
    let (total0, _, _) = vm.meminfo();
    let rss0 = vm.rss();
    let (inflate_s, inflate_kicks, inflate_ranges) = inflate(vm, ROUND_MIB);
    std::thread::sleep(Duration::from_millis(300));
    let rss1 = vm.rss();
    let (total1, _, _) = vm.meminfo();
    let vmstat_inflate = vm.cmd("balloon", MIN).ok().num("balloon_inflate");
    let (k0, r0) = (vm.counter("deflate_kicks"), vm.counter("deflate_ranges"));
    vm.set_target(0);
    vm.wait_actual("0", 5 * MIN, |a| a == 0);
    let (deflate_kicks, deflate_ranges) = (
        vm.counter("deflate_kicks") - k0,
        vm.counter("deflate_ranges") - r0,
    );
    let (total2, _, _) = vm.meminfo();
    let w = vm.cmd("tmpfs-write d 4 3", 5 * MIN).ok();
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
/// 16 MiB in ranges: Linux's MemTotal drops by exactly 16 MiB and comes
/// back, the host's RSS drops by at least 14 MiB, the device takes the 4096
/// pages as ranges (no invalid one), statistics still flow and match
/// /proc/meminfo. A twin guest without `sg=on` does the same with PFN
/// arrays; both notification counts are printed and the chunked one must be
/// at most a tenth of the PFN one (one kick per 256-PFN array, 16 here,
/// against one queue's worth of ranges: 1 against 32 with 32 MiB before).
///
/// Sizes: 16 MiB is the smallest inflate whose PFN arrays (16) leave room
/// for the tenfold ratio with one chunked kick. Only the chunked guest's RSS
/// drop is asserted, so only it first writes and deletes a 24 MiB file to
/// make the balloon's pages resident (as `linux_e2e`'s inflate test, which
/// measured 15.9 of 16 MiB returned); the PFN twin skips that emulated work
/// (each did 64 MiB before).
#[test]
fn sg_inflate_deflate_16_mib_with_far_fewer_notifications_than_pfn_arrays() {
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
    let p = round(&mut twin, 0);
    assert_eq!(twin.counter("inflate_ranges"), 0, "ranges without sg=on");
    twin.poweroff();

    let (pages0, discards0) = (vm.counter("inflate_pages"), vm.counter("discard_calls"));
    let r = round(&mut vm, 24);
    let pages = vm.counter("inflate_pages") - pages0;
    let discards = vm.counter("discard_calls") - discards0;
    eprintln!(
        "linux sg: [sg] inflate {ROUND_MIB} MiB in {:.2} s: {} inflate notifications, {} ranges \
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
        ROUND_MIB * 1024,
        "MemTotal must drop by exactly {ROUND_MIB} MiB"
    );
    assert!(r.memtotal_restored, "deflate must restore MemTotal");
    assert!(
        r.rss_drop >= (ROUND_MIB - 2) * MIB,
        "host RSS dropped by only {:.1} MiB after inflating {ROUND_MIB} MiB in ranges",
        mib(r.rss_drop)
    );
    assert_eq!(r.vmstat_inflate, ROUND_PAGES, "Linux's balloon_inflate");
    assert!(
        r.inflate_ranges >= 1 && r.inflate_ranges <= ROUND_PAGES,
        "{} inflate ranges for {ROUND_PAGES} pages",
        r.inflate_ranges
    );
    assert!(r.deflate_ranges >= 1, "no deflate ranges");
    assert_eq!(vm.counter("invalid_ranges"), 0, "refused ranges");
    eprintln!(
        "linux sg: [sg] the device took {pages} pages in {} ranges, {discards} discard calls",
        r.inflate_ranges
    );
    assert_eq!(pages, ROUND_PAGES, "the device's inflate_pages");

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
        "linux sg: inflate-queue notifications for {ROUND_MIB} MiB: PFN arrays {} (in {:.2} s), \
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
    assert_eq!(p.memtotal_drop_kib, ROUND_MIB * 1024, "PFN twin MemTotal");
    assert!(
        p.memtotal_restored,
        "PFN twin: deflate must restore MemTotal"
    );
    assert_eq!(p.inflate_ranges, 0);
    assert!(
        p.inflate_kicks >= ROUND_PAGES / 256,
        "{ROUND_PAGES} PFNs in arrays of 256 need {} notifications, the device counted {}",
        ROUND_PAGES / 256,
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

/// Deflate on OOM with the bit negotiated: with the balloon at 64 MiB of a
/// 128 MiB guest, an allocation 4 MiB over the guest's MemAvailable
/// succeeds because the OOM notifier gives pages back, each as its own
/// single-page range (leak_balloon_sg_oom): the device's deflate range and
/// page counts are equal. (Balloon compaction may migrate pages meanwhile;
/// each migration is a single-page inflate and deflate range too.)
///
/// Sizes: those of `linux_e2e`'s deflate-on-OOM test (`common::linux::
/// OOM_*`, which says why): every page given back on OOM is a range here,
/// so a few MiB of them (~2000 ranges) show the rule as well as 160 MiB.
#[test]
fn sg_deflate_on_oom_returns_single_page_ranges() {
    let t = Instant::now();
    let mut vm = boot_sg_with(&LinuxVmConfig {
        name: "sg-oom",
        memory: OOM_GUEST_MEMORY,
        balloon: Some("sg=on,deflate_on_oom=on,stats_interval=1"),
        ..Default::default()
    });
    let (took, kicks, ranges) = inflate(&vm, OOM_BALLOON_MIB);
    eprintln!(
        "linux sg: inflate {OOM_BALLOON_MIB} MiB in {took:.1} s: {kicks} notifications, {ranges} ranges"
    );
    let (_, _, avail) = vm.meminfo();
    let alloc = oom_alloc_mib(avail);
    let before = vm.cmd("balloon", MIN).ok();
    let (d0, p0) = (vm.counter("deflate_ranges"), vm.counter("deflate_pages"));
    let r = vm.cmd(&format!("alloc {alloc} 100"), 10 * MIN);
    let after = vm.balloon();
    let actual = after["actual_mib"].as_u64().expect("actual_mib");
    let b = vm.cmd("balloon", MIN).ok();
    let deflated = b.num("balloon_deflate") - before.num("balloon_deflate");
    let migrated = b.num("balloon_migrate") - before.num("balloon_migrate");
    let d = vm.counter("deflate_ranges") - d0;
    let pages = vm.counter("deflate_pages") - p0;
    eprintln!(
        "linux sg: deflate on OOM: alloc {alloc} MiB (MemAvailable {avail} KiB) rc={} in {:.1} s; \
         actual {OOM_BALLOON_MIB} -> {actual} MiB; \
         Linux deflated {deflated} pages and migrated {migrated}; the device got {d} deflate \
         ranges holding {pages} pages",
        r.rc,
        r.took.as_secs_f64()
    );
    assert_eq!(r.rc, 0, "{alloc} MiB allocation failed: {:?}", r.lines);
    assert!(
        actual + OOM_MIN_DEFLATE_MIB <= OOM_BALLOON_MIB,
        "the balloon gave back less than the {OOM_MIN_DEFLATE_MIB} MiB the allocation lacked: {after}"
    );
    assert!(deflated > 0);
    assert_eq!(d, pages, "on OOM every deflate range must be one page");
    assert_eq!(
        d,
        deflated + migrated,
        "one deflate range per page deflated or migrated"
    );
    assert_eq!(vm.counter("invalid_ranges"), 0, "refused ranges");
    vm.poweroff();
    done("sg deflate on OOM", t);
}

/// Hint-aware migration with the bit negotiated: a guest with 16 MiB in its
/// balloon (inflated in ranges) keeps a 4 MiB file; a migration to a file
/// with free page hints skips at least 64 MiB of free memory and sends at
/// most 192 MiB of 256; the restored guest still has the file, its balloon
/// is still 16 MiB, and its driver keeps talking ranges to the restored
/// device (which still has bit 23 negotiated).
///
/// Sizes: how much hints save over a hint-less migration (memory the guest
/// dirtied and freed) is `linux_e2e`'s twin test; here hints must flow with
/// bit 23, and the ~200 MiB the idle guest has free are hinted with no
/// emulated work beforehand (this test wrote and deleted 96 MiB before, for
/// no assertion that needed it). The balloon is 16 MiB so that the restored
/// device has ranges to keep; the kept file is 4 MiB (its checksum is the
/// check).
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
    let keep = vm.cmd("tmpfs-write keep 4 7", 5 * MIN).ok();
    let sha = keep.value("sha256").expect("sha256").to_string();
    let path = dir.join("sg.mig");
    let m = vm.migrate_to_file(&path, true);
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

    let mut vm = LinuxVm::restore("sg-mig-restored", &path);
    let s = vm.cmd("sha256 keep", 5 * MIN).ok();
    assert_eq!(s.value("sha256"), Some(sha.as_str()), "{:?}", s.lines);
    let b = vm.balloon();
    assert_eq!(b["actual_mib"].as_u64(), Some(16), "{b}");
    let (negotiated, _, _) = negotiated_features(&mut vm);
    assert_ne!(negotiated & (1 << F_BLIMP_SG), 0, "bit 23 lost");
    let (took, kicks, ranges) = inflate(&vm, 32);
    let d0 = vm.counter("deflate_ranges");
    vm.set_target(0);
    vm.wait_actual("0", 5 * MIN, |a| a == 0);
    let d = vm.counter("deflate_ranges") - d0;
    eprintln!(
        "linux sg: restored guest: 16 -> 32 MiB in {took:.1} s ({kicks} notifications, \
         {ranges} ranges), deflated to 0 in {d} ranges"
    );
    assert!(ranges >= 1 && d >= 1, "the restored device got no ranges");
    assert_eq!(vm.counter("invalid_ranges"), 0, "refused ranges");
    vm.poweroff();
    let _ = std::fs::remove_dir_all(&dir);
    done("sg hint-aware migration", t);
}
