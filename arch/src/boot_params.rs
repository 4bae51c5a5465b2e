//! The Linux 64-bit boot protocol's zero page (`struct boot_params`) and its
//! e820 memory map (Documentation/arch/x86/boot.rst, zero-page.rst).

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use crate::layout::{EBDA_START, HIMEM_START, MemoryLayout};

/// e820 type for usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type for reserved memory.
pub const E820_RESERVED: u32 = 2;
/// `boot_params.e820_table` holds at most this many entries.
pub const E820_MAX_ENTRIES: usize = 128;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Errors building the zero page.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootParamsError {
    #[error(
        "initrd of {size} bytes does not fit in low guest RAM (ends at {low_end:#x}, kernel ends at {kernel_end:#x})"
    )]
    InitrdTooLarge {
        size: u64,
        low_end: u64,
        kernel_end: u64,
    },
    #[error("too many e820 entries ({0})")]
    TooManyE820Entries(usize),
}

/// The e820 map for a layout: RAM below the EBDA, RAM from 1 MiB to the
/// MMIO hole, and RAM above 4 GiB. The EBDA/BIOS area (where the MP table
/// lives) and the MMIO hole are not RAM.
pub fn e820_map(layout: &MemoryLayout) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for r in layout.regions() {
        let start = r.start.max(HIMEM_START);
        if r.end() > start {
            map.push(E820Entry {
                addr: start,
                size: r.end() - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// Where an initrd of `size` bytes goes: page-aligned, at the top of RAM below
/// the MMIO hole, above `kernel_end`.
pub fn initrd_address(
    layout: &MemoryLayout,
    kernel_end: u64,
    size: u64,
) -> Result<u64, BootParamsError> {
    let low_end = layout.low_end();
    let err = BootParamsError::InitrdTooLarge {
        size,
        low_end,
        kernel_end,
    };
    let addr = low_end.checked_sub(size).ok_or(err.clone())? & !0xfff;
    if addr < kernel_end {
        return Err(err);
    }
    Ok(addr)
}

/// What goes into the zero page.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootParamsConfig {
    pub cmdline_addr: u64,
    /// Length of the command line including its NUL.
    pub cmdline_size: u32,
    /// (address, size) of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// The bzImage's setup header, if the kernel is a bzImage.
    pub setup_header: Option<setup_header>,
}

/// Build `struct boot_params` for a kernel entered at its 64-bit entry point.
pub fn build(
    layout: &MemoryLayout,
    cfg: &BootParamsConfig,
) -> Result<boot_params, BootParamsError> {
    let mut bp = boot_params::default();
    if let Some(hdr) = cfg.setup_header {
        bp.hdr = hdr;
    }
    bp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    bp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    bp.hdr.header = KERNEL_HDR_MAGIC;
    bp.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    // Both fit in 32 bits: the command line is at 0x20000 and the initrd below 3 GiB.
    bp.hdr.cmd_line_ptr = cfg.cmdline_addr as u32;
    bp.hdr.cmdline_size = cfg.cmdline_size;
    if let Some((addr, size)) = cfg.initrd {
        bp.hdr.ramdisk_image = addr as u32;
        bp.hdr.ramdisk_size = size as u32;
        bp.ext_ramdisk_image = (addr >> 32) as u32;
        bp.ext_ramdisk_size = (size >> 32) as u32;
    }
    let map = e820_map(layout);
    if map.len() > E820_MAX_ENTRIES {
        return Err(BootParamsError::TooManyE820Entries(map.len()));
    }
    for (slot, e) in bp.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    bp.e820_entries = map.len() as u8;
    Ok(bp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_guest() {
        let l = MemoryLayout::new(512 << 20).unwrap();
        let m = e820_map(&l);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(m[1].kind, E820_RESERVED);
        assert_eq!(
            m[2],
            E820Entry {
                addr: 0x100000,
                size: (512 << 20) - 0x100000,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn e820_has_high_memory_for_8g() {
        let l = MemoryLayout::new(8 << 30).unwrap();
        let m = e820_map(&l);
        assert_eq!(
            m.last(),
            Some(&E820Entry {
                addr: 4 << 30,
                size: 5 << 30,
                kind: E820_RAM
            })
        );
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (8 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn zero_page_fields() {
        let l = MemoryLayout::new(1 << 30).unwrap();
        let bp = build(
            &l,
            &BootParamsConfig {
                cmdline_addr: 0x20000,
                cmdline_size: 12,
                initrd: Some((0x3000_0000, 0x1234)),
                setup_header: None,
            },
        )
        .unwrap();
        assert_eq!({ bp.hdr.boot_flag }, 0xaa55);
        assert_eq!({ bp.hdr.header }, 0x5372_6448);
        assert_eq!({ bp.hdr.type_of_loader }, 0xff);
        assert_eq!({ bp.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ bp.hdr.cmdline_size }, 12);
        assert_eq!({ bp.hdr.ramdisk_image }, 0x3000_0000);
        assert_eq!({ bp.hdr.ramdisk_size }, 0x1234);
        assert_eq!(bp.e820_entries, 3);
        assert_eq!({ bp.e820_table[2].addr }, 0x100000);
    }

    #[test]
    fn initrd_goes_to_top_of_low_ram() {
        let l = MemoryLayout::new(8 << 30).unwrap();
        let a = initrd_address(&l, 0x200_0000, 0x1800).unwrap();
        assert_eq!(a, (3 << 30) - 0x2000);
        assert_eq!(a % 4096, 0);
        let small = MemoryLayout::new(32 << 20).unwrap();
        assert!(initrd_address(&small, 0x100_0000, 20 << 20).is_err());
        assert!(initrd_address(&small, 0, 64 << 20).is_err());
    }
}
