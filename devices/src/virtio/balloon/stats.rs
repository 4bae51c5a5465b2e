//! Memory statistics from the stats queue: `struct virtio_balloon_stat
//! { le16 tag; le64 val; } __packed`, tags as Linux 6.12 defines them.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{Error as _, IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes of one packed entry.
pub const STAT_ENTRY_SIZE: usize = 10;
/// Tags this device knows (0..=15).
pub const NUM_STAT_TAGS: usize = 16;
/// Most bytes of a stats buffer the device reads (room for 4x the known
/// tags; anything beyond is ignored).
pub const MAX_STATS_BYTES: usize = STAT_ENTRY_SIZE * NUM_STAT_TAGS * 4;

/// Names of tags 0..=15, as `/sys` and QEMU spell them.
pub const STAT_NAMES: [&str; NUM_STAT_TAGS] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kill",
    "alloc_stall",
    "async_scan",
    "direct_scan",
    "async_reclaim",
    "direct_reclaim",
];

/// The tag number for a name, if known.
pub fn stat_tag(name: &str) -> Option<u16> {
    STAT_NAMES.iter().position(|n| *n == name).map(|i| i as u16)
}

/// The last statistics the guest sent: the one definition, used by the
/// device, its saved state, the policy and the API. Serialised (flattened
/// into `GET /balloon/statistics`) as one field per name in [`STAT_NAMES`]
/// for the tags the guest sent, then `last_update` (Unix seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestStats {
    /// Value of each known tag, `None` if the guest did not send it.
    pub values: [Option<u64>; NUM_STAT_TAGS],
    /// When the buffer was received.
    pub updated: SystemTime,
}

/// The API's name for [`GuestStats::updated`].
const LAST_UPDATE: &str = "last_update";

impl Serialize for GuestStats {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let last_update = self
            .updated
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        let mut map = ser.serialize_map(None)?;
        for (name, v) in self.iter() {
            map.serialize_entry(name, &v)?;
        }
        if let Some(secs) = last_update {
            map.serialize_entry(LAST_UPDATE, &secs)?;
        }
        map.end()
    }
}

/// Reads the fields [`Serialize`] writes and ignores any other (they belong
/// to the reply it is flattened into). Without `last_update` it is an
/// error, which a flattened `Option<GuestStats>` reads as absent.
impl<'de> Deserialize<'de> for GuestStats {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GuestStats;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("guest statistics by name")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<GuestStats, A::Error> {
                let mut values = [None; NUM_STAT_TAGS];
                let mut updated = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == LAST_UPDATE {
                        let secs: u64 = map.next_value()?;
                        updated = UNIX_EPOCH.checked_add(Duration::from_secs(secs));
                    } else if let Some(tag) = stat_tag(&key) {
                        values[usize::from(tag)] = map.next_value()?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                let updated = updated.ok_or_else(|| A::Error::missing_field(LAST_UPDATE))?;
                Ok(GuestStats { values, updated })
            }
        }
        de.deserialize_map(V)
    }
}

impl GuestStats {
    /// Value for a tag number.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.values.get(usize::from(tag)).copied().flatten()
    }

    /// Value by name (`"free_memory"`, ...).
    pub fn by_name(&self, name: &str) -> Option<u64> {
        stat_tag(name).and_then(|t| self.get(t))
    }

    /// The values present, as (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        STAT_NAMES
            .iter()
            .zip(self.values.iter())
            .filter_map(|(n, v)| v.map(|v| (*n, v)))
    }
}

/// What parsing one buffer found besides the values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParseOutcome {
    pub entries: usize,
    pub unknown_tags: usize,
    /// Bytes of a trailing partial entry, ignored.
    pub truncated_bytes: usize,
}

/// Parse a stats buffer; known tags update `values` (later entries win),
/// unknown tags and a trailing partial entry are ignored.
pub fn parse_stats(buf: &[u8], values: &mut [Option<u64>; NUM_STAT_TAGS]) -> ParseOutcome {
    let mut out = ParseOutcome::default();
    let mut chunks = buf.chunks_exact(STAT_ENTRY_SIZE);
    for e in &mut chunks {
        out.entries += 1;
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&e[2..10]);
        match values.get_mut(usize::from(tag)) {
            Some(slot) => *slot = Some(u64::from_le_bytes(v)),
            None => out.unknown_tags += 1,
        }
    }
    out.truncated_bytes = chunks.remainder().len();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, val: u64) -> Vec<u8> {
        let mut v = tag.to_le_bytes().to_vec();
        v.extend_from_slice(&val.to_le_bytes());
        v
    }

    #[test]
    fn parses_known_tags() {
        let mut buf = entry(4, 1 << 30);
        buf.extend(entry(5, 2 << 30));
        buf.extend(entry(15, 7));
        let mut values = [None; NUM_STAT_TAGS];
        let out = parse_stats(&buf, &mut values);
        assert_eq!(out.entries, 3);
        let s = GuestStats {
            values,
            updated: SystemTime::now(),
        };
        assert_eq!(s.by_name("free_memory"), Some(1 << 30));
        assert_eq!(s.by_name("total_memory"), Some(2 << 30));
        assert_eq!(s.by_name("direct_reclaim"), Some(7));
        assert_eq!(s.get(0), None);
        assert_eq!(s.iter().count(), 3);
    }

    #[test]
    fn unknown_tags_are_ignored() {
        let mut buf = entry(16, 1);
        buf.extend(entry(0xffff, 2));
        buf.extend(entry(2, 3));
        let mut values = [None; NUM_STAT_TAGS];
        let out = parse_stats(&buf, &mut values);
        assert_eq!(out.unknown_tags, 2);
        assert_eq!(values[2], Some(3));
        assert_eq!(values.iter().flatten().count(), 1);
    }

    #[test]
    fn truncated_trailing_entry_is_ignored() {
        let mut buf = entry(1, 42);
        buf.extend(&entry(3, 99)[..7]);
        let mut values = [None; NUM_STAT_TAGS];
        let out = parse_stats(&buf, &mut values);
        assert_eq!(out.entries, 1);
        assert_eq!(out.truncated_bytes, 7);
        assert_eq!(values[1], Some(42));
        assert_eq!(values[3], None);
        // Empty and tiny buffers.
        assert_eq!(parse_stats(&[], &mut values).entries, 0);
        assert_eq!(parse_stats(&[1], &mut values).truncated_bytes, 1);
    }

    #[test]
    fn names_match_linux_order() {
        // Linux include/uapi/linux/virtio_balloon.h, VIRTIO_BALLOON_S_*.
        let linux = [
            ("swap_in", 0),             // SWAP_IN
            ("swap_out", 1),            // SWAP_OUT
            ("major_faults", 2),        // MAJFLT
            ("minor_faults", 3),        // MINFLT
            ("free_memory", 4),         // MEMFREE
            ("total_memory", 5),        // MEMTOT
            ("available_memory", 6),    // AVAIL
            ("disk_caches", 7),         // CACHES
            ("hugetlb_allocations", 8), // HTLB_PGALLOC
            ("hugetlb_failures", 9),    // HTLB_PGFAIL
            ("oom_kill", 10),           // OOM_KILL
            ("alloc_stall", 11),        // ALLOC_STALL
            ("async_scan", 12),         // ASYNC_SCAN
            ("direct_scan", 13),        // DIRECT_SCAN
            ("async_reclaim", 14),      // ASYNC_RECLAIM
            ("direct_reclaim", 15),     // DIRECT_RECLAIM
        ];
        assert_eq!(linux.len(), NUM_STAT_TAGS);
        for (name, tag) in linux {
            assert_eq!(stat_tag(name), Some(tag), "{name}");
        }
        assert_eq!(stat_tag("nope"), None);
    }
}
