//! The KVM VM: its file descriptor, memslots, in-kernel irqchip and PIT.

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};

use crate::memory::GuestRam;

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "cannot open /dev/kvm: {0} (is KVM available on this host, and may this user open /dev/kvm?)"
    )]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("unsupported KVM API version {0} (12 is required)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("this host's KVM supports at most {max} vCPUs, {asked} were asked for")]
    TooManyVcpus { max: usize, asked: usize },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// A KVM VM with its memslots registered.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    slots: Vec<kvm_userspace_memory_region>,
}

impl Vm {
    /// Open KVM and create a VM with an in-kernel irqchip and PIT.
    pub fn new(vcpus: usize) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::ApiVersion(version));
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (kvm_ioctls::Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let max = kvm.get_max_vcpus();
        if vcpus > max {
            return Err(VmError::TooManyVcpus { max, asked: vcpus });
        }
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(arch::layout::KVM_TSS_ADDR as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        Ok(Self {
            kvm,
            fd,
            slots: Vec::new(),
        })
    }

    /// Register every RAM region of `ram` as a memslot.
    pub fn register_memory(&mut self, ram: &GuestRam, log_dirty: bool) -> Result<(), VmError> {
        self.slots.clear();
        for (i, (gpa, size, host)) in ram.slots().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: i as u32,
                flags: if log_dirty {
                    kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: `host` is the start of a mapping of `size` bytes owned by
            // `ram`, which outlives the VM (the Vmm drops the VM first).
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
            self.slots.push(region);
        }
        Ok(())
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn slots(&self) -> &[kvm_userspace_memory_region] {
        &self.slots
    }
}
