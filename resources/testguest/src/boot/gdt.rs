//! GDT with ring-0 and ring-3 segments and a 64-bit TSS (RSP0 for
//! interrupts taken in ring 3, IST1 for double faults and NMIs).

use core::arch::asm;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
/// Ring-3 selectors (RPL 3): 0x1b code, 0x23 data (used by `enter_user`).
pub const USER_CS: u16 = 0x18 | 3;
pub const USER_DS: u16 = 0x20 | 3;
pub const TSS_SEL: u16 = 0x28;

#[repr(C, align(16))]
struct Gdt([u64; 7]);

/// 64-bit TSS (104 bytes) followed by an I/O permission bitmap covering
/// all 65536 ports (all allowed) and the mandatory 0xff terminator byte.
///
/// Under PVM the guest's ring 3 runs with the *underlying* IOPL = 0 and an
/// `iretq` cannot give it IOPL = 3, so `in`/`out` in ring 3 trap to KVM,
/// whose instruction emulator then consults this bitmap
/// (`emulator_io_port_access_allowed`). On hardware KVM the bitmap is
/// what allows ring-3 port I/O as well.
const TSS_BYTES: usize = 104;
const IOMAP_BYTES: usize = 65536 / 8 + 1;
const TSS_WORDS: usize = (TSS_BYTES + IOMAP_BYTES).div_ceil(4);

#[repr(C, align(16))]
struct Tss([u32; TSS_WORDS]);

#[unsafe(link_section = ".bss.boot.gdt")]
static mut GDT: Gdt = Gdt([0; 7]);
#[unsafe(link_section = ".bss.boot.gdt")]
static mut TSS: Tss = Tss([0; TSS_WORDS]);

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

/// Loads the GDT and TSS and reloads all segment registers. Ring 0, boot.
pub fn init(rsp0: u64, ist1: u64) {
    // SAFETY: single-threaded boot.
    unsafe {
        // Volatile stores only: ring 0 must not use SSE (see paging.rs).
        let tss = &raw mut TSS;
        let t = |i: usize, v: u32| core::ptr::write_volatile(&raw mut (*tss).0[i], v);
        for i in 0..TSS_WORDS {
            t(i, 0);
        }
        t(1, rsp0 as u32); // RSP0 at byte 4
        t(2, (rsp0 >> 32) as u32);
        t(9, ist1 as u32); // IST1 at byte 0x24
        t(10, (ist1 >> 32) as u32);
        t(25, (TSS_BYTES as u32) << 16); // I/O map base right after the TSS
        // Terminator byte after the bitmap (the rest of the word too).
        t(
            TSS_WORDS - 1,
            u32::MAX << (8 * ((TSS_BYTES + IOMAP_BYTES - 1) % 4)),
        );
        let base = tss as u64;
        let limit = (TSS_BYTES + IOMAP_BYTES - 1) as u64;
        let tss_lo = (limit & 0xffff)
            | ((limit >> 16) << 48)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((base >> 24) & 0xff) << 56);
        let gdt = &raw mut GDT;
        let entries = [
            0,
            0x00af_9b00_0000_ffff, // 0x08 kernel code, L
            0x00cf_9300_0000_ffff, // 0x10 kernel data
            0x00af_fb00_0000_ffff, // 0x18 user code, DPL 3, L
            0x00cf_f300_0000_ffff, // 0x20 user data, DPL 3
            tss_lo,                // 0x28 TSS (16 bytes)
            base >> 32,
        ];
        for (i, e) in entries.into_iter().enumerate() {
            core::ptr::write_volatile(&raw mut (*gdt).0[i], e);
        }
        let ptr = Pointer {
            limit: (core::mem::size_of::<Gdt>() - 1) as u16,
            base: gdt as u64,
        };
        asm!(
            "lgdt [{p}]",
            "push {cs}",
            "lea {t}, [rip + 2f]",
            "push {t}",
            "retfq",
            "2:",
            "mov ds, {ds:e}",
            "mov es, {ds:e}",
            "mov ss, {ds:e}",
            "mov fs, {ds:e}",
            "mov gs, {ds:e}",
            "ltr {tss:x}",
            p = in(reg) &raw const ptr,
            cs = const KERNEL_CS as u64,
            t = out(reg) _,
            ds = in(reg) u32::from(KERNEL_DS),
            tss = in(reg) TSS_SEL,
        );
    }
}
