//! Per-batch cost of the balloon's inflate path: parse, validate and merge
//! 256 PFNs (one Linux inflate buffer), with a no-op `RamDiscard`, so the
//! figures exclude the madvise/fallocate syscall.
//!
//! `cargo bench -p devices --bench inflate_batch` prints mean and best
//! per-batch times for:
//! * `PfnBatch::process` alone (parse + sort + dedupe + validate + merge);
//! * the whole device path (`Balloon::process_queue`: pop the chain from a
//!   real split virtqueue, check it, read the PFNs from guest memory,
//!   process, update the bitmap, call discard per run, add_used).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::balloon::pfn_runs::{PfnBatch, RamLayout};
use devices::virtio::balloon::{Balloon, BalloonConfig, VIRTIO_BALLOON_F_MUST_TELL_HOST};
use devices::virtio::{Interrupt, VIRTIO_F_VERSION_1, VirtioDevice};
use devices::{DiscardError, DiscardOutcome, GpaRange, GuestMemory, PAGE_SIZE, RamDiscard};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const GIB: u64 = 1 << 30;
const QSIZE: u16 = 256;
const QBASE: u64 = 0x10_0000;
const BUFS: u64 = 0x20_0000;

struct NoopDiscard;
impl RamDiscard for NoopDiscard {
    fn discard(&self, range: GpaRange) -> Result<DiscardOutcome, DiscardError> {
        black_box(range);
        Ok(DiscardOutcome::default())
    }
}

struct NoopIrq;
impl Interrupt for NoopIrq {
    fn trigger(&self, _: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn status(&self) -> u32 {
        0
    }
    fn ack(&self, _: u32) {}
}

/// A small xorshift so the "scattered" case needs no extra crate.
fn scattered(n: usize, max: u32, seed: &mut u64) -> Vec<u32> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed % u64::from(max)) as u32
        })
        .collect()
}

fn bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

fn report(name: &str, samples: &mut [Duration], per_sample: u32) {
    samples.sort();
    let total: Duration = samples.iter().sum();
    let mean = total / (samples.len() as u32 * per_sample);
    let best = samples[0] / per_sample;
    let median = samples[samples.len() / 2] / per_sample;
    println!(
        "{name:<48} mean {:>8.2} us  median {:>8.2} us  best {:>8.2} us  per 256-PFN batch",
        mean.as_secs_f64() * 1e6,
        median.as_secs_f64() * 1e6,
        best.as_secs_f64() * 1e6
    );
}

fn bench_process(name: &str, layout: &RamLayout, raw: &[u8]) {
    let mut batch = PfnBatch::new();
    let per = 1000u32;
    let mut samples = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        for _ in 0..per {
            black_box(batch.process(black_box(raw), layout));
        }
        samples.push(t.elapsed());
    }
    report(name, &mut samples, per);
}

/// Driver side: fill the whole queue with one 1 KiB PFN buffer per chain.
fn fill_queue(mem: &GuestMemory, payloads: &[Vec<u8>]) -> (u64, u64, u64) {
    let desc = QBASE;
    let avail = desc + 16 * u64::from(QSIZE);
    let used = (avail + 6 + 2 * u64::from(QSIZE) + 3) & !3;
    for i in 0..QSIZE {
        let buf = BUFS + u64::from(i) * 0x1000;
        let p = &payloads[usize::from(i) % payloads.len()];
        mem.write_slice(p, GuestAddress(buf)).unwrap();
        let d = GuestAddress(desc + 16 * u64::from(i));
        mem.write_obj(buf, d).unwrap();
        mem.write_obj(p.len() as u32, GuestAddress(d.0 + 8))
            .unwrap();
        mem.write_obj(0u16, GuestAddress(d.0 + 12)).unwrap();
        mem.write_obj(0u16, GuestAddress(d.0 + 14)).unwrap();
        mem.write_obj(i, GuestAddress(avail + 4 + 2 * u64::from(i)))
            .unwrap();
    }
    mem.write_obj(0u16, GuestAddress(avail)).unwrap();
    (desc, avail, used)
}

fn bench_device(name: &str, mem: &GuestMemory, ram: &[GpaRange], payloads: &[Vec<u8>]) {
    let (desc, avail, used) = fill_queue(mem, payloads);
    let mut b = Balloon::new(
        BalloonConfig::default(),
        ram.to_vec(),
        Arc::new(NoopDiscard),
    )
    .unwrap();
    let feats = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_BALLOON_F_MUST_TELL_HOST);
    let mut samples = Vec::new();
    for _ in 0..200 {
        // Fresh queues (the driver's avail index restarts at 0).
        b.reset();
        b.set_acked_features(feats);
        mem.write_obj(0u16, GuestAddress(used + 2)).unwrap();
        let queues = (0..2)
            .map(|_| {
                let mut q = Queue::new(QSIZE).unwrap();
                q.set_desc_table_address(Some(desc as u32), Some(0));
                q.set_avail_ring_address(Some(avail as u32), Some(0));
                q.set_used_ring_address(Some(used as u32), Some(0));
                q.set_ready(true);
                q
            })
            .collect();
        let evts = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        b.activate(mem.clone(), Arc::new(NoopIrq), queues, evts)
            .unwrap();
        // Publish all 256 chains at once, then time serving them.
        mem.write_obj(QSIZE, GuestAddress(avail + 2)).unwrap();
        let t = Instant::now();
        b.process_queue(0);
        samples.push(t.elapsed());
        let served: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
        assert_eq!(served, QSIZE);
    }
    report(name, &mut samples, u32::from(QSIZE));
}

fn main() {
    // A 6 GiB guest with the 3–4 GiB MMIO hole.
    let ram = vec![GpaRange::new(0, 3 * GIB), GpaRange::new(4 * GIB, 3 * GIB)];
    let layout = RamLayout::new(&ram).unwrap();
    let max_pfn = (7 * GIB / PAGE_SIZE) as u32;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;

    let contiguous = bytes(&(0x1_0000..0x1_0100).collect::<Vec<u32>>());
    // Linux with 4 KiB pages sends PFNs in allocation order, mostly descending.
    let descending = bytes(&(0x1_0000..0x1_0100).rev().collect::<Vec<u32>>());
    let random = bytes(&scattered(256, max_pfn, &mut seed));

    println!("balloon inflate path, 256 PFNs per batch, no-op discard");
    bench_process("PfnBatch::process, contiguous", &layout, &contiguous);
    bench_process("PfnBatch::process, descending", &layout, &descending);
    bench_process("PfnBatch::process, random (incl. hole)", &layout, &random);

    let mem = GuestMemory::from_ranges(&[
        (GuestAddress(0), (3 * GIB) as usize),
        (GuestAddress(4 * GIB), (3 * GIB) as usize),
    ])
    .unwrap();
    bench_device(
        "Balloon::process_queue, contiguous",
        &mem,
        &ram,
        std::slice::from_ref(&contiguous),
    );
    let randoms: Vec<Vec<u8>> = (0..16)
        .map(|_| bytes(&scattered(256, max_pfn, &mut seed)))
        .collect();
    bench_device(
        "Balloon::process_queue, random (incl. hole)",
        &mem,
        &ram,
        &randoms,
    );
}
