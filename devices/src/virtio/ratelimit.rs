//! Rate-limited logging for messages a guest can trigger at will.
//!
//! A hostile or buggy driver can make the device log on every queue kick; each
//! call site gets its own [`LogLimiter`] (via [`warn_limited!`] /
//! [`error_limited!`]) that lets a burst through per window and then counts
//! what it swallowed, reporting the count with the next message let through.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Messages let through per window and call site.
pub const BURST: u64 = 10;
/// Window length in milliseconds.
pub const WINDOW_MS: u64 = 5_000;

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One call site's budget. `const`-constructible so it can live in a `static`.
#[derive(Debug)]
pub struct LogLimiter {
    window_start_ms: AtomicU64,
    in_window: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimiter {
    pub const fn new() -> Self {
        Self {
            window_start_ms: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if a message may be logged now (`n` = messages swallowed
    /// since the last one let through), `None` if it must be dropped.
    pub fn check(&self) -> Option<u64> {
        self.check_at(now_ms())
    }

    fn check_at(&self, now: u64) -> Option<u64> {
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= WINDOW_MS || self.in_window.load(Ordering::Relaxed) == 0 {
            // Races between threads only make the budget slightly fuzzy.
            self.window_start_ms.store(now, Ordering::Relaxed);
            self.in_window.store(0, Ordering::Relaxed);
        }
        if self.in_window.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `log::log!` at `level` with a per-call-site rate limit (each expansion
/// has its own limiter); see [`warn_limited!`] and [`error_limited!`].
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::virtio::ratelimit::LogLimiter =
            $crate::virtio::ratelimit::LogLimiter::new();
        if let Some(dropped) = LIMITER.check() {
            if dropped > 0 {
                log::log!($level, "({} similar messages suppressed) {}", dropped, format_args!($($arg)+));
            } else {
                log::log!($level, $($arg)+);
            }
        }
    }};
}

/// `log::warn!` with a per-call-site rate limit.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!(log::Level::Warn, $($arg)+)
    };
}

/// `log::error!` with a per-call-site rate limit.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!(log::Level::Error, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_suppress_then_report() {
        let l = LogLimiter::new();
        for _ in 0..BURST {
            assert_eq!(l.check_at(1), Some(0));
        }
        assert_eq!(l.check_at(2), None);
        assert_eq!(l.check_at(3), None);
        // New window: the next message carries the suppressed count.
        assert_eq!(l.check_at(1 + WINDOW_MS), Some(2));
        assert_eq!(l.check_at(2 + WINDOW_MS), Some(0));
    }

    #[test]
    fn macros_compile_and_do_not_panic() {
        for i in 0..100 {
            crate::warn_limited!("test warning {i}");
            crate::error_limited!("test error {}", i);
        }
    }
}
