//! Identity page tables over all of guest-physical memory: 2 MiB pages,
//! user-accessible (the guest works in ring 3). RAM from e820 is mapped
//! write-back; everything else (the 3–4 GiB MMIO hole with virtio-mmio,
//! IOAPIC and LAPIC) uncached (PCD|PWT). At least 4 GiB is always mapped so
//! the whole MMIO hole is reachable.

use super::{bp, e820_count, e820_entry};

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const PS: u64 = 1 << 7;

const GIB: u64 = 1 << 30;
const PAGE_2M: u64 = 1 << 21;

/// Largest physical address space mapped (one PD page per GiB).
pub const MAX_GIB: usize = 64;
/// Everything below this address is mapped.
pub const fn mapped_limit(top: u64) -> u64 {
    let top = if top > 4 * GIB { top } else { 4 * GIB };
    let gib = top.div_ceil(GIB);
    if gib > MAX_GIB as u64 {
        MAX_GIB as u64 * GIB
    } else {
        gib * GIB
    }
}

#[repr(C, align(4096))]
struct Table([u64; 512]);

#[unsafe(link_section = ".bss.boot.pt")]
static mut PML4: Table = Table([0; 512]);
#[unsafe(link_section = ".bss.boot.pt")]
static mut PDPT: Table = Table([0; 512]);
#[unsafe(link_section = ".bss.boot.pt")]
static mut PDS: [Table; MAX_GIB] = [const { Table([0; 512]) }; MAX_GIB];

/// Volatile store: keeps the compiler from vectorising ring-0 loops (the
/// PVM instruction emulator that runs guest ring 0 here rejects SSE).
#[inline(always)]
unsafe fn wr(p: *mut u64, v: u64) {
    unsafe { core::ptr::write_volatile(p, v) }
}

/// Builds the tables and loads CR3. Ring 0, during boot only.
pub fn init(boot_params: u64, ram_top: u64) {
    let gib = (mapped_limit(ram_top) / GIB) as usize;
    // SAFETY: single-threaded boot; the tables are not yet in use.
    unsafe {
        let pml4 = &raw mut PML4;
        let pdpt = &raw mut PDPT;
        let pds = &raw mut PDS;
        for i in 0..512 {
            let pdpte = if i < gib {
                &raw const (*pds)[i] as u64 | P | RW | US
            } else {
                0
            };
            wr(&raw mut (*pml4).0[i], 0);
            wr(&raw mut (*pdpt).0[i], pdpte);
        }
        wr(&raw mut (*pml4).0[0], pdpt as u64 | P | RW | US);
        // Everything uncached first...
        for g in 0..gib {
            let base = g as u64 * GIB;
            for i in 0..512 {
                wr(
                    &raw mut (*pds)[g].0[i],
                    (base + i as u64 * PAGE_2M) | P | RW | US | PS | PCD | PWT,
                );
            }
        }
        // ...then RAM write-back.
        let limit = gib as u64 * GIB;
        for i in 0..e820_count(boot_params) {
            let e = e820_entry(boot_params, i);
            if e.kind != bp::E820_RAM || e.addr >= limit {
                continue;
            }
            let mut a = e.addr & !(PAGE_2M - 1);
            let end = e.end().min(limit);
            while a < end {
                let e = &raw mut (*pds)[(a / GIB) as usize].0[((a % GIB) / PAGE_2M) as usize];
                wr(e, core::ptr::read_volatile(e) & !(PCD | PWT));
                a += PAGE_2M;
            }
        }
        core::arch::asm!("mov cr3, {}", in(reg) pml4 as u64, options(nostack));
    }
}
