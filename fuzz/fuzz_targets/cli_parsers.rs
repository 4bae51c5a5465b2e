//! The command line's size parser (`--memory`, `--balloon-target`) and the
//! `--balloon` option parser, fed arbitrary strings.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/size.rs"]
#[allow(dead_code)]
mod size;

#[path = "../../src/balloon_opts.rs"]
#[allow(dead_code)]
mod balloon_opts;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = size::parse_size(s) {
        // A parsed size is stable: its byte count parses back to itself.
        assert_eq!(size::parse_size(&format!("{n}B")), Ok(n), "{s:?}");
        assert_eq!(
            size::parse_size(&format!("{}K", n >> 10)).map(|k| k >> 10),
            Ok(n >> 10)
        );
    }
    if let Ok(cfg) = balloon_opts::parse(s) {
        // Values within the documented bounds.
        assert!(
            cfg.stats_polling_interval_s <= api::types::MAX_STATS_INTERVAL_S,
            "{s:?}: {cfg:?}"
        );
    }
});
