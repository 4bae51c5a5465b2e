//! Throughput of the migration stream: writing 1 GiB of guest RAM (half its
//! pages zero, in alternating 64 KiB stretches) to /dev/null and to memory,
//! reading it back into a fresh guest, and the zero-page check alone.
//!
//! `cargo bench -p vmm --bench migration_stream`

use std::time::{Duration, Instant};

use arch::MemoryLayout;
use devices::{GuestMemory, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};
use vmm::migration::AtomicPageBitmap;
use vmm::migration::stream::{Destination, StreamReader, StreamWriter, layout_ranges};
use vmm::migration::zero::is_zero_page;

const SIZE: u64 = 1 << 30;
const GIB: f64 = (1u64 << 30) as f64;

fn guest(layout: &MemoryLayout) -> GuestMemory {
    let ranges: Vec<_> = layout
        .regions()
        .iter()
        .map(|r| (GuestAddress(r.start), r.size as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).expect("map guest memory")
}

fn rate(bytes: u64, d: Duration) -> String {
    format!("{:.2} GiB/s", bytes as f64 / GIB / d.as_secs_f64())
}

fn write_stream<W: std::io::Write>(
    mem: &GuestMemory,
    layout: &MemoryLayout,
    out: W,
) -> (W, u64, Duration) {
    let start = Instant::now();
    let bm = AtomicPageBitmap::new(layout);
    bm.set_all();
    let mut w = StreamWriter::new(out);
    w.header(&layout_ranges(layout), 0).expect("header");
    w.send_bitmap(mem, 1, &bm).expect("send");
    w.state(b"{}").expect("state");
    let (out, stats) = w.finish().expect("finish");
    (out, stats.stream_bytes, start.elapsed())
}

fn main() {
    let layout = MemoryLayout::new(SIZE).expect("layout");
    let src = guest(&layout);
    let chunk = vec![0x5au8; 64 << 10];
    let mut gpa = 0;
    while gpa < SIZE {
        src.write_slice(&chunk, GuestAddress(gpa)).expect("fill");
        gpa += 128 << 10;
    }
    println!("guest: 1 GiB, half the pages non-zero (64 KiB of data, 64 KiB of zeros, ...)");

    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let (null, bytes, d) = write_stream(&src, &layout, null);
    println!(
        "write to /dev/null: {:?}: {} of guest RAM, stream {} MiB (first pass: read faults on never-touched zero pages)",
        d,
        rate(SIZE, d),
        bytes >> 20
    );
    let (_, _, d) = write_stream(&src, &layout, null);
    println!(
        "write to /dev/null: {:?}: {} of guest RAM (again)",
        d,
        rate(SIZE, d)
    );

    let (stream, bytes, d) = write_stream(&src, &layout, Vec::with_capacity(600 << 20));
    println!(
        "write to memory:    {:?}: {} of guest RAM ({} MiB stream)",
        d,
        rate(SIZE, d),
        bytes >> 20
    );

    let dst = guest(&layout);
    for dest in [Destination::Fresh, Destination::Unknown] {
        let start = Instant::now();
        let r = StreamReader::new(&stream[..])
            .restore(&dst, &layout, dest)
            .expect("restore");
        let d = start.elapsed();
        assert_eq!(r.state, b"{}");
        println!(
            "read from memory ({dest:?} destination{}): {:?}: {} of guest RAM, {} of stream",
            if dest == Destination::Fresh {
                ", faulting in 512 MiB"
            } else {
                ", already populated"
            },
            d,
            rate(SIZE, d),
            rate(stream.len() as u64, d)
        );
        let mut a = vec![0u8; 1 << 20];
        let mut b = vec![0u8; 1 << 20];
        for at in [0, 64 << 10, 512 << 20] {
            src.read_slice(&mut a, GuestAddress(at)).expect("read");
            dst.read_slice(&mut b, GuestAddress(at)).expect("read");
            assert!(a == b, "restored memory differs at {at:#x}");
        }
    }

    // Every page scanned to its end: zero pages, and pages whose last byte is set.
    let mut pages = vec![1u8; 256 << 20];
    pages.fill(0);
    for p in pages.chunks_exact_mut(PAGE_SIZE as usize).step_by(2) {
        p[PAGE_SIZE as usize - 1] = 1;
    }
    for _ in 0..2 {
        let start = Instant::now();
        let zero = pages
            .chunks_exact(PAGE_SIZE as usize)
            .filter(|p| is_zero_page(std::hint::black_box(p)))
            .count();
        let d = start.elapsed();
        assert_eq!(zero as u64, (128 << 20) / PAGE_SIZE);
        println!("is_zero_page (full scans): {}", rate(256 << 20, d));
    }
    let start = Instant::now();
    let crc = crc32c::crc32c(std::hint::black_box(&pages));
    println!("crc32c: {} ({crc:#x})", rate(256 << 20, start.elapsed()));
}
