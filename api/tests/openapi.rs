//! openapi.yaml describes exactly the routes the server serves, its `$ref`s
//! resolve, and its schemas have exactly the fields of the Rust types.

use std::collections::BTreeSet;

use api::routes::ROUTES;
use api::types::*;
use serde_json::{Value, json};
use serde_yaml_ng::Value as Y;

fn spec() -> Y {
    serde_yaml_ng::from_str(api::OPENAPI_YAML).expect("openapi.yaml parses")
}

#[test]
fn routes_match_openapi_both_ways() {
    let spec = spec();
    assert_eq!(
        spec["openapi"].as_str().map(|s| s.starts_with("3.0")),
        Some(true)
    );
    let mut documented = BTreeSet::new();
    let paths = spec["paths"].as_mapping().expect("paths");
    for (path, ops) in paths {
        let path = path.as_str().unwrap().to_string();
        for (method, op) in ops.as_mapping().unwrap() {
            let method = method.as_str().unwrap().to_ascii_uppercase();
            if ["GET", "PUT", "PATCH", "POST", "DELETE", "HEAD", "OPTIONS"]
                .contains(&method.as_str())
            {
                assert!(
                    op["responses"].is_mapping(),
                    "{method} {path} has no responses"
                );
                documented.insert((method, path.clone()));
            }
        }
    }
    let served: BTreeSet<_> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in openapi.yaml: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "in openapi.yaml but not served: {unserved:?}"
    );
}

/// The statuses the server gives beyond a route's own are listed, not
/// left to `default`: a migrated VM answers every request but GETs and
/// `PUT /vm/shutdown` with 409; a VM without a balloon answers the
/// balloon's GETs with 400; the 17th event reader gets 503.
#[test]
fn responses_the_server_gives_are_listed() {
    let spec = spec();
    let listed = |method: &str, path: &str, status: &str| {
        spec["paths"][path][method.to_ascii_lowercase().as_str()]["responses"]
            .as_mapping()
            .is_some_and(|m| m.contains_key(Y::from(status)))
    };
    let mut missing = Vec::new();
    for r in ROUTES {
        let (m, p) = (r.method, r.path);
        let mut want = Vec::new();
        if m != "GET" && (m, p) != ("PUT", "/vm/shutdown") {
            want.push("409");
        }
        if m == "GET" && p.starts_with("/balloon") {
            want.push("400");
        }
        if (m, p) == ("GET", "/events") {
            want.push("503");
        }
        for status in want {
            if !listed(m, p, status) {
                missing.push(format!("{m} {p} {status}"));
            }
        }
    }
    assert!(missing.is_empty(), "not in openapi.yaml: {missing:?}");
}

fn collect_refs(v: &Y, out: &mut Vec<String>) {
    match v {
        Y::Mapping(m) => {
            for (k, v) in m {
                if k.as_str() == Some("$ref") {
                    out.push(v.as_str().unwrap().to_string());
                } else {
                    collect_refs(v, out);
                }
            }
        }
        Y::Sequence(s) => s.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[test]
fn refs_resolve() {
    let spec = spec();
    let mut refs = Vec::new();
    collect_refs(&spec, &mut refs);
    assert!(refs.len() > 20);
    for r in refs {
        let mut node = &spec;
        let path = r
            .strip_prefix("#/")
            .unwrap_or_else(|| panic!("external ref {r}"));
        for part in path.split('/') {
            node = &node[part];
        }
        assert!(node.is_mapping(), "dangling $ref {r}");
    }
}

/// Every key of every mapping in `v` whose value is null, with its path.
fn null_values(v: &Y, path: &str, out: &mut Vec<String>) {
    match v {
        Y::Mapping(m) => {
            for (k, v) in m {
                let key = k.as_str().map_or_else(|| format!("{k:?}"), str::to_string);
                let here = format!("{path}/{key}");
                if v.is_null() {
                    out.push(here);
                } else {
                    null_values(v, &here, out);
                }
            }
        }
        Y::Sequence(s) => {
            for (i, v) in s.iter().enumerate() {
                null_values(v, &format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Every mapping in `v` with a `nullable` key, and its path.
fn nullables<'a>(v: &'a Y, path: &str, out: &mut Vec<(String, &'a Y)>) {
    match v {
        Y::Mapping(m) => {
            if m.contains_key("nullable") {
                out.push((path.to_string(), v));
            }
            for (k, v) in m {
                let key = k.as_str().unwrap_or("?");
                nullables(v, &format!("{path}/{key}"), out);
            }
        }
        Y::Sequence(s) => {
            for (i, v) in s.iter().enumerate() {
                nullables(v, &format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Plain YAML traps that still parse: a comma or colon inside a flow
/// mapping's unquoted text makes a key with a null value (a cut-off
/// description and a stray keyword), and OpenAPI 3.0's `nullable` does
/// nothing without a `type` beside it (a `$ref` or `allOf` alone stays
/// non-nullable).
#[test]
fn no_null_values_and_no_nullable_without_type() {
    let spec = spec();
    let mut nulls = Vec::new();
    null_values(&spec, "", &mut nulls);
    assert!(
        nulls.is_empty(),
        "keys with no value (quote the text): {nulls:?}"
    );
    let mut found = Vec::new();
    nullables(&spec, "", &mut found);
    assert!(found.len() > 3);
    let untyped: Vec<_> = found
        .iter()
        .filter(|(_, s)| s["type"].as_str().is_none())
        .map(|(p, _)| p)
        .collect();
    assert!(untyped.is_empty(), "nullable without type: {untyped:?}");
}

/// Property names of a schema, and its required list.
fn schema_fields(spec: &Y, name: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let s = &spec["components"]["schemas"][name];
    let props = s["properties"]
        .as_mapping()
        .unwrap_or_else(|| panic!("schema {name} has no properties"))
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let required = s["required"]
        .as_sequence()
        .map(|r| r.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    (props, required)
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

/// `full` has every optional field set, `minimal` none of them.
fn check<T: serde::Serialize>(spec: &Y, name: &str, full: &T, minimal: &T) {
    let (props, required) = schema_fields(spec, name);
    let full = serde_json::to_value(full).unwrap();
    let minimal = serde_json::to_value(minimal).unwrap();
    assert_eq!(
        keys(&full),
        props,
        "schema {name}: properties differ from the Rust type"
    );
    assert_eq!(
        keys(&minimal),
        required,
        "schema {name}: required differs from the Rust type"
    );
}

#[test]
fn schemas_match_types() {
    let spec = spec();
    let vm = VmInfo {
        state: VmState::Running,
        memory_mib: 1,
        vcpus: 1,
        uptime_s: 1,
        balloon: true,
    };
    check(&spec, "VmInfo", &vm, &vm);
    let p = VmStatePatch {
        state: VmState::Paused,
    };
    check(&spec, "VmStatePatch", &p, &p);
    let b = BalloonInfo::default();
    check(&spec, "BalloonInfo", &b, &b);
    // Blimp's target_mib and Firecracker's amount_mib, one of them.
    let (props, required) = schema_fields(&spec, "BalloonPatch");
    assert_eq!(props, ["amount_mib", "target_mib"].map(String::from).into());
    assert!(required.is_empty());
    for field in props {
        let p: BalloonPatch = serde_json::from_value(json!({ field: 1 })).unwrap();
        assert_eq!(p.target_mib, 1);
    }
    let full = BalloonStats {
        guest: Some(GuestStats {
            values: [Some(1); _],
            updated: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1),
        }),
        ..Default::default()
    };
    // Counters are always sent but may be absent (serde default) for old VMMs.
    let (props, _) = schema_fields(&spec, "BalloonStats");
    assert_eq!(keys(&serde_json::to_value(&full).unwrap()), props);
    let p = StatsPatch {
        stats_polling_interval_s: 1,
    };
    check(&spec, "StatsPatch", &p, &p);
    let h = HintingStarted { cmd_id: 1 };
    check(&spec, "HintingStarted", &h, &h);
    let hs = HintingStatus {
        host_cmd_id: 1,
        guest_cmd_id: Some(1),
        state: HintingState::Running,
        hinted_pages: 1,
    };
    let hs_min = HintingStatus {
        guest_cmd_id: None,
        ..hs.clone()
    };
    check(&spec, "HintingStatus", &hs, &hs_min);
    check(
        &spec,
        "HintingStatusReply",
        &HintingStatusReply::from(hs.clone()),
        &HintingStatusReply::from(hs_min.clone()),
    );
    let settings = api::policy::PolicySettings::default();
    check(&spec, "PolicySettings", &settings, &settings);
    let d = sample_decision();
    check(&spec, "PolicyDecision", &d, &d);
    let st = api::policy::PolicyStatus {
        enabled: true,
        paused: false,
        paused_reason: None,
        config: settings,
        last_decision: Some(d),
        decisions: 1,
        target_changes: 1,
    };
    check(&spec, "PolicyStatus", &st, &st);
    let put = BalloonPut {
        amount_mib: 1,
        deflate_on_oom: true,
        stats_polling_interval_s: 1,
        free_page_hinting: true,
        free_page_reporting: true,
    };
    let (props, required) = schema_fields(&spec, "BalloonPut");
    assert_eq!(keys(&serde_json::to_value(put).unwrap()), props);
    assert_eq!(
        required,
        ["amount_mib", "deflate_on_oom"].map(String::from).into()
    );
    let minimal: BalloonPut =
        serde_json::from_value(json!({"amount_mib": 0, "deflate_on_oom": false})).unwrap();
    assert_eq!(minimal.stats_polling_interval_s, 0);
    let (props, required) = schema_fields(&spec, "HintingStartCmd");
    assert_eq!(
        keys(&serde_json::to_value(HintingStartCmd::default()).unwrap()),
        props
    );
    assert!(required.is_empty(), "the body may be empty");
    let m = MigrationRequest {
        downtime_ms: 1,
        max_rounds: Some(1),
        ..MigrationRequest::new(MigrationDestination::parse("file:///x").unwrap())
    };
    let (props, required) = schema_fields(&spec, "MigrationRequest");
    assert_eq!(keys(&serde_json::to_value(&m).unwrap()), props);
    assert_eq!(required, BTreeSet::from(["destination".to_string()]));
    let ms = MigrationStatus {
        destination: Some("x".into()),
        downtime_ms: Some(1),
        error: Some("x".into()),
        ..MigrationStatus::idle()
    };
    check(&spec, "MigrationStatus", &ms, &MigrationStatus::idle());
    let st = MigrationStarted {
        destination: "x".into(),
    };
    check(&spec, "MigrationStarted", &st, &st);
    let sn = SnapshotRequest { path: "/x".into() };
    check(&spec, "SnapshotRequest", &sn, &sn);
    let e = ErrorBody { error: "x".into() };
    let (_, required) = schema_fields(&spec, "Error");
    assert_eq!(keys(&serde_json::to_value(&e).unwrap()), required);
}

#[test]
fn enums_match_types() {
    let spec = spec();
    let values = |name: &str| -> Vec<String> {
        spec["components"]["schemas"][name]["enum"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let ser = |v: Value| v.as_str().unwrap().to_string();
    assert_eq!(
        values("VmState"),
        [VmState::Running, VmState::Paused, VmState::Migrated]
            .map(|s| ser(serde_json::to_value(s).unwrap()))
    );
    assert_eq!(
        values("HintingState"),
        [
            HintingState::Idle,
            HintingState::Requested,
            HintingState::Running,
            HintingState::Stopped,
            HintingState::Done
        ]
        .map(|s| ser(serde_json::to_value(s).unwrap()))
    );
    assert_eq!(
        values("MigrationState"),
        [
            MigrationState::Idle,
            MigrationState::Setup,
            MigrationState::Active,
            MigrationState::Completing,
            MigrationState::Switchover,
            MigrationState::Completed,
            MigrationState::Failed,
            MigrationState::Cancelled
        ]
        .map(|s| ser(serde_json::to_value(s).unwrap()))
    );
    let event_types: Vec<String> =
        spec["components"]["schemas"]["EventEnvelope"]["properties"]["type"]["enum"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
    use api::ApiEvent as E;
    let all = [
        E::VmStateChanged {
            state: VmState::Running,
        },
        E::BalloonChanged {
            target_mib: 0,
            actual_mib: 0,
            target_pages: 0,
            actual_pages: 0,
        },
        E::BalloonStatistics(BalloonStats::default()),
        E::HintingChanged(HintingStatus {
            host_cmd_id: 0,
            guest_cmd_id: None,
            state: HintingState::Idle,
            hinted_pages: 0,
        }),
        E::MigrationProgress(MigrationStatus::idle()),
        E::PolicyDecision(sample_decision()),
        E::BalloonSettled {
            target_mib: 1,
            actual_mib: 1,
            reached: true,
        },
        E::ShuttingDown { reason: "x".into() },
        E::Lagged { missed: 1 },
    ];
    let kinds: Vec<String> = all
        .iter()
        .map(|e| {
            let v = serde_json::to_value(e).unwrap();
            assert_eq!(v["type"], e.kind());
            e.kind().to_string()
        })
        .collect();
    assert_eq!(event_types, kinds);
}

/// A decision with every optional field empty, for the schema checks.
fn sample_decision() -> api::policy::PolicyDecision {
    api::policy::PolicyDecision {
        action: "hold".into(),
        reason: "within_band".into(),
        detail: "x".into(),
        old_target_mib: 1,
        new_target_mib: 1,
        available_mib: None,
        headroom_mib: 1,
        host_psi: None,
        host_pressure: false,
        guest_ram_mib: 1,
        host_available_mib: None,
    }
}

/// `PolicyRequest` lists exactly the keys `PATCH /balloon/policy` takes:
/// both spellings of every policy key, and `enabled`.
#[test]
fn policy_request_lists_every_key_in_both_spellings() {
    let spec = spec();
    let (props, required) = schema_fields(&spec, "PolicyRequest");
    assert!(required.is_empty());
    let mut want: BTreeSet<String> = BTreeSet::from(["enabled".to_string()]);
    for k in api::policy::KEYS {
        want.insert(k.name.to_string());
        want.insert(k.json.to_string());
    }
    assert_eq!(props, want);
    let schema = &spec["components"]["schemas"]["PolicyRequest"];
    assert_eq!(schema["additionalProperties"].as_bool(), Some(false));
}
