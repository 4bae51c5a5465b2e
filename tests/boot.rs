//! Boot the test guest through `blimp run` and check what it prints and how
//! the VMM ends.

mod common;

use std::time::Duration;

use common::Vm;

const BOOT: Duration = Duration::from_secs(30);

#[test]
fn fill_verify_and_exit_status_512m() {
    let mut vm = common::run_program("fill 256 7;verify;exit 0", &["--memory", "512M"]);
    vm.expect_line("fill done 256 MiB", BOOT);
    vm.expect_line("verify ok 65536 pages", BOOT);
    assert_eq!(vm.wait(BOOT).code(), Some(0));
}

#[test]
fn debug_exit_status_is_passed_through() {
    let mut vm = common::run_program("echo about to exit;exit 3", &["--memory", "512M"]);
    vm.expect_line("about to exit", BOOT);
    assert_eq!(vm.wait(BOOT).code(), Some(3));
}

#[test]
fn guest_over_4_gib_uses_memory_above_the_hole() {
    // 4 GiB is 3 GiB below the MMIO hole and 1 GiB above it: filling
    // 3584 MiB must use at least ~500 MiB above 4 GiB whatever order the
    // guest allocates in. (It was 7168 MiB of an 8 GiB guest: 1.8 million
    // first touches, which took over 180 s on a loaded 2-core PVM host.)
    let mut vm = common::run_program("meminfo;fill 3584 1;verify;exit 0", &["--memory", "4G"]);
    let meminfo = vm.expect_line("meminfo", BOOT);
    assert!(meminfo.contains("regions 3"), "{meminfo}");
    vm.expect_line("fill done 3584 MiB", Duration::from_secs(180));
    vm.expect_line("verify ok 917504 pages", Duration::from_secs(180));
    assert_eq!(vm.wait(BOOT).code(), Some(0));
}

#[test]
fn serial_console_takes_commands_from_stdin() {
    let mut vm = Vm::start(&["--memory", "256M", "--debug-exit"]);
    vm.expect_line("ready", BOOT);
    vm.send("echo hello over serial");
    vm.expect_line("hello over serial", BOOT);
    vm.exit_with(5, BOOT);
}

/// A script of over 4 KiB written at once (a paste, `blimp run < file`)
/// arrives whole, with no more input after it to wake the VMM.
#[test]
fn a_long_script_on_stdin_arrives_whole() {
    let mut vm = Vm::start(&["--memory", "256M", "--debug-exit"]);
    vm.expect_line("ready", BOOT);
    let script: String = (1..=120)
        .map(|i| format!("echo line {i:03} {}\n", "x".repeat(50)))
        .collect();
    assert!(script.len() > 7000);
    // One write: nothing comes after it.
    vm.send_raw(script.as_bytes());
    vm.expect_line(&format!("line 120 {}", "x".repeat(50)), BOOT);
    vm.exit_with(5, BOOT);
}

/// Console input far faster than the guest reads it (20 MiB piped in a
/// few writes, while the guest sleeps) is dropped with a rate-limited
/// warning, not one per 16 KiB read (1965 lines for 20 MB before).
#[test]
fn a_console_flood_is_dropped_with_few_warnings() {
    let mut vm = Vm::start(&["--memory", "256M", "--debug-exit"]);
    vm.expect_line("ready", BOOT);
    vm.send("sleep 5");
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..20 {
        vm.send_raw(&chunk);
    }
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait(BOOT).code(), Some(128 + libc::SIGTERM));
    let warnings = vm
        .log_lines()
        .iter()
        .filter(|l| l.contains("serial input backlog full"))
        .count();
    assert!(
        (1..=20).contains(&warnings),
        "{warnings} backlog warnings for 20 MiB of input"
    );
    // Each says how much was dropped so far in all.
    let last = vm
        .log_lines()
        .into_iter()
        .rfind(|l| l.contains("serial input backlog full"))
        .unwrap();
    assert!(last.contains("since start)"), "{last}");
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let mut vm = Vm::start(&[
        "--memory",
        "256M",
        "--no-stdin",
        "--cmdline",
        "testguest.run=\"echo sleeping;sleep 60\"",
    ]);
    vm.expect_line("sleeping", BOOT);
    let threads_dir = format!("/proc/{}/task", vm.pid());
    assert!(
        std::fs::read_dir(&threads_dir).unwrap().count() >= 2,
        "a vCPU thread runs"
    );
    vm.signal(libc::SIGTERM);
    let status = vm.wait(Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "exit status 128+SIGTERM"
    );
}

#[test]
fn sleeping_guest_does_not_spin_a_host_cpu() {
    let mut vm = Vm::start(&[
        "--memory",
        "256M",
        "--no-stdin",
        "--cmdline",
        "testguest.run=\"echo sleeping;sleep 30\"",
    ]);
    vm.expect_line("sleeping", BOOT);
    let cpu = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = cpu(vm.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu(vm.pid()) - before;
    // clock ticks are 1/100 s: an idle guest uses well under half a CPU.
    assert!(used < 100, "an idle (hlt) guest used {used} ticks in 2 s");
}
