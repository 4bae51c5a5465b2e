//! The test guest's command language: one command per line (or per `;`
//! in `testguest.run`), a verb followed by whitespace-separated arguments.
//! Parsing never panics; bad input becomes a [`ParseError`] that the shell
//! prints as an `error: …` line.

use crate::num::{parse_seconds_ns, parse_u64, parse_u64_dec_or_hex};
use crate::ramp::{DEFAULT_SEED, DEFAULT_WAIT_S};

/// Bad inputs the balloon driver can deliberately send (`hostile CASE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostileCase {
    PfnOutsideRam,
    PfnInMmioHole,
    DescLoop,
    ChainTooLong,
    ZeroLen,
    OddLen,
    WritableInflate,
    /// An inflate buffer through an indirect descriptor table, a feature
    /// (VIRTIO_RING_F_INDIRECT_DESC) no balloon device offers.
    Indirect,
    StatsTruncated,
    HintStaleId,
    HintOutsideRam,
    HintWrongDirection,
    ReportOutsideRam,
    ReportTooLong,
    /// Every bad chunked range (VIRTIO_BALLOON_F_BLIMP_SG negotiated).
    SgRanges,
    /// The inflate ring kept full for seconds, each buffer re-added as soon
    /// as it is used (not in `all`: it takes a while).
    Flood,
    /// As `Flood`, with 64 KiB PFN arrays of 16384 pages no two adjacent
    /// (each a host call to give back) instead of one PFN.
    FloodScattered,
    All,
}

impl HostileCase {
    /// Every single case, in the order `hostile all` sends them.
    pub const EACH: [HostileCase; 15] = [
        HostileCase::PfnOutsideRam,
        HostileCase::PfnInMmioHole,
        HostileCase::DescLoop,
        HostileCase::ChainTooLong,
        HostileCase::ZeroLen,
        HostileCase::OddLen,
        HostileCase::WritableInflate,
        HostileCase::Indirect,
        HostileCase::StatsTruncated,
        HostileCase::HintStaleId,
        HostileCase::HintOutsideRam,
        HostileCase::HintWrongDirection,
        HostileCase::ReportOutsideRam,
        HostileCase::ReportTooLong,
        HostileCase::SgRanges,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HostileCase::PfnOutsideRam => "pfn-outside-ram",
            HostileCase::PfnInMmioHole => "pfn-in-mmio-hole",
            HostileCase::DescLoop => "desc-loop",
            HostileCase::ChainTooLong => "chain-too-long",
            HostileCase::ZeroLen => "zero-len",
            HostileCase::OddLen => "odd-len",
            HostileCase::WritableInflate => "writable-inflate",
            HostileCase::Indirect => "indirect",
            HostileCase::StatsTruncated => "stats-truncated",
            HostileCase::HintStaleId => "hint-stale-id",
            HostileCase::HintOutsideRam => "hint-outside-ram",
            HostileCase::HintWrongDirection => "hint-wrong-direction",
            HostileCase::ReportOutsideRam => "report-outside-ram",
            HostileCase::ReportTooLong => "report-too-long",
            HostileCase::SgRanges => "sg-ranges",
            HostileCase::Flood => "flood",
            HostileCase::FloodScattered => "flood-scattered",
            HostileCase::All => "all",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::EACH
            .into_iter()
            .chain([
                HostileCase::Flood,
                HostileCase::FloodScattered,
                HostileCase::All,
            ])
            .find(|c| c.name() == s)
    }
}

/// A parsed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// `echo TEXT` → prints TEXT.
    Echo(&'a str),
    /// `help` → lists the commands.
    Help,
    /// `meminfo`
    Meminfo,
    /// `fill MIB SEED`
    Fill { mib: u64, seed: u64 },
    /// `verify`
    Verify,
    /// `touch MIB`
    Touch { mib: u64 },
    /// `free MIB`: return filled memory to the free pool without clearing it.
    Free { mib: u64 },
    /// `dirty MIB RATE`: keep rewriting the first MIB MiB of filled pages at
    /// RATE MiB/s in the background (`dirty 0 0` stops).
    Dirty { mib: u64, rate: u64 },
    /// `sleep SECS`
    Sleep { ns: u64 },
    /// `spin SECS`: busy in ring 3, the balloon driver not served.
    Spin { ns: u64 },
    /// `exit CODE`
    Exit { code: u8 },
    /// `balloon`: start the virtio balloon driver.
    Balloon,
    /// `balloon-wait`: wait until actual == num_pages.
    BalloonWait,
    /// `balloon-handoff`: the next burst leaves its first request to ring 3.
    BalloonHandoff,
    /// `stats`: print the statistics last sent to the device.
    Stats,
    /// `oom MIB`: deflate like Linux's OOM notifier.
    Oom { mib: u64 },
    /// `hostile CASE`
    Hostile(HostileCase),
    /// `report`: force a free page reporting round.
    Report,
    /// `hints`: free page hinting counters.
    Hints,
    /// `poison BYTE`
    Poison { byte: u8 },
    /// `ramp MIB RATE [HOLD [CYCLES [SEED [WAIT]]]]`: allocate MIB MiB at
    /// RATE MiB/s, hold HOLD seconds, free them; CYCLES times (0: until
    /// Ctrl-C). An allocation that finds no memory while the balloon holds
    /// pages waits up to WAIT seconds for it.
    Ramp {
        mib: u64,
        rate: u64,
        hold_ns: u64,
        cycles: u64,
        seed: u64,
        wait_ns: u64,
    },
    /// `mmio-rtt N`: time N reads of the first virtio-mmio slot's MagicValue
    /// (each a full exit to the VMM and back).
    MmioRtt { n: u64 },
    /// `rep-outs BYTES COUNT`: COUNT `rep outsb` of BYTES bytes each to
    /// the UART's scratch register (one exit per byte).
    RepOuts { bytes: u64, count: u64 },
}

/// Why a command line was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError<'a> {
    Unknown(&'a str),
    /// Wrong number of arguments; carries the usage string.
    Usage(&'static str),
    /// An argument did not parse; carries the argument.
    BadArg(&'a str),
}

impl core::fmt::Display for ParseError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ParseError::Unknown(v) => write!(f, "unknown command '{v}' (try 'help')"),
            ParseError::Usage(u) => write!(f, "usage: {u}"),
            ParseError::BadArg(a) => write!(f, "bad argument '{a}'"),
        }
    }
}

/// One line per command, used by `help` and the documentation.
pub const USAGE: &[&str] = &[
    "echo TEXT",
    "meminfo",
    "fill MIB SEED",
    "verify",
    "touch MIB",
    "free MIB",
    "dirty MIB RATE",
    "ramp MIB RATE [HOLD [CYCLES [SEED [WAIT]]]]",
    "sleep SECS",
    "spin SECS",
    "exit CODE",
    "balloon",
    "balloon-wait",
    "balloon-handoff",
    "stats",
    "oom MIB",
    "hostile CASE",
    "report",
    "hints",
    "poison BYTE",
    "mmio-rtt N",
    "rep-outs BYTES COUNT",
    "help",
];

/// Parses one command line.
pub fn parse<'a>(line: &'a str) -> Result<Command<'a>, ParseError<'a>> {
    let line = line.trim();
    let (verb, rest) = match line.find(|c: char| c.is_ascii_whitespace()) {
        Some(i) => (&line[..i], line[i..].trim_start()),
        None => (line, ""),
    };
    if verb == "echo" {
        return Ok(Command::Echo(rest));
    }
    let mut args = rest.split_ascii_whitespace();
    let mut argv: [&str; 6] = [""; 6];
    let mut argc = 0;
    for a in args.by_ref() {
        if argc == argv.len() {
            argc += 1;
            break;
        }
        argv[argc] = a;
        argc += 1;
    }
    let Some(usage) = USAGE
        .iter()
        .copied()
        .find(|u| u.split(' ').next() == Some(verb))
    else {
        return Err(ParseError::Unknown(verb));
    };
    if !arity(usage).contains(&argc) {
        return Err(ParseError::Usage(usage));
    }
    let bad = ParseError::BadArg;
    let num = |s: &'a str| parse_u64(s).ok_or(bad(s));
    let hex = |s: &'a str| parse_u64_dec_or_hex(s).ok_or(bad(s));
    let secs = |s: &'a str| parse_seconds_ns(s).ok_or(bad(s));
    let byte = |s: &'a str, v: u64| u8::try_from(v).map_err(|_| bad(s));
    Ok(match verb {
        "help" => Command::Help,
        "meminfo" => Command::Meminfo,
        "fill" => Command::Fill {
            mib: num(argv[0])?,
            seed: hex(argv[1])?,
        },
        "verify" => Command::Verify,
        "touch" => Command::Touch { mib: num(argv[0])? },
        "mmio-rtt" => Command::MmioRtt { n: num(argv[0])? },
        "rep-outs" => Command::RepOuts {
            bytes: num(argv[0])?,
            count: num(argv[1])?,
        },
        "free" => Command::Free { mib: num(argv[0])? },
        "dirty" => Command::Dirty {
            mib: num(argv[0])?,
            rate: num(argv[1])?,
        },
        "ramp" => {
            let opt = |i: usize| (i < argc).then(|| argv[i]);
            let rate = num(argv[1])?;
            if rate == 0 {
                return Err(bad(argv[1]));
            }
            let wait_ns = opt(5).map_or(Ok(DEFAULT_WAIT_S * 1_000_000_000), secs)?;
            if wait_ns == 0 {
                return Err(bad(argv[5]));
            }
            Command::Ramp {
                mib: num(argv[0])?,
                rate,
                hold_ns: opt(2).map_or(Ok(0), secs)?,
                cycles: opt(3).map_or(Ok(1), num)?,
                seed: opt(4).map_or(Ok(DEFAULT_SEED), hex)?,
                wait_ns,
            }
        }
        "sleep" => Command::Sleep { ns: secs(argv[0])? },
        "spin" => Command::Spin { ns: secs(argv[0])? },
        "exit" => Command::Exit {
            code: byte(argv[0], num(argv[0])?)?,
        },
        "balloon" => Command::Balloon,
        "balloon-wait" => Command::BalloonWait,
        "balloon-handoff" => Command::BalloonHandoff,
        "stats" => Command::Stats,
        "oom" => Command::Oom { mib: num(argv[0])? },
        "hostile" => Command::Hostile(HostileCase::from_name(argv[0]).ok_or(bad(argv[0]))?),
        "report" => Command::Report,
        "hints" => Command::Hints,
        "poison" => Command::Poison {
            byte: byte(argv[0], hex(argv[0])?)?,
        },
        _ => return Err(ParseError::Unknown(verb)),
    })
}

/// How many arguments a [`USAGE`] line takes: its words after the verb,
/// those from the first `[` on optional.
fn arity(usage: &str) -> core::ops::RangeInclusive<usize> {
    let mut words = usage.split(' ').skip(1);
    let required = words.by_ref().take_while(|w| !w.starts_with('[')).count();
    let optional = usage.matches('[').count();
    required..=required + optional
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_command() {
        assert_eq!(
            parse("echo  hello  world "),
            Ok(Command::Echo("hello  world"))
        );
        assert_eq!(parse("echo"), Ok(Command::Echo("")));
        assert_eq!(parse("meminfo"), Ok(Command::Meminfo));
        assert_eq!(
            parse(" fill 256 7 "),
            Ok(Command::Fill { mib: 256, seed: 7 })
        );
        assert_eq!(
            parse("fill 1 0xff"),
            Ok(Command::Fill { mib: 1, seed: 255 })
        );
        assert_eq!(parse("verify"), Ok(Command::Verify));
        assert_eq!(parse("touch 3"), Ok(Command::Touch { mib: 3 }));
        assert_eq!(parse("free 3"), Ok(Command::Free { mib: 3 }));
        assert_eq!(
            parse("dirty 64 10"),
            Ok(Command::Dirty { mib: 64, rate: 10 })
        );
        assert_eq!(parse("sleep 0.5"), Ok(Command::Sleep { ns: 500_000_000 }));
        assert_eq!(parse("spin 2"), Ok(Command::Spin { ns: 2_000_000_000 }));
        assert_eq!(
            parse("ramp 1536 200"),
            Ok(Command::Ramp {
                mib: 1536,
                rate: 200,
                hold_ns: 0,
                cycles: 1,
                seed: DEFAULT_SEED,
                wait_ns: DEFAULT_WAIT_S * 1_000_000_000,
            })
        );
        assert_eq!(
            parse("ramp 64 32 1.5 0 0x9 2"),
            Ok(Command::Ramp {
                mib: 64,
                rate: 32,
                hold_ns: 1_500_000_000,
                cycles: 0,
                seed: 9,
                wait_ns: 2_000_000_000,
            })
        );
        assert_eq!(parse("exit 3"), Ok(Command::Exit { code: 3 }));
        assert_eq!(parse("balloon"), Ok(Command::Balloon));
        assert_eq!(parse("balloon-wait"), Ok(Command::BalloonWait));
        assert_eq!(parse("balloon-handoff"), Ok(Command::BalloonHandoff));
        assert_eq!(parse("stats"), Ok(Command::Stats));
        assert_eq!(parse("oom 4"), Ok(Command::Oom { mib: 4 }));
        assert_eq!(
            parse("hostile desc-loop"),
            Ok(Command::Hostile(HostileCase::DescLoop))
        );
        assert_eq!(parse("hostile all"), Ok(Command::Hostile(HostileCase::All)));
        assert_eq!(parse("report"), Ok(Command::Report));
        assert_eq!(parse("hints"), Ok(Command::Hints));
        assert_eq!(parse("mmio-rtt 100"), Ok(Command::MmioRtt { n: 100 }));
        assert_eq!(
            parse("rep-outs 4096 7"),
            Ok(Command::RepOuts {
                bytes: 4096,
                count: 7
            })
        );
        assert_eq!(parse("poison 0xaa"), Ok(Command::Poison { byte: 0xaa }));
        assert_eq!(parse("help"), Ok(Command::Help));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            parse("frobnicate 1"),
            Err(ParseError::Unknown("frobnicate"))
        );
        assert_eq!(parse(""), Err(ParseError::Unknown("")));
        assert_eq!(parse("fill 1"), Err(ParseError::Usage("fill MIB SEED")));
        assert_eq!(parse("fill 1 2 3"), Err(ParseError::Usage("fill MIB SEED")));
        assert_eq!(
            parse("fill 1 2 3 4 5 6"),
            Err(ParseError::Usage("fill MIB SEED"))
        );
        assert_eq!(parse("fill x 2"), Err(ParseError::BadArg("x")));
        assert_eq!(parse("fill -1 2"), Err(ParseError::BadArg("-1")));
        assert_eq!(parse("exit 256"), Err(ParseError::BadArg("256")));
        assert_eq!(parse("sleep abc"), Err(ParseError::BadArg("abc")));
        assert_eq!(parse("hostile nope"), Err(ParseError::BadArg("nope")));
        assert_eq!(parse("verify now"), Err(ParseError::Usage("verify")));
        let ramp_usage = ParseError::Usage("ramp MIB RATE [HOLD [CYCLES [SEED [WAIT]]]]");
        assert_eq!(parse("ramp 64"), Err(ramp_usage));
        assert_eq!(parse("ramp 1 2 3 4 5 6 7"), Err(ramp_usage));
        assert_eq!(
            parse("ramp 64 0"),
            Err(ParseError::BadArg("0")),
            "zero rate"
        );
        assert_eq!(
            parse("ramp 64 8 0 1 1 0"),
            Err(ParseError::BadArg("0")),
            "zero wait bound"
        );
        assert_eq!(parse("ramp 64 8 soon"), Err(ParseError::BadArg("soon")));
        assert_eq!(parse("ramp 64 8 1 x"), Err(ParseError::BadArg("x")));
        assert_eq!(
            parse("touch 99999999999999999999999"),
            Err(ParseError::BadArg("99999999999999999999999"))
        );
    }

    #[test]
    fn hostile_names_round_trip() {
        for c in HostileCase::EACH {
            assert_eq!(HostileCase::from_name(c.name()), Some(c));
        }
    }

    /// Each verb refuses one argument more than its usage line allows,
    /// and (if it takes any) one fewer than it needs.
    #[test]
    fn usage_lines_set_the_arity() {
        assert_eq!(arity("help"), 0..=0);
        assert_eq!(arity("fill MIB SEED"), 2..=2);
        assert_eq!(arity("ramp MIB RATE [HOLD [CYCLES [SEED [WAIT]]]]"), 2..=6);
        for u in USAGE.iter().copied().filter(|u| !u.starts_with("echo ")) {
            let (verb, max) = (u.split(' ').next().unwrap(), *arity(u).end());
            let too_many = [verb].into_iter().chain(["1"; 7].into_iter().take(max + 1));
            let line = too_many.collect::<Vec<_>>().join(" ");
            assert_eq!(parse(&line), Err(ParseError::Usage(u)), "{line}");
            if *arity(u).start() > 0 {
                assert_eq!(parse(verb), Err(ParseError::Usage(u)), "{verb}");
            }
        }
    }

    #[test]
    fn usage_lists_every_verb() {
        for u in USAGE {
            let verb = u.split(' ').next().unwrap();
            assert!(
                !matches!(parse(verb), Err(ParseError::Unknown(_))),
                "{verb}"
            );
        }
    }
}
