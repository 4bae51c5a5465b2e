//! The migration stream reader and restore validation fed arbitrary bytes:
//! `StreamReader::restore` over a real (small) GuestMemoryMmap, then
//! `VmState::from_bytes` and its destination checks on the blob. No KVM.
#![no_main]

use std::sync::OnceLock;

use arch::layout::MemoryLayout;
use devices::GuestMemory;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm::migration::state::{VmState, max_state_bytes};
use vmm::migration::stream::{Destination, StreamReader, StreamWriter, layout_ranges};

struct Fixture {
    layout: MemoryLayout,
    mem: GuestMemory,
    header: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let layout = MemoryLayout::new(arch::layout::MIN_MEMORY).unwrap();
        let ranges: Vec<_> = layout
            .regions()
            .iter()
            .map(|r| (GuestAddress(r.start), r.size as usize))
            .collect();
        let mem = GuestMemory::from_ranges(&ranges).unwrap();
        // A valid header for this layout, so the fuzzer starts at the records.
        // (finish() needs a state section, so the writer borrows the buffer.)
        let mut header = Vec::new();
        let mut w = StreamWriter::new(&mut header);
        w.header(&layout_ranges(&layout), 0).unwrap();
        w.flush().unwrap();
        drop(w);
        Fixture {
            layout,
            mem,
            header,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let input: Vec<u8> = if mode & 1 == 1 {
        // Structure-aware: a valid header, then the fuzzer's records.
        let mut v = f.header.clone();
        v.truncate(v.len().saturating_sub(usize::from(mode >> 1) % 64));
        v.extend_from_slice(rest);
        v
    } else {
        rest.to_vec()
    };
    let mut r = StreamReader::new(&input[..]);
    let Ok(restored) = r.restore(&f.mem, &f.layout, Destination::Unknown) else {
        return;
    };
    // Bounded by what the layout allows, and never past the input.
    assert!(restored.state.len() as u64 <= u64::from(max_state_bytes(&f.layout)));
    assert!(r.offset() <= input.len() as u64);
    if let Ok(st) = VmState::from_bytes(&restored.state) {
        let _ = st.check_destination(&f.layout, 1);
    }
});
