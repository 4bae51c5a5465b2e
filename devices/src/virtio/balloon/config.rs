//! The balloon's host-side configuration and its virtio config space
//! (`struct virtio_balloon_config`, all fields little-endian u32).

use serde::{Deserialize, Serialize};

/// How the VMM configures the balloon at boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BalloonConfig {
    /// Offer VIRTIO_BALLOON_F_MUST_TELL_HOST.
    pub must_tell_host: bool,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Statistics polling interval in seconds; non-zero offers the stats
    /// queue (VIRTIO_BALLOON_F_STATS_VQ). 0 = statistics off for good.
    pub stats_polling_interval_s: u32,
    /// Offer VIRTIO_BALLOON_F_FREE_PAGE_HINT.
    pub free_page_hint: bool,
    /// Offer VIRTIO_BALLOON_F_REPORTING.
    pub free_page_reporting: bool,
    /// Offer VIRTIO_BALLOON_F_PAGE_POISON.
    pub page_poison: bool,
    /// Discard hinted pages when no hint sink is registered.
    pub hint_discard: bool,
    /// Initial target (`num_pages`), in 4 KiB pages.
    pub initial_target_pages: u32,
    /// Offer VIRTIO_BALLOON_F_BLIMP_SG (chunked inflate/deflate ranges;
    /// Blimp-experimental, off by default).
    pub sg: bool,
    /// Suppress guest notifications (VRING_USED_F_NO_NOTIFY) while the
    /// device is serving a queue, and on the free page queue for a short
    /// poll window after it ran dry. `false` gives the old behaviour: the
    /// driver may kick for every buffer.
    pub notify_suppression: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self {
            must_tell_host: true,
            deflate_on_oom: false,
            stats_polling_interval_s: 0,
            free_page_hint: false,
            free_page_reporting: false,
            page_poison: false,
            hint_discard: false,
            initial_target_pages: 0,
            sg: false,
            notify_suppression: true,
        }
    }
}

/// Offsets of the config fields.
pub const CFG_NUM_PAGES: usize = 0x0;
pub const CFG_ACTUAL: usize = 0x4;
pub const CFG_FREE_PAGE_HINT_CMD_ID: usize = 0x8;
pub const CFG_POISON_VAL: usize = 0xc;
/// Size of the config space.
pub const CONFIG_SPACE_SIZE: usize = 0x10;

/// The config space as the guest sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ConfigSpace {
    /// Target: pages the host wants in the balloon (host writes).
    pub num_pages: u32,
    /// Pages the guest says are in the balloon (guest writes).
    pub actual: u32,
    /// Free page hinting command id (host writes).
    pub free_page_hint_cmd_id: u32,
    /// Page poison value (guest writes, before DRIVER_OK).
    pub poison_val: u32,
}

/// What a config write changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigWrite {
    pub actual_changed: bool,
    pub poison_changed: bool,
    /// The write touched read-only bytes or fell outside the space.
    pub rejected_bytes: bool,
}

impl ConfigSpace {
    pub fn to_bytes(self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        b[CFG_NUM_PAGES..CFG_NUM_PAGES + 4].copy_from_slice(&self.num_pages.to_le_bytes());
        b[CFG_ACTUAL..CFG_ACTUAL + 4].copy_from_slice(&self.actual.to_le_bytes());
        b[CFG_FREE_PAGE_HINT_CMD_ID..CFG_FREE_PAGE_HINT_CMD_ID + 4]
            .copy_from_slice(&self.free_page_hint_cmd_id.to_le_bytes());
        b[CFG_POISON_VAL..CFG_POISON_VAL + 4].copy_from_slice(&self.poison_val.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; CONFIG_SPACE_SIZE]) -> Self {
        let f = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        Self {
            num_pages: f(CFG_NUM_PAGES),
            actual: f(CFG_ACTUAL),
            free_page_hint_cmd_id: f(CFG_FREE_PAGE_HINT_CMD_ID),
            poison_val: f(CFG_POISON_VAL),
        }
    }

    /// Read `data.len()` bytes at `offset`; `false` (and zeros) if the
    /// access does not fit inside the space.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        let bytes = self.to_bytes();
        match usize::try_from(offset)
            .ok()
            .and_then(|o| bytes.get(o..o.checked_add(data.len())?))
        {
            Some(src) => {
                data.copy_from_slice(src);
                true
            }
            None => {
                data.fill(0);
                false
            }
        }
    }

    /// Apply a driver write: only `actual` and `poison_val` are writable;
    /// bytes aimed at read-only fields or outside the space are dropped.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> ConfigWrite {
        let mut out = ConfigWrite::default();
        let mut bytes = self.to_bytes();
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .filter(|&o| o < CONFIG_SPACE_SIZE)
            else {
                out.rejected_bytes = true;
                continue;
            };
            let writable = (CFG_ACTUAL..CFG_ACTUAL + 4).contains(&o)
                || (CFG_POISON_VAL..CFG_POISON_VAL + 4).contains(&o);
            if writable {
                bytes[o] = b;
            } else {
                out.rejected_bytes = true;
            }
        }
        let new = Self::from_bytes(&bytes);
        out.actual_changed = new.actual != self.actual;
        out.poison_changed = new.poison_val != self.poison_val;
        *self = new;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_virtio_balloon_config() {
        let c = ConfigSpace {
            num_pages: 0x11223344,
            actual: 0x55667788,
            free_page_hint_cmd_id: 2,
            poison_val: 0xaa,
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..4], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[4..8], &[0x88, 0x77, 0x66, 0x55]);
        assert_eq!(&b[8..12], &[2, 0, 0, 0]);
        assert_eq!(&b[12..16], &[0xaa, 0, 0, 0]);
        assert_eq!(std::mem::size_of::<ConfigSpace>(), CONFIG_SPACE_SIZE);
    }

    #[test]
    fn reads_bounds_checked() {
        let c = ConfigSpace {
            num_pages: 7,
            ..Default::default()
        };
        let mut d = [0xffu8; 4];
        assert!(c.read(0, &mut d));
        assert_eq!(u32::from_le_bytes(d), 7);
        let mut d = [0xffu8; 2];
        assert!(c.read(1, &mut d));
        assert_eq!(d, [0, 0]);
        let mut d = [0xffu8; 4];
        assert!(!c.read(14, &mut d));
        assert_eq!(d, [0; 4]);
        assert!(!c.read(u64::MAX, &mut d));
    }

    #[test]
    fn only_actual_and_poison_are_writable() {
        let mut c = ConfigSpace {
            num_pages: 7,
            free_page_hint_cmd_id: 3,
            ..Default::default()
        };
        let w = c.write(4, &9u32.to_le_bytes());
        assert!(w.actual_changed && !w.rejected_bytes);
        assert_eq!(c.actual, 9);
        let w = c.write(0, &100u32.to_le_bytes());
        assert!(w.rejected_bytes && !w.actual_changed);
        assert_eq!(c.num_pages, 7);
        let w = c.write(8, &0u32.to_le_bytes());
        assert!(w.rejected_bytes);
        assert_eq!(c.free_page_hint_cmd_id, 3);
        let w = c.write(0xc, &0xaau32.to_le_bytes());
        assert!(w.poison_changed);
        assert_eq!(c.poison_val, 0xaa);
        // Straddling write: the writable half lands.
        let w = c.write(2, &[1, 1, 2, 0]);
        assert!(w.rejected_bytes && w.actual_changed);
        assert_eq!(c.num_pages, 7);
        assert_eq!(c.actual, 2);
        let w = c.write(u64::MAX, &[1, 2]);
        assert!(w.rejected_bytes);
    }
}
