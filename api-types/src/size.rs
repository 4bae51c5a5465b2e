//! The one parser of human memory sizes in Blimp: `--memory`,
//! `--balloon-target`, `blimp balloon set`, the `balloon_floor` switch of
//! `--balloon` and the API's `target_mib` given as a string all go through
//! [`parse`]: `512M`, `1G`, `256MiB`, `1.5G`, `0`.
//!
//! A plain number means MiB. Units are binary and case-insensitive:
//! `B`, `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB`; `KB`, `MB`, `GB`, `TB`
//! are accepted as the same binary units (as QEMU's `-m 512M`, Cloud
//! Hypervisor's `size=512M` and most users mean them: nobody sizes guest
//! RAM in powers of ten). A decimal fraction is fine when the result is a
//! whole number of the unit the caller counts in (`1.5G` = 1536 MiB; `1.3M`
//! is not a whole number of 4 KiB pages). Negative sizes are refused with
//! their own message.

/// Why a size did not parse. Every message names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("empty size: expected a number with an optional unit, e.g. 512M, 1G, 256MiB")]
    Empty,
    #[error("invalid size {0:?}: a size cannot be negative")]
    Negative(String),
    #[error("invalid size {0:?}: expected a number with an optional unit, e.g. 512M, 1G, 256MiB")]
    Syntax(String),
    #[error(
        "invalid size {0:?}: unknown unit (use B, K, M, G or T; KiB/MiB/GiB/TiB and KB/MB/GB/TB mean the same binary units)"
    )]
    Unit(String),
    #[error("invalid size {input:?}: not a whole number of {granule}")]
    NotWhole {
        input: String,
        granule: &'static str,
    },
    #[error("invalid size {0:?}: too large")]
    TooLarge(String),
    /// A whole JSON number written with a fraction or an exponent
    /// (`512.0`, `1e3`): JSON sizes are integers.
    #[error(
        "invalid size {0:?}: a JSON number of MiB must be an integer (write it without a decimal point or exponent, or give a string with a unit, e.g. \"512M\")"
    )]
    NotInteger(String),
}

/// What a size must be a whole number of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granule {
    Byte,
    /// 4 KiB, the page the balloon and guest RAM count in.
    Page,
    Mib,
}

impl Granule {
    fn bytes(self) -> u128 {
        match self {
            Granule::Byte => 1,
            Granule::Page => u128::from(devices::PAGE_SIZE),
            Granule::Mib => 1 << 20,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Granule::Byte => "bytes",
            Granule::Page => "4 KiB pages",
            Granule::Mib => "MiB",
        }
    }
}

fn unit_bytes(unit: &str) -> Option<u128> {
    let u = unit.to_ascii_lowercase();
    let shift = match u.as_str() {
        "b" => 0,
        "k" | "kb" | "kib" => 10,
        "" | "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    Some(1u128 << shift)
}

/// Parse a size into bytes, which must be a whole number of `granule`.
pub fn parse(input: &str, granule: Granule) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    if let Some(rest) = s.strip_prefix('-')
        && rest.starts_with(|c: char| c.is_ascii_digit() || c == '.')
    {
        return Err(SizeError::Negative(input.to_string()));
    }
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(num_end);
    let unit = unit.trim_start();
    if num.is_empty() {
        return Err(SizeError::Syntax(input.to_string()));
    }
    let mult = unit_bytes(unit).ok_or_else(|| SizeError::Unit(input.to_string()))?;
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int_part.is_empty() && frac_part.is_empty()
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
        || num.ends_with('.')
    {
        return Err(SizeError::Syntax(input.to_string()));
    }
    let too_large = || SizeError::TooLarge(input.to_string());
    let not_whole = || SizeError::NotWhole {
        input: input.to_string(),
        granule: granule.name(),
    };
    // Exact arithmetic in u128, bounded: trailing zeros say nothing, and
    // more than 12 decimals is no whole number of pages or MiB.
    let frac_part = frac_part.trim_end_matches('0');
    if frac_part.len() > 12 {
        return Err(not_whole());
    }
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse::<u64>().map_err(|_| too_large())?.into()
    };
    let frac: u128 = if frac_part.is_empty() {
        0
    } else {
        frac_part
            .parse::<u64>()
            .map_err(|_| SizeError::Syntax(input.to_string()))?
            .into()
    };
    let scale = 10u128.pow(frac_part.len() as u32);
    // bytes = (int + frac/scale) * mult, kept exact as (int*scale + frac) * mult / scale.
    let scaled = int
        .checked_mul(scale)
        .and_then(|v| v.checked_add(frac))
        .and_then(|v| v.checked_mul(mult))
        .ok_or_else(too_large)?;
    if !scaled.is_multiple_of(scale) {
        return Err(not_whole());
    }
    let bytes = scaled / scale;
    if !bytes.is_multiple_of(granule.bytes()) {
        return Err(not_whole());
    }
    u64::try_from(bytes).map_err(|_| too_large())
}

/// Parse a size into MiB (a whole number of MiB).
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    parse(input, Granule::Mib).map(|b| b >> 20)
}

/// Parse a size into bytes (a whole number of 4 KiB pages): guest RAM and
/// the balloon count in pages.
pub fn parse_page_bytes(input: &str) -> Result<u64, SizeError> {
    parse(input, Granule::Page)
}

/// serde: a size in MiB given as a JSON integer, or as a string in the
/// syntax of [`parse`] (`"1.5G"`, `"512MB"`); see [`mib_of_json`].
pub fn deserialize_mib<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = <serde_json::Value as serde::Deserialize>::deserialize(d)?;
    mib_of_json(&v).map_err(serde::de::Error::custom)
}

/// A size in MiB from JSON: an integer, or a string in the syntax of
/// [`parse`]. A negative, fractional or non-integer number (`512.0`,
/// `1e3`) gets its own message naming it instead of serde's type error;
/// none is taken.
pub fn mib_of_json(v: &serde_json::Value) -> Result<u64, String> {
    match v {
        serde_json::Value::Number(n) => mib_of_number(n).map_err(|e| e.to_string()),
        serde_json::Value::String(s) => parse_size(s).map_err(|e| e.to_string()),
        other => Err(format!(
            "invalid size {other}: expected a number of MiB or a string like \"1.5G\""
        )),
    }
}

/// A JSON number as MiB: only a non-negative integer is one. A float is
/// refused even when whole (`512.0`): JSON sizes are integers, and a float
/// beyond 2^53 is not exact.
fn mib_of_number(n: &serde_json::Number) -> Result<u64, SizeError> {
    let input = n.to_string();
    if let Some(v) = n.as_u64() {
        return Ok(v);
    }
    let f = n.as_f64().unwrap_or(0.0);
    if n.as_i64().is_some() || f < 0.0 {
        Err(SizeError::Negative(input))
    } else if f.fract() != 0.0 {
        Err(SizeError::NotWhole {
            input,
            granule: "MiB (give a string with a unit, e.g. \"1.5G\")",
        })
    } else if n.is_f64() && f < u64::MAX as f64 {
        Err(SizeError::NotInteger(input))
    } else {
        Err(SizeError::TooLarge(input))
    }
}

/// `1536` → `"1.5 GiB"`, `512` → `"512 MiB"`.
pub fn format_mib(mib: u64) -> String {
    if mib == 0 {
        return "0 MiB".into();
    }
    format_bytes(mib.saturating_mul(1 << 20))
}

/// [`format_bytes`], with `0` as `0 MiB`.
pub fn format_bytes_or_zero(bytes: u64) -> String {
    if bytes == 0 {
        "0 MiB".into()
    } else {
        format_bytes(bytes)
    }
}

/// Bytes with a binary unit and at most two decimals (trailing zeros dropped).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut v = bytes as f64;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_sizes() {
        for (s, mib) in [
            ("512", 512),
            ("0", 0),
            ("512M", 512),
            ("512m", 512),
            ("512MB", 512),
            ("256MiB", 256),
            ("256 MiB", 256),
            (" 1G ", 1024),
            ("1g", 1024),
            ("1GiB", 1024),
            ("1.5G", 1536),
            ("0.5GiB", 512),
            ("1T", 1 << 20),
            ("2048K", 2),
            ("1048576B", 1),
            (".5G", 512),
        ] {
            assert_eq!(parse_size(s), Ok(mib), "{s}");
        }
    }

    #[test]
    fn bad_sizes() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("  "), Err(SizeError::Empty));
        for s in [
            "abc", "1..5G", "1.", ".", "1.2.3M", "M", "+5", "5 M B", "0x10",
        ] {
            assert!(
                matches!(
                    parse_size(s),
                    Err(SizeError::Syntax(_)) | Err(SizeError::Unit(_))
                ),
                "{s}: {:?}",
                parse_size(s)
            );
        }
        assert!(matches!(parse_size("5X"), Err(SizeError::Unit(_))));
        assert!(matches!(parse_size("512Mi"), Err(SizeError::Unit(_))));
        assert!(matches!(parse_size("1K"), Err(SizeError::NotWhole { .. })));
        assert!(matches!(
            parse_size("1.3M"),
            Err(SizeError::NotWhole { .. })
        ));
        assert!(matches!(
            parse_size("100B"),
            Err(SizeError::NotWhole { .. })
        ));
        for s in ["-5", "-1", "-1.5G", " -0", "-.5M"] {
            assert_eq!(parse_size(s), Err(SizeError::Negative(s.into())), "{s}");
        }
        assert!(matches!(
            parse_size("99999999999999999999999"),
            Err(SizeError::TooLarge(_))
        ));
        assert!(matches!(
            parse_size("18446744073709551615T"),
            Err(SizeError::TooLarge(_))
        ));
    }

    /// The table of issue #16: what `--memory`, `--balloon-target`,
    /// `balloon set` and the API all get, with the message a user sees.
    #[test]
    fn table() {
        for (input, granule, want) in [
            ("1.5G", Granule::Mib, Ok(1536 << 20)),
            ("1.5G", Granule::Page, Ok(1536 << 20)),
            ("512MB", Granule::Mib, Ok(512 << 20)),
            ("512mb", Granule::Page, Ok(512 << 20)),
            ("2GB", Granule::Mib, Ok(2 << 30)),
            ("0", Granule::Mib, Ok(0)),
            ("0", Granule::Page, Ok(0)),
            ("8K", Granule::Page, Ok(8192)),
            ("1.50G", Granule::Mib, Ok(1536 << 20)),
            (
                "1.3M",
                Granule::Page,
                Err("not a whole number of 4 KiB pages"),
            ),
            ("1.3M", Granule::Mib, Err("not a whole number of MiB")),
            ("6K", Granule::Mib, Err("not a whole number of MiB")),
            ("-5", Granule::Mib, Err("cannot be negative")),
            ("-5", Granule::Page, Err("cannot be negative")),
            ("99999999999999999999", Granule::Mib, Err("too large")),
            ("16777216T", Granule::Mib, Err("too large")),
            ("garbage", Granule::Mib, Err("expected a number")),
            ("12X", Granule::Mib, Err("unknown unit")),
            ("", Granule::Mib, Err("empty size")),
        ] {
            let got = parse(input, granule);
            match want {
                Ok(bytes) => assert_eq!(got, Ok(bytes), "{input}"),
                Err(msg) => {
                    let e = got.expect_err(input).to_string();
                    assert!(e.contains(msg), "{input}: {e}");
                    if !input.is_empty() {
                        assert!(e.contains(&format!("{input:?}")), "{input}: {e}");
                    }
                }
            }
        }
        assert_eq!(parse_size("1.5G"), Ok(1536));
        assert_eq!(parse_page_bytes("512M"), Ok(512 << 20));
    }

    #[test]
    fn api_sizes_deserialize() {
        #[derive(serde::Deserialize, Debug)]
        struct P {
            #[serde(deserialize_with = "deserialize_mib")]
            m: u64,
        }
        let p = |j: &str| {
            serde_json::from_str::<P>(j)
                .map(|p| p.m)
                .map_err(|e| e.to_string())
        };
        assert_eq!(p(r#"{"m": 1536}"#), Ok(1536));
        assert_eq!(p(r#"{"m": "1.5G"}"#), Ok(1536));
        assert_eq!(p(r#"{"m": "512MB"}"#), Ok(512));
        assert_eq!(p(r#"{"m": 0}"#), Ok(0));
        for (j, msg) in [
            (r#"{"m": -5}"#, "cannot be negative"),
            (r#"{"m": 1.5}"#, "not a whole number of MiB"),
            (r#"{"m": "1K"}"#, "not a whole number of MiB"),
            (r#"{"m": 1e30}"#, "too large"),
            (
                r#"{"m": 512.0}"#,
                "invalid size \"512.0\": a JSON number of MiB must be an integer",
            ),
            (
                r#"{"m": 1e3}"#,
                "invalid size \"1000.0\": a JSON number of MiB must be an integer",
            ),
            (r#"{"m": 0.0}"#, "must be an integer"),
            (r#"{"m": "garbage"}"#, "expected a number"),
            (r#"{"m": true}"#, "expected a number of MiB"),
        ] {
            let e = p(j).unwrap_err();
            assert!(e.contains(msg), "{j}: {e}");
        }
    }

    #[test]
    fn never_panics() {
        let alphabet: Vec<char> = "0123456789.kKmMgGtTbBiI -+eé\u{0}∞".chars().collect();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            let mut s = String::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            for i in 0..(x % 24) {
                let idx = ((x >> (i % 48)) as usize + i as usize * 7) % alphabet.len();
                s.push(alphabet[idx]);
            }
            let _ = parse_size(&s);
            let _ = parse(&s, Granule::Page);
        }
    }

    #[test]
    fn formatting() {
        assert_eq!(format_mib(512), "512 MiB");
        assert_eq!(format_mib(1536), "1.5 GiB");
        assert_eq!(format_mib(1024), "1 GiB");
        assert_eq!(format_mib(0), "0 MiB");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
    }
}
