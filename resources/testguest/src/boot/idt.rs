//! Interrupt descriptor table and the ring-0 entry stubs.
//!
//! Ring-0 code is emulated (slow) under PVM, so the stubs are tiny:
//! * exceptions (0–31) save the registers and call [`exception`], which
//!   prints one line on COM1 and ends the VM through the debug-exit port;
//! * device interrupts (vectors 0x20–0x3f) bump a per-vector counter and the
//!   global event counter, optionally read-and-acknowledge a virtio-mmio
//!   InterruptStatus register, EOI the LAPIC and return;
//! * the idle call is a `hlt` executed in ring 3: it raises #GP, and the #GP
//!   stub recognises a user-mode `hlt` (opcode 0xf4 at the faulting RIP),
//!   halts with interrupts enabled unless an event arrived since the caller
//!   looked (rdi = the event count it saw), skips the `hlt` and returns.
//!   With rsi pointing at an [`events::DevCall`] the same trap is a device
//!   call: the stub makes the call's register accesses from ring 0, as
//!   Linux's driver makes them in kernel mode (see `DevCall` for the order);
//!   with rdi != 0 as well it is a burst of virtqueue requests (see
//!   `events::Burst`), made from ring 0 as Linux's balloon work function
//!   makes its batches.
//!   `int n` cannot serve: under PVM, `int n` from ring 3 raises #UD.

use core::arch::{asm, global_asm};

use crate::events::{EVENTS, IRQ_ACK, IRQ_COUNT, IRQ_ISR, IRQ_VECTOR_BASE, NUM_IRQ_VECTORS};

/// LAPIC spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

global_asm!(
    r#"
    .text
    /* Exception stubs: 16 bytes each, pushing a dummy error code where the
       CPU does not push one, then the vector. */
    .macro EXC_NOERR n
    .balign 16
    push 0
    push \n
    jmp exc_common
    .endm
    .macro EXC_ERR n
    .balign 16
    push \n
    jmp exc_common
    .endm

    .balign 16
    .global exc_stubs
exc_stubs:
    EXC_NOERR 0
    EXC_NOERR 1
    EXC_NOERR 2
    EXC_NOERR 3
    EXC_NOERR 4
    EXC_NOERR 5
    EXC_NOERR 6
    EXC_NOERR 7
    EXC_ERR 8
    EXC_NOERR 9
    EXC_ERR 10
    EXC_ERR 11
    EXC_ERR 12
    .balign 16
    jmp gp_entry
    EXC_ERR 14
    EXC_NOERR 15
    EXC_NOERR 16
    EXC_ERR 17
    EXC_NOERR 18
    EXC_NOERR 19
    EXC_NOERR 20
    EXC_ERR 21
    EXC_NOERR 22
    EXC_NOERR 23
    EXC_NOERR 24
    EXC_NOERR 25
    EXC_NOERR 26
    EXC_NOERR 27
    EXC_NOERR 28
    EXC_ERR 29
    EXC_ERR 30
    EXC_NOERR 31

exc_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    and rsp, -16
    call {exception}
    ud2

    /* Device interrupt stubs: 16 bytes each; eax = index (vector - 0x20). */
    .macro IRQ n
    .balign 16
    push rax
    mov eax, \n
    jmp irq_common
    .endm

    .balign 16
    .global irq_stubs
irq_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    IRQ \n
    .endr

irq_common:
    push rdx
    push rcx
    lock inc qword ptr [{count} + rax*8]
    mov rdx, qword ptr [{ack} + rax*8]
    test rdx, rdx
    jz 2f
    /* virtio-mmio: rdx = base; InterruptStatus at 0x60, InterruptACK at 0x64 */
    mov ecx, dword ptr [rdx + 0x60]
    mov dword ptr [rdx + 0x64], ecx
    lock or dword ptr [{isr} + rax*4], ecx
2:
    lock inc qword ptr [{events}]
    mov rdx, 0xfee000b0
    mov dword ptr [rdx], 0
    pop rcx
    pop rdx
    pop rax
    iretq

    /* #GP: [rsp] error, +8 rip, +16 cs. A ring-3 `hlt` is the idle call. */
gp_entry:
    test byte ptr [rsp + 16], 3
    jz 4f
    push rax
    mov rax, qword ptr [rsp + 16]
    cmp byte ptr [rax], 0xf4
    jne 5f
    inc qword ptr [rsp + 16]
    /* rsi != 0: a device call, rsi -> events::DevCall (offsets below),
       or with rdi != 0 a burst, rsi -> events::Burst. */
    test rsi, rsi
    jz 6f
    push rdx
    test rdi, rdi
    jnz 20f
    /* write (+0 address, +8 value) */
    mov rax, qword ptr [rsi]
    test rax, rax
    jz 11f
    mov edx, dword ptr [rsi + 8]
    mov dword ptr [rax], edx
11:
    /* wait (+12 bit 0) unless the event count moved from +56 */
    test byte ptr [rsi + 12], 1
    jz 12f
    mov rax, qword ptr [rsi + 56]
    cmp qword ptr [{events}], rax
    jne 12f
    sti
    hlt
    cli
12:
    /* condition: the u16 at +16 must differ from +24, else stop here */
    mov rax, qword ptr [rsi + 16]
    test rax, rax
    jz 13f
    movzx edx, word ptr [rax]
    cmp edx, dword ptr [rsi + 24]
    je 15f
13:
    mov dword ptr [rsi + 28], 1
    /* second write (+32 address, +40 value) */
    mov rax, qword ptr [rsi + 32]
    test rax, rax
    jz 14f
    mov edx, dword ptr [rsi + 40]
    mov dword ptr [rax], edx
14:
    /* read (+48 address) into +44 */
    mov rax, qword ptr [rsi + 48]
    test rax, rax
    jz 15f
    mov eax, dword ptr [rax]
    mov dword ptr [rsi + 44], eax
15:
    pop rdx
    jmp 3f
20:
    /* Burst: rsi -> events::Burst. r8d = avail idx, r9d = request i,
       r10 = &used.idx. */
    push rcx
    push r8
    push r9
    push r10
    xor r9d, r9d
    mov r8d, dword ptr [rsi + 68]
    mov r10, qword ptr [rsi + 16]
21:
    /* 1. avail.ring[idx & mask] = heads[i]; avail.idx = ++idx */
    movzx ecx, word ptr [rsi + r9*2 + 88]
    mov edx, r8d
    and edx, dword ptr [rsi + 36]
    mov rax, qword ptr [rsi]
    mov word ptr [rax + rdx*2], cx
    inc r8d
    mov rax, qword ptr [rsi + 8]
    mov word ptr [rax], r8w
    mov dword ptr [rsi + 68], r8d
    inc dword ptr [rsi + 72]
    /* 2. kick unless used.flags has VIRTQ_USED_F_NO_NOTIFY */
    test byte ptr [r10 - 2], 1
    jnz 22f
    mov rax, qword ptr [rsi + 24]
    mov edx, dword ptr [rsi + 32]
    mov dword ptr [rax], edx
22:
    /* (flags bit 0: leave this request in flight to the caller) */
    test byte ptr [rsi + 84], 1
    jnz 29f
23:
    /* 3. until used.idx == avail idx: halt; stop on a config change */
    cmp word ptr [r10], r8w
    je 24f
    mov rax, qword ptr [rsi + 56]
    test byte ptr [rax], 2
    jnz 29f
    sti
    hlt
    cli
    jmp 23b
24:
    /* 4. actual = actuals[i] */
    mov edx, dword ptr [rsi + r9*4 + 152]
    mov rax, qword ptr [rsi + 40]
    mov dword ptr [rax], edx
    inc r9d
    mov dword ptr [rsi + 76], r9d
    /* 5. no difference left (num_pages as read last == actual): done */
    cmp edx, dword ptr [rsi + 80]
    je 29f
    mov rax, qword ptr [rsi + 48]
    mov edx, dword ptr [rax]
    mov dword ptr [rsi + 80], edx
    /* 6. request i + 1 iff there is one and bounds[i] holds num_pages */
    cmp r9d, dword ptr [rsi + 64]
    jae 29f
    cmp edx, dword ptr [rsi + r9*8 + 272]
    jb 29f
    cmp edx, dword ptr [rsi + r9*8 + 276]
    jbe 21b
29:
    pop r10
    pop r9
    pop r8
    pop rcx
    jmp 15b
6:
    cmp qword ptr [{events}], rdi
    jne 3f
    sti
    hlt
    cli
3:
    pop rax
    add rsp, 8
    iretq
5:
    pop rax
4:
    push 13
    jmp exc_common

    .global spurious_stub
spurious_stub:
    iretq
"#,
    exception = sym exception,
    count = sym IRQ_COUNT,
    ack = sym IRQ_ACK,
    isr = sym IRQ_ISR,
    events = sym EVENTS,
);

unsafe extern "C" {
    static exc_stubs: u8;
    static irq_stubs: u8;
    static spurious_stub: u8;
}

#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

#[unsafe(link_section = ".bss.boot.idt")]
static mut IDT: Idt = Idt([[0; 2]; 256]);

/// 64-bit interrupt gate (IF cleared on entry).
fn gate(handler: u64, ist: u8, dpl: u8) -> [u64; 2] {
    let attr: u64 = 0x8e | (u64::from(dpl) << 5);
    let lo = (handler & 0xffff)
        | (u64::from(super::gdt::KERNEL_CS) << 16)
        | (u64::from(ist) << 32)
        | (attr << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [lo, handler >> 32]
}

/// Fills and loads the IDT. Ring 0, boot.
pub fn init() {
    // SAFETY: single-threaded boot; addresses of our own stubs.
    unsafe {
        let idt = &raw mut IDT;
        let exc = &raw const exc_stubs as u64;
        let irq = &raw const irq_stubs as u64;
        for v in 0..256 {
            let g = match v {
                // #DF and NMI on their own stack.
                2 | 8 => gate(exc + 16 * v as u64, 1, 0),
                0..=31 => gate(exc + 16 * v as u64, 0, 0),
                _ if (IRQ_VECTOR_BASE as usize..IRQ_VECTOR_BASE as usize + NUM_IRQ_VECTORS)
                    .contains(&v) =>
                {
                    gate(irq + 16 * (v - IRQ_VECTOR_BASE as usize) as u64, 0, 0)
                }
                _ if v == SPURIOUS_VECTOR as usize => gate(&raw const spurious_stub as u64, 0, 0),
                _ => [0, 0],
            };
            // Volatile stores only: ring 0 must not use SSE (see paging.rs).
            core::ptr::write_volatile(&raw mut (*idt).0[v][0], g[0]);
            core::ptr::write_volatile(&raw mut (*idt).0[v][1], g[1]);
        }
        #[repr(C, packed)]
        struct Pointer {
            limit: u16,
            base: u64,
        }
        let ptr = Pointer {
            limit: (core::mem::size_of::<Idt>() - 1) as u16,
            base: idt as u64,
        };
        asm!("lidt [{}]", in(reg) &raw const ptr, options(nostack));
    }
}

/// Saved state at `exc_common`.
#[repr(C)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved",
    "#MF x87 floating point",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD floating point",
    "#VE virtualization",
    "#CP control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved",
];

/// Exit status used when the guest dies of an exception.
pub const EXCEPTION_EXIT_CODE: u8 = 99;

/// Ring-0-safe output: byte at a time, no `core::fmt` (which may use SSE,
/// and the PVM emulator running ring 0 rejects SSE instructions).
fn put(s: &str) {
    for b in s.bytes() {
        crate::serial::write_byte(b);
    }
}

fn put_hex(name: &str, v: u64) {
    put(name);
    put(" 0x");
    let mut started = false;
    for i in (0..16).rev() {
        let d = ((v >> (i * 4)) & 0xf) as u8;
        if d != 0 || started || i == 0 {
            started = true;
            crate::serial::write_byte(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
    }
}

/// Reports a CPU exception on COM1 and ends the VM (debug-exit 99); halts
/// if the VMM has no debug-exit port.
extern "C" fn exception(f: &ExceptionFrame) -> ! {
    let cr2: u64;
    // SAFETY: ring 0.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    let name = NAMES.get(f.vector as usize).copied().unwrap_or("?");
    put("\nEXCEPTION");
    put_hex(" vector", f.vector);
    put(" (");
    put(name);
    put(")");
    put_hex(" rip", f.rip);
    put_hex(" cr2", cr2);
    put_hex(" error", f.error);
    put_hex(" cs", f.cs);
    put_hex(" rsp", f.rsp);
    put_hex(" rflags", f.rflags);
    put("\n");
    put_hex("  rax", f.rax);
    put_hex(" rbx", f.rbx);
    put_hex(" rcx", f.rcx);
    put_hex(" rdx", f.rdx);
    put_hex(" rsi", f.rsi);
    put_hex(" rdi", f.rdi);
    put_hex(" rbp", f.rbp);
    put("\n");
    crate::io::outb(crate::io::DEBUG_EXIT_PORT, EXCEPTION_EXIT_CODE);
    super::halt_forever()
}
