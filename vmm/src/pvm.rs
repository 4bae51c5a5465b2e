//! Detecting the host's KVM backend. On PVM (`kvm_pvm`), guest ring-0 code
//! is software-emulated and a few instructions are not emulated at all;
//! Blimp switches on a compatibility mode by itself.

use std::path::Path;

/// The kind of KVM this host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmBackend {
    /// Hardware virtualization (kvm_intel / kvm_amd).
    Hardware,
    /// PVM: paravirtualized KVM without VMX/SVM.
    Pvm,
}

impl KvmBackend {
    pub fn detect() -> Self {
        if Path::new("/sys/module/kvm_pvm").exists() {
            KvmBackend::Pvm
        } else {
            KvmBackend::Hardware
        }
    }

    pub fn is_pvm(self) -> bool {
        self == KvmBackend::Pvm
    }
}
