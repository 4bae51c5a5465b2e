//! Guest-physical memory map.
//!
//! ```text
//! 0x0000_0000  RAM (low): real-mode area, boot structures, kernel, ...
//!   0x500      GDT              0x7000  boot_params (zero page)
//!   0x9000     PML4/PDPT/PD     0x20000 kernel command line
//!   0x9_fc00   EBDA: MP table (not RAM in e820)
//! 0x0010_0000  RAM continues (HIMEM) up to min(size, 3 GiB)
//! 0xc000_0000  32-bit MMIO hole (3-4 GiB): virtio-mmio slots at 0xd000_0000,
//!              IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000, KVM TSS 0xfffb_d000
//! 0x1_0000_0000 RAM (high): whatever did not fit below the hole
//! ```

/// Start of the 32-bit MMIO hole. RAM above this goes above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio slot; each slot is [`VIRTIO_MMIO_SLOT_SIZE`] bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device (serial uses 4).
pub const VIRTIO_MMIO_FIRST_GSI: u32 = 5;
/// Number of IOAPIC pins KVM's in-kernel IOAPIC provides.
pub const IOAPIC_PINS: u32 = 24;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM needs three pages for the real-mode TSS (KVM_SET_TSS_ADDR), in the hole.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line we pass (Linux's x86 COMMAND_LINE_SIZE is 2048; we allow more
/// for the test guest, and Linux truncates safely).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the EBDA, where the MP table lives; RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of high memory (1 MiB): the kernel is loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;

/// One contiguous range of guest RAM (one KVM memslot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub start: u64,
    pub size: u64,
}

impl RamRegion {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Where guest RAM lives for a VM of a given size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    regions: Vec<RamRegion>,
}

/// Errors building a [`MemoryLayout`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("guest memory size {0} bytes is too small: at least 16 MiB is needed")]
    TooSmall(u64),
    #[error("guest memory size {0} bytes is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("guest memory size {0} bytes is too large for this VMM (at most 1 TiB)")]
    TooLarge(u64),
}

/// Smallest guest we build: room for boot structures and a kernel at 16 MiB.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest we build (far beyond any machine this runs on).
pub const MAX_MEMORY: u64 = 1 << 40;

impl MemoryLayout {
    /// Split `size` bytes of RAM around the 3-4 GiB MMIO hole.
    pub fn new(size: u64) -> Result<Self, LayoutError> {
        if size < MIN_MEMORY {
            return Err(LayoutError::TooSmall(size));
        }
        if size > MAX_MEMORY {
            return Err(LayoutError::TooLarge(size));
        }
        if !size.is_multiple_of(4096) {
            return Err(LayoutError::Unaligned(size));
        }
        let low = size.min(MMIO_HOLE_START);
        let mut regions = vec![RamRegion {
            start: 0,
            size: low,
        }];
        if size > low {
            regions.push(RamRegion {
                start: MMIO_HOLE_END,
                size: size - low,
            });
        }
        Ok(Self { regions })
    }

    /// RAM regions in ascending address order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// End of RAM below the MMIO hole.
    pub fn low_end(&self) -> u64 {
        self.regions[0].end()
    }

    /// Is `[addr, addr + len)` entirely inside one RAM region?
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.regions
            .iter()
            .any(|r| addr >= r.start && end <= r.end())
    }
}

/// Guest-physical base address of virtio-mmio slot `index`.
pub fn virtio_mmio_slot(index: u32) -> u64 {
    VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SLOT_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        let l = MemoryLayout::new(512 << 20).unwrap();
        assert_eq!(
            l.regions(),
            &[RamRegion {
                start: 0,
                size: 512 << 20
            }]
        );
        assert_eq!(l.size(), 512 << 20);
        assert_eq!(l.low_end(), 512 << 20);
    }

    #[test]
    fn exactly_three_gib_stays_below_the_hole() {
        let l = MemoryLayout::new(3 << 30).unwrap();
        assert_eq!(l.regions().len(), 1);
    }

    #[test]
    fn eight_gib_is_split_around_the_hole() {
        let l = MemoryLayout::new(8 << 30).unwrap();
        assert_eq!(
            l.regions(),
            &[
                RamRegion {
                    start: 0,
                    size: 3 << 30
                },
                RamRegion {
                    start: 4 << 30,
                    size: 5 << 30
                }
            ]
        );
        assert_eq!(l.size(), 8 << 30);
        assert!(l.contains(0x1_0000_0000, 4096));
        assert!(!l.contains(0xd000_0000, 4096));
        assert!(
            !l.contains((3 << 30) - 4096, 8192),
            "a range may not span the hole"
        );
        assert!(!l.contains(u64::MAX - 10, 100), "overflow is not inside");
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert_eq!(MemoryLayout::new(0), Err(LayoutError::TooSmall(0)));
        assert_eq!(
            MemoryLayout::new((64 << 20) + 1),
            Err(LayoutError::Unaligned((64 << 20) + 1))
        );
        assert!(matches!(
            MemoryLayout::new(2 << 40),
            Err(LayoutError::TooLarge(_))
        ));
    }

    #[test]
    fn virtio_slots_are_in_the_hole() {
        assert_eq!(virtio_mmio_slot(0), 0xd000_0000);
        assert_eq!(virtio_mmio_slot(2), 0xd000_2000);
        assert!(virtio_mmio_slot(0) >= MMIO_HOLE_START && virtio_mmio_slot(0) < IOAPIC_ADDR);
    }
}
