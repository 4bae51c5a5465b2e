//! CPUID as the guest sees it: what `KVM_GET_SUPPORTED_CPUID` offers,
//! sanitised with Blimp's own topology (one thread per core, `vcpu_count`
//! cores in one socket) and the quirks of the host's KVM backend.

use kvm_bindings::kvm_cpuid_entry2;

/// How to sanitise CPUID for one vCPU.
#[derive(Clone, Copy, Debug)]
pub struct CpuidConfig {
    pub vcpu_id: u8,
    pub vcpu_count: u8,
    /// The host's KVM is PVM: its instruction emulator cannot run
    /// `lock cmpxchg16b`, so CX16 is hidden.
    pub pvm: bool,
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;

const ECX_CX16: u32 = 1 << 13;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const CLFLUSH_LINE_QWORDS: u32 = 8;

/// Number of bits needed to hold APIC IDs for `n` cores.
fn core_bits(n: u8) -> u32 {
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

/// Sanitise `entries` in place for `cfg`.
pub fn sanitise(entries: &mut [kvm_cpuid_entry2], cfg: &CpuidConfig) {
    let count = u32::from(cfg.vcpu_count.max(1));
    let apic_id = u32::from(cfg.vcpu_id);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (apic_id << 24) | (count << 16) | (CLFLUSH_LINE_QWORDS << 8);
                e.ecx |= ECX_HYPERVISOR;
                if cfg.pvm {
                    e.ecx &= !ECX_CX16;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                // Sub-leaf 0: SMT level (1 thread per core); sub-leaf 1: core level.
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits(cfg.vcpu_count);
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i & 0xff;
                    }
                }
            }
            LEAF_AMD_SIZE_IDS => {
                // ECX[7:0]: number of cores - 1; ECX[15:12]: APIC ID size.
                e.ecx = (core_bits(cfg.vcpu_count) << 12) | (count - 1);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx: ECX_CX16,
            ..Default::default()
        }
    }

    #[test]
    fn topology_and_pvm_quirks() {
        let mut e = vec![entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(4, 0)];
        sanitise(
            &mut e,
            &CpuidConfig {
                vcpu_id: 2,
                vcpu_count: 4,
                pvm: true,
            },
        );
        assert_eq!(e[0].ebx >> 24, 2, "initial APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(e[0].ecx & ECX_CX16, 0, "CX16 hidden on PVM");
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].ebx, 1);
        assert_eq!(e[1].edx, 2);
        assert_eq!(e[2].ebx, 4);
        assert_eq!(e[2].eax, 2);
        assert_eq!(e[3].eax >> 26, 3);
    }

    #[test]
    fn cx16_kept_on_hardware_kvm() {
        let mut e = vec![entry(1, 0)];
        sanitise(
            &mut e,
            &CpuidConfig {
                vcpu_id: 0,
                vcpu_count: 1,
                pvm: false,
            },
        );
        assert_ne!(e[0].ecx & ECX_CX16, 0);
        assert_eq!(e[0].edx & EDX_HTT, 0);
    }
}
