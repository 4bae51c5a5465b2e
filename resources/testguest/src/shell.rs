//! The command interpreter: runs `testguest.run` at boot, then reads
//! commands from the serial console. Each command prints exactly one result
//! line (or an `error: …` line).

use testguest::balloon_proto::VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
use testguest::cmdline::{GuestArgs, program};
use testguest::command::{self, Command, HostileCase, USAGE};
use testguest::frames::FRAMES_PER_MIB;
use testguest::lineedit::{Event, LineBuf, LineEditor};

use crate::balloon::{Balloon, StartError};
use crate::memory::Memory;
use crate::{clock, events, idle, io, serial, workload};

pub const PROMPT: &str = "testguest> ";

pub struct Guest {
    pub mem: Memory,
    pub args: GuestArgs<'static>,
    editor: LineEditor,
    balloon: Option<Balloon>,
    dirtier: Option<workload::Dirtier>,
}

/// Services the balloon (if started) from inside long workloads (stats
/// requests wait until the command is done).
fn bg(balloon: &mut Option<Balloon>) -> impl FnMut(&mut Memory) + '_ {
    move |m: &mut Memory| {
        if let Some(b) = balloon.as_mut() {
            b.service(m, false);
        }
    }
}

impl Guest {
    pub fn new(mem: Memory, args: GuestArgs<'static>) -> Self {
        Guest {
            mem,
            args,
            editor: LineEditor::new(),
            balloon: None,
            dirtier: None,
        }
    }

    /// Runs the boot program, then the interactive console; never returns.
    pub fn run(&mut self) -> ! {
        self.probe();
        if let Some(run) = self.args.run {
            for cmd in program(run) {
                self.execute(cmd);
                self.background();
            }
        }
        loop {
            crate::print!("{PROMPT}");
            let line = self.read_line();
            let line = line.as_str().trim();
            if !line.is_empty() {
                self.execute(line);
                self.background();
            }
        }
    }

    /// Services background drivers; called between commands, between
    /// chunks of long commands and whenever the guest waits.
    pub fn background(&mut self) {
        if let Some(b) = self.balloon.as_mut() {
            b.service(&mut self.mem, true);
        }
        if let Some(d) = self.dirtier.as_mut() {
            d.tick(&mut self.mem, clock::now_ns());
        }
    }

    /// Halts until an interrupt, `deadline_ns` or a background driver's
    /// own deadline, unless an event arrived after `seen` was read.
    fn idle(&mut self, seen: u64, deadline_ns: Option<u64>) {
        idle_until(
            self.balloon.as_ref(),
            self.dirtier.is_some(),
            seen,
            deadline_ns,
        );
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

    /// Parses and runs one command, printing its result line (and, if
    /// the command found poisoned pages changed, an `error: poison` line).
    pub fn execute(&mut self, line: &str) {
        let poison_errors = self.mem.poison_errors;
        self.mem.poison_first = None;
        self.run_command(line);
        if self.mem.poison_errors > poison_errors {
            let (pfn, off, got) = self.mem.poison_first.unwrap_or_default();
            crate::println!(
                "error: poison: {} pages changed while free (first page {:#x} offset {off} holds {got:#04x}, expected {:#04x})",
                self.mem.poison_errors - poison_errors,
                pfn << 12,
                self.mem.poison.unwrap_or(0)
            );
        }
    }

    fn run_command(&mut self, line: &str) {
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
                let r = workload::fill(&mut self.mem, mib, seed, &mut bg(&mut self.balloon));
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
                let r = workload::verify(&mut self.mem, &mut bg(&mut self.balloon));
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
            Command::MmioRtt { n } => {
                let n = n.max(1);
                let r = crate::virtio::mmio::round_trip_ns(n);
                crate::println!(
                    "mmio-rtt {n} read {} ns write {} ns ring0-read {} ns ring0-write {} ns trap {} ns",
                    r.read,
                    r.write,
                    r.call_read,
                    r.call_write,
                    r.trap
                );
            }
            Command::RepOuts { bytes, count } => match crate::serial::rep_outs(bytes, count) {
                Ok(()) => crate::println!("rep-outs {count} x {} ok", bytes.clamp(1, 4096)),
                Err(e) => crate::println!(
                    "rep-outs FAIL at {}: rcx {} rsi +{} scratch {:#04x} expected {:#04x}",
                    e.at,
                    e.rcx,
                    e.advanced,
                    e.scratch,
                    e.expected
                ),
            },
            Command::Touch { mib } => {
                // Asking for more than is free touches all free memory.
                let n = workload::touch(&mut self.mem, mib);
                crate::println!("touch done {n} MiB");
            }
            Command::Free { mib } => {
                let pages = workload::free(&mut self.mem, mib);
                crate::println!("free done {} MiB ({pages} pages)", pages / FRAMES_PER_MIB);
            }
            Command::Spin { ns } => {
                // Nothing else runs meanwhile: no interrupt handling in
                // ring 3, no balloon driver, as a guest busy in a program.
                let deadline = clock::now_ns().saturating_add(ns);
                while clock::now_ns() < deadline {
                    core::hint::spin_loop();
                }
                crate::println!("spin done");
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
            Command::Balloon => self.balloon_start(),
            Command::BalloonWait => match self.balloon.as_mut() {
                Some(b) => match b.wait_target(&mut self.mem) {
                    Ok(n) => {
                        crate::print!("balloon actual {n} pages (");
                        let _ = b.burst_line(&mut serial::Console);
                        crate::println!(")");
                    }
                    Err(e) => crate::println!("error: balloon-wait: {e}"),
                },
                None => crate::println!("error: balloon not started"),
            },
            Command::BalloonHandoff => match self.balloon.as_mut() {
                Some(b) => {
                    b.handoff_next_burst();
                    crate::println!("balloon-handoff armed");
                }
                None => crate::println!("error: balloon not started"),
            },
            Command::Stats => match self.balloon.as_ref() {
                Some(b) if b.queue_sizes().2.is_some() => {
                    let _ = b.stats_line(&mut serial::Console);
                    crate::println!();
                }
                Some(_) => {
                    crate::println!("error: stats: VIRTIO_BALLOON_F_STATS_VQ not negotiated")
                }
                None => crate::println!("error: balloon not started"),
            },
            Command::Oom { mib } => match self.balloon.as_mut() {
                Some(b) => match b.oom(&mut self.mem, mib) {
                    Ok(n) => crate::println!("oom deflated {n} pages actual {}", b.actual()),
                    Err(e) => crate::println!("error: oom: {e}"),
                },
                None => crate::println!("error: balloon not started"),
            },
            Command::Hostile(case) => self.hostile(case),
            Command::Report => match self.balloon.as_mut() {
                Some(b) => match b.report(&mut self.mem) {
                    Ok(n) => crate::println!("report done {n} ranges ({} MiB)", n * 2),
                    Err(e) => crate::println!("error: report: {e}"),
                },
                None => crate::println!("error: balloon not started"),
            },
            Command::Hints => match self.balloon.as_ref().and_then(Balloon::hint_status) {
                Some((rounds, total, held, id)) => {
                    crate::println!("hints rounds {rounds} blocks {total} held {held} id {id}")
                }
                None if self.balloon.is_some() => {
                    crate::println!("error: hints: VIRTIO_BALLOON_F_FREE_PAGE_HINT not negotiated")
                }
                None => crate::println!("error: balloon not started"),
            },
            Command::Poison { byte } => {
                let pages = self.mem.enable_poison(byte);
                crate::print!(
                    "poison {byte:#04x} on, {} MiB free memory poisoned",
                    pages / FRAMES_PER_MIB
                );
                // PAGE_POISON and poison_val are negotiated before DRIVER_OK.
                if let Some(b) = self.balloon.as_mut() {
                    match b.restart(&mut self.mem) {
                        Ok(()) => crate::print!(", balloon restarted"),
                        Err(e) => crate::print!(", balloon restart failed: {e}"),
                    }
                }
                crate::println!();
            }
            Command::Ramp {
                mib,
                rate,
                hold_ns,
                cycles,
                seed,
                wait_ns,
            } => {
                let args = workload::RampArgs {
                    mib,
                    rate_mib_s: rate,
                    hold_ns,
                    cycles,
                    seed,
                    wait_ns,
                };
                let mut ctx = RampCtx {
                    balloon: &mut self.balloon,
                    dirtier: &mut self.dirtier,
                    watch_ctrl_c: cycles == 0,
                };
                let r = workload::ramp(&mut self.mem, args, &mut ctx);
                match r.error {
                    None => {
                        crate::print!("ramp done ");
                        let _ = r.stats.write_figures(&mut serial::Console, r.elapsed_ns);
                        if r.interrupted {
                            crate::print!(" interrupted=1");
                        }
                        crate::println!();
                    }
                    Some(e) => {
                        crate::print!("error: ramp: {e}: ");
                        let _ = r.stats.write_figures(&mut serial::Console, r.elapsed_ns);
                        crate::println!();
                    }
                }
            }
            Command::Dirty { mib, rate } => {
                if mib == 0 || rate == 0 {
                    match self.dirtier.take() {
                        Some(d) => crate::println!("dirty off ({} pages rewritten)", d.rewritten),
                        None => crate::println!("dirty off (0 pages rewritten)"),
                    }
                } else {
                    self.dirtier = Some(workload::Dirtier::new(mib, rate, clock::now_ns()));
                    crate::println!("dirty on {mib} MiB at {rate} MiB/s");
                }
            }
        }
    }
}

impl Guest {
    /// Boot-time probe, as Linux binds its drivers before init runs: with a
    /// virtio-balloon among the `virtio_mmio.device=` entries its driver
    /// starts now and prints its `balloon started …` line, unless
    /// `testguest.balloon=0`. Without a balloon nothing is printed; a device
    /// that is there but fails to start prints `error: balloon: …`.
    fn probe(&mut self) {
        if self.args.no_balloon || self.args.devices().next().is_none() {
            return;
        }
        match self.start_driver() {
            Ok(()) | Err(StartError::NoDevice) => {}
            Err(e) => crate::println!("error: balloon: {e}"),
        }
    }

    /// Starts a fresh driver and prints its `balloon started …` line.
    fn start_driver(&mut self) -> Result<(), StartError> {
        let b = Balloon::start(self.args.devices(), &mut self.mem, events::IRQ_VIRTIO_BASE)?;
        let _ = b.describe(&mut serial::Console);
        crate::println!();
        self.balloon = Some(b);
        Ok(())
    }

    fn balloon_start(&mut self) {
        if let Some(b) = self.balloon.as_mut() {
            match b.restart(&mut self.mem) {
                Ok(()) => {
                    let _ = b.describe(&mut serial::Console);
                    crate::println!(" (restarted)");
                }
                Err(e) => crate::println!("error: balloon: {e}"),
            }
            return;
        }
        if let Err(e) = self.start_driver() {
            crate::println!("error: balloon: {e}");
        }
    }

    fn hostile(&mut self, case: HostileCase) {
        let Some(b) = self.balloon.as_mut() else {
            crate::println!("error: balloon not started");
            return;
        };
        let cases: &[HostileCase] = if case == HostileCase::All {
            &HostileCase::EACH
        } else {
            core::slice::from_ref(&case)
        };
        for &c in cases {
            if cases.len() > 1 && !b.hostile_supported(c) {
                continue;
            }
            // Each case should meet a working device: if an earlier one
            // made it give up (NEEDS_RESET) or kept its buffer, start over.
            if cases.len() > 1
                && b.needs_restart()
                && let Err(e) = b.restart(&mut self.mem)
            {
                crate::println!("error: hostile {}: restart: {e}", c.name());
                continue;
            }
            match b.hostile(&mut self.mem, c, cases.len() > 1) {
                Ok(_returned) => crate::println!("hostile {} sent", c.name()),
                Err(e) => crate::println!("error: hostile {}: {e}", c.name()),
            }
            // Let the driver pick up whatever the device did meanwhile.
            b.service(&mut self.mem, true);
        }
        if case == HostileCase::All {
            crate::println!("hostile all sent");
        }
    }
}

/// Halts until an interrupt, `deadline_ns` or the balloon's or the
/// dirtier's own deadline, unless an event arrived after `seen` was read.
fn idle_until(balloon: Option<&Balloon>, dirtier: bool, seen: u64, deadline_ns: Option<u64>) {
    let mut driver = balloon.and_then(Balloon::next_wake_ns);
    if dirtier {
        let t = clock::now_ns() + workload::DIRTY_TICK_NS;
        driver = Some(driver.map_or(t, |d| d.min(t)));
    }
    let wake = match (deadline_ns, driver) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    idle::wait(seen, wake);
}

/// Ctrl-C on the console.
const CTRL_C: u8 = 0x03;

/// The rest of the guest as a ramp sees it.
struct RampCtx<'a> {
    balloon: &'a mut Option<Balloon>,
    dirtier: &'a mut Option<workload::Dirtier>,
    /// `ramp … CYCLES=0`: read the console for Ctrl-C.
    watch_ctrl_c: bool,
}

impl workload::RampEnv for RampCtx<'_> {
    fn service(&mut self, mem: &mut Memory) {
        if let Some(b) = self.balloon.as_mut() {
            b.service(mem, true);
        }
        if let Some(d) = self.dirtier.as_mut() {
            d.tick(mem, clock::now_ns());
        }
    }

    fn idle(&mut self, seen: u64, deadline_ns: u64) {
        idle_until(
            self.balloon.as_ref(),
            self.dirtier.is_some(),
            seen,
            Some(deadline_ns),
        );
    }

    fn oom_deflate(&mut self, mem: &mut Memory) -> u64 {
        match self.balloon.as_mut() {
            Some(b) if b.has(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) => b.oom(mem, 1).unwrap_or(0),
            _ => 0,
        }
    }

    fn note_stall(&mut self, scanned: u64) {
        if let Some(b) = self.balloon.as_mut() {
            b.note_alloc_stall(scanned);
        }
    }

    fn note_reclaim(&mut self, pages: u64) {
        if let Some(b) = self.balloon.as_mut() {
            b.note_direct_reclaim(pages);
        }
    }

    /// Other bytes typed during an endless ramp are dropped.
    fn interrupted(&mut self) -> bool {
        if !self.watch_ctrl_c {
            return false;
        }
        let mut stop = false;
        while let Some(b) = serial::try_read() {
            stop |= b == CTRL_C;
        }
        stop
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
