//! x86_64 boot layout for Blimp: e820, boot_params, page tables, GDT, CPUID, MSRs, MP table.
