//! Blimp's test guest: a freestanding program booted through the Linux
//! 64-bit boot protocol. Ring 0 only sets the machine up (boot/); the
//! command interpreter, memory workloads and drivers run in ring 3.
#![no_std]
#![no_main]

mod apic;
mod balloon;
mod boot;
mod clock;
mod events;
mod idle;
mod io;
mod memory;
mod serial;
mod shell;
mod virtio;
mod workload;

use testguest::cmdline::GuestArgs;

pub const BANNER: &str = "blimp-testguest 0.1 ready";

/// Exit status after a Rust panic (a bug in the guest).
const PANIC_EXIT_CODE: u8 = 98;

const CMDLINE_CAP: usize = 4096;
static mut CMDLINE: [u8; CMDLINE_CAP] = [0; CMDLINE_CAP];

/// Copies the NUL-terminated command line out of low memory.
fn cmdline(boot_params: u64) -> &'static str {
    // SAFETY: the zero page is mapped; CMDLINE is only touched here, once.
    unsafe {
        let ptr = u64::from(core::ptr::read_unaligned(
            (boot_params + boot::bp::CMD_LINE_PTR) as *const u32,
        ));
        let size = core::ptr::read_unaligned((boot_params + boot::bp::CMDLINE_SIZE) as *const u32)
            as usize;
        if ptr == 0 {
            return "";
        }
        let buf = (&raw mut CMDLINE).cast::<u8>();
        let cap = CMDLINE_CAP;
        let max = if size == 0 { cap } else { size.min(cap) };
        let mut n = 0;
        while n < max {
            let b = core::ptr::read_volatile((ptr + n as u64) as *const u8);
            if b == 0 {
                break;
            }
            buf.add(n).write(b);
            n += 1;
        }
        core::str::from_utf8(core::slice::from_raw_parts(buf, n)).unwrap_or("")
    }
}

/// Ring-3 entry (from boot::boot_main via iretq).
pub extern "C" fn user_main(boot_params: u64) -> ! {
    serial::init();
    apic::init_lapic();
    clock::calibrate();
    let args = GuestArgs::parse(cmdline(boot_params));
    idle::set_poll(args.poll);
    balloon::set_sg_allowed(!args.no_sg);
    let mem = match memory::Memory::init(boot_params) {
        Ok(m) => m,
        Err(e) => {
            println!("error: memory: {e}");
            shell::exit(97);
        }
    };
    if let Err(e) = apic::route(4, events::vector(events::IRQ_SERIAL), apic::Trigger::Edge) {
        println!("error: serial irq: {e}");
    }
    serial::enable_rx_interrupt();
    println!("{BANNER}");
    if args.bad_devices > 0 {
        println!(
            "error: {} bad virtio_mmio.device entries ignored",
            args.bad_devices
        );
    }
    shell::Guest::new(mem, args).run()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC: {info}");
    shell::exit(PANIC_EXIT_CODE)
}

// The freestanding link has no libc: provide the memory intrinsics the
// compiler emits calls to. `rep movsb`/`rep stosb` keep the compiler from
// turning these loops back into calls to themselves.

/// # Safety
/// C `memcpy` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C `memmove` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    unsafe {
        if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize + n) {
            return memcpy(dst, src, n);
        }
        // Overlapping with dst above src: copy backwards.
        core::arch::asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dst.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack)
        );
    }
    dst
}

/// # Safety
/// C `memset` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C `memcmp` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: caller guarantees n readable bytes at a and b.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// C `bcmp` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    unsafe { memcmp(a, b, n) }
}
