//! Firecracker's balloon requests against a fake VMM: what each becomes at
//! the VMM, and Firecracker's `fault_message` on `/balloon` errors only.
//! (`tests/firecracker_api.rs` replays them against a real guest.)

mod common;

use api::ApiRequest;
use api::client::Method;
use api::types::*;
use common::FakeVmm;
use serde_json::{Value, json};

#[test]
fn firecracker_requests_reach_the_vmm_as_blimp_requests() {
    let vmm = FakeVmm::start();
    let c = vmm.client();
    let cases: Vec<(Method, &str, Value, u16, ApiRequest)> = vec![
        (
            Method::PATCH,
            "/balloon",
            json!({"amount_mib": 64}),
            204,
            ApiRequest::PatchBalloon(BalloonPatch { target_mib: 64 }),
        ),
        (
            Method::PUT,
            "/balloon",
            json!({"amount_mib": 32, "deflate_on_oom": true}),
            204,
            ApiRequest::PutBalloon(BalloonPut {
                amount_mib: 32,
                deflate_on_oom: true,
                stats_polling_interval_s: 0,
                free_page_hinting: false,
                free_page_reporting: false,
            }),
        ),
        (
            Method::PATCH,
            "/balloon/hinting/start",
            Value::Null,
            204,
            ApiRequest::FcHintingStart(HintingStartCmd {
                acknowledge_on_stop: true,
            }),
        ),
        (
            Method::PATCH,
            "/balloon/hinting/start",
            json!({"acknowledge_on_stop": false}),
            204,
            ApiRequest::FcHintingStart(HintingStartCmd {
                acknowledge_on_stop: false,
            }),
        ),
        (
            Method::PATCH,
            "/balloon/hinting/stop",
            Value::Null,
            204,
            ApiRequest::HintingDone,
        ),
        (
            Method::GET,
            "/balloon/hinting/status",
            Value::Null,
            200,
            ApiRequest::HintingStatus,
        ),
    ];
    for (method, path, body, status, want) in cases {
        let (s, v) = c.request(method.clone(), path, &body).unwrap();
        assert_eq!(s, status, "{method} {path} {body}: {v}");
        let got = vmm.state.lock().unwrap().requests.pop();
        assert_eq!(got, Some(want), "{method} {path} {body}");
    }
    let (_, st) = c.get("/balloon/hinting/status").unwrap();
    assert_eq!(st["host_cmd"], st["host_cmd_id"], "{st}");
}

#[test]
fn balloon_errors_carry_fault_message() {
    let vmm = FakeVmm::start();
    let c = vmm.client();
    for (method, path, body) in [
        (Method::PATCH, "/balloon", json!({"amount_mib": "x"})),
        (
            Method::PATCH,
            "/balloon",
            json!({"amount_mib": 1, "target_mib": 1}),
        ),
        (Method::PATCH, "/balloon", json!({"amount_mib": 1u64 << 40})),
        (Method::PUT, "/balloon", json!({"amount_mib": 1})),
        (
            Method::PUT,
            "/balloon",
            json!({"amount_mib": 1, "deflate_on_oom": false}),
        ),
        (
            Method::PATCH,
            "/balloon/hinting/start",
            json!({"acknowledge_on_stop": 1}),
        ),
        (
            Method::PATCH,
            "/balloon/statistics",
            json!({"stats_polling_interval_s": -1}),
        ),
    ] {
        let (s, v) = c.request(method.clone(), path, &body).unwrap();
        assert_eq!(s, 400, "{method} {path} {body}: {v}");
        assert!(v["error"].is_string(), "{v}");
        assert_eq!(v["fault_message"], v["error"], "{method} {path}: {v}");
    }
    // Blimp's other routes keep their documented {"error"} alone.
    let (s, v) = c.patch("/vm", &json!({"state": "Nope"})).unwrap();
    assert_eq!(s, 400);
    assert!(v.get("fault_message").is_none(), "{v}");
}
