//! Number parsing shared by the kernel command line and the shell.

/// Parses an unsigned integer the way C's `%lli`/`strtoull(.., 0)` does:
/// `0x`/`0X` prefix for hex, a leading `0` for octal, decimal otherwise.
/// The whole string must be consumed.
pub fn parse_c_u64(s: &str) -> Option<u64> {
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    parse_radix(digits, radix)
}

/// Parses a non-empty string of digits in `radix`, rejecting overflow.
pub fn parse_radix(s: &str, radix: u32) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for c in s.chars() {
        let d = c.to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

/// Plain decimal `u64`.
pub fn parse_u64(s: &str) -> Option<u64> {
    parse_radix(s, 10)
}

/// Parses a decimal or `0x` hexadecimal `u64`.
pub fn parse_u64_dec_or_hex(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => parse_radix(h, 16),
        None => parse_radix(s, 10),
    }
}

/// Linux `memparse()`: a C number with an optional K/M/G/T/P/E suffix
/// (case-insensitive, binary multiples). Returns the value and the rest.
pub fn memparse(s: &str) -> Option<(u64, &str)> {
    let end = if s.starts_with("0x") || s.starts_with("0X") {
        2 + s[2..]
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(s.len() - 2)
    } else {
        s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len())
    };
    let v = parse_c_u64(&s[..end])?;
    let rest = &s[end..];
    let shift = match rest.as_bytes().first() {
        Some(b'k' | b'K') => 10,
        Some(b'm' | b'M') => 20,
        Some(b'g' | b'G') => 30,
        Some(b't' | b'T') => 40,
        Some(b'p' | b'P') => 50,
        Some(b'e' | b'E') => 60,
        _ => return Some((v, rest)),
    };
    let v = v.checked_mul(1u64 << shift)?;
    Some((v, &rest[1..]))
}

/// Parses seconds with an optional fraction ("1", "0.25", "2.") into
/// nanoseconds. At most 9 fractional digits are significant.
pub fn parse_seconds_ns(s: &str) -> Option<u64> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let whole = if int.is_empty() { 0 } else { parse_u64(int)? };
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut frac_ns: u64 = 0;
    let mut scale: u64 = 100_000_000;
    for b in frac.bytes().take(9) {
        frac_ns += (b - b'0') as u64 * scale;
        scale /= 10;
    }
    whole.checked_mul(1_000_000_000)?.checked_add(frac_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_numbers() {
        assert_eq!(parse_c_u64("0xd0000000"), Some(0xd000_0000));
        assert_eq!(parse_c_u64("010"), Some(8));
        assert_eq!(parse_c_u64("0"), Some(0));
        assert_eq!(parse_c_u64("42"), Some(42));
        assert_eq!(parse_c_u64("0x"), None);
        assert_eq!(parse_c_u64("12a"), None);
        assert_eq!(parse_c_u64("99999999999999999999999"), None);
    }

    #[test]
    fn memparse_suffixes() {
        assert_eq!(memparse("4K@x"), Some((4096, "@x")));
        assert_eq!(memparse("0x200@"), Some((0x200, "@")));
        assert_eq!(memparse("1M"), Some((1 << 20, "")));
        assert_eq!(memparse("2g"), Some((2 << 30, "")));
        assert_eq!(memparse("K"), None);
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds_ns("1"), Some(1_000_000_000));
        assert_eq!(parse_seconds_ns("0.25"), Some(250_000_000));
        assert_eq!(parse_seconds_ns(".5"), Some(500_000_000));
        assert_eq!(parse_seconds_ns("2."), Some(2_000_000_000));
        assert_eq!(parse_seconds_ns("1.0000000019"), Some(1_000_000_001));
        assert_eq!(parse_seconds_ns("."), None);
        assert_eq!(parse_seconds_ns("-1"), None);
        assert_eq!(parse_seconds_ns("1.x"), None);
        assert_eq!(parse_seconds_ns(""), None);
    }
}
