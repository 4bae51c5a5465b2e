//! The one size parser (`--memory`, `--balloon-target`, `balloon set`, the
//! API's size strings), the `--balloon` option parser and the
//! `--balloon-policy` parser, fed arbitrary strings.
#![no_main]

use libfuzzer_sys::fuzz_target;

use api::size::{self, Granule};

#[path = "../../src/balloon_opts.rs"]
#[allow(dead_code)]
mod balloon_opts;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = size::parse(s, Granule::Page) {
        // A parsed size is stable: its byte count parses back to itself,
        // and it is whole pages.
        assert_eq!(n % 4096, 0, "{s:?}");
        assert_eq!(size::parse(&format!("{n}B"), Granule::Page), Ok(n), "{s:?}");
        assert_eq!(size::parse(&format!("{}K", n >> 10), Granule::Page), Ok(n));
    }
    if let Ok(mib) = size::parse_size(s) {
        assert_eq!(size::parse(s, Granule::Byte), Ok(mib << 20), "{s:?}");
    }
    if let Ok(cfg) = balloon_opts::parse_opts(s).map(|o| o.device) {
        // Values within the documented bounds.
        assert!(
            cfg.stats_polling_interval_s <= api::types::MAX_STATS_INTERVAL_S,
            "{s:?}: {cfg:?}"
        );
    }
    if let Ok((_, p)) = api::policy::PolicySettings::parse_cli(s) {
        // Values within the documented bounds; the guest check never panics.
        assert!((0.0..=1.0).contains(&p.headroom_fraction), "{s:?}: {p:?}");
        assert!(p.floor_mib <= api::policy::MAX_SIZE_MIB, "{s:?}: {p:?}");
        assert!(p.settle_ms <= api::policy::MAX_DURATION_MS, "{s:?}: {p:?}");
        assert!(p.host_psi_high >= 0.0 && p.major_faults_per_s >= 0.0);
        let _ = p.check(1 << 30);
    }
});
