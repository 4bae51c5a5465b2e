//! The command interpreter: runs `testguest.run` at boot, then reads
//! commands from the serial console. Each command prints exactly one result
//! line (or an `error: …` line).

use testguest::cmdline::{GuestArgs, program};
use testguest::command::{self, Command, USAGE};
use testguest::frames::FRAMES_PER_MIB;
use testguest::lineedit::{Event, LineBuf, LineEditor};

use crate::memory::Memory;
use crate::{clock, events, io, serial, workload};

pub const PROMPT: &str = "testguest> ";

/// Poll interval when `testguest.poll=1` (devices are not interrupt-driven).
const POLL_INTERVAL_NS: u64 = 10_000_000;

pub struct Guest {
    pub mem: Memory,
    pub args: GuestArgs<'static>,
    editor: LineEditor,
}

impl Guest {
    pub fn new(mem: Memory, args: GuestArgs<'static>) -> Self {
        Guest {
            mem,
            args,
            editor: LineEditor::new(),
        }
    }

    /// Runs the boot program, then the interactive console; never returns.
    pub fn run(&mut self) -> ! {
        if let Some(run) = self.args.run {
            for cmd in program(run) {
                self.execute(cmd);
            }
        }
        loop {
            crate::print!("{PROMPT}");
            let line = self.read_line();
            let line = line.as_str().trim();
            if !line.is_empty() {
                self.execute(line);
            }
        }
    }

    /// Services background drivers; called between chunks of long commands
    /// and whenever the guest waits.
    pub fn background(&mut self) {}

    /// Sleeps until an interrupt (or `deadline_ns`, or the poll interval)
    /// unless an event arrived after `seen` was read.
    fn idle(&mut self, seen: u64, deadline_ns: Option<u64>) {
        let mut wake = deadline_ns;
        if self.args.poll {
            let p = clock::now_ns() + POLL_INTERVAL_NS;
            wake = Some(wake.map_or(p, |d| d.min(p)));
        }
        if let Some(w) = wake
            && !clock::arm(w)
        {
            return;
        }
        events::wait(seen);
    }

    fn read_line(&mut self) -> LineBuf {
        loop {
            let seen = events::snapshot();
            while let Some(b) = serial::try_read() {
                match self.editor.feed(b) {
                    Event::None => {}
                    Event::Echo(s) => serial::write_bytes(s),
                    Event::EchoByte(c) => serial::write_byte(c),
                    Event::Line => {
                        serial::write_byte(b'\n');
                        return self.editor.take_line();
                    }
                }
            }
            self.background();
            self.idle(seen, None);
        }
    }

    /// Parses and runs one command, printing its result line.
    pub fn execute(&mut self, line: &str) {
        let cmd = match command::parse(line) {
            Ok(c) => c,
            Err(e) => {
                crate::println!("error: {e}");
                return;
            }
        };
        match cmd {
            Command::Echo(text) => crate::println!("{text}"),
            Command::Help => {
                crate::print!("commands:");
                for u in USAGE {
                    crate::print!(" [{u}]");
                }
                crate::println!();
            }
            Command::Meminfo => {
                let m = &self.mem;
                crate::println!(
                    "meminfo ram {} bytes ({} MiB) regions {} free {} MiB",
                    m.ram_bytes,
                    m.ram_bytes >> 20,
                    m.ram_regions,
                    m.free_mib()
                );
            }
            Command::Fill { mib, seed } => {
                let r = workload::fill(&mut self.mem, mib, seed, &mut |_| {});
                match r {
                    Ok(()) => crate::println!("fill done {mib} MiB"),
                    Err(workload::FillError::TooManySeeds) => {
                        crate::println!("error: fill: too many distinct seeds (max 255)")
                    }
                    Err(workload::FillError::OutOfMemory(pages)) => crate::println!(
                        "error: fill: out of memory after {} MiB ({pages} pages filled)",
                        pages / FRAMES_PER_MIB
                    ),
                }
            }
            Command::Verify => {
                let r = workload::verify(&mut self.mem, &mut |_| {});
                match r.first_bad {
                    None => crate::println!("verify ok {} pages", r.pages),
                    Some((pfn, m)) => crate::println!(
                        "verify FAIL page {:#x} word {} expected {:#018x} got {:#018x} bad {} of {} pages",
                        pfn << 12,
                        m.word,
                        m.expected,
                        m.got,
                        r.bad,
                        r.pages
                    ),
                }
            }
            Command::Touch { mib } => {
                let n = workload::touch(&mut self.mem, mib);
                if n == mib {
                    crate::println!("touch done {mib} MiB");
                } else {
                    crate::println!("error: touch: only {n} MiB free");
                }
            }
            Command::Free { mib } => {
                let pages = workload::free(&mut self.mem, mib);
                crate::println!("free done {} MiB ({pages} pages)", pages / FRAMES_PER_MIB);
            }
            Command::Sleep { ns } => {
                let deadline = clock::now_ns().saturating_add(ns);
                loop {
                    let seen = events::snapshot();
                    self.background();
                    if clock::now_ns() >= deadline {
                        break;
                    }
                    self.idle(seen, Some(deadline));
                }
                clock::disarm();
                crate::println!("sleep done");
            }
            Command::Exit { code } => {
                crate::println!("exit {code}");
                exit(code)
            }
            Command::Dirty { .. }
            | Command::Balloon
            | Command::BalloonWait
            | Command::Stats
            | Command::Oom { .. }
            | Command::Hostile(_)
            | Command::Report
            | Command::Poison { .. } => {
                crate::println!("error: not implemented yet");
            }
        }
    }
}

/// Ends the VM through the debug-exit port; without `--debug-exit` the
/// write is ignored and the guest idles forever.
pub fn exit(code: u8) -> ! {
    io::outb(io::DEBUG_EXIT_PORT, code);
    loop {
        events::wait(events::snapshot());
    }
}
