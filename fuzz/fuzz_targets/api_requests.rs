//! API request bodies: every PATCH/PUT body type fed arbitrary JSON, with
//! the server's own validation; migration destination URLs.
//!
//! Invariants: a body that validates re-serialises to one that parses and
//! validates again to the same value.
#![no_main]

use api::types::{
    BalloonPatch, BalloonPut, HintingStartCmd, MigrationDestination, MigrationRequest,
    SnapshotRequest, StatsPatch, Validate, VmStatePatch,
};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn check<T: DeserializeOwned + Serialize + Validate>(body: &[u8]) {
    let Ok(v) = serde_json::from_slice::<T>(body) else {
        return;
    };
    if v.validate().is_err() {
        return;
    }
    let again = serde_json::to_vec(&v).expect("serialises");
    let v2: T = serde_json::from_slice(&again).expect("own output parses");
    v2.validate().expect("own output validates");
    assert_eq!(serde_json::to_vec(&v2).unwrap(), again);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => check::<VmStatePatch>(body),
        1 => check::<BalloonPatch>(body),
        6 => check::<BalloonPut>(body),
        7 => check::<HintingStartCmd>(body),
        2 => check::<StatsPatch>(body),
        3 => check::<MigrationRequest>(body),
        4 => check::<SnapshotRequest>(body),
        _ => {
            if let Ok(s) = std::str::from_utf8(body)
                && let Ok(d) = MigrationDestination::parse(s)
            {
                let _ = format!("{d:?}");
            }
        }
    }
});
