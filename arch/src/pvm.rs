//! What a Linux guest needs on a PVM host (kvm_pvm), as data. Measured in
//! `shared/docs/kvm-here.md`: PVM's instruction emulator fails on xsave/xrstor,
//! several CPUID-advertised instructions (popcnt, clac/stac, ...), and FSGSBASE.

/// Kernel command-line additions Blimp appends in PVM compatibility mode:
/// `noxsave` and `nofsgsbase` avoid instructions the emulator refuses;
/// `clearcpuid=` hides CPU features (X86_FEATURE numbers, word*32+bit) that
/// the host CPU has but the emulator cannot run (popcnt, clac/stac, ...);
/// `init_on_alloc=0 mitigations=off` skip work that costs seconds when ring 0
/// is emulated. Other guests (the test guest) ignore these words.
pub const PVM_CMDLINE: &str =
    "noxsave clearcpuid=150,151,154,308,534,112,297,580 nofsgsbase init_on_alloc=0 mitigations=off";
