//! Virtio balloon device interface (virtio spec 5.5; Linux
//! include/uapi/linux/virtio_balloon.h): feature bits, configuration
//! layout, statistics.

/// Device ID of the memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;

// Feature bits.
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// Blimp-experimental chunked inflate/deflate: one guest-physical range per
/// device-writable descriptor instead of a PFN array (Blimp's
/// `devices::virtio::balloon::VIRTIO_BALLOON_F_BLIMP_SG`).
pub const VIRTIO_BALLOON_F_BLIMP_SG: u32 = 23;
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Feature bit as a mask.
pub const fn bit(feature: u32) -> u64 {
    1 << feature
}

// Configuration space offsets (struct virtio_balloon_config).
pub const CONFIG_NUM_PAGES: u64 = 0x00;
pub const CONFIG_ACTUAL: u64 = 0x04;
pub const CONFIG_FREE_PAGE_HINT_CMD_ID: u64 = 0x08;
pub const CONFIG_POISON_VAL: u64 = 0x0c;

/// Free page hint command ids (spec 5.5.6.4 / Linux).
pub const FREE_PAGE_HINT_CMD_ID_STOP: u32 = 0;
pub const FREE_PAGE_HINT_CMD_ID_DONE: u32 = 1;

/// Balloon page size: PFNs are always in 4 KiB units.
pub const VIRTIO_BALLOON_PFN_SHIFT: u32 = 12;
/// Linux VIRTIO_BALLOON_ARRAY_PFNS_MAX: PFNs per inflate/deflate buffer.
pub const ARRAY_PFNS_MAX: usize = 256;
/// Linux VIRTIO_BALLOON_OOM_NR_PAGES (module parameter `oom_pages`).
pub const OOM_NR_PAGES: u64 = 256;

/// Statistics tags (VIRTIO_BALLOON_S_*), as in Linux 6.12.
pub const NUM_STATS: usize = 16;
pub const S_SWAP_IN: u16 = 0;
pub const S_SWAP_OUT: u16 = 1;
pub const S_MAJFLT: u16 = 2;
pub const S_MINFLT: u16 = 3;
pub const S_MEMFREE: u16 = 4;
pub const S_MEMTOT: u16 = 5;
pub const S_AVAIL: u16 = 6;
pub const S_CACHES: u16 = 7;
pub const S_HTLB_PGALLOC: u16 = 8;
pub const S_HTLB_PGFAIL: u16 = 9;
pub const S_OOM_KILL: u16 = 10;
pub const S_ALLOC_STALL: u16 = 11;
pub const S_ASYNC_SCAN: u16 = 12;
pub const S_DIRECT_SCAN: u16 = 13;
pub const S_ASYNC_RECLAIM: u16 = 14;
pub const S_DIRECT_RECLAIM: u16 = 15;

/// Linux VIRTIO_BALLOON_S_NAMES, indexed by tag.
pub const STAT_NAMES: [&str; NUM_STATS] = [
    "swap-in",
    "swap-out",
    "major-faults",
    "minor-faults",
    "free-memory",
    "total-memory",
    "available-memory",
    "disk-caches",
    "hugetlb-allocations",
    "hugetlb-failures",
    "oom-kills",
    "alloc-stalls",
    "async-scans",
    "direct-scans",
    "async-reclaims",
    "direct-reclaims",
];

/// `struct virtio_balloon_stat { le16 tag; le64 val; } __packed`.
pub const STAT_SIZE: usize = 10;
/// The stats buffer: one entry per tag.
pub const STATS_BYTES: usize = NUM_STATS * STAT_SIZE;

/// Serialises `vals` (indexed by tag) into the wire format.
pub fn encode_stats(vals: &[u64; NUM_STATS], out: &mut [u8; STATS_BYTES]) {
    for (tag, v) in vals.iter().enumerate() {
        let e = &mut out[tag * STAT_SIZE..(tag + 1) * STAT_SIZE];
        e[..2].copy_from_slice(&(tag as u16).to_le_bytes());
        e[2..].copy_from_slice(&v.to_le_bytes());
    }
}

/// Pages the balloon should change by, like Linux `towards_target()`:
/// positive = inflate, negative = deflate.
pub fn towards_target(num_pages: u32, balloon_pages: u64) -> i64 {
    i64::from(num_pages) - balloon_pages as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_wire_format() {
        let mut vals = [0u64; NUM_STATS];
        vals[S_MEMFREE as usize] = 0x1122_3344_5566_7788;
        vals[S_DIRECT_RECLAIM as usize] = 7;
        let mut out = [0u8; STATS_BYTES];
        encode_stats(&vals, &mut out);
        assert_eq!(out.len(), 160);
        let e = &out[40..50];
        assert_eq!(e, &[4, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&out[150..160], &[15, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn target_direction() {
        assert_eq!(towards_target(100, 40), 60);
        assert_eq!(towards_target(0, 40), -40);
        assert_eq!(towards_target(u32::MAX, 0), i64::from(u32::MAX));
    }

    #[test]
    fn names_cover_tags() {
        assert_eq!(STAT_NAMES[S_OOM_KILL as usize], "oom-kills");
        assert_eq!(STAT_NAMES[S_CACHES as usize], "disk-caches");
    }
}
