//! Issue #16: one size parser for the CLI and the API (`1.5G`, `-5`,
//! `512MB`, `0`, overflow, garbage), bare `--balloon` switches, and the
//! balloon floor, against a running test guest.

mod common;

use std::time::Duration;

use common::{boot_with_api, run_blimp, set_target, testguest};
use serde_json::{Value, json};

/// What a size should do, everywhere it is read.
enum Want {
    /// Accepted, as this many MiB.
    Mib(u64),
    /// Refused; the message contains this.
    Refused(&'static str),
}

/// The table every path is checked against.
const TABLE: &[(&str, Want)] = &[
    ("1.5G", Want::Mib(1536)),
    ("512MB", Want::Mib(512)),
    ("512mib", Want::Mib(512)),
    ("0", Want::Mib(0)),
    ("-5", Want::Refused("cannot be negative")),
    ("-1.5G", Want::Refused("cannot be negative")),
    ("1.3M", Want::Refused("not a whole number")),
    ("99999999999999999999", Want::Refused("too large")),
    ("garbage", Want::Refused("expected a number")),
    ("12X", Want::Refused("unknown unit")),
];

/// A file that passes the CLI's "readable kernel" check but is no kernel:
/// a size the CLI accepts gets as far as loading it.
fn not_a_kernel() -> std::path::PathBuf {
    let f = std::env::temp_dir().join(format!("blimp-sizes-not-a-kernel-{}", std::process::id()));
    std::fs::write(&f, b"not a kernel").unwrap();
    f
}

const NOT_A_KERNEL: &str = "neither an ELF vmlinux nor a bzImage";

/// `blimp run --kernel KERNEL --no-stdin ARGS` must refuse to start (exit
/// status 2); returns its stderr.
fn refused_run(kernel: &str, args: &[&str]) -> String {
    let mut all = vec!["run", "--kernel", kernel, "--no-stdin"];
    all.extend_from_slice(args);
    let (code, _, err) = run_blimp(&all);
    assert_eq!(code, 2, "{args:?}: {err}");
    err
}

#[test]
fn cli_sizes_all_go_through_one_parser() {
    let k = not_a_kernel();
    let k = k.to_str().unwrap();
    for (input, want) in TABLE {
        // --memory (0 has its own message: a guest needs memory).
        let err = refused_run(k, &["--memory", input]);
        match want {
            Want::Mib(0) => assert!(err.contains("cannot be 0"), "--memory {input}: {err}"),
            Want::Mib(_) => assert!(err.contains(NOT_A_KERNEL), "--memory {input}: {err}"),
            Want::Refused(msg) => {
                assert!(
                    err.contains("--memory") && err.contains(msg) && err.contains(input),
                    "--memory {input}: {err}"
                );
                assert!(!err.contains("unexpected argument"), "{err}");
            }
        }
        // --balloon-target on a 2 GiB guest.
        let err = refused_run(k, &["--memory", "2G", "--balloon-target", input]);
        match want {
            Want::Mib(_) => assert!(
                err.contains(NOT_A_KERNEL),
                "--balloon-target {input}: {err}"
            ),
            Want::Refused(msg) => assert!(
                err.contains("--balloon-target") && err.contains(msg) && err.contains(input),
                "--balloon-target {input}: {err}"
            ),
        }
        // blimp balloon set, with no blimp listening: an accepted size gets
        // as far as connecting.
        let sock = std::env::temp_dir().join("blimp-sizes-nobody-listens.sock");
        let (code, _, err) = run_blimp(&[
            "balloon",
            "set",
            "--api-sock",
            sock.to_str().unwrap(),
            input,
        ]);
        match want {
            Want::Mib(_) => {
                assert_eq!(code, 1, "balloon set {input}: {err}");
                assert!(err.contains("cannot connect"), "balloon set {input}: {err}");
            }
            Want::Refused(msg) => {
                assert_eq!(code, 2, "balloon set {input}: {err}");
                assert!(
                    err.contains(msg) && err.contains(input),
                    "balloon set {input}: {err}"
                );
                assert!(!err.contains("unexpected argument"), "{err}");
            }
        }
    }
    // A negative size before the other options reaches the parser too.
    let (code, _, err) = run_blimp(&["balloon", "set", "-5", "--api-sock", "/nonexistent"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be negative"), "{err}");
    // A fraction of a page for --memory: whole 4 KiB pages.
    let (code, _, err) = run_blimp(&["run", "--kernel", k, "--memory", "100.001M"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a whole number of 4 KiB pages"), "{err}");
    std::fs::remove_file(k).unwrap();
}

fn err(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_string()
}

/// The API path: `PATCH /balloon` takes the same sizes, as a string or as
/// a number of MiB, with the same messages; a refused size changes nothing.
#[test]
fn api_sizes_match_the_cli() {
    common::require_kvm();
    let (mut vm, mut api, _sock) = boot_with_api(
        "sizes-api",
        "echo ready",
        &["--memory", "2G", "--balloon", ""],
    );
    for (input, want) in TABLE {
        set_target(&mut api, 100);
        let (s, b) = api
            .patch("/balloon", &json!({ "target_mib": input }))
            .unwrap();
        let (_, now) = api.get("/balloon").unwrap();
        match want {
            Want::Mib(mib) => {
                assert_eq!(s, 204, "{input}: {b}");
                assert_eq!(now["target_mib"], *mib, "{input}: {now}");
            }
            Want::Refused(msg) => {
                assert_eq!(s, 400, "{input}: {b}");
                assert!(err(&b).contains(msg), "{input}: {b}");
                assert_eq!(now["target_mib"], 100, "{input}: {now}");
            }
        }
    }
    // JSON numbers: whole MiB only, never negative.
    for (n, status, msg) in [
        (json!(1536), 204, ""),
        (json!(0), 204, ""),
        (json!(-5), 400, "cannot be negative"),
        (json!(1.5), 400, "not a whole number of MiB"),
        (json!(1e30), 400, "too large"),
        (json!(u64::MAX), 400, "out of range"),
    ] {
        let (s, b) = api.patch("/balloon", &json!({ "target_mib": n })).unwrap();
        assert_eq!(s, status, "{n}: {b}");
        assert!(err(&b).contains(msg), "{n}: {b}");
    }
    vm.exit_with(0, Duration::from_secs(30));
}

/// The floor (default: 64 MiB on a 2 GiB guest): a target that would leave
/// the guest less is refused by the API (400) and by `blimp balloon set`
/// (exit 2), naming the floor and the guest's size; the guest still runs.
#[test]
fn balloon_floor_is_enforced_on_api_and_cli() {
    common::require_kvm();
    let (mut vm, mut api, sock) = boot_with_api(
        "sizes-floor",
        "balloon",
        &["--memory", "2G", "--balloon", ""],
    );
    let sock = sock.to_str().unwrap();
    for mib in [2048, 2000, 1985] {
        let (s, b) = api
            .patch("/balloon", &json!({ "target_mib": mib }))
            .unwrap();
        assert_eq!(s, 400, "{mib}: {b}");
        let e = err(&b);
        assert!(
            e.contains(&format!("target_mib {mib}")) && e.contains("64 MiB") && e.contains("2 GiB"),
            "{mib}: {e}"
        );
    }
    // Exactly the floor left is fine, and the guest gets there.
    common::resize_balloon(&mut api, 1984, Duration::from_secs(120));
    common::resize_balloon(&mut api, 0, Duration::from_secs(120));

    let (code, _, e) = run_blimp(&["balloon", "set", "--api-sock", sock, "2G"]);
    assert_eq!(code, 2, "{e}");
    assert!(
        e.contains("floor") && e.contains("64 MiB") && e.contains("2 GiB"),
        "{e}"
    );
    let (code, out, e) = run_blimp(&["balloon", "set", "--api-sock", sock, "1.5G"]);
    assert_eq!(code, 0, "{out} {e}");
    let (_, b) = api.get("/balloon").unwrap();
    assert_eq!(b["target_mib"], 1536, "{b}");
    set_target(&mut api, 0);
    vm.exit_with(0, Duration::from_secs(30));
}

/// `--balloon floor=SIZE` overrides the default (and `floor=0` removes it);
/// `--balloon-target` is checked against it at startup.
#[test]
fn balloon_floor_is_configurable() {
    common::require_kvm();
    let k = testguest().to_str().unwrap();
    let e = refused_run(k, &["--memory", "256M", "--balloon-target", "256M"]);
    assert!(
        e.contains("--balloon-target 256M")
            && e.contains("floor of 64 MiB")
            && e.contains("256 MiB"),
        "{e}"
    );
    let e = refused_run(
        k,
        &[
            "--memory",
            "256M",
            "--balloon",
            "floor=100M",
            "--balloon-target",
            "157M",
        ],
    );
    assert!(e.contains("floor of 100 MiB"), "{e}");

    let (mut vm, api, _) = boot_with_api(
        "sizes-floor-1g",
        "echo ready",
        &[
            "--memory",
            "2G",
            "--balloon",
            "floor=1G",
            "--balloon-target",
            "1G",
        ],
    );
    let (_, b) = api.get("/balloon").unwrap();
    assert_eq!(b["target_mib"], 1024, "{b}");
    let (s, b) = api
        .patch("/balloon", &json!({ "target_mib": 1025 }))
        .unwrap();
    assert_eq!(s, 400, "{b}");
    assert!(err(&b).contains("floor of 1 GiB"), "{b}");
    vm.exit_with(0, Duration::from_secs(30));

    let (mut vm, mut api, _) = boot_with_api(
        "sizes-floor-0",
        "echo ready",
        &["--memory", "256M", "--balloon", "floor=0"],
    );
    set_target(&mut api, 256);
    set_target(&mut api, 0);
    vm.exit_with(0, Duration::from_secs(30));
}

/// README's bare switches: `--balloon deflate_on_oom,free_page_hint` turns
/// both on, as `=on` does; `=off` still turns one off.
#[test]
fn bare_balloon_switches_mean_on() {
    common::require_kvm();
    let (mut vm, api, _) = boot_with_api(
        "sizes-bare",
        "echo ready",
        &[
            "--memory",
            "256M",
            "--balloon",
            "deflate_on_oom,free_page_hint,free_page_reporting,must_tell_host=off",
        ],
    );
    let (s, b) = api.get("/balloon").unwrap();
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["deflate_on_oom"], true, "{b}");
    assert_eq!(b["free_page_hint"], true, "{b}");
    assert_eq!(b["free_page_reporting"], true, "{b}");
    assert_eq!(b["must_tell_host"], false, "{b}");
    assert_eq!(b["page_poison"], false, "{b}");
    vm.exit_with(0, Duration::from_secs(30));
}
