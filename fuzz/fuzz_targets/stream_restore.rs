//! The migration stream reader and restore validation fed arbitrary bytes:
//! `StreamReader::restore` over a real (small) GuestMemoryMmap, then
//! `VmState::from_bytes` and its destination checks on the blob. No KVM.
//! Inputs: raw bytes, a valid header then raw records, or records made by
//! the writer from fuzzer-chosen values (first byte selects).
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

/// A stream from ops of 6 bytes: [kind, round, gpa page: 3 bytes, count].
/// Kinds: zero pages, data pages (filled with `count`), state (the next
/// `count * 8` input bytes), finish. Whatever the writer refuses ends the
/// stream there (a truncated stream is a case too).
fn generated(f: &Fixture, ops: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = StreamWriter::new(&mut out);
    if w.header(&layout_ranges(&f.layout), 0).is_err() {
        return Vec::new();
    }
    let mut rest = ops;
    while let Some((op, tail)) = rest.split_first_chunk::<6>() {
        rest = tail;
        let round = u32::from(op[1]);
        let gpa = u64::from(u32::from_le_bytes([op[2], op[3], op[4], 0])) * 4096;
        let count = op[5];
        let ok = match op[0] % 4 {
            0 => w.zero_pages(round, gpa, u64::from(count)),
            1 => w.data_pages(round, gpa, &vec![count; usize::from(count % 4) * 4096]),
            2 => {
                let n = (usize::from(count) * 8).min(rest.len());
                let (blob, tail) = rest.split_at(n);
                rest = tail;
                w.state(blob)
            }
            _ => {
                let _ = w.finish();
                return out;
            }
        };
        if ok.is_err() {
            break;
        }
    }
    let _ = w.flush();
    drop(w);
    out
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let input: Vec<u8> = if mode & 3 == 2 {
        // Generated: records written by the real writer (valid CRCs and
        // framing) with fuzzer-chosen rounds, addresses, counts and state,
        // so the reader's checks past the CRCs are reached.
        generated(f, rest)
    } else if mode & 1 == 1 {
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
