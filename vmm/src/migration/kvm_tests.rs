//! Tests on a real KVM VM: dirty logging with guest writes, and state
//! capture/restore. A tiny 64-bit guest (GDT and identity page tables as
//! the boot path sets them up) writes two pages, reads a port and writes
//! one.

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::dirty::{AtomicPageBitmap, start_dirty_logging, stop_dirty_logging, sync};
use super::state::{self, MSR_IA32_TSC, StateError, StateSupport, VcpuRestoreReport, VmState};
use super::stream::{Destination, StreamReader, StreamWriter, layout_ranges};
use crate::memory::GuestRam;
use crate::pvm::KvmBackend;
use crate::vm::Vm;
use crate::{MemoryBackend, vcpu};
use arch::MemoryLayout;
use arch::layout::GDT_ADDR;

const ENTRY: u64 = 0x10_0000;
const WRITE_A: u64 = 0x20_0000;
const WRITE_B: u64 = 0x30_5000;
const IN_PORT: u16 = 0x80;
const OUT_PORT: u16 = 0x81;

const CODE: &[u8] = &[
    0xc6, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0x01, // mov byte [0x200000], 1
    0xc6, 0x04, 0x25, 0x00, 0x50, 0x30, 0x00, 0x02, // mov byte [0x305000], 2
    0xe4, 0x80, // in al, 0x80
    0xe6, 0x81, // out 0x81, al
    0xf4, // hlt
    0xeb, 0xfd, // jmp hlt
];

struct TestVm {
    vm: Vm,
    ram: GuestRam,
    layout: MemoryLayout,
    vcpu: VcpuFd,
}

impl TestVm {
    /// The VM's state as a source captures it (vCPU, then VM), with `devices`.
    fn capture(&self, support: &StateSupport, devices: serde_json::Value) -> VmState {
        let vcpus = vec![state::capture_vcpu(support, 0, &self.vcpu).unwrap()];
        let vm = state::capture_vm(self.vm.fd()).unwrap();
        VmState::new(&self.layout, vcpus, vm, devices)
    }

    /// Restore `s` into this VM, as a destination does.
    fn restore(&self, support: &StateSupport, s: &VmState) -> Vec<VcpuRestoreReport> {
        let vcpus = std::slice::from_ref(&self.vcpu);
        state::restore(self.vm.fd(), support, vcpus, &self.layout, s).unwrap()
    }
}

/// A VM with one vCPU and empty RAM (a migration destination).
fn bare_vm() -> TestVm {
    let layout = MemoryLayout::new(16 << 20).unwrap();
    let ram = GuestRam::new(&layout, &MemoryBackend::Anon).unwrap();
    let mut vm = Vm::new(1).unwrap();
    vm.register_memory(&ram, false).unwrap();
    let vcpu = vcpu::create_vcpu(&vm, 0, 1, ENTRY, KvmBackend::detect().is_pvm()).unwrap();
    TestVm {
        vm,
        ram,
        layout,
        vcpu,
    }
}

/// A VM with the test guest loaded, about to run it.
fn test_vm() -> TestVm {
    let t = bare_vm();
    let mem = t.ram.memory();
    for (i, e) in arch::gdt::BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))
            .unwrap();
    }
    for page in arch::paging::identity_map_first_gib() {
        for (i, e) in page.entries.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(page.addr + i as u64 * 8))
                .unwrap();
        }
    }
    mem.write_slice(CODE, GuestAddress(ENTRY)).unwrap();
    t
}

/// Run until the `in`; answer it with `value`.
fn run_to_in(fd: &mut VcpuFd, value: u8) {
    loop {
        match fd.run().expect("KVM_RUN") {
            VcpuExit::IoIn(port, data) => {
                assert_eq!(port, IN_PORT);
                data[0] = value;
                return;
            }
            VcpuExit::IoOut(port, _) => panic!("unexpected out to {port:#x}"),
            _ => {}
        }
    }
}

/// Run until the `out`; returns the byte written.
fn run_to_out(fd: &mut VcpuFd) -> u8 {
    loop {
        match fd.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) => {
                assert_eq!(port, OUT_PORT);
                return data[0];
            }
            VcpuExit::IoIn(port, _) => panic!("unexpected in from {port:#x}"),
            _ => {}
        }
    }
}

#[test]
fn sync_reports_guest_and_vmm_writes_then_clears() {
    let mut t = test_vm();
    start_dirty_logging(&mut t.vm, &t.ram).unwrap();
    let bm = AtomicPageBitmap::new(&t.layout);
    run_to_in(&mut t.vcpu, 7);
    // The VMM writes a page too (as a device would).
    t.ram
        .memory()
        .write_obj(0xabu8, GuestAddress(0x40_0000))
        .unwrap();
    let stats = sync(&t.vm, &t.ram, &bm).unwrap();
    for gpa in [WRITE_A, WRITE_B] {
        assert!(
            bm.is_set(gpa),
            "guest write at {gpa:#x} not logged: {stats:?}"
        );
    }
    assert!(bm.is_set(0x40_0000), "VMM write not logged");
    assert!(stats.kvm_pages >= 2 && stats.vmm_pages == 1, "{stats:?}");
    // Nothing written since: the next sync adds nothing new of ours.
    let next = AtomicPageBitmap::new(&t.layout);
    sync(&t.vm, &t.ram, &next).unwrap();
    for gpa in [WRITE_A, WRITE_B, 0x40_0000] {
        assert!(!next.is_set(gpa), "{gpa:#x} reported twice");
    }
    // Guest writes the same pages again after the sync: logged again.
    state::flush_pending_exit(0, &mut t.vcpu).unwrap();
    let mut regs = t.vcpu.get_regs().unwrap();
    regs.rip = ENTRY;
    t.vcpu.set_regs(&regs).unwrap();
    run_to_in(&mut t.vcpu, 7);
    sync(&t.vm, &t.ram, &next).unwrap();
    assert!(next.is_set(WRITE_A) && next.is_set(WRITE_B));
    stop_dirty_logging(&mut t.vm, &t.ram).unwrap();
    assert!(sync(&t.vm, &t.ram, &next).is_err(), "logging is off");
}

#[test]
fn pending_in_is_completed_before_capture() {
    let mut t = test_vm();
    let support = StateSupport::probe(t.vm.kvm()).unwrap();
    run_to_in(&mut t.vcpu, 0x5a);
    // Without completing the exit, RAX lacks the value the VMM supplied.
    let before = state::capture_vcpu(&support, 0, &t.vcpu).unwrap();
    assert_ne!(before.regs.rax & 0xff, 0x5a);
    state::flush_pending_exit(0, &mut t.vcpu).unwrap();
    let after = state::capture_vcpu(&support, 0, &t.vcpu).unwrap();
    assert_eq!(after.regs.rax & 0xff, 0x5a);
    assert_eq!(after.regs.rip, ENTRY + 18, "at the out, past the in");
}

#[test]
fn vcpu_and_vm_state_round_trip_into_a_fresh_vm() {
    let mut src = test_vm();
    let support = StateSupport::probe(src.vm.kvm()).unwrap();
    run_to_in(&mut src.vcpu, 0x33);
    state::flush_pending_exit(0, &mut src.vcpu).unwrap();
    // Distinctive values in registers and MSRs.
    let mut regs = src.vcpu.get_regs().unwrap();
    regs.rbx = 0x1122_3344_5566_7788;
    regs.r15 = 0xdead_beef;
    src.vcpu.set_regs(&regs).unwrap();
    let kernel_gs_base = 0xc000_0102;
    let msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: kernel_gs_base,
        data: 0xffff_8880_1234_5000,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(src.vcpu.set_msrs(&msrs).unwrap(), 1);
    let vm_state = state::capture_vm(src.vm.fd()).unwrap();
    let saved = state::capture_vcpu(&support, 0, &src.vcpu).unwrap();
    assert!(saved.msrs.len() > 10, "{saved:?}");
    assert_eq!(saved.msr(kernel_gs_base), Some(0xffff_8880_1234_5000));
    let tsc = saved.msr(MSR_IA32_TSC).expect("TSC saved");

    let whole = VmState::new(
        &src.layout,
        vec![saved],
        vm_state,
        serde_json::json!({"serial": 1}),
    );
    let blob = whole.to_bytes().unwrap();
    let back = VmState::from_bytes(&blob).unwrap();
    assert_eq!(back.devices.get(), r#"{"serial":1}"#);

    // Fresh VM, guest memory copied over (the stream's job).
    let mut dst = test_vm();
    let mut buf = vec![0u8; 16 << 20];
    src.ram
        .memory()
        .read_slice(&mut buf, GuestAddress(0))
        .unwrap();
    dst.ram.memory().write_slice(&buf, GuestAddress(0)).unwrap();
    let reports = dst.restore(&support, &back);
    assert_eq!(reports.len(), 1);
    eprintln!(
        "restore report: {:x?}, {} MSRs saved",
        reports[0],
        back.vcpus[0].msrs.len()
    );

    let again = state::capture_vcpu(&support, 0, &dst.vcpu).unwrap();
    let saved = &back.vcpus[0];
    assert_eq!(again.regs, saved.regs);
    assert_eq!(again.sregs, saved.sregs);
    assert_eq!(again.fpu, saved.fpu);
    assert_eq!(again.xcrs, saved.xcrs);
    assert_eq!(again.mp_state, saved.mp_state);
    assert_eq!(again.cpuid, saved.cpuid);
    assert_eq!(again.msr(kernel_gs_base), Some(0xffff_8880_1234_5000));
    let tsc_again = again.msr(MSR_IA32_TSC).unwrap();
    assert!(
        tsc_again >= tsc && tsc_again - tsc < 100_000_000_000,
        "TSC continues from the saved value: {tsc} -> {tsc_again}"
    );
    let mut differ = Vec::new();
    for m in &saved.msrs {
        if again.msr(m.index) != Some(m.data) && !reports[0].refused_msrs.contains(&m.index) {
            differ.push((m.index, m.data, again.msr(m.index)));
        }
    }
    // Only time-like MSRs may move on.
    differ.retain(|(i, _, _)| *i != MSR_IA32_TSC);
    assert!(differ.is_empty(), "MSRs not restored: {differ:x?}");
    let vm_again = state::capture_vm(dst.vm.fd()).unwrap();
    let bytes = |c: &kvm_bindings::kvm_irqchip| serde_json::to_string(c).unwrap();
    assert_eq!(bytes(&vm_again.ioapic), bytes(&back.vm.ioapic));
    assert_eq!(bytes(&vm_again.pic_master), bytes(&back.vm.pic_master));
    assert_eq!(vm_again.pit.flags, back.vm.pit.flags);
    assert!(vm_again.clock.clock >= back.vm.clock.clock);

    // And the restored guest carries on: its `out` sends what its `in` read.
    assert_eq!(run_to_out(&mut dst.vcpu), 0x33);
}

#[test]
fn state_refuses_other_layout_vcpu_count_and_version() {
    let t = test_vm();
    let support = StateSupport::probe(t.vm.kvm()).unwrap();
    let s = t.capture(&support, serde_json::Value::Null);
    let bigger = MemoryLayout::new(32 << 20).unwrap();
    let e = s.check_destination(&bigger, 1).unwrap_err();
    assert!(matches!(e, StateError::LayoutMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("+16 MiB") && e.to_string().contains("+32 MiB"),
        "{e}"
    );
    let e = s.check_destination(&t.layout, 2).unwrap_err();
    assert!(
        e.to_string().contains("1 vCPUs, the destination has 2"),
        "{e}"
    );
    s.check_destination(&t.layout, 1).unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&s.to_bytes().unwrap()).unwrap();
    json["version"] = 99.into();
    let e = VmState::from_bytes(&serde_json::to_vec(&json).unwrap()).unwrap_err();
    assert!(
        e.to_string().contains("unsupported VM state version 99"),
        "{e}"
    );
    let e = VmState::from_bytes(b"{\"version\":1}").unwrap_err();
    assert!(matches!(e, StateError::Deserialize(_)), "{e}");
}

/// The building blocks together: a running guest is pre-copied in two
/// rounds (the second carries what it wrote meanwhile), paused, its state
/// written, and a fresh VM restored from the stream carries on.
#[test]
fn live_migration_of_a_running_guest_through_a_stream() {
    let mut src = test_vm();
    let support = StateSupport::probe(src.vm.kvm()).unwrap();
    start_dirty_logging(&mut src.vm, &src.ram).unwrap();
    let mut w = StreamWriter::new(Vec::new());
    w.header(&layout_ranges(&src.layout), super::stream::FLAG_LIVE)
        .unwrap();
    let all = AtomicPageBitmap::new(&src.layout);
    all.set_all();
    assert_eq!(w.send_bitmap(src.ram.memory(), 1, &all).unwrap(), 4096);
    let round1_bytes = w.stats().page_bytes;
    assert!(
        round1_bytes < 16 * 4096,
        "zero pages cost nothing: {round1_bytes}"
    );

    // The guest runs (writes two pages) while round 1 is "on the wire".
    run_to_in(&mut src.vcpu, 0x77);
    let dirty = AtomicPageBitmap::new(&src.layout);
    sync(&src.vm, &src.ram, &dirty).unwrap();
    assert!(dirty.is_set(WRITE_A) && dirty.is_set(WRITE_B));
    let sent = w.send_bitmap(src.ram.memory(), 2, &dirty).unwrap();
    assert!(sent >= 2);

    // Stop and copy.
    state::flush_pending_exit(0, &mut src.vcpu).unwrap();
    sync(&src.vm, &src.ram, &dirty).unwrap();
    w.send_bitmap(src.ram.memory(), 3, &dirty).unwrap();
    let blob = src
        .capture(&support, serde_json::json!({}))
        .to_bytes()
        .unwrap();
    w.state(&blob).unwrap();
    let (stream, _) = w.finish().unwrap();

    let mut dst = bare_vm();
    let restored = StreamReader::new(&stream[..])
        .restore(dst.ram.memory(), &dst.layout, Destination::Fresh)
        .unwrap();
    assert!(
        restored.last_round >= 2,
        "round 3 may have had nothing to send"
    );
    let state = VmState::from_bytes(&restored.state).unwrap();
    dst.restore(&support, &state);
    let byte = |t: &TestVm, gpa| t.ram.memory().read_obj::<u8>(GuestAddress(gpa)).unwrap();
    assert_eq!((byte(&dst, WRITE_A), byte(&dst, WRITE_B)), (1, 2));
    assert_eq!(
        run_to_out(&mut dst.vcpu),
        0x77,
        "the destination carries on"
    );
}
