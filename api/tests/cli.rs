//! The root binary's CLI client (src/client.rs) against a fake VMM.

mod common;

#[path = "../../src/client.rs"]
#[allow(dead_code)]
mod client;

use std::time::{Duration, Instant};

use api::types::{MigrationState, VmState};
use clap::Parser;
use common::{FakeVmm, Mode};

/// Stands in for the root binary's command line.
#[derive(Parser, Debug)]
#[command(name = "blimp")]
struct Cli {
    #[command(subcommand)]
    cmd: client::ClientCommand,
}

fn run(vmm: &FakeVmm, args: &[&str]) -> Result<(), String> {
    let sock = vmm.sock.display().to_string();
    let mut argv = vec!["blimp"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--api-sock", &sock]);
    let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
    client::run(cli.cmd)
}

#[test]
fn clap_definitions_are_consistent() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
}

#[test]
fn balloon_set_wait_reaches_target() {
    let vmm = FakeVmm::start();
    vmm.state.lock().unwrap().step_pages = 40_000; // the fake guest moves in steps
    let t0 = Instant::now();
    run(
        &vmm,
        &["balloon", "set", "512M", "--wait", "--timeout", "10"],
    )
    .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    let st = vmm.state.lock().unwrap();
    assert_eq!(st.balloon.target_mib, 512);
    assert_eq!(st.balloon.actual_pages, 512 * 256);
}

#[test]
fn balloon_set_sizes_and_errors() {
    let vmm = FakeVmm::start();
    run(&vmm, &["balloon", "set", "1G"]).unwrap();
    assert_eq!(vmm.state.lock().unwrap().balloon.target_mib, 1024);
    run(&vmm, &["balloon", "set", "256MiB", "--json"]).unwrap();
    assert_eq!(vmm.state.lock().unwrap().balloon.target_mib, 256);
    run(&vmm, &["balloon", "set", "300"]).unwrap();
    assert_eq!(vmm.state.lock().unwrap().balloon.target_mib, 300);
    let e = run(&vmm, &["balloon", "set", "12XB"]).unwrap_err();
    assert!(e.contains("unknown unit"), "{e}");
    let e = run(&vmm, &["balloon", "set", "4G"]).unwrap_err();
    assert!(e.contains("larger than guest memory"), "{e}");
    assert!(e.contains("HTTP 400"), "{e}");
}

#[test]
fn balloon_set_wait_times_out() {
    let vmm = FakeVmm::start();
    vmm.state.lock().unwrap().step_pages = 0; // the guest never follows
    let t0 = Instant::now();
    let e = run(&vmm, &["balloon", "set", "64M", "--wait", "--timeout", "1"]).unwrap_err();
    assert!(t0.elapsed() >= Duration::from_secs(1));
    assert!(t0.elapsed() < Duration::from_secs(4));
    assert!(e.starts_with("timed out after 1 s"), "{e}");
}

#[test]
fn balloon_set_wait_names_a_missing_driver() {
    let vmm = FakeVmm::start();
    {
        let mut st = vmm.state.lock().unwrap();
        st.step_pages = 0;
        st.balloon.driver_ok = false; // the guest never set DRIVER_OK
    }
    let e = run(&vmm, &["balloon", "set", "64M", "--wait", "--timeout", "1"]).unwrap_err();
    assert!(
        e.starts_with(
            "the guest has not started its balloon driver (DRIVER_OK not set) within 1 s"
        ),
        "{e}"
    );
    assert!(e.contains("target of 64 MiB is set"), "{e}");
}

#[test]
fn balloon_get_stats_and_hinting() {
    let vmm = FakeVmm::start();
    run(&vmm, &["balloon", "get"]).unwrap();
    run(&vmm, &["balloon", "get", "--json"]).unwrap();
    run(&vmm, &["balloon", "stats"]).unwrap();
    run(&vmm, &["balloon", "stats", "--json"]).unwrap();
    run(&vmm, &["balloon", "stats-interval", "0"]).unwrap();
    assert_eq!(
        vmm.state.lock().unwrap().balloon.stats_polling_interval_s,
        0
    );
    run(&vmm, &["balloon", "hint", "start"]).unwrap();
    run(&vmm, &["balloon", "hint", "status"]).unwrap();
    run(&vmm, &["balloon", "hint", "stop"]).unwrap();
    run(&vmm, &["balloon", "hint", "done"]).unwrap();
}

#[test]
fn vm_commands() {
    let vmm = FakeVmm::start();
    run(&vmm, &["vm", "info"]).unwrap();
    run(&vmm, &["vm", "pause"]).unwrap();
    assert_eq!(vmm.state.lock().unwrap().vm, VmState::Paused);
    let e = run(&vmm, &["vm", "pause"]).unwrap_err();
    assert_eq!(e, "VM is already Paused (HTTP 409)");
    run(&vmm, &["vm", "resume", "--json"]).unwrap();
    assert_eq!(vmm.state.lock().unwrap().vm, VmState::Running);
    run(&vmm, &["vm", "shutdown"]).unwrap();
    assert!(vmm.state.lock().unwrap().shutdown);
}

#[test]
fn migrate_follows_to_completion() {
    let vmm = FakeVmm::start();
    run(
        &vmm,
        &[
            "migrate",
            "--to",
            "unix:///tmp/dst.sock",
            "--no-hints",
            "--max-rounds",
            "9",
        ],
    )
    .unwrap();
    let st = vmm.state.lock().unwrap();
    assert_eq!(st.migration.state, MigrationState::Completed);
    let req = st
        .requests
        .iter()
        .find_map(|r| match r {
            api::ApiRequest::PutMigration(m) => Some(m.clone()),
            _ => None,
        })
        .unwrap();
    assert!(!req.free_page_hints);
    assert_eq!(req.max_rounds, Some(9));
    drop(st);
    let e = run(&vmm, &["migrate", "--to", "ftp://x"]).unwrap_err();
    assert!(e.contains("not supported"), "{e}");
}

#[test]
fn snapshot_metrics_events() {
    let vmm = FakeVmm::start();
    run(&vmm, &["snapshot", "/tmp/blimp-snap"]).unwrap();
    assert_eq!(
        vmm.state.lock().unwrap().snapshots,
        vec![std::path::PathBuf::from("/tmp/blimp-snap")]
    );
    run(&vmm, &["metrics"]).unwrap();
    let hub = vmm.hub.clone();
    let publisher = std::thread::spawn(move || {
        let t0 = Instant::now();
        while hub.subscribers() == 0 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        for _ in 0..2 {
            hub.publish(api::ApiEvent::VmStateChanged {
                state: VmState::Paused,
            });
        }
    });
    run(&vmm, &["events", "--count", "2"]).unwrap();
    publisher.join().unwrap();
}

#[test]
fn missing_socket_message() {
    let vmm = FakeVmm::start();
    vmm.set_mode(Mode::Normal);
    let cli =
        Cli::try_parse_from(["blimp", "vm", "info", "--api-sock", "/tmp/blimp-nope.sock"]).unwrap();
    let e = client::run(cli.cmd).unwrap_err();
    assert_eq!(
        e,
        "cannot connect to /tmp/blimp-nope.sock: no such file (is blimp running with --api-sock /tmp/blimp-nope.sock?)"
    );
}
