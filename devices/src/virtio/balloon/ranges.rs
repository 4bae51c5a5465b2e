//! Chunked inflate and deflate (VIRTIO_BALLOON_F_BLIMP_SG): the checks of
//! one guest-physical range against guest RAM and the inflated-page bitmap.
//!
//! With the bit negotiated, each descriptor of an inflate or deflate buffer
//! is one range: `addr` its guest-physical start, `len` its length in
//! bytes, device-writable (the device writes nothing; used length 0).
//! A range is applied whole or refused whole: every page of an inflate
//! range must be RAM outside the balloon, every page of a deflate range
//! RAM inside it. Pure bookkeeping, like `pfn_runs`: no guest memory is
//! read, nothing is discarded here.

use super::pfn_runs::{InflatedBitmap, PfnRun, RamLayout};
use crate::{GpaRange, PAGE_SIZE};

/// Longest range one descriptor may carry: 4 GiB − 4 KiB (the largest
/// multiple of 4 KiB a descriptor's 32-bit length can hold).
pub const MAX_RANGE_BYTES: u64 = (1 << 32) - PAGE_SIZE;

/// Why a range was refused (each names the offending value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("descriptor {0} is device-readable (chunked ranges are device-writable)")]
    Readable(GpaRange),
    #[error("range {0} is empty")]
    Empty(GpaRange),
    #[error("range {0} is not 4 KiB aligned (start and length)")]
    Unaligned(GpaRange),
    #[error("range {0} is longer than {MAX_RANGE_BYTES:#x} bytes")]
    TooLong(GpaRange),
    #[error("range {0} wraps around the address space")]
    Overflow(GpaRange),
    #[error("range {0} is not inside one stretch of guest RAM (outside RAM or across a hole)")]
    NotRam(GpaRange),
    #[error("range {range}: page {pfn:#x} is already in the balloon")]
    AlreadyInflated { range: GpaRange, pfn: u64 },
    #[error("range {range}: page {pfn:#x} is not in the balloon")]
    NotInflated { range: GpaRange, pfn: u64 },
}

/// Why [`RamLayout::run_of_range`] finds no run for `range`, for the
/// queues that check ranges that way (free page reports and hints).
pub fn not_a_run(range: GpaRange) -> RangeError {
    if range.len == 0 {
        RangeError::Empty(range)
    } else if !range.start.is_multiple_of(PAGE_SIZE) || !range.len.is_multiple_of(PAGE_SIZE) {
        RangeError::Unaligned(range)
    } else if range.end().is_none() {
        RangeError::Overflow(range)
    } else {
        RangeError::NotRam(range)
    }
}

/// Check one range of an inflate (`inflate`) or deflate buffer; on
/// success, the run of guest page frames it covers (inside one span of
/// RAM; it may still cross backing boundaries, see
/// [`RamLayout::backing_runs`]).
pub fn check_range(
    range: GpaRange,
    writable: bool,
    inflate: bool,
    layout: &RamLayout,
    bitmap: &InflatedBitmap,
) -> Result<PfnRun, RangeError> {
    if !writable {
        return Err(RangeError::Readable(range));
    }
    if range.len == 0 {
        return Err(RangeError::Empty(range));
    }
    if !range.start.is_multiple_of(PAGE_SIZE) || !range.len.is_multiple_of(PAGE_SIZE) {
        return Err(RangeError::Unaligned(range));
    }
    if range.len > MAX_RANGE_BYTES {
        return Err(RangeError::TooLong(range));
    }
    if range.end().is_none() {
        return Err(RangeError::Overflow(range));
    }
    let run = layout
        .run_of_range(range)
        .ok_or(RangeError::NotRam(range))?;
    let pfn_of = |bit: u64| run.start_pfn + (bit - run.bit);
    if inflate {
        if let Some(b) = bitmap.first_with(run.bit, run.npages, true) {
            return Err(RangeError::AlreadyInflated {
                range,
                pfn: pfn_of(b),
            });
        }
    } else if let Some(b) = bitmap.first_with(run.bit, run.npages, false) {
        return Err(RangeError::NotInflated {
            range,
            pfn: pfn_of(b),
        });
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// 0..3 GiB, the 3–4 GiB hole, then 4..5 GiB made of two contiguous
    /// regions (a backing boundary at 4.5 GiB).
    fn layout() -> RamLayout {
        RamLayout::new(&[
            GpaRange::new(0, 3 * GIB),
            GpaRange::new(4 * GIB, GIB / 2),
            GpaRange::new(4 * GIB + GIB / 2, GIB / 2),
        ])
        .unwrap()
    }

    fn check(
        l: &RamLayout,
        b: &InflatedBitmap,
        start: u64,
        len: u64,
        inflate: bool,
    ) -> Result<PfnRun, RangeError> {
        check_range(GpaRange::new(start, len), true, inflate, l, b)
    }

    /// A report or hint range with no run is logged with its real reason,
    /// not "not aligned guest RAM" for an aligned range outside RAM.
    #[test]
    fn a_range_without_a_run_says_why() {
        let l = layout();
        let r = |start, len| GpaRange::new(start, len);
        for (range, why) in [
            (r(0x1000, 0), "is empty"),
            (r(0x1800, 0x1000), "is not 4 KiB aligned"),
            (r(u64::MAX - 0xfff, 0x2000), "wraps around"),
            (r(1 << 40, 0x1000), "is not inside one stretch of guest RAM"),
            (
                r(3 * GIB + 0x1000, 0x1000),
                "is not inside one stretch of guest RAM",
            ),
        ] {
            assert!(l.run_of_range(range).is_none(), "{range}");
            let msg = not_a_run(range).to_string();
            assert!(msg.contains(why), "{range}: {msg}");
        }
    }

    #[test]
    fn hostile_ranges_are_refused_with_their_reason() {
        let l = layout();
        let b = InflatedBitmap::new(l.total_pages());
        let r = |s, n| GpaRange::new(s, n);
        assert_eq!(
            check_range(r(0x1000, 0x1000), false, true, &l, &b),
            Err(RangeError::Readable(r(0x1000, 0x1000)))
        );
        assert_eq!(
            check(&l, &b, 0x1000, 0, true),
            Err(RangeError::Empty(r(0x1000, 0)))
        );
        assert_eq!(
            check(&l, &b, 0x1800, 0x1000, true),
            Err(RangeError::Unaligned(r(0x1800, 0x1000)))
        );
        assert_eq!(
            check(&l, &b, 0x1000, 0x1800, true),
            Err(RangeError::Unaligned(r(0x1000, 0x1800)))
        );
        assert_eq!(
            check(&l, &b, 0, 1 << 32, true),
            Err(RangeError::TooLong(r(0, 1 << 32)))
        );
        let top = u64::MAX - 0xfff;
        assert_eq!(
            check(&l, &b, top, 0x2000, true),
            Err(RangeError::Overflow(r(top, 0x2000)))
        );
        // In the MMIO hole, beyond RAM, spanning the hole.
        assert_eq!(
            check(&l, &b, 0xd000_0000, 0x1000, true),
            Err(RangeError::NotRam(r(0xd000_0000, 0x1000)))
        );
        assert_eq!(
            check(&l, &b, 5 * GIB, 0x1000, true),
            Err(RangeError::NotRam(r(5 * GIB, 0x1000)))
        );
        let across = r(3 * GIB - 0x1000, GIB + 0x2000);
        assert_eq!(
            check(&l, &b, across.start, across.len, true),
            Err(RangeError::NotRam(across))
        );
        // The largest legal length is accepted where RAM allows it.
        let run = check(&l, &b, 0, MAX_RANGE_BYTES.min(3 * GIB), true).unwrap();
        assert_eq!((run.start_pfn, run.npages), (0, 3 * GIB / PAGE_SIZE));
    }

    #[test]
    fn inflate_needs_pages_outside_and_deflate_inside_the_balloon() {
        let l = layout();
        let mut b = InflatedBitmap::new(l.total_pages());
        // Pages 0x100..0x110 are in the balloon.
        b.update(0x100, 0x10, true);
        assert_eq!(
            check(&l, &b, 0xf0000, 0x30000, true),
            Err(RangeError::AlreadyInflated {
                range: GpaRange::new(0xf0000, 0x30000),
                pfn: 0x100
            })
        );
        assert!(check(&l, &b, 0x110000, 0x1000, true).is_ok());
        assert_eq!(
            check(&l, &b, 0x100000, 0x11000, false),
            Err(RangeError::NotInflated {
                range: GpaRange::new(0x100000, 0x11000),
                pfn: 0x110
            })
        );
        let run = check(&l, &b, 0x100000, 0x10000, false).unwrap();
        assert_eq!((run.start_pfn, run.npages, run.bit), (0x100, 0x10, 0x100));
    }

    #[test]
    fn a_range_is_split_only_at_backing_boundaries() {
        let l = layout();
        let b = InflatedBitmap::new(l.total_pages());
        let run = check(&l, &b, 4 * GIB, GIB, true).unwrap();
        let mut parts = Vec::new();
        l.backing_runs(run, |r| parts.push(r.range()));
        assert_eq!(
            parts,
            vec![
                GpaRange::new(4 * GIB, GIB / 2),
                GpaRange::new(4 * GIB + GIB / 2, GIB / 2)
            ]
        );
        let run = check(&l, &b, 0, 2 * GIB, true).unwrap();
        let mut parts = Vec::new();
        l.backing_runs(run, |r| parts.push(r.range()));
        assert_eq!(parts, vec![GpaRange::new(0, 2 * GIB)]);
    }
}
