//! Monotonic clock (TSC calibrated once against the LAPIC timer, whose KVM
//! bus clock is 1 GHz) and sleeping with the LAPIC one-shot timer.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::apic;
use crate::io::rdtsc;

static TSC0: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per TSC tick, as a 32.32 fixed-point number.
static NS_PER_TICK_FP: AtomicU64 = AtomicU64::new(0);

/// Calibration window in LAPIC counts (= ns).
const CALIBRATE_NS: u32 = 20_000_000;

/// Measures the TSC frequency over 20 ms of LAPIC timer countdown.
pub fn calibrate() {
    apic::timer_start_masked(u32::MAX);
    let c0 = apic::timer_current();
    let t0 = rdtsc();
    let mut c1;
    loop {
        c1 = apic::timer_current();
        if c0.wrapping_sub(c1) >= CALIBRATE_NS || c1 == 0 {
            break;
        }
    }
    let t1 = rdtsc();
    apic::timer_stop();
    let ns = u64::from(c0.wrapping_sub(c1)).max(1);
    let ticks = (t1 - t0).max(1);
    NS_PER_TICK_FP.store(
        ((u128::from(ns) << 32) / u128::from(ticks)) as u64,
        Ordering::Relaxed,
    );
    TSC0.store(t0, Ordering::Relaxed);
}

/// Nanoseconds since calibration.
pub fn now_ns() -> u64 {
    let d = rdtsc().wrapping_sub(TSC0.load(Ordering::Relaxed));
    ((u128::from(d) * u128::from(NS_PER_TICK_FP.load(Ordering::Relaxed))) >> 32) as u64
}

/// Longest single timer arm (fits the 32-bit count at 1 ns).
const MAX_ARM_NS: u64 = 1_000_000_000;

/// Arms the one-shot timer to fire at `deadline_ns` (capped to 1 s ahead).
/// Returns false if the deadline already passed.
pub fn arm(deadline_ns: u64) -> bool {
    let now = now_ns();
    if now >= deadline_ns {
        return false;
    }
    apic::timer_oneshot_ns((deadline_ns - now).min(MAX_ARM_NS) as u32);
    true
}

pub fn disarm() {
    apic::timer_stop();
}
