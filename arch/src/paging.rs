//! Identity-mapped page tables for entering a 64-bit kernel: one PML4, one
//! PDPT and one PD of 2 MiB pages covering the first GiB (what the Linux
//! 64-bit boot protocol needs; the kernel builds its own tables next).

use crate::layout::{PD_ADDR, PDPT_ADDR, PML4_ADDR};

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// A page-table page to write into guest memory.
pub struct TablePage {
    pub addr: u64,
    pub entries: Vec<u64>,
}

/// The three table pages. The VMM writes each at its address and sets CR3 to
/// [`PML4_ADDR`].
pub fn identity_map_first_gib() -> Vec<TablePage> {
    let mut pml4 = vec![0u64; 512];
    pml4[0] = PDPT_ADDR | PRESENT_RW;
    let mut pdpt = vec![0u64; 512];
    pdpt[0] = PD_ADDR | PRESENT_RW;
    let pd = (0..512u64)
        .map(|i| (i << 21) | PRESENT_RW | PAGE_SIZE_2M)
        .collect();
    vec![
        TablePage {
            addr: PML4_ADDR,
            entries: pml4,
        },
        TablePage {
            addr: PDPT_ADDR,
            entries: pdpt,
        },
        TablePage {
            addr: PD_ADDR,
            entries: pd,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walk the tables like the MMU does for a 2 MiB mapping.
    fn translate(tables: &[TablePage], va: u64) -> Option<u64> {
        let find = |addr: u64| tables.iter().find(|t| t.addr == addr);
        let pml4e = find(PML4_ADDR)?.entries[((va >> 39) & 511) as usize];
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte = find(pml4e & !0xfff)?.entries[((va >> 30) & 511) as usize];
        if pdpte & 1 == 0 {
            return None;
        }
        let pde = find(pdpte & !0xfff)?.entries[((va >> 21) & 511) as usize];
        if pde & 1 == 0 || pde & PAGE_SIZE_2M == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff))
    }

    #[test]
    fn first_gib_is_identity_mapped() {
        let t = identity_map_first_gib();
        assert_eq!(t.len(), 3);
        for va in [0u64, 0x7000, 0x100_0000, 0x3fff_ffff, 0x1234_5678] {
            assert_eq!(translate(&t, va), Some(va));
        }
        assert_eq!(translate(&t, 0x4000_0000), None);
    }
}
