//! `KVM_EXIT_INTERNAL_ERROR` handling. PVM's instruction emulator cannot
//! run a few instructions a Linux kernel uses; KVM hands us their bytes and
//! we emulate a short allowlist in PVM compatibility mode:
//! - `int3` (0xcc, the kernel's boot self-test): RIP += 1, inject #BP;
//! - `fwait` (0x9b, on every process exit/exec): RIP += 1.
//!
//! Anything else stops the VM with an error naming the bytes and RIP.

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::VcpuFd;

const BP_VECTOR: u8 = 3;

/// What to do about an instruction the emulator refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Fixup {
    /// Skip the instruction (`len` bytes).
    Skip { len: u64 },
    /// Skip it and inject an exception with this vector.
    SkipAndInject { len: u64, vector: u8 },
}

/// Decide how to handle the instruction starting with `bytes`.
pub fn decide(bytes: &[u8]) -> Option<Fixup> {
    match bytes.first()? {
        0xcc => Some(Fixup::SkipAndInject {
            len: 1,
            vector: BP_VECTOR,
        }),
        0x9b => Some(Fixup::Skip { len: 1 }),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Handle one internal-error exit; Err carries the message to stop the VM with.
pub fn handle_internal_error(fd: &mut VcpuFd, pvm: bool) -> Result<(), String> {
    let run = fd.get_kvm_run();
    // SAFETY: KVM_RUN returned KVM_EXIT_INTERNAL_ERROR (that is how we got
    // here), so the union member KVM filled is `internal`.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let (suberror, ndata) = (internal.suberror, internal.ndata as usize);
    let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
    if suberror != KVM_INTERNAL_ERROR_EMULATION {
        let data = &internal.data[..ndata.min(internal.data.len())];
        return Err(format!(
            "KVM internal error, suberror {suberror}, data {data:x?}, RIP {rip:#x}"
        ));
    }
    // For emulation failures `data` is laid out as struct emulation_failure:
    // flags (u64), then insn_size (u8) and up to 15 instruction bytes.
    let flags = internal.data[0];
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&internal.data[1].to_le_bytes());
    raw[8..].copy_from_slice(&internal.data[2].to_le_bytes());
    let have_bytes = flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0;
    let insn = if have_bytes {
        &raw[1..1 + usize::from(raw[0]).min(15)]
    } else {
        &raw[..0]
    };
    let fixup = if pvm { decide(insn) } else { None };
    let Some(fixup) = fixup else {
        return Err(format!(
            "instruction emulation failed at RIP {rip:#x}, instruction bytes [{}]{}",
            hex(insn),
            if pvm {
                " (not in Blimp's PVM fixup allowlist: int3, fwait)"
            } else {
                ""
            }
        ));
    };
    log::debug!(
        "emulation failure at RIP {rip:#x} [{}]: {fixup:?}",
        hex(insn)
    );
    let mut regs = fd.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    let (len, vector) = match fixup {
        Fixup::Skip { len } => (len, None),
        Fixup::SkipAndInject { len, vector } => (len, Some(vector)),
    };
    // Wraps as the CPU does at the top of the address space.
    regs.rip = regs.rip.wrapping_add(len);
    fd.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    if let Some(vector) = vector {
        let mut events = fd
            .get_vcpu_events()
            .map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = 0;
        fd.set_vcpu_events(&events)
            .map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist() {
        assert_eq!(
            decide(&[0xcc]),
            Some(Fixup::SkipAndInject { len: 1, vector: 3 })
        );
        assert_eq!(decide(&[0x9b, 0x90]), Some(Fixup::Skip { len: 1 }));
        assert_eq!(decide(&[0x0f, 0x01, 0xca]), None, "clac is not emulated");
        assert_eq!(decide(&[]), None);
    }
}
