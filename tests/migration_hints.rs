//! Free page hints make migration skip free memory, and never lose a page:
//! integrity under a page-dirtying workload, and hint skipping measured on
//! an 8 GiB guest.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use api::client::ApiClient;
use common::{Vm, boot_with_api};
use serde_json::{Value, json};

const BOOT: Duration = Duration::from_secs(60);
const GIB: u64 = 1 << 30;

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("blimp-hint-{name}-{}", std::process::id()))
}

fn migrate(api: &mut ApiClient, body: Value) -> Value {
    common::migrate(api, &body, Duration::from_secs(600))
}

/// `--memory memory`, free page hinting on, no console input.
fn hint_args(memory: &str) -> [&str; 5] {
    [
        "--memory",
        memory,
        "--no-stdin",
        "--balloon",
        "free_page_hint=on",
    ]
}

/// One integrity run: the guest rewrites pages (versions recorded in its own
/// memory) while hint rounds race the writes; after the migration the
/// restored guest verifies every page.
///
/// The guest dirties until the test's commands reach it on the destination:
/// nothing here depends on how long the migration takes (a file
/// destination on a busy disk can take tens of seconds to converge).
fn integrity_run(run: usize, via_socket: bool, hints: bool) {
    let name = format!("int{run}");
    let program = "fill 384 7;free 128;dirty 192 200;echo MIGRATE NOW";
    let (mut src, mut api, _) = boot_with_api(&name, program, &hint_args("1G"));
    src.expect_line("MIGRATE NOW", BOOT);
    let (dest, mut dst) = if via_socket {
        let (dst, url) = common::start_incoming_with_console(&tmp(&format!("{name}.sock")), &[]);
        (url, Some(dst))
    } else {
        (format!("file://{}", tmp(&name).display()), None)
    };
    let st = migrate(
        &mut api,
        json!({"destination": dest, "free_page_hints": hints}),
    );
    assert_eq!(st["state"], "Completed", "run {run}: {st}");
    eprintln!(
        "integrity run {run} ({}, hints {hints}): rounds {}, data {} MiB, hinted {} pages, downtime {} ms, {} ms",
        if via_socket { "unix socket" } else { "file" },
        st["round"],
        st["bytes_sent"].as_u64().unwrap_or(0) >> 20,
        st["pages_hinted"],
        st["downtime_ms"],
        st["elapsed_ms"]
    );
    if hints {
        assert!(
            st["pages_hinted"].as_u64().unwrap() > 100_000,
            "run {run}: hints were used: {st}"
        );
    }
    assert_eq!(src.wait(BOOT).code(), Some(0));
    let mut dst = match dst.take() {
        Some(d) => d,
        None => {
            let f = tmp(&name);
            Vm::start_cmd("restore", &["--from", f.to_str().unwrap()])
        }
    };
    // The restored guest is still dirtying: stop it, then check every page.
    dst.send("dirty 0 0");
    dst.expect_line("dirty off", BOOT);
    dst.verify("verify ok 65536 pages", BOOT);
    dst.send("hints");
    let held = dst.expect_line("hints rounds", BOOT);
    assert!(
        held.contains("held 0 "),
        "run {run}: hinted blocks freed after DONE: {held}"
    );
    dst.exit_with(0, BOOT);
    let _ = std::fs::remove_file(tmp(&name));
}

#[test]
fn twenty_migrations_under_a_dirtying_workload_lose_nothing() {
    for run in 0..20 {
        integrity_run(run, run % 2 == 1, (run / 2) % 2 == 0);
    }
}

/// Migrate an 8 GiB guest with 1 GiB in use (7 GiB filled, 6 GiB freed:
/// free memory keeps its garbage, as a real guest's does) to a file.
fn eight_gib_migration(hints: bool) -> (Value, PathBuf) {
    let name = if hints { "8g-hints" } else { "8g-nohints" };
    let program = "fill 7168 1;free 6144;echo MIGRATE NOW";
    let (mut vm, mut api, _) = boot_with_api(name, program, &hint_args("8G"));
    vm.expect_line("MIGRATE NOW", Duration::from_secs(300));
    let file = tmp(name);
    let t = Instant::now();
    let st = migrate(
        &mut api,
        json!({"destination": format!("file://{}", file.display()), "free_page_hints": hints}),
    );
    assert_eq!(st["state"], "Completed", "{st}");
    eprintln!(
        "8 GiB guest, 1 GiB live, hints {hints}: {} MiB of page data, file {} MiB, {} pages hinted, {} zero, {:?}",
        st["bytes_sent"].as_u64().unwrap() >> 20,
        std::fs::metadata(&file).unwrap().len() >> 20,
        st["pages_hinted"],
        st["pages_zero"],
        t.elapsed()
    );
    vm.wait(BOOT);
    (st, file)
}

#[test]
fn hints_skip_free_memory_of_an_eight_gib_guest() {
    let (with, file) = eight_gib_migration(true);
    let data = with["bytes_sent"].as_u64().unwrap();
    assert!(
        data <= GIB + GIB / 10,
        "with hints {data} bytes of page data (at most 1.1 GiB)"
    );
    // The hinted file restores, and the guest frees its hinted blocks after DONE.
    let mut dst = Vm::start_cmd("restore", &["--from", file.to_str().unwrap()]);
    dst.send("verify");
    dst.expect_line("verify ok 262144 pages", Duration::from_secs(120));
    dst.send("hints");
    let h = dst.expect_line("hints rounds", BOOT);
    assert!(h.contains("held 0 "), "{h}");
    dst.send("meminfo");
    let m = dst.expect_line("meminfo ram", BOOT);
    eprintln!("after restore: {m}");
    dst.exit_with(0, BOOT);
    let _ = std::fs::remove_file(&file);

    let (without, file) = eight_gib_migration(false);
    let data = without["bytes_sent"].as_u64().unwrap();
    assert!(
        data >= 7 * GIB,
        "without hints {data} bytes of page data (at least 7 GiB)"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn zero_pages_of_a_fresh_guest_are_never_data() {
    let (mut vm, mut api, _) = common::start_with_sock(
        "fresh",
        &[
            "--memory",
            "2G",
            "--no-stdin",
            "--cmdline",
            "testguest.run=\"echo MIGRATE NOW;sleep 60\"",
        ],
    );
    vm.expect_line("MIGRATE NOW", BOOT);
    let file = tmp("fresh");
    let st = migrate(
        &mut api,
        json!({"destination": format!("file://{}", file.display()), "free_page_hints": false}),
    );
    let data = st["bytes_sent"].as_u64().unwrap();
    eprintln!(
        "fresh 2 GiB guest: {} KiB of page data, {} zero pages",
        data >> 10,
        st["pages_zero"]
    );
    assert!(
        data < 64 << 20,
        "a fresh guest sent {data} bytes of page data"
    );
    assert!(st["pages_zero"].as_u64().unwrap() > 500_000);
    let _ = std::fs::remove_file(&file);
}
