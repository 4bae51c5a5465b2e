//! `--balloon k=v,...`: the balloon device's switches.

use api::types::MAX_STATS_INTERVAL_S;
use vmm::BalloonConfig;

pub const BALLOON_HELP: &str = "deflate_on_oom=on|off, must_tell_host=on|off, stats_interval=SECS, \
free_page_hint=on|off, free_page_reporting=on|off, page_poison=on|off, hint_discard=on|off, \
sg=on|off (chunked inflate/deflate, Blimp-experimental feature bit 23), notify_suppression=on|off";

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!("--balloon {key}={v}: expected on or off")),
    }
}

/// A stats polling interval in seconds, within the bound the API applies
/// to `PATCH /balloon/statistics` (one limit for both ways in).
fn stats_interval(key: &str, v: &str) -> Result<u32, String> {
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

/// Parse the value of `--balloon` (may be empty: all defaults).
pub fn parse(s: &str) -> Result<BalloonConfig, String> {
    let mut o = BalloonConfig::default();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("--balloon '{item}': expected key=value ({BALLOON_HELP})"))?;
        match k {
            "deflate_on_oom" => o.deflate_on_oom = on_off(k, v)?,
            "must_tell_host" => o.must_tell_host = on_off(k, v)?,
            "free_page_hint" => o.free_page_hint = on_off(k, v)?,
            "free_page_reporting" => o.free_page_reporting = on_off(k, v)?,
            "page_poison" => o.page_poison = on_off(k, v)?,
            "hint_discard" => o.hint_discard = on_off(k, v)?,
            "sg" => o.sg = on_off(k, v)?,
            "notify_suppression" => o.notify_suppression = on_off(k, v)?,
            "stats_interval" | "stats_polling_interval_s" => {
                o.stats_polling_interval_s = stats_interval(k, v)?
            }
            _ => {
                return Err(format!(
                    "--balloon: unknown option '{k}' (known: {BALLOON_HELP})"
                ));
            }
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn errors_name_the_option() {
        assert!(
            parse("deflate_on_oom=maybe")
                .unwrap_err()
                .contains("deflate_on_oom=maybe")
        );
        assert!(parse("frobnicate=on").unwrap_err().contains("'frobnicate'"));
        assert!(
            parse("stats_interval=-1")
                .unwrap_err()
                .contains("stats_interval=-1")
        );
        assert!(parse("deflate_on_oom").unwrap_err().contains("key=value"));
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
