//! The test guest's host unit tests (its pure logic: command parsing, the
//! virtqueue driver, the frame allocator, the fill pattern...), run with
//! the rest of the suite so that CI covers them.

mod common;

use std::process::Command;

#[test]
fn testguest_unit_tests_pass() {
    let out = Command::new(common::repo_root().join("resources/build.sh"))
        .arg("testguest-unit")
        .output()
        .expect("running resources/build.sh testguest-unit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("test result:"))
        .collect();
    eprintln!("testguest unit tests: {summary:?}");
    assert!(
        out.status.success(),
        "the test guest's unit tests failed ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    let passed: u64 = summary
        .iter()
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .sum();
    assert!(passed > 0, "no test guest unit test ran:\n{stdout}");
}
