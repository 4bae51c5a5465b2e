//! `--balloon k[=v],...`: the balloon device's switches.
//!
//! One vocabulary for the parser, `--help` and README: [`KEYS`]. A bare
//! switch means `=on` (`--balloon deflate_on_oom,free_page_hint`).

use api::size::{self, Granule};
use api::types::MAX_STATS_INTERVAL_S;
use vmm::BalloonConfig;

/// Every key `--balloon` takes, with its value and default, as `--help`
/// and README list them.
pub const KEYS: &[(&str, &str)] = &[
    ("deflate_on_oom", "[=on|off] (default off)"),
    ("must_tell_host", "[=on|off] (default on)"),
    (
        "stats_interval",
        "=SECS (default 0 = off; alias stats_polling_interval_s)",
    ),
    ("free_page_hint", "[=on|off] (default off)"),
    ("free_page_reporting", "[=on|off] (default off)"),
    ("page_poison", "[=on|off] (default off)"),
    ("hint_discard", "[=on|off] (default off)"),
    (
        "sg",
        "[=on|off] (default off; chunked inflate/deflate ranges, Blimp-experimental feature bit 23)",
    ),
    (
        "notify_suppression",
        "[=on|off] (default on; VRING_USED_F_NO_NOTIFY while a queue is served)",
    ),
    (
        "floor",
        "=SIZE (default 64M, at most a quarter of guest memory; 0 = none)",
    ),
];

/// The keys with their values, for error messages.
fn known() -> String {
    KEYS.iter()
        .map(|(k, v)| format!("{k}{}", v.split(" (").next().unwrap_or("")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `--balloon` sets.
#[derive(Debug, Clone, Copy, Default)]
pub struct BalloonOpts {
    pub device: BalloonConfig,
    /// `floor=SIZE` in bytes (`None`: the default for the guest's size).
    pub floor_bytes: Option<u64>,
}

fn on_off(key: &str, v: Option<&str>) -> Result<bool, String> {
    match v {
        None | Some("on" | "true" | "1" | "yes") => Ok(true),
        Some("off" | "false" | "0" | "no") => Ok(false),
        Some(v) => Err(format!("--balloon {key}={v}: expected on or off")),
    }
}

/// A stats polling interval in seconds, within the bound the API applies
/// to `PATCH /balloon/statistics` (one limit for both ways in).
fn stats_interval(key: &str, v: Option<&str>) -> Result<u32, String> {
    let Some(v) = v else {
        return Err(format!(
            "--balloon {key}: needs a value in seconds, e.g. {key}=1 (0 turns stats polling off)"
        ));
    };
    let secs: u32 = v.parse().map_err(|_| {
        format!(
            "--balloon {key}={v}: expected a whole number of seconds (0 turns stats polling off)"
        )
    })?;
    if secs > MAX_STATS_INTERVAL_S {
        return Err(format!(
            "--balloon {key}={v}: out of range (0 to {MAX_STATS_INTERVAL_S} seconds)"
        ));
    }
    Ok(secs)
}

fn floor(key: &str, v: Option<&str>) -> Result<u64, String> {
    let Some(v) = v else {
        return Err(format!(
            "--balloon {key}: needs a size, e.g. {key}=64M (0 = no floor)"
        ));
    };
    size::parse(v, Granule::Page).map_err(|e| format!("--balloon {key}={v}: {e}"))
}

/// Parse the value of `--balloon` (may be empty: all defaults).
pub fn parse_opts(s: &str) -> Result<BalloonOpts, String> {
    let mut o = BalloonOpts::default();
    let d = &mut o.device;
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (item, None),
        };
        match k {
            "deflate_on_oom" => d.deflate_on_oom = on_off(k, v)?,
            "must_tell_host" => d.must_tell_host = on_off(k, v)?,
            "free_page_hint" => d.free_page_hint = on_off(k, v)?,
            "free_page_reporting" => d.free_page_reporting = on_off(k, v)?,
            "page_poison" => d.page_poison = on_off(k, v)?,
            "hint_discard" => d.hint_discard = on_off(k, v)?,
            "sg" => d.sg = on_off(k, v)?,
            "notify_suppression" => d.notify_suppression = on_off(k, v)?,
            "stats_interval" | "stats_polling_interval_s" => {
                d.stats_polling_interval_s = stats_interval(k, v)?
            }
            "floor" => o.floor_bytes = Some(floor(k, v)?),
            _ => {
                return Err(format!(
                    "--balloon: unknown option '{k}' (known: {})",
                    known()
                ));
            }
        }
    }
    Ok(o)
}

impl BalloonOpts {
    /// Refuse a `floor=` above the guest's memory: the guest could never
    /// keep it, so every nonzero balloon target would be refused later,
    /// one request at a time. A floor equal to the memory is allowed (a
    /// balloon that may never inflate, e.g. for its statistics).
    pub fn check_floor(&self, guest_bytes: u64) -> Result<(), String> {
        match self.floor_bytes {
            Some(floor) if floor > guest_bytes => Err(format!(
                "--balloon floor={} is more than the guest's memory (--memory {}): every balloon target would be refused; the floor is what the balloon must leave the guest, at most its memory (floor=0: none)",
                size::format_bytes(floor),
                size::format_bytes(guest_bytes)
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<BalloonConfig, String> {
        parse_opts(s).map(|o| o.device)
    }

    #[test]
    fn defaults_and_switches() {
        let d = parse("").unwrap();
        assert!(d.must_tell_host && !d.deflate_on_oom && d.stats_polling_interval_s == 0);
        let o = parse("deflate_on_oom=on,stats_interval=2,must_tell_host=off,free_page_hint=on,free_page_reporting=on,page_poison=on,hint_discard=on").unwrap();
        assert!(o.deflate_on_oom && !o.must_tell_host && o.free_page_hint && o.free_page_reporting);
        assert!(o.page_poison && o.hint_discard);
        assert_eq!(o.stats_polling_interval_s, 2);
        assert!(!d.sg && d.notify_suppression);
        let o = parse("sg=on,notify_suppression=off").unwrap();
        assert!(o.sg && !o.notify_suppression);
        assert!(parse("sg=2").unwrap_err().contains("sg=2"));
    }

    /// Issue #16: README's bare switches mean `=on`; both forms work.
    #[test]
    fn bare_switches_mean_on() {
        let o = parse("deflate_on_oom,free_page_hint,free_page_reporting,page_poison,hint_discard")
            .unwrap();
        assert!(o.deflate_on_oom && o.free_page_hint && o.free_page_reporting);
        assert!(o.page_poison && o.hint_discard && o.must_tell_host);
        let o = parse("must_tell_host=off,deflate_on_oom").unwrap();
        assert!(!o.must_tell_host && o.deflate_on_oom);
        assert_eq!(
            parse("deflate_on_oom").unwrap(),
            parse("deflate_on_oom=on").unwrap()
        );
        // Switches that need a value say so.
        let e = parse("stats_interval").unwrap_err();
        assert!(
            e.contains("stats_interval") && e.contains("needs a value"),
            "{e}"
        );
        let e = parse_opts("floor").unwrap_err();
        assert!(e.contains("floor") && e.contains("needs a size"), "{e}");
    }

    #[test]
    fn floor_is_a_size() {
        assert_eq!(parse_opts("").unwrap().floor_bytes, None);
        assert_eq!(
            parse_opts("floor=128M").unwrap().floor_bytes,
            Some(128 << 20)
        );
        assert_eq!(parse_opts("floor=0").unwrap().floor_bytes, Some(0));
        assert_eq!(
            parse_opts("floor=1.5G").unwrap().floor_bytes,
            Some(1536 << 20)
        );
        let e = parse_opts("floor=-5").unwrap_err();
        assert!(e.contains("floor=-5") && e.contains("negative"), "{e}");
    }

    #[test]
    fn a_floor_above_the_guest_memory_is_refused() {
        let o = parse_opts("floor=4G").unwrap();
        let e = o.check_floor(1 << 30).unwrap_err();
        assert!(
            e.starts_with("--balloon floor=4 GiB is more than the guest's memory (--memory 1 GiB)"),
            "{e}"
        );
        assert_eq!(o.check_floor(4 << 30), Ok(()), "equal: allowed");
        assert_eq!(
            parse_opts("").unwrap().check_floor(1 << 20),
            Ok(()),
            "default"
        );
        assert_eq!(parse_opts("floor=0").unwrap().check_floor(0), Ok(()));
    }

    #[test]
    fn errors_name_the_option() {
        assert!(
            parse("deflate_on_oom=maybe")
                .unwrap_err()
                .contains("deflate_on_oom=maybe")
        );
        let e = parse("frobnicate=on").unwrap_err();
        assert!(
            e.contains("'frobnicate'") && e.contains("deflate_on_oom[=on|off]"),
            "{e}"
        );
        assert!(e.contains("floor=SIZE"), "{e}");
        assert!(parse("frobnicate").unwrap_err().contains("'frobnicate'"));
        assert!(
            parse("stats_interval=-1")
                .unwrap_err()
                .contains("stats_interval=-1")
        );
    }

    /// Every key the parser takes is in KEYS and the error's list, and
    /// every listed key parses (one vocabulary).
    #[test]
    fn one_vocabulary() {
        for (k, v) in KEYS {
            assert!(known().contains(k), "{k}");
            let item = if v.starts_with('[') {
                k.to_string()
            } else if *k == "floor" {
                format!("{k}=32M")
            } else {
                format!("{k}=1")
            };
            parse_opts(&item).unwrap_or_else(|e| panic!("{item}: {e}"));
        }
    }

    /// Found by fuzz/cli_parsers: the CLI took any u32 while the API caps
    /// the interval at a day.
    #[test]
    fn stats_interval_is_bounded_like_the_api() {
        assert_eq!(
            parse("stats_interval=86400")
                .unwrap()
                .stats_polling_interval_s,
            MAX_STATS_INTERVAL_S
        );
        let e = parse("stats_interval=00100136736").unwrap_err();
        assert!(
            e.contains("stats_interval=00100136736") && e.contains("out of range"),
            "{e}"
        );
        assert!(parse("stats_interval=86401").is_err());
    }
}
