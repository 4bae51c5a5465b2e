//! The migration state blob (`VmState::from_bytes`: vCPUs, KVM VM state,
//! device state) fed arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::migration::state::VmState;

fuzz_target!(|data: &[u8]| {
    let Ok(st) = VmState::from_bytes(data) else {
        return;
    };
    // Whatever parsed serialises and parses back to the same bytes.
    let bytes = st.to_bytes().expect("a parsed state serialises");
    let again = VmState::from_bytes(&bytes).expect("a serialised state parses");
    assert_eq!(again.to_bytes().unwrap(), bytes);
});
