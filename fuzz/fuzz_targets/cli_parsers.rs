//! The one size parser (`--memory`, `--balloon-target`, `balloon set`, the
//! API's size strings) and the `--balloon` option parser, fed arbitrary
//! strings.
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
});
