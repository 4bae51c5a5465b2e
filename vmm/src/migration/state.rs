//! KVM state of a paused VM: per vCPU (registers, FPU/xsave, MSRs, LAPIC,
//! events, MP state, ...) and per VM (in-kernel PIC/IOAPIC, PIT, kvmclock),
//! gathered with the memory layout and the devices' state into a versioned
//! [`VmState`] that travels in the stream's state section as JSON.
//!
//! Restore order on a vCPU, and why:
//! CPUID (the guest must see the same CPU) → MP state → regs → sregs → FPU
//! → xsave (supersedes the FPU image) → xcrs → LAPIC → MSRs (TSC first,
//! then the rest; `MSR_IA32_TSC_DEADLINE` is ignored by KVM unless the LAPIC
//! timer is already in TSC-deadline mode, hence after the LAPIC) → debug
//! registers → vCPU events (pending exceptions/NMIs/interrupt shadow last,
//! so nothing above clears them).
//!
//! TSC: each vCPU's `MSR_IA32_TSC` is saved with the other MSRs and written
//! back first; KVM treats writes of nearly equal values to the vCPUs of a VM
//! within a second as one synchronised TSC, so the vCPUs stay in step and
//! the guest TSC continues from where it stopped (it does not count the
//! downtime). The TSC frequency is saved too and set on the destination
//! when it differs (needs TSC scaling; without it the difference is reported).
//! kvmclock is restored with `KVM_SET_CLOCK` to the saved value, so guest
//! time also resumes where it paused.

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use serde::de::DeserializeSeed;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use arch::MemoryLayout;

use super::checked::{Exact, List, Opt};
use super::limits::MAX_REGIONS;
pub use super::limits::{
    MAX_VCPUS, STATE_FIXED_BYTES, STATE_PER_PAGE_BYTES, STATE_PER_VCPU_BYTES, max_state_bytes,
};
use super::stream::{RamRange, describe_layout, layout_ranges};

/// Version of [`VmState`] this build writes and reads.
pub const VM_STATE_VERSION: u32 = 1;
/// `MSR_IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// MSRs read or written per KVM_GET_MSRS / KVM_SET_MSRS call.
const MSR_CHUNK: usize = 64;
const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// Most MSRs saved per vCPU: KVM_GET_MSR_INDEX_LIST returns at most this many.
pub const MAX_MSRS: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;
/// 32-bit words of the legacy XSAVE area (4 KiB).
pub const XSAVE_WORDS: usize = 1024;
/// Errors capturing or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}{what} failed: {source}", vcpu_prefix(*.vcpu))]
    Ioctl {
        vcpu: Option<u8>,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: {count} CPUID entries do not fit KVM_SET_CPUID2")]
    Cpuid { vcpu: u8, count: usize },
    #[error(
        "vCPU {vcpu}: KVM_RUN returned an exit ({exit}) while completing the pending one; handle it and capture again"
    )]
    ExitWhileFlushing { vcpu: u8, exit: String },
    #[error("cannot serialize the VM state: {0}")]
    Serialize(#[source] serde_json::Error),
    #[error("the VM state is not valid JSON of the expected shape: {0}")]
    Deserialize(#[source] serde_json::Error),
    #[error("unsupported VM state version {found} (this Blimp reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error(
        "the saved VM has memory {saved}, the destination has {destination}: create the destination with the same memory size"
    )]
    LayoutMismatch { saved: String, destination: String },
    #[error("the saved VM has {saved} vCPUs, the destination has {destination}")]
    VcpuCountMismatch { saved: usize, destination: usize },
    #[error("vcpus: entry {index} has id {id}, the ids must be 0 to {last} in order")]
    VcpuIds { index: usize, id: u8, last: usize },
}

fn vcpu_prefix(vcpu: Option<u8>) -> String {
    vcpu.map(|v| format!("vCPU {v}: ")).unwrap_or_default()
}

fn vcpu_ioctl(vcpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Ioctl {
        vcpu: Some(vcpu),
        what,
        source,
    }
}

fn vm_ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Ioctl {
        vcpu: None,
        what,
        source,
    }
}

/// What this host's KVM can save and restore; probe once per VM.
#[derive(Clone, Debug)]
pub struct StateSupport {
    /// MSRs KVM reports through KVM_GET_MSR_INDEX_LIST.
    pub msr_indices: Vec<u32>,
    pub xsave: bool,
    pub xcrs: bool,
    pub debugregs: bool,
    pub vcpu_events: bool,
    pub tsc_khz: bool,
    pub tsc_control: bool,
}

impl StateSupport {
    pub fn probe(kvm: &Kvm) -> Result<Self, StateError> {
        let list = kvm
            .get_msr_index_list()
            .map_err(vm_ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(Self {
            msr_indices: list.as_slice().to_vec(),
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            debugregs: kvm.check_extension(Cap::Debugregs),
            vcpu_events: kvm.check_extension(Cap::VcpuEvents),
            tsc_khz: kvm.check_extension(Cap::GetTscKhz),
            tsc_control: kvm.check_extension(Cap::TscControl),
        })
    }
}

/// `kvm_fpu` (which has no serde support in kvm-bindings).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

/// `From` both ways between a serde mirror and the KVM struct it mirrors,
/// copying the listed fields (the KVM struct's others, padding, are zero).
macro_rules! mirror_kvm_struct {
    ($ours:ident <=> $kvm:ident { $($field:ident),+ $(,)? }) => {
        impl From<&$kvm> for $ours {
            fn from(k: &$kvm) -> Self {
                Self { $($field: k.$field),+ }
            }
        }

        impl From<&$ours> for $kvm {
            fn from(o: &$ours) -> Self {
                $kvm { $($field: o.$field,)+ ..Default::default() }
            }
        }
    };
}

mirror_kvm_struct!(FpuState <=> kvm_fpu {
    fpr, fcw, fsw, ftwx, last_opcode, last_ip, last_dp, xmm, mxcsr
});

/// One MSR's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// `deserialize_with` functions that read a field with a checking seed
/// (see [`super::checked`]); the seed names the field in its errors.
macro_rules! checked_field {
    ($name:ident, $ty:ty, $seed:expr) => {
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
            $seed.deserialize(d)
        }
    };
}

checked_field!(
    de_cpuid,
    Vec<kvm_cpuid_entry2>,
    List::new(
        "cpuid",
        1,
        MAX_CPUID_ENTRIES,
        Exact::<kvm_cpuid_entry2>::new("cpuid entry")
    )
);
checked_field!(de_mp_state, kvm_mp_state, Exact::new("mp_state"));
checked_field!(de_regs, kvm_regs, Exact::new("regs"));
checked_field!(de_sregs, kvm_sregs, Exact::new("sregs"));
checked_field!(
    de_xsave,
    Option<Vec<u32>>,
    Opt(List::of("xsave", XSAVE_WORDS, XSAVE_WORDS))
);
checked_field!(de_xcrs, Option<kvm_xcrs>, Opt(Exact::new("xcrs")));
checked_field!(de_lapic, kvm_lapic_state, Exact::new("lapic"));
checked_field!(de_msrs, Vec<MsrValue>, List::of("msrs", 0, MAX_MSRS));
checked_field!(
    de_debug_regs,
    Option<kvm_debugregs>,
    Opt(Exact::new("debug_regs"))
);
checked_field!(
    de_vcpu_events,
    Option<kvm_vcpu_events>,
    Opt(Exact::new("vcpu_events"))
);
checked_field!(de_pic_master, kvm_irqchip, Exact::new("pic_master"));
checked_field!(de_pic_slave, kvm_irqchip, Exact::new("pic_slave"));
checked_field!(de_ioapic, kvm_irqchip, Exact::new("ioapic"));
checked_field!(de_pit, kvm_pit_state2, Exact::new("pit"));
checked_field!(de_clock, kvm_clock_data, Exact::new("clock"));
checked_field!(de_vcpus, Vec<VcpuState>, List::of("vcpus", 1, MAX_VCPUS));
checked_field!(
    de_memory_layout,
    Vec<RamRange>,
    List::of("memory_layout", 1, MAX_REGIONS as usize)
);

/// State of one paused vCPU. Reading it checks every KVM structure's exact
/// size and every list's bounds, naming the field that is wrong.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    pub id: u8,
    /// 1 to KVM_MAX_CPUID_ENTRIES entries.
    #[serde(deserialize_with = "de_cpuid")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    #[serde(deserialize_with = "de_mp_state")]
    pub mp_state: kvm_mp_state,
    #[serde(deserialize_with = "de_regs")]
    pub regs: kvm_regs,
    #[serde(deserialize_with = "de_sregs")]
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// The 4 KiB legacy XSAVE area (KVM_GET_XSAVE), if KVM has XSAVE.
    #[serde(deserialize_with = "de_xsave")]
    pub xsave: Option<Vec<u32>>,
    #[serde(deserialize_with = "de_xcrs")]
    pub xcrs: Option<kvm_xcrs>,
    #[serde(deserialize_with = "de_lapic")]
    pub lapic: kvm_lapic_state,
    /// Every MSR of KVM's index list that this vCPU let us read (at most
    /// [`MAX_MSRS`]).
    #[serde(deserialize_with = "de_msrs")]
    pub msrs: Vec<MsrValue>,
    #[serde(deserialize_with = "de_debug_regs")]
    pub debug_regs: Option<kvm_debugregs>,
    #[serde(deserialize_with = "de_vcpu_events")]
    pub vcpu_events: Option<kvm_vcpu_events>,
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .field("xsave", &self.xsave.is_some())
            .field("tsc_khz", &self.tsc_khz)
            .finish_non_exhaustive()
    }
}

impl VcpuState {
    /// The saved value of MSR `index`, if it was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }
}

/// Complete an exit the VMM already handled (e.g. the data of an `in`)
/// by entering the vCPU with `immediate_exit` set: KVM finishes the
/// instruction and returns `EINTR` without running guest code. Call on the
/// vCPU's thread, after its last exit was handled, before
/// [`capture_vcpu`]: otherwise the saved registers miss the result.
/// A vCPU thread already does this, serving any further exit, before it
/// parks for a pause (`vcpu::complete_pending_exit`); here it checks that
/// nothing is left, and an exit is an error (the capture would be torn).
pub fn flush_pending_exit(id: u8, fd: &mut VcpuFd) -> Result<(), StateError> {
    fd.set_kvm_immediate_exit(1);
    let result = match fd.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
        Err(source) => Err(StateError::Ioctl {
            vcpu: Some(id),
            what: "KVM_RUN (immediate exit)",
            source,
        }),
        Ok(exit) => Err(StateError::ExitWhileFlushing {
            vcpu: id,
            exit: exit_name(&exit),
        }),
    };
    fd.set_kvm_immediate_exit(0);
    result
}

fn exit_name(exit: &VcpuExit) -> String {
    match exit {
        VcpuExit::IoIn(port, _) => format!("in from port {port:#x}"),
        VcpuExit::IoOut(port, _) => format!("out to port {port:#x}"),
        VcpuExit::MmioRead(addr, _) => format!("MMIO read at {addr:#x}"),
        VcpuExit::MmioWrite(addr, _) => format!("MMIO write at {addr:#x}"),
        other => format!("{other:?}"),
    }
}

/// The `kvm_msrs` list for one KVM_GET_MSRS/KVM_SET_MSRS of vCPU `id`
/// (at most `MSR_CHUNK` entries, so it is never too long).
fn msr_list(id: u8, entries: &[kvm_msr_entry], what: &'static str) -> Result<Msrs, StateError> {
    Msrs::from_entries(entries).map_err(|_| StateError::Ioctl {
        vcpu: Some(id),
        what,
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })
}

/// Read every MSR of `indices` KVM lets this vCPU read, in chunks. KVM
/// stops a KVM_GET_MSRS at the first MSR it refuses; that one is skipped.
fn read_msrs(id: u8, fd: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrValue>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut at = 0;
    while at < indices.len() {
        let chunk = &indices[at..(at + MSR_CHUNK).min(indices.len())];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_list(id, &entries, "building the KVM_GET_MSRS list")?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(vcpu_ioctl(id, "KVM_GET_MSRS"))?;
        out.extend(
            msrs.as_slice()[..n.min(chunk.len())]
                .iter()
                .map(|e| MsrValue {
                    index: e.index,
                    data: e.data,
                }),
        );
        if n < chunk.len() {
            log::debug!("vCPU {id}: MSR {:#x} is not readable, not saved", chunk[n]);
        }
        // Skip the refused one, if any.
        at += (n + 1).min(chunk.len());
    }
    Ok(out)
}

/// Write `msrs`, skipping (and returning) those KVM refuses.
fn write_msrs(id: u8, fd: &VcpuFd, msrs: &[MsrValue]) -> Result<Vec<u32>, StateError> {
    let mut refused = Vec::new();
    let mut at = 0;
    while at < msrs.len() {
        let chunk = &msrs[at..(at + MSR_CHUNK).min(msrs.len())];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let list = msr_list(id, &entries, "building the KVM_SET_MSRS list")?;
        let n = fd.set_msrs(&list).map_err(vcpu_ioctl(id, "KVM_SET_MSRS"))?;
        if n < chunk.len() {
            refused.push(chunk[n].index);
        }
        at += (n + 1).min(chunk.len());
    }
    Ok(refused)
}

/// Capture vCPU `id`'s state. The vCPU must be paused (out of KVM_RUN, its
/// last exit completed with [`flush_pending_exit`]).
pub fn capture_vcpu(support: &StateSupport, id: u8, fd: &VcpuFd) -> Result<VcpuState, StateError> {
    let e = |what| vcpu_ioctl(id, what);
    let cpuid = fd
        .get_cpuid2(MAX_CPUID_ENTRIES)
        .map_err(e("KVM_GET_CPUID2"))?;
    let mp_state = fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(e("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    let fpu = FpuState::from(&fd.get_fpu().map_err(e("KVM_GET_FPU"))?);
    let xsave = if support.xsave {
        Some(fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?.region.to_vec())
    } else {
        None
    };
    let xcrs = if support.xcrs {
        Some(fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?)
    } else {
        None
    };
    let lapic = fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(id, fd, &support.msr_indices)?;
    let debug_regs = if support.debugregs {
        Some(fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?)
    } else {
        None
    };
    let vcpu_events = if support.vcpu_events {
        Some(fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?)
    } else {
        None
    };
    let tsc_khz = if support.tsc_khz {
        Some(fd.get_tsc_khz().map_err(e("KVM_GET_TSC_KHZ"))?)
    } else {
        None
    };
    Ok(VcpuState {
        id,
        cpuid: cpuid.as_slice().to_vec(),
        mp_state,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        lapic,
        msrs,
        debug_regs,
        vcpu_events,
        tsc_khz,
    })
}

/// What a vCPU restore could not carry over exactly (the restore went on).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuRestoreReport {
    /// MSRs KVM refused to write.
    pub refused_msrs: Vec<u32>,
    /// (saved, destination) TSC frequency in kHz when they differ and the
    /// destination could not be set to the saved one.
    pub tsc_khz_mismatch: Option<(u32, u32)>,
}

/// Restore `state` into a vCPU that has not run yet.
pub fn restore_vcpu(
    support: &StateSupport,
    fd: &VcpuFd,
    state: &VcpuState,
) -> Result<VcpuRestoreReport, StateError> {
    let id = state.id;
    let e = |what| vcpu_ioctl(id, what);
    let mut report = VcpuRestoreReport::default();

    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| StateError::Cpuid {
        vcpu: id,
        count: state.cpuid.len(),
    })?;
    fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
    if let Some(saved) = state.tsc_khz.filter(|_| support.tsc_khz) {
        let here = fd.get_tsc_khz().map_err(e("KVM_GET_TSC_KHZ"))?;
        if here != saved {
            let set = support.tsc_control && fd.set_tsc_khz(saved).is_ok();
            if !set {
                log::warn!(
                    "vCPU {id}: TSC runs at {here} kHz here, {saved} kHz on the source, and cannot be scaled"
                );
                report.tsc_khz_mismatch = Some((saved, here));
            }
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(e("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(e("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(e("KVM_SET_SREGS"))?;
    fd.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(e("KVM_SET_FPU"))?;
    if let Some(region) = state.xsave.as_ref().filter(|_| support.xsave) {
        let mut xsave = kvm_xsave::default();
        let n = region.len().min(xsave.region.len());
        xsave.region[..n].copy_from_slice(&region[..n]);
        // SAFETY: `xsave` is a whole `kvm_xsave` (the 4 KiB legacy area
        // KVM_SET_XSAVE reads); no dynamic features were negotiated with
        // KVM_GET_XSAVE2, so the kernel reads nothing past it.
        unsafe { fd.set_xsave(&xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    }
    if let Some(xcrs) = state.xcrs.as_ref().filter(|_| support.xcrs) {
        fd.set_xcrs(xcrs).map_err(e("KVM_SET_XCRS"))?;
    }
    fd.set_lapic(&state.lapic).map_err(e("KVM_SET_LAPIC"))?;
    // The TSC first: the TSC deadline and anything else relative to it follow.
    let (tsc, rest): (Vec<MsrValue>, Vec<MsrValue>) =
        state.msrs.iter().partition(|m| m.index == MSR_IA32_TSC);
    report.refused_msrs = write_msrs(id, fd, &tsc)?;
    report.refused_msrs.extend(write_msrs(id, fd, &rest)?);
    if !report.refused_msrs.is_empty() {
        log::warn!(
            "vCPU {id}: KVM refused {} saved MSRs: {:x?}",
            report.refused_msrs.len(),
            report.refused_msrs
        );
    }
    if let Some(d) = state.debug_regs.as_ref().filter(|_| support.debugregs) {
        fd.set_debug_regs(d).map_err(e("KVM_SET_DEBUGREGS"))?;
    }
    if let Some(ev) = state.vcpu_events.as_ref().filter(|_| support.vcpu_events) {
        fd.set_vcpu_events(ev).map_err(e("KVM_SET_VCPU_EVENTS"))?;
    }
    Ok(report)
}

/// State of the VM-wide in-kernel devices (each of exactly its KVM size).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvmVmState {
    #[serde(deserialize_with = "de_pic_master")]
    pub pic_master: kvm_irqchip,
    #[serde(deserialize_with = "de_pic_slave")]
    pub pic_slave: kvm_irqchip,
    #[serde(deserialize_with = "de_ioapic")]
    pub ioapic: kvm_irqchip,
    #[serde(deserialize_with = "de_pit")]
    pub pit: kvm_pit_state2,
    #[serde(deserialize_with = "de_clock")]
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for KvmVmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

fn get_chip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(vm_ioctl(what))?;
    Ok(chip)
}

/// Capture the in-kernel PIC pair, IOAPIC, PIT and kvmclock of a paused VM.
pub fn capture_vm(vm: &VmFd) -> Result<KvmVmState, StateError> {
    Ok(KvmVmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        pit: vm.get_pit2().map_err(vm_ioctl("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(vm_ioctl("KVM_GET_CLOCK"))?,
    })
}

/// Restore the in-kernel devices and kvmclock into a VM created with an
/// irqchip and a PIT, before any vCPU runs.
pub fn restore_vm(vm: &VmFd, state: &KvmVmState) -> Result<(), StateError> {
    for (chip, id, what) in [
        (
            &state.pic_master,
            KVM_IRQCHIP_PIC_MASTER,
            "KVM_SET_IRQCHIP (PIC master)",
        ),
        (
            &state.pic_slave,
            KVM_IRQCHIP_PIC_SLAVE,
            "KVM_SET_IRQCHIP (PIC slave)",
        ),
        (
            &state.ioapic,
            KVM_IRQCHIP_IOAPIC,
            "KVM_SET_IRQCHIP (IOAPIC)",
        ),
    ] {
        let chip = kvm_irqchip {
            chip_id: id,
            ..*chip
        };
        vm.set_irqchip(&chip).map_err(vm_ioctl(what))?;
    }
    vm.set_pit2(&state.pit).map_err(vm_ioctl("KVM_SET_PIT2"))?;
    // The saved clock value only: no KVM_CLOCK_REALTIME adjustment, so the
    // guest's clock resumes where it paused (as the TSC does).
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(vm_ioctl("KVM_SET_CLOCK"))?;
    Ok(())
}

/// Everything but guest RAM: what the stream's state section holds. Read
/// straight into these types (no intermediate JSON tree); the device
/// document stays raw JSON text until the integrator types it.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    pub version: u32,
    #[serde(deserialize_with = "de_memory_layout")]
    pub memory_layout: Vec<RamRange>,
    /// 1 to [`MAX_VCPUS`] vCPUs, ids 0 to n-1 in order.
    #[serde(deserialize_with = "de_vcpus")]
    pub vcpus: Vec<VcpuState>,
    pub vm: KvmVmState,
    /// Device state, filled by the integrator (serial, balloon, transport).
    pub devices: Box<RawValue>,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("version", &self.version)
            .field("memory_layout", &self.memory_layout)
            .field("vcpus", &self.vcpus)
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

impl VmState {
    pub fn new(
        layout: &MemoryLayout,
        vcpus: Vec<VcpuState>,
        vm: KvmVmState,
        devices: serde_json::Value,
    ) -> Self {
        Self {
            version: VM_STATE_VERSION,
            memory_layout: layout_ranges(layout),
            vcpus,
            vm,
            devices: serde_json::value::to_raw_value(&devices)
                .expect("a serde_json::Value always serializes"),
        }
    }

    /// The JSON blob for the stream's state section.
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        serde_json::to_vec(self).map_err(StateError::Serialize)
    }

    /// Parse a state blob; refuses other versions with a clear error, and
    /// any KVM structure of the wrong size, list out of bounds or vCPU ids
    /// other than 0 to n-1, naming the field.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let v: VersionOnly = serde_json::from_slice(bytes).map_err(StateError::Deserialize)?;
        if v.version != VM_STATE_VERSION {
            return Err(StateError::UnsupportedVersion {
                found: v.version,
                supported: VM_STATE_VERSION,
            });
        }
        let state: Self = serde_json::from_slice(bytes).map_err(StateError::Deserialize)?;
        state.check_vcpu_ids()?;
        Ok(state)
    }

    /// vCPU ids are exactly 0 to n-1, in order (so unique).
    fn check_vcpu_ids(&self) -> Result<(), StateError> {
        let last = self.vcpus.len().saturating_sub(1);
        for (index, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.id) != index {
                return Err(StateError::VcpuIds {
                    index,
                    id: v.id,
                    last,
                });
            }
        }
        Ok(())
    }

    /// Refuse a destination whose RAM layout or vCPU count differs.
    pub fn check_destination(&self, layout: &MemoryLayout, vcpus: usize) -> Result<(), StateError> {
        let ours = layout_ranges(layout);
        if self.memory_layout != ours {
            return Err(StateError::LayoutMismatch {
                saved: describe_layout(&self.memory_layout),
                destination: describe_layout(&ours),
            });
        }
        if self.vcpus.len() != vcpus {
            return Err(StateError::VcpuCountMismatch {
                saved: self.vcpus.len(),
                destination: vcpus,
            });
        }
        Ok(())
    }
}

/// Restore a whole [`VmState`] into a fresh VM (irqchip and PIT created,
/// memory registered, vCPUs created and not run yet) with RAM `layout`:
/// checks the layout and vCPU count, then the VM devices, then each vCPU
/// (`vcpus[i]` gets `state.vcpus[i]`). Device state is the caller's.
pub fn restore(
    vm: &VmFd,
    support: &StateSupport,
    vcpus: &[VcpuFd],
    layout: &MemoryLayout,
    state: &VmState,
) -> Result<Vec<VcpuRestoreReport>, StateError> {
    state.check_destination(layout, vcpus.len())?;
    restore_vm(vm, &state.vm)?;
    vcpus
        .iter()
        .zip(&state.vcpus)
        .map(|(fd, s)| restore_vcpu(support, fd, s))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::migration::limits::MAX_STATE_BYTES;

    fn vcpu(id: u8) -> VcpuState {
        VcpuState {
            id,
            cpuid: vec![kvm_cpuid_entry2::default()],
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            fpu: FpuState::default(),
            xsave: Some(vec![0; XSAVE_WORDS]),
            xcrs: Some(kvm_xcrs::default()),
            lapic: kvm_lapic_state::default(),
            msrs: vec![MsrValue {
                index: MSR_IA32_TSC,
                data: 1,
            }],
            debug_regs: Some(kvm_debugregs::default()),
            vcpu_events: Some(kvm_vcpu_events::default()),
            tsc_khz: Some(1_000_000),
        }
    }

    fn vm() -> KvmVmState {
        KvmVmState {
            pic_master: kvm_irqchip::default(),
            pic_slave: kvm_irqchip::default(),
            ioapic: kvm_irqchip::default(),
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data::default(),
        }
    }

    /// A valid state section of a 2-vCPU, 64 MiB guest, as a JSON tree to mutate.
    fn valid() -> Value {
        let layout = MemoryLayout::new(64 << 20).unwrap();
        let s = VmState::new(
            &layout,
            vec![vcpu(0), vcpu(1)],
            vm(),
            json!({"version": 1, "debug_exit": false, "serial": {}, "balloon": null}),
        );
        serde_json::from_slice(&s.to_bytes().unwrap()).unwrap()
    }

    fn bytes(n: usize, v: u8) -> Value {
        Value::Array(vec![json!(v); n])
    }

    fn len_of(v: &Value) -> usize {
        v.as_array().unwrap().len()
    }

    #[test]
    fn a_valid_state_section_parses() {
        let s = VmState::from_bytes(&serde_json::to_vec(&valid()).unwrap()).unwrap();
        assert_eq!(s.vcpus.len(), 2);
        assert_eq!(s.vcpus[1].id, 1);
        assert_eq!(s.vcpus[0].xsave.as_ref().map(Vec::len), Some(XSAVE_WORDS));
    }

    type Mutation = (&'static str, &'static str, fn(&mut Value));

    /// Each mutation of a valid state section is refused, and the error
    /// names the field (the second column).
    #[test]
    fn every_bad_field_is_refused_by_name() {
        let table: &[Mutation] = &[
            ("short regs", "regs", |s| {
                let n = len_of(&s["vcpus"][0]["regs"]);
                s["vcpus"][0]["regs"] = bytes(n - 1, 0);
            }),
            ("long regs", "regs", |s| {
                let n = len_of(&s["vcpus"][0]["regs"]);
                s["vcpus"][0]["regs"] = bytes(n + 1, 0);
            }),
            ("short sregs", "sregs", |s| {
                s["vcpus"][1]["sregs"] = bytes(8, 0)
            }),
            ("long sregs", "sregs", |s| {
                let n = len_of(&s["vcpus"][1]["sregs"]);
                s["vcpus"][1]["sregs"] = bytes(n * 2, 0);
            }),
            ("short lapic", "lapic", |s| {
                s["vcpus"][0]["lapic"] = bytes(1023, 0)
            }),
            ("long lapic", "lapic", |s| {
                s["vcpus"][0]["lapic"] = bytes(4096, 0)
            }),
            ("short xsave", "xsave", |s| {
                s["vcpus"][0]["xsave"] = bytes(1023, 0)
            }),
            ("long xsave", "xsave", |s| {
                s["vcpus"][0]["xsave"] = bytes(1025, 0)
            }),
            ("short xcrs", "xcrs", |s| {
                s["vcpus"][0]["xcrs"] = bytes(3, 0)
            }),
            ("long debug_regs", "debug_regs", |s| {
                let n = len_of(&s["vcpus"][0]["debug_regs"]);
                s["vcpus"][0]["debug_regs"] = bytes(n + 8, 0);
            }),
            ("short vcpu_events", "vcpu_events", |s| {
                s["vcpus"][0]["vcpu_events"] = bytes(1, 0)
            }),
            ("long mp_state", "mp_state", |s| {
                s["vcpus"][0]["mp_state"] = bytes(5, 0)
            }),
            ("short cpuid entry", "cpuid entry", |s| {
                s["vcpus"][0]["cpuid"][0] = bytes(39, 0)
            }),
            ("empty cpuid", "cpuid", |s| {
                s["vcpus"][0]["cpuid"] = json!([])
            }),
            ("too many cpuid entries", "cpuid", |s| {
                let e = s["vcpus"][0]["cpuid"][0].clone();
                s["vcpus"][0]["cpuid"] = Value::Array(vec![e; MAX_CPUID_ENTRIES + 1]);
            }),
            ("too many msrs", "msrs", |s| {
                let m = json!({"index": 16, "data": 0});
                s["vcpus"][0]["msrs"] = Value::Array(vec![m; MAX_MSRS + 1]);
            }),
            ("short pic_master", "pic_master", |s| {
                s["vm"]["pic_master"] = bytes(100, 0)
            }),
            ("long pic_slave", "pic_slave", |s| {
                let n = len_of(&s["vm"]["pic_slave"]);
                s["vm"]["pic_slave"] = bytes(n + 1, 0);
            }),
            ("short ioapic", "ioapic", |s| {
                s["vm"]["ioapic"] = bytes(0, 0)
            }),
            ("short pit", "pit", |s| s["vm"]["pit"] = bytes(7, 0)),
            ("long clock", "clock", |s| {
                let n = len_of(&s["vm"]["clock"]);
                s["vm"]["clock"] = bytes(n + 1, 0);
            }),
            ("duplicate vCPU ids", "vcpus", |s| {
                s["vcpus"][1]["id"] = json!(0)
            }),
            ("vCPU ids out of order", "vcpus", |s| {
                s["vcpus"][0]["id"] = json!(1);
                s["vcpus"][1]["id"] = json!(0);
            }),
            ("vCPU id gap", "vcpus", |s| s["vcpus"][1]["id"] = json!(7)),
            ("no vCPUs", "vcpus", |s| s["vcpus"] = json!([])),
            ("255 vCPUs", "vcpus", |s| {
                let v = s["vcpus"][0].clone();
                s["vcpus"] = Value::Array(vec![v; MAX_VCPUS + 1]);
            }),
            ("missing vm", "vm", |s| {
                s.as_object_mut().unwrap().remove("vm");
            }),
            ("missing devices", "devices", |s| {
                s.as_object_mut().unwrap().remove("devices");
            }),
            ("unknown field", "surprise", |s| s["surprise"] = json!(1)),
            ("missing regs", "regs", |s| {
                s["vcpus"][0].as_object_mut().unwrap().remove("regs");
            }),
            ("no memory layout", "memory_layout", |s| {
                s["memory_layout"] = json!([])
            }),
        ];
        for (what, field, mutate) in table {
            let mut s = valid();
            mutate(&mut s);
            let e = VmState::from_bytes(&serde_json::to_vec(&s).unwrap())
                .err()
                .unwrap_or_else(|| panic!("{what}: accepted"))
                .to_string();
            assert!(e.contains(field), "{what}: {e}");
        }
    }

    /// The per-vCPU allowance of [`max_state_bytes`] holds the largest vCPU
    /// state: the most CPUID entries and MSRs, every byte and number at its
    /// widest. And the VM-wide KVM state fits well inside the fixed part.
    #[test]
    fn the_state_limit_fits_the_largest_vcpu() {
        let mut s = valid();
        let v = &mut s["vcpus"][0];
        for f in [
            "mp_state",
            "regs",
            "sregs",
            "lapic",
            "xcrs",
            "debug_regs",
            "vcpu_events",
        ] {
            let n = len_of(&v[f]);
            v[f] = bytes(n, 255);
        }
        let entry = bytes(std::mem::size_of::<kvm_cpuid_entry2>(), 255);
        v["cpuid"] = Value::Array(vec![entry; MAX_CPUID_ENTRIES]);
        let msr = json!({"index": u32::MAX, "data": u64::MAX});
        v["msrs"] = Value::Array(vec![msr; MAX_MSRS]);
        v["xsave"] = Value::Array(vec![json!(u32::MAX); XSAVE_WORDS]);
        v["id"] = json!(0);
        v["tsc_khz"] = json!(u32::MAX);
        v["fpu"] = json!({
            "fpr": vec![vec![255u8; 16]; 8], "fcw": u16::MAX, "fsw": u16::MAX,
            "ftwx": u8::MAX, "last_opcode": u16::MAX, "last_ip": u64::MAX,
            "last_dp": u64::MAX, "xmm": vec![vec![255u8; 16]; 16], "mxcsr": u32::MAX,
        });
        for f in ["pic_master", "pic_slave", "ioapic", "pit", "clock"] {
            let n = len_of(&s["vm"][f]);
            s["vm"][f] = bytes(n, 255);
        }
        let one = serde_json::to_vec(&s["vcpus"][0]).unwrap().len() as u64;
        assert!(one <= STATE_PER_VCPU_BYTES, "{one} bytes per vCPU");
        let vm_part = serde_json::to_vec(&s["vm"]).unwrap().len() as u64;
        assert!(
            vm_part <= STATE_FIXED_BYTES / 4,
            "{vm_part} bytes of VM state"
        );
        // And the widest vCPU is a valid one.
        VmState::from_bytes(&serde_json::to_vec(&s).unwrap()).unwrap();
    }

    #[test]
    fn the_state_limit_grows_with_the_guest_up_to_the_format_maximum() {
        let small = max_state_bytes(&MemoryLayout::new(256 << 20).unwrap());
        let big = max_state_bytes(&MemoryLayout::new(8 << 30).unwrap());
        assert!(small < 32 << 20, "{small}");
        assert!(big > small);
        let huge = max_state_bytes(&MemoryLayout::new(1 << 40).unwrap());
        assert_eq!(huge, MAX_STATE_BYTES);
    }
}
