//! Ring-0 start-up. The VMM enters `_start` in 64-bit mode on its own GDT and
//! identity tables for the first GiB; this code (emulated, ~1M instr/s under
//! PVM, so kept short) switches to our own stack, enables SSE, clears .bss,
//! builds page tables, GDT/TSS (with an all-ports I/O bitmap) and IDT, masks
//! the legacy PIC and drops to ring 3, where all real work happens.

pub mod gdt;
pub mod idt;
pub mod paging;

use core::arch::{asm, global_asm};

use crate::io::outb;

/// Linux `boot_params` (zero page) offsets, arch/x86/include/uapi/asm/bootparam.h.
pub mod bp {
    pub const E820_ENTRIES: u64 = 0x1e8;
    pub const CMD_LINE_PTR: u64 = 0x228;
    pub const CMDLINE_SIZE: u64 = 0x238;
    pub const E820_TABLE: u64 = 0x2d0;
    /// `struct boot_e820_entry`: addr u64, size u64, type u32 (packed).
    pub const E820_ENTRY_SIZE: u64 = 20;
    pub const E820_MAX: usize = 128;
    pub const E820_RAM: u32 = 1;
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, Default)]
pub struct E820 {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl E820 {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// Reads entry `i` of the zero page's e820 table.
pub fn e820_entry(boot_params: u64, i: usize) -> E820 {
    let p = boot_params + bp::E820_TABLE + i as u64 * bp::E820_ENTRY_SIZE;
    // SAFETY: the zero page is identity-mapped RAM provided by the VMM.
    unsafe {
        E820 {
            addr: core::ptr::read_unaligned(p as *const u64),
            size: core::ptr::read_unaligned((p + 8) as *const u64),
            kind: core::ptr::read_unaligned((p + 16) as *const u32),
        }
    }
}

/// Number of valid e820 entries.
pub fn e820_count(boot_params: u64) -> usize {
    // SAFETY: as above.
    let n = unsafe { core::ptr::read_volatile((boot_params + bp::E820_ENTRIES) as *const u8) };
    usize::from(n).min(bp::E820_MAX)
}

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
    static kernel_stack_top: u8;
    static ist_stack_top: u8;
    static user_stack_top: u8;
}

/// Physical range occupied by the guest image, its stacks and tables.
pub fn image_range() -> (u64, u64) {
    // Linker-script symbols: only their addresses are used.
    (
        &raw const __image_start as u64,
        &raw const __image_end as u64,
    )
}

// Entry point. Stacks live in .bss.boot (never zeroed, not loaded).
global_asm!(
    r#"
    .section .bss.boot.stacks, "aw", @nobits
    .balign 4096
    .skip 32768
    .global kernel_stack_top
kernel_stack_top:
    .skip 16384
    .global ist_stack_top
ist_stack_top:
    .skip 262144
    .global user_stack_top
user_stack_top:

    .section .text.entry, "ax"
    .global _start
    .code64
_start:
    cli
    cld
    lea rsp, [rip + kernel_stack_top]
    mov r12, rsi
    /* SSE for Rust code: CR0.EM=0, CR0.MP=1, CR4.OSFXSR|OSXMMEXCPT. */
    mov rax, cr0
    and rax, -5
    or rax, 2
    mov cr0, rax
    mov rax, cr4
    or rax, 0x600
    mov cr4, rax
    /* Clear .bss (small: big bookkeeping is allocated at run time). */
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    shr rcx, 3
    xor eax, eax
    rep stosq
    mov rdi, r12
    call {boot_main}
2:  hlt
    jmp 2b

    .text
    /* enter_user(rip, rsp, arg): iretq to ring 3 with IF=1. Ring-3 port
       I/O is allowed by the TSS I/O bitmap (see gdt.rs), not by IOPL. */
    .global enter_user
enter_user:
    push {user_ds}
    push rsi
    push 0x202
    push {user_cs}
    push rdi
    mov rdi, rdx
    iretq
"#,
    boot_main = sym boot_main,
    user_cs = const gdt::USER_CS,
    user_ds = const gdt::USER_DS,
);

unsafe extern "C" {
    fn enter_user(rip: u64, rsp: u64, arg: u64) -> !;
}

/// Legacy 8259 PIC data ports; all lines are masked (we use the IOAPIC).
const PIC1_DATA: u16 = 0x21;
const PIC2_DATA: u16 = 0xa1;

extern "C" fn boot_main(boot_params: u64) -> ! {
    let mut top = 0u64;
    for i in 0..e820_count(boot_params) {
        let e = e820_entry(boot_params, i);
        if e.kind == bp::E820_RAM {
            top = top.max(e.end());
        }
    }
    paging::init(boot_params, top);
    let (kstack, ist) = (
        &raw const kernel_stack_top as u64,
        &raw const ist_stack_top as u64,
    );
    gdt::init(kstack, ist);
    idt::init();
    outb(PIC1_DATA, 0xff);
    outb(PIC2_DATA, 0xff);
    // SAFETY: page tables, GDT, TSS and IDT are set up; the user entry point
    // and stack are ours. The stack is offset by 8 as if `call` pushed a
    // return address (SysV alignment).
    unsafe {
        let ustack = &raw const user_stack_top as u64 - 8;
        enter_user(crate::user_main as *const () as u64, ustack, boot_params)
    }
}

/// Ring-0 only: halts forever with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: ring 0 only (the exception handler).
        unsafe { asm!("cli; hlt", options(nomem, nostack)) }
    }
}
