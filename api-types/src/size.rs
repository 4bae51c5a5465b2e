//! Human memory sizes for the CLI: `512M`, `1G`, `256MiB`, `1.5GiB`, `0`.
//!
//! A plain number means MiB. Units are binary and case-insensitive:
//! `B`, `K`/`KB`/`KiB`, `M`/`MB`/`MiB`, `G`/`GB`/`GiB`, `T`/`TB`/`TiB`.
//! The result is in MiB and must be a whole number of MiB.

/// Why a size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("empty size")]
    Empty,
    #[error("invalid size {0:?}: expected a number with an optional unit, e.g. 512M, 1G, 256MiB")]
    Syntax(String),
    #[error("invalid size {0:?}: unknown unit (use B, K, M, G or T, optionally with iB)")]
    Unit(String),
    #[error("size {0:?} is not a whole number of MiB")]
    NotWholeMib(String),
    #[error("size {0:?} is too large")]
    TooLarge(String),
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

/// Parse a size into MiB.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(num_end);
    let unit = unit.trim_start();
    let mult = unit_bytes(unit).ok_or_else(|| SizeError::Unit(input.to_string()))?;
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int_part.is_empty() && frac_part.is_empty()
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
        || num.ends_with('.')
        || frac_part.len() > 9
    {
        return Err(SizeError::Syntax(input.to_string()));
    }
    let too_large = || SizeError::TooLarge(input.to_string());
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
        return Err(SizeError::NotWholeMib(input.to_string()));
    }
    let bytes = scaled / scale;
    if !bytes.is_multiple_of(1 << 20) {
        return Err(SizeError::NotWholeMib(input.to_string()));
    }
    u64::try_from(bytes >> 20).map_err(|_| too_large())
}

/// `1536` → `"1.5 GiB"`, `512` → `"512 MiB"`.
pub fn format_mib(mib: u64) -> String {
    if mib == 0 {
        return "0 MiB".into();
    }
    format_bytes(mib.saturating_mul(1 << 20))
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
        for s in ["abc", "-1", "1..5G", "1.", ".", "1.2.3M", "M", "+5"] {
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
        assert!(matches!(parse_size("1K"), Err(SizeError::NotWholeMib(_))));
        assert!(matches!(parse_size("1.3M"), Err(SizeError::NotWholeMib(_))));
        assert!(matches!(parse_size("100B"), Err(SizeError::NotWholeMib(_))));
        assert!(matches!(
            parse_size("99999999999999999999999"),
            Err(SizeError::TooLarge(_))
        ));
        assert!(matches!(
            parse_size("18446744073709551615T"),
            Err(SizeError::TooLarge(_))
        ));
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
