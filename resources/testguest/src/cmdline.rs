//! Kernel command line parsing, following Linux `next_arg()`
//! (lib/cmdline.c / kernel/params.c) so that what the VMM writes means the
//! same to this guest as to Linux.

use crate::num::{memparse, parse_c_u64};

/// Splits a command line into `(param, value)` pairs like Linux `next_arg()`:
/// whitespace separates parameters except inside double quotes; a value that
/// starts with `"` loses its surrounding quotes (`key="a b"` → `a b`), and a
/// fully quoted `"key=value"` loses its outer quotes.
pub fn params(cmdline: &str) -> Params<'_> {
    Params { rest: cmdline }
}

/// Iterator returned by [`params`].
pub struct Params<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Params<'a> {
    type Item = (&'a str, Option<&'a str>);

    fn next(&mut self) -> Option<Self::Item> {
        let mut args = self
            .rest
            .trim_start_matches(|c: char| c.is_ascii_whitespace());
        if args.is_empty() {
            self.rest = args;
            return None;
        }
        let mut in_quote = false;
        let mut quoted = false;
        if let Some(a) = args.strip_prefix('"') {
            args = a;
            in_quote = true;
            quoted = true;
        }
        let bytes = args.as_bytes();
        let mut equals = None;
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            if c.is_ascii_whitespace() && !in_quote {
                break;
            }
            if equals.is_none() && c == b'=' {
                equals = Some(i);
            }
            if c == b'"' {
                in_quote = !in_quote;
            }
            i += 1;
        }
        self.rest = &args[i..];
        let mut token = &args[..i];
        // A closing quote at the end of the token is dropped when the value
        // or the whole token was quoted.
        let ends_quote = token.len() > 1 && token.ends_with('"');
        let (param, val) = match equals {
            None => {
                if quoted && ends_quote {
                    token = &token[..token.len() - 1];
                }
                (token, None)
            }
            Some(eq) => {
                let param = &token[..eq];
                let mut val = &token[eq + 1..];
                if let Some(v) = val.strip_prefix('"') {
                    val = v;
                    if ends_quote && !val.is_empty() && val.ends_with('"') {
                        val = &val[..val.len() - 1];
                    }
                } else if quoted && ends_quote && val.ends_with('"') {
                    val = &val[..val.len() - 1];
                }
                (param, Some(val))
            }
        };
        Some((param, val))
    }
}

/// One `virtio_mmio.device=<size>@<baseaddr>:<irq>[:<id>]` entry, parsed
/// like Linux `vm_cmdline_set()` (drivers/virtio/virtio_mmio.c): the size
/// goes through `memparse()` (K/M/G suffixes), base and irq through
/// `sscanf("@%lli:%u")`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// Parses the value of a `virtio_mmio.device=` parameter.
pub fn parse_mmio_device(val: &str) -> Option<MmioDevice> {
    let (size, rest) = memparse(val)?;
    let rest = rest.strip_prefix('@')?;
    let (base, rest) = rest.split_once(':')?;
    let base = parse_c_u64(base)?;
    // An optional ":<id>" (platform device id) may follow; it is ignored.
    let irq = match rest.split_once(':') {
        Some((irq, _id)) => irq,
        None => rest,
    };
    let irq = u32::try_from(crate::num::parse_u64(irq)?).ok()?;
    if size == 0 {
        return None;
    }
    Some(MmioDevice { base, size, irq })
}

/// Maximum number of virtio-mmio devices the guest keeps track of.
pub const MAX_MMIO_DEVICES: usize = 8;

/// What the test guest takes from its command line.
#[derive(Debug, Default)]
pub struct GuestArgs<'a> {
    /// `testguest.run=`: `;`-separated commands run at boot.
    pub run: Option<&'a str>,
    /// `testguest.poll=1`: poll devices instead of waiting for interrupts.
    pub poll: bool,
    /// `testguest.sg=0`: the balloon driver does not take the chunked
    /// protocol (VIRTIO_BALLOON_F_BLIMP_SG) even when offered.
    pub no_sg: bool,
    /// `virtio_mmio.device=` entries, in command-line order.
    pub devices: [Option<MmioDevice>; MAX_MMIO_DEVICES],
    /// Entries that did not parse or did not fit (reported at boot).
    pub bad_devices: usize,
}

impl<'a> GuestArgs<'a> {
    pub fn parse(cmdline: &'a str) -> Self {
        let mut args = GuestArgs::default();
        let mut ndev = 0;
        for (param, val) in params(cmdline) {
            match (param, val) {
                ("testguest.run", Some(v)) => args.run = Some(v),
                ("testguest.poll", v) => args.poll = !matches!(v, Some("0") | Some("")),
                ("testguest.sg", v) => args.no_sg = matches!(v, Some("0") | Some("off")),
                ("virtio_mmio.device", Some(v)) => match parse_mmio_device(v) {
                    Some(d) if ndev < MAX_MMIO_DEVICES => {
                        args.devices[ndev] = Some(d);
                        ndev += 1;
                    }
                    _ => args.bad_devices += 1,
                },
                _ => {}
            }
        }
        args
    }

    pub fn devices(&self) -> impl Iterator<Item = MmioDevice> + '_ {
        self.devices.iter().flatten().copied()
    }
}

/// Splits a `testguest.run` program into its commands: `;`-separated,
/// surrounding whitespace trimmed, empty commands skipped.
pub fn program(run: &str) -> impl Iterator<Item = &str> {
    run.split(';').map(str::trim).filter(|c| !c.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(s: &str) -> Vec<(&str, Option<&str>)> {
        params(s).collect()
    }

    #[test]
    fn linux_next_arg_semantics() {
        assert_eq!(
            all("  a=1  b  c=\"x y\" "),
            vec![("a", Some("1")), ("b", None), ("c", Some("x y"))]
        );
        assert_eq!(all("\"k=v w\" z"), vec![("k", Some("v w")), ("z", None)]);
        assert_eq!(all("k="), vec![("k", Some(""))]);
        assert_eq!(all("k=\"\""), vec![("k", Some(""))]);
        assert_eq!(all(""), vec![]);
        // Unterminated quote runs to the end of the line.
        assert_eq!(all("k=\"a b"), vec![("k", Some("a b"))]);
    }

    #[test]
    fn guest_args() {
        let c = "console=ttyS0 testguest.run=\"fill 256 7;verify;exit 0\" \
                 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6:3 testguest.poll=1";
        let a = GuestArgs::parse(c);
        assert_eq!(a.run, Some("fill 256 7;verify;exit 0"));
        assert!(a.poll);
        let d: Vec<_> = a.devices().collect();
        assert_eq!(
            d,
            vec![
                MmioDevice {
                    base: 0xd000_0000,
                    size: 4096,
                    irq: 5
                },
                MmioDevice {
                    base: 0xd000_1000,
                    size: 4096,
                    irq: 6
                },
            ]
        );
        assert_eq!(a.bad_devices, 0);
    }

    #[test]
    fn unquoted_run_and_bad_devices() {
        let a = GuestArgs::parse(
            "testguest.run=meminfo virtio_mmio.device=4K@zz:5 virtio_mmio.device=@1:2",
        );
        assert_eq!(a.run, Some("meminfo"));
        assert!(!a.poll);
        assert_eq!(a.devices().count(), 0);
        assert_eq!(a.bad_devices, 2);
        assert!(!GuestArgs::parse("testguest.poll=0").poll);
        assert!(GuestArgs::parse("testguest.sg=0").no_sg);
        assert!(!GuestArgs::parse("testguest.sg=1").no_sg);
        assert!(!GuestArgs::parse("").no_sg);
    }

    #[test]
    fn mmio_device_forms() {
        assert_eq!(
            parse_mmio_device("0x200@0x1000:1"),
            Some(MmioDevice {
                base: 0x1000,
                size: 0x200,
                irq: 1
            })
        );
        assert_eq!(
            parse_mmio_device("1M@4096:33"),
            Some(MmioDevice {
                base: 4096,
                size: 1 << 20,
                irq: 33
            })
        );
        assert_eq!(parse_mmio_device("4K@0xd0000000"), None);
        assert_eq!(parse_mmio_device("4K0xd0000000:5"), None);
    }

    #[test]
    fn program_split() {
        let p: Vec<_> = program(" fill 256 7 ; verify;;exit 0 ").collect();
        assert_eq!(p, vec!["fill 256 7", "verify", "exit 0"]);
    }
}
