//! `blimp balloon|vm|migrate|snapshot|metrics|events ...`: commands that talk
//! to a running blimp through its API socket (`--api-sock`).
//!
//! Needs only `api`, `clap` and `serde_json` (progress bars come from
//! `api::indicatif`). The root binary flattens [`ClientCommand`] into its
//! subcommands and calls [`run`].

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use api::client::{ApiClient, ClientError};
use api::indicatif::{ProgressBar, ProgressStyle};
use api::size::{format_bytes, format_mib, parse_size};
use api::types::{
    BalloonInfo, BalloonStats, MigrationDestination, MigrationRequest, MigrationState,
    MigrationStatus, PAGE_SIZE, SnapshotRequest, VmInfo, VmState, mib_to_pages, pages_to_mib,
};
use clap::{Args, Subcommand};
use serde_json::Value;

/// `println!` for the client commands' stdout, in a function returning
/// `Result<_, String>`: a stdout closed by its reader (`blimp events |
/// head -1`) ends the command quietly (see [`stdout_closed`]) instead of
/// panicking as `println!` does.
macro_rules! out {
    ($($arg:tt)*) => {
        write_out(format_args!("{}\n", format_args!($($arg)*)))?
    };
}

/// `eprintln!` that never panics (for blimp's error messages, here and in
/// main.rs): a message for a stderr that cannot take it (a hung-up
/// terminal: EIO; a full disk: ENOSPC; a closed pipe: EPIPE) is lost,
/// instead of turning an exit with its documented status into a panic
/// (exit 101).
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Write to stdout (flushed). A reader that went away (EPIPE) is
/// remembered for [`stdout_closed`] and ends the command with an empty
/// message, which [`run`] turns into success; another write error is an
/// error.
fn write_out(args: std::fmt::Arguments) -> Result<(), String> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
            Err(String::new())
        }
        Err(e) => Err(format!("cannot write to stdout: {e}")),
    }
}

/// stdout's reader went away (EPIPE).
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether stdout was closed by its reader (`| head -1` had read enough):
/// not an error.
fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Where the API is and how to print.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// API socket of the running blimp (its --api-sock)
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    /// Print JSON (for scripts) instead of text
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Inspect or resize the memory balloon of a running VM
    Balloon {
        #[command(subcommand)]
        cmd: BalloonCommand,
    },
    /// Pause, resume, shut down or describe a running VM
    Vm {
        #[command(subcommand)]
        cmd: VmCommand,
    },
    /// Live-migrate a running VM and follow its progress
    ///
    /// Destinations: another blimp (`blimp run --incoming URL` there) at
    /// unix:///path or tcp://IP:PORT, or a file (file:///path).
    ///
    /// Over a socket the source keeps the guest paused after the last byte
    /// until the destination has verified the stream, built the VM and
    /// acknowledged; if it does not (refusal, crash, timeout), the guest runs
    /// here again and the migration is Failed with the reason. Once
    /// Completed, this VM is Migrated: it answers only GET requests and
    /// exits after --source-exit-delay-ms (or stays with --source-stays).
    ///
    /// Ctrl-C (or SIGTERM) cancels the migration: the guest runs here again.
    /// `blimp migrate --cancel` cancels one started elsewhere.
    ///
    /// Exit status: 0 when the migration Completed; 3 when the source blimp
    /// exited before this command could read how the migration ended (its
    /// API socket went away between two polls, 200 ms apart, e.g. with a
    /// --source-exit-delay-ms shorter than that): a source exits by itself
    /// only after a Completed migration, so the VM most likely runs at the
    /// destination, but this command did not see it (check there); 1
    /// otherwise (Failed, Cancelled, or an error).
    Migrate(MigrateArgs),
    /// Write a snapshot of a running VM to a file
    Snapshot(SnapshotArgs),
    /// Print the Prometheus metrics of a running VM (Prometheus text: the
    /// API has no JSON form of them)
    Metrics(MetricsArgs),
    /// Follow the events of a running VM (one per line)
    Events(EventsArgs),
}

#[derive(Subcommand, Debug)]
pub enum BalloonCommand {
    /// Set the balloon size, i.e. the memory taken from the guest
    Set(BalloonSetArgs),
    /// Show the balloon's configuration and size
    Get(Conn),
    /// Show the guest memory statistics reported through the balloon
    Stats(Conn),
    /// Set how often the guest is asked for statistics (0 = never)
    StatsInterval {
        #[command(flatten)]
        conn: Conn,
        /// Seconds between requests; 0 turns polling off
        seconds: u32,
    },
    /// The automatic balloon policy: show it (default), turn it on (also
    /// resumes it after a manual target paused it) or off, or set keys
    ///
    /// `blimp balloon policy set headroom=256M settle=5s`; the keys are
    /// those of `blimp run --balloon-policy`.
    Policy(PolicyArgs),
    /// Free page hinting: start a round, show it, stop it or release the pages
    Hint {
        #[command(subcommand)]
        cmd: HintCommand,
    },
}

#[derive(Args, Debug)]
pub struct PolicyArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// show, on, off or set
    #[arg(value_name = "ACTION", default_value = "show", value_parser = ["show", "on", "off", "set"])]
    pub action: String,
    /// With set: KEY=VALUE pairs (floor=512M settle=5s ...)
    #[arg(value_name = "KEY=VALUE")]
    pub settings: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum HintCommand {
    /// Ask the guest to hint its free pages (new command id)
    Start(Conn),
    /// Show the state of the current round
    Status(Conn),
    /// Stop the current round
    Stop(Conn),
    /// Let the guest reuse the hinted pages
    Done(Conn),
}

#[derive(Args, Debug)]
pub struct BalloonSetArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Balloon size: 512M, 1G, 256MiB, 1.5G (MB/GB mean MiB/GiB); a plain
    /// number is MiB. It must leave the guest the balloon floor (--balloon
    /// floor=SIZE of blimp run, default 64 MiB): else exit status 2
    #[arg(value_name = "SIZE", value_parser = parse_size_arg, allow_hyphen_values = true)]
    pub size_mib: u64,
    /// Wait, with a progress bar, until the guest has reached the size. A VM
    /// migrated away meanwhile ends the wait (exit status 1) with where it
    /// went: the target travels with it
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds (exit status 1); at
    /// most 86400 (a day)
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(..=MAX_WAIT_S)
    )]
    pub timeout: u64,
}

/// The longest `balloon set --wait --timeout`: a day is more than any
/// balloon needs, and a bound keeps the deadline's arithmetic in range.
const MAX_WAIT_S: u64 = 86_400;

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Pause the vCPUs
    Pause(Conn),
    /// Resume the vCPUs
    Resume(Conn),
    /// Shut the VM down and stop blimp
    Shutdown(Conn),
    /// Show the VM's state, memory, vCPUs and uptime
    Info(Conn),
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Destination: file:///path, unix:///path or tcp://IP:PORT
    #[arg(long, value_name = "URL", value_parser = parse_destination_arg, required_unless_present = "cancel")]
    pub to: Option<MigrationDestination>,
    /// Cancel the running migration (DELETE /migration) and wait until the
    /// guest runs here again
    #[arg(long, conflicts_with = "to")]
    pub cancel: bool,
    /// How long the paused source waits for the destination's
    /// acknowledgement before it resumes the guest
    #[arg(long, value_name = "MS", default_value_t = api::types::DEFAULT_ACK_TIMEOUT_MS)]
    pub ack_timeout_ms: u64,
    /// How long the destination may accept no data before the migration fails
    #[arg(long, value_name = "MS", default_value_t = api::types::DEFAULT_WRITE_TIMEOUT_MS)]
    pub write_timeout_ms: u64,
    /// Keep the source blimp (Migrated, GET only) after the migration
    /// instead of ending it
    #[arg(long)]
    pub source_stays: bool,
    /// Time between completion and the source's exit. Shorter than this
    /// command's polls (200 ms), the source may exit before this command
    /// reads Completed: it then exits with status 3 (see above)
    #[arg(long, value_name = "MS", default_value_t = api::types::DEFAULT_SOURCE_EXIT_DELAY_MS)]
    pub source_exit_delay_ms: u64,
    /// Do not use free page hinting to skip free guest memory
    #[arg(long)]
    pub no_hints: bool,
    /// Allowed downtime in milliseconds
    #[arg(long, value_name = "MS", default_value_t = api::types::DEFAULT_DOWNTIME_MS)]
    pub downtime_ms: u64,
    /// Most pre-copy rounds before the final stop-and-copy
    #[arg(long, value_name = "N")]
    pub max_rounds: Option<u32>,
    /// Start the migration and return without following it
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// File to write (relative paths are made absolute here); an existing one is replaced only if it is empty or an older snapshot or stream
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
}

/// `blimp metrics`: [`Conn`] without `--json` (`GET /metrics` is
/// Prometheus text only).
#[derive(Args, Debug)]
pub struct MetricsArgs {
    /// API socket of the running blimp (its --api-sock)
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Stop after this many events
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_destination_arg(s: &str) -> Result<MigrationDestination, String> {
    MigrationDestination::parse(s)
}

/// Run a client command. `Err` carries the message to print; exit with 1.
/// A stdout closed by its reader ends the command with `Ok`.
pub fn run(cmd: ClientCommand) -> Result<(), String> {
    match run_command(cmd) {
        // Only [`write_out`] fails with an empty message.
        Err(msg) if msg.is_empty() && stdout_closed() => Ok(()),
        r => r,
    }
}

fn run_command(cmd: ClientCommand) -> Result<(), String> {
    match cmd {
        ClientCommand::Balloon { cmd } => balloon(cmd),
        ClientCommand::Vm { cmd } => vm(cmd),
        ClientCommand::Migrate(args) => migrate(args),
        ClientCommand::Snapshot(args) => snapshot(args),
        ClientCommand::Metrics(args) => {
            let text = ApiClient::new(&args.api_sock)
                .and_then(|c| c.metrics())
                .map_err(err)?;
            write_out(format_args!("{text}"))?;
            Ok(())
        }
        ClientCommand::Events(args) => events(args),
    }
}

fn client(conn: &Conn) -> Result<ApiClient, String> {
    ApiClient::new(&conn.api_sock).map_err(err)
}

/// The message of a failed request; a 400 (the API refused the request as
/// invalid) is remembered for [`refused_as_invalid`], whichever command
/// sent it.
fn err(e: ClientError) -> String {
    if e.status() == Some(400) {
        REFUSED_AS_INVALID.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    e.to_string()
}

/// A request this command refuses before sending it (exit status 2, as
/// the API's 400 for it would be).
fn usage(msg: String) -> String {
    REFUSED_AS_INVALID.store(true, std::sync::atomic::Ordering::Relaxed);
    msg
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), String> {
    let s = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    out!("{s}");
    Ok(())
}

/// `v` as JSON with `--json`, else as `human` prints it.
fn show<T: serde::Serialize>(
    json: bool,
    v: &T,
    human: impl FnOnce(&T) -> Result<(), String>,
) -> Result<(), String> {
    if json { print_json(v) } else { human(v) }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn mib_pages(mib: u64, pages: u64) -> String {
    format!("{} ({pages} pages)", format_mib(mib))
}

/// The "target:" and "actual:" lines (with `prefix` before each label).
fn print_target_actual(prefix: &str, target: (u64, u64), actual: (u64, u64)) -> Result<(), String> {
    for (label, (mib, pages)) in [("target", target), ("actual", actual)] {
        out!(
            "{:<20} {}",
            format!("{prefix}{label}:"),
            mib_pages(mib, pages)
        );
    }
    Ok(())
}

fn print_balloon(b: &BalloonInfo) -> Result<(), String> {
    print_target_actual(
        "",
        (b.target_mib, b.target_pages),
        (b.actual_mib, b.actual_pages),
    )?;
    out!(
        "guest driver:        {}",
        if b.driver_ok {
            "ready (DRIVER_OK)"
        } else {
            "not started (DRIVER_OK not set): the guest follows no target"
        }
    );
    out!("deflate on OOM:      {}", yes_no(b.deflate_on_oom));
    out!("must tell host:      {}", yes_no(b.must_tell_host));
    out!("free page hinting:   {}", yes_no(b.free_page_hint));
    out!("free page reporting: {}", yes_no(b.free_page_reporting));
    out!("page poison:         {}", yes_no(b.page_poison));
    if b.stats_polling_interval_s == 0 {
        out!("statistics polling:  off");
    } else {
        out!(
            "statistics polling:  every {} s",
            b.stats_polling_interval_s
        );
    }
    Ok(())
}

fn print_stats(s: &BalloonStats) -> Result<(), String> {
    print_target_actual(
        "balloon ",
        (s.target_mib, s.target_pages),
        (s.actual_mib, s.actual_pages),
    )?;
    let v = |name| s.guest.as_ref().and_then(|g| g.by_name(name));
    // (label, statistic, whether the value is a byte count), in print order.
    const SHOWN: [(&str, &str, bool); 16] = [
        ("total memory", "total_memory", true),
        ("free memory", "free_memory", true),
        ("available memory", "available_memory", true),
        ("disk caches", "disk_caches", true),
        ("swapped in", "swap_in", true),
        ("swapped out", "swap_out", true),
        ("major faults", "major_faults", false),
        ("minor faults", "minor_faults", false),
        ("hugetlb allocations", "hugetlb_allocations", false),
        ("hugetlb failures", "hugetlb_failures", false),
        ("OOM kills", "oom_kill", false),
        ("alloc stalls", "alloc_stall", false),
        ("async scans", "async_scan", false),
        ("direct scans", "direct_scan", false),
        ("async reclaims", "async_reclaim", false),
        ("direct reclaims", "direct_reclaim", false),
    ];
    for (label, name, is_bytes) in SHOWN {
        if let Some(v) = v(name) {
            let value = if is_bytes {
                format_bytes(v)
            } else {
                v.to_string()
            };
            out!("{:<20} {value}", format!("{label}:"));
        }
    }
    match &s.guest {
        Some(g) => {
            let ago = SystemTime::now()
                .duration_since(g.updated)
                .map_or(0, |d| d.as_secs());
            out!("last update:         {ago} s ago");
        }
        None => out!("last update:         never (statistics not reported yet)"),
    }
    out!("hinting rounds:      {}", s.hint_rounds);
    out!(
        "hinted:              {}",
        format_bytes(s.hinted_pages.saturating_mul(PAGE_SIZE))
    );
    out!(
        "reported:            {}",
        format_bytes(s.reported_pages.saturating_mul(PAGE_SIZE))
    );
    out!("discarded:           {}", format_bytes(s.discarded_bytes));
    Ok(())
}

fn balloon(cmd: BalloonCommand) -> Result<(), String> {
    match cmd {
        BalloonCommand::Set(args) => balloon_set(args),
        BalloonCommand::Get(conn) => {
            let b = client(&conn)?.balloon().map_err(err)?;
            show(conn.json, &b, print_balloon)
        }
        BalloonCommand::Stats(conn) => {
            let s = client(&conn)?.balloon_stats().map_err(err)?;
            show(conn.json, &s, print_stats)
        }
        BalloonCommand::StatsInterval { conn, seconds } => {
            client(&conn)?.set_stats_interval(seconds).map_err(err)?;
            if !conn.json {
                if seconds == 0 {
                    out!("statistics polling turned off");
                } else {
                    out!("statistics polled every {seconds} s");
                }
            }
            Ok(())
        }
        BalloonCommand::Policy(args) => policy(args),
        BalloonCommand::Hint { cmd } => hint(cmd),
    }
}

fn policy(args: PolicyArgs) -> Result<(), String> {
    let c = client(&args.conn)?;
    let mut patch = api::policy::PolicyPatch::default();
    match args.action.as_str() {
        "on" => patch.enabled = Some(true),
        "off" => patch.enabled = Some(false),
        "set" => {
            if args.settings.is_empty() {
                return Err(usage(format!(
                    "balloon policy set: give KEY=VALUE pairs (keys: {})",
                    api::policy::known_keys()
                )));
            }
            let mut check = api::policy::PolicySettings::default();
            let mut given = api::policy::GivenKeys::default();
            for kv in &args.settings {
                let Some((k, v)) = kv.split_once('=') else {
                    return Err(usage(format!(
                        "balloon policy set: '{kv}' is not KEY=VALUE"
                    )));
                };
                given
                    .note(k)
                    .map_err(|e| usage(format!("balloon policy set: {e}")))?;
                if k == "enabled" {
                    patch.enabled = Some(match v {
                        "on" | "true" | "1" | "yes" => true,
                        "off" | "false" | "0" | "no" => false,
                        _ => {
                            return Err(usage(format!(
                                "balloon policy set enabled={v}: expected on or off"
                            )));
                        }
                    });
                    continue;
                }
                check.set_str(k, v).map_err(usage)?;
                patch
                    .changes
                    .insert(k.to_string(), serde_json::Value::String(v.to_string()));
            }
        }
        _ => {}
    }
    if args.action != "show" {
        c.patch_balloon_policy(&patch).map_err(err)?;
    }
    let st = c.balloon_policy().map_err(err)?;
    if args.conn.json {
        return print_json(&st);
    }
    let state = match (st.enabled, st.paused) {
        (false, _) => "off",
        (true, false) => "on",
        (true, true) => "on, paused",
    };
    out!("policy:        {state}");
    if let Some(r) = &st.paused_reason {
        out!("paused:        {r}");
    }
    let cfg = serde_json::to_value(&st.config).map_err(|e| e.to_string())?;
    if let serde_json::Value::Object(m) = cfg {
        for (k, v) in m {
            out!("  {k:<20} {v}");
        }
    }
    out!(
        "decisions:     {} ({} target changes)",
        st.decisions,
        st.target_changes
    );
    if let Some(d) = &st.last_decision {
        out!(
            "last decision: {} {} -> {} MiB, {}: {}",
            d.action,
            d.old_target_mib,
            d.new_target_mib,
            d.reason,
            d.detail
        );
    }
    Ok(())
}

fn hint(cmd: HintCommand) -> Result<(), String> {
    match cmd {
        HintCommand::Start(conn) => {
            let r = client(&conn)?.hinting_start().map_err(err)?;
            show(conn.json, &r, |r| {
                out!("free page hinting started (command id {})", r.cmd_id);
                Ok(())
            })
        }
        HintCommand::Status(conn) => {
            let s = client(&conn)?.hinting_status().map_err(err)?;
            if conn.json {
                return print_json(&s);
            }
            out!("state:        {:?}", s.state);
            out!("host cmd id:  {}", s.host_cmd_id);
            match s.guest_cmd_id {
                Some(g) => out!("guest cmd id: {g}"),
                None => out!("guest cmd id: (no answer yet)"),
            }
            out!(
                "hinted:       {} ({} pages)",
                format_bytes(s.hinted_pages.saturating_mul(PAGE_SIZE)),
                s.hinted_pages
            );
            Ok(())
        }
        HintCommand::Stop(conn) => {
            client(&conn)?.hinting_stop().map_err(err)?;
            if !conn.json {
                out!("free page hinting stopped");
            }
            Ok(())
        }
        HintCommand::Done(conn) => {
            client(&conn)?.hinting_done().map_err(err)?;
            if !conn.json {
                out!("hinted pages released to the guest");
            }
            Ok(())
        }
    }
}

/// How often `--wait` polls.
const POLL: Duration = Duration::from_millis(100);

/// The request was invalid: the API answered it 400, or this command
/// refused it before sending.
static REFUSED_AS_INVALID: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether the command failed because the API refused a request as
/// invalid (400), e.g. a balloon target below the floor, or this command
/// refused it first (`balloon policy set foo=1`): exit status 2.
pub fn refused_as_invalid() -> bool {
    REFUSED_AS_INVALID.load(std::sync::atomic::Ordering::Relaxed)
}

/// The source blimp went away before `blimp migrate` read how its
/// migration ended.
static SOURCE_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `blimp migrate` failed because the source blimp exited before
/// it could read the migration's final state (exit status 3: the outcome
/// is most likely Completed, but was not seen).
pub fn source_gone() -> bool {
    SOURCE_GONE.load(std::sync::atomic::Ordering::Relaxed)
}

fn balloon_set(args: BalloonSetArgs) -> Result<(), String> {
    let c = client(&args.conn)?;
    c.set_balloon(args.size_mib).map_err(err)?;
    let target_pages = mib_to_pages(args.size_mib);
    if !args.wait {
        if args.conn.json {
            return print_json(&c.balloon().map_err(err)?);
        }
        out!("balloon target set to {}", format_mib(args.size_mib));
        return Ok(());
    }
    let first = c.balloon().map_err(err)?;
    let start = first.actual_pages;
    let distance = start.abs_diff(target_pages);
    let bar = if args.conn.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(distance.max(1))
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:40}] {msg} ({elapsed})")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut b = first;
    let mut moving_to = None;
    loop {
        let moved = start.abs_diff(b.actual_pages).min(distance);
        bar.set_position(moved);
        bar.set_message(if b.driver_ok {
            format!(
                "{} of {}",
                format_mib(pages_to_mib(b.actual_pages)),
                format_mib(args.size_mib)
            )
        } else {
            "waiting for the guest's balloon driver (DRIVER_OK not set)".to_string()
        });
        if b.target_pages != target_pages {
            bar.abandon();
            return Err(format!(
                "the balloon target was changed to {} by another request",
                format_mib(b.target_mib)
            ));
        }
        if b.actual_pages == target_pages {
            bar.finish();
            break;
        }
        if Instant::now() >= deadline && !b.driver_ok {
            bar.abandon();
            return Err(no_driver_message(args.timeout, &b));
        }
        if Instant::now() >= deadline {
            bar.abandon();
            return Err(format!(
                "timed out after {} s: the balloon is at {} of its {} target",
                args.timeout,
                format_mib(b.actual_mib),
                format_mib(args.size_mib)
            ));
        }
        std::thread::sleep(POLL);
        b = match next_balloon(&c, &mut moving_to) {
            Ok(b) => b,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
    }
    if args.conn.json {
        print_json(&b)
    } else {
        out!("balloon is at {}", format_mib(args.size_mib));
        Ok(())
    }
}

/// The balloon's next state for `balloon set --wait`, unless the VM left:
/// migrated (it answers GET requests, with figures that no longer move),
/// or its blimp gone after a migration seen in progress (`moving_to`, the
/// destination, kept from poll to poll). The target travelled with it.
fn next_balloon(c: &ApiClient, moving_to: &mut Option<String>) -> Result<BalloonInfo, String> {
    let gone = |dest: &str, how: &str| {
        format!(
            "the VM was migrated to {dest} while waiting{how}: its balloon target went with it; \
             follow it there (`blimp balloon get --api-sock` the destination's socket)"
        )
    };
    match c.migration() {
        Ok(m) if !m.state.is_finished() && m.state != MigrationState::Idle => {
            *moving_to = m.destination;
        }
        Ok(m)
            if m.state == MigrationState::Completed
                && c.vm_info().is_ok_and(|v| v.state == VmState::Migrated) =>
        {
            return Err(gone(m.destination.as_deref().unwrap_or("?"), ""));
        }
        Ok(_) => *moving_to = None,
        Err(e) => {
            return Err(match moving_to {
                Some(dest) => gone(dest, &format!(" (and its blimp exited: {e})")),
                None => err(e),
            });
        }
    }
    c.balloon().map_err(|e| match moving_to {
        Some(dest) => gone(dest, &format!(" (and its blimp exited: {e})")),
        None => err(e),
    })
}

/// Why `--wait` gave up when the guest never started its driver: the
/// target is set, but nothing in the guest follows it.
fn no_driver_message(timeout_s: u64, b: &BalloonInfo) -> String {
    format!(
        "the guest has not started its balloon driver (DRIVER_OK not set) within {timeout_s} s: \
         the target of {} is set but nothing in the guest follows it; the balloon stays at {}. \
         A Linux guest needs CONFIG_VIRTIO_BALLOON (or `modprobe virtio_balloon`) and \
         virtio_mmio; the test guest starts its driver at boot unless its command line has \
         testguest.balloon=0 (then type `balloon` on its console)",
        format_mib(b.target_mib),
        format_mib(b.actual_mib)
    )
}

fn fmt_uptime(s: u64) -> String {
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h {m}m {s}s")
    } else if h > 0 {
        format!("{h}h {m}m {s}s")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

fn print_vm(v: &VmInfo) -> Result<(), String> {
    out!("state:   {}", v.state);
    out!("memory:  {}", format_mib(v.memory_mib));
    out!("vcpus:   {}", v.vcpus);
    out!("uptime:  {}", fmt_uptime(v.uptime_s));
    out!("balloon: {}", yes_no(v.balloon));
    Ok(())
}

fn vm(cmd: VmCommand) -> Result<(), String> {
    let (conn, state, done) = match cmd {
        VmCommand::Info(conn) => {
            let v = client(&conn)?.vm_info().map_err(err)?;
            return show(conn.json, &v, print_vm);
        }
        VmCommand::Shutdown(conn) => {
            client(&conn)?.shutdown_vm().map_err(err)?;
            if !conn.json {
                out!("VM shutting down");
            }
            return Ok(());
        }
        VmCommand::Pause(conn) => (conn, VmState::Paused, "VM paused"),
        VmCommand::Resume(conn) => (conn, VmState::Running, "VM resumed"),
    };
    client(&conn)?.set_vm_state(state).map_err(err)?;
    if !conn.json {
        out!("{done}");
    }
    Ok(())
}

fn print_migration(m: &MigrationStatus) -> Result<(), String> {
    let mut line = format!(
        "{:?} after {:.1} s, {} rounds: {} pages sent ({}), {} hinted free, {} zero",
        m.state,
        m.elapsed_ms as f64 / 1000.0,
        m.round,
        m.pages_sent,
        format_bytes(m.bytes_sent),
        m.pages_hinted,
        m.pages_zero
    );
    if let Some(d) = m.downtime_ms {
        line.push_str(&format!(", downtime {d} ms"));
    }
    out!("{line}");
    Ok(())
}

/// Set once by the binary: says whether the user interrupted (Ctrl-C).
static INTERRUPTED: std::sync::OnceLock<Box<dyn Fn() -> bool + Send + Sync>> =
    std::sync::OnceLock::new();

/// How `blimp migrate` learns of Ctrl-C/SIGTERM (the binary blocks them and
/// reads a signalfd); without it, Ctrl-C ends the client as usual.
pub fn set_interrupt_check(check: Box<dyn Fn() -> bool + Send + Sync>) {
    let _ = INTERRUPTED.set(check);
}

fn interrupted() -> bool {
    INTERRUPTED.get().is_some_and(|f| f())
}

static READER_GONE: std::sync::OnceLock<fn() -> bool> = std::sync::OnceLock::new();

/// How a command that waits for something to print (`blimp events`) learns
/// that its reader went away before it has anything to write (the binary
/// polls stdout: `vmm::console::stdout_reader_gone`).
pub fn set_reader_gone_check(check: fn() -> bool) {
    let _ = READER_GONE.set(check);
}

fn reader_gone() -> bool {
    READER_GONE.get().is_some_and(|f| f())
}

/// Wait until the running job ends (or none runs).
fn wait_job_end(c: &ApiClient) -> Result<MigrationStatus, String> {
    loop {
        let m = c.migration().map_err(err)?;
        if m.state.is_finished() || m.state == MigrationState::Idle {
            return Ok(m);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cancel_migration(args: &MigrateArgs) -> Result<(), String> {
    let c = client(&args.conn)?;
    c.cancel_migration().map_err(err)?;
    let status = wait_job_end(&c)?;
    // How it ended decides the exit status, even when stdout is closed.
    let shown = show(args.conn.json, &status, print_migration);
    let outcome = match status.state {
        MigrationState::Cancelled => Ok(()),
        other => Err(format!(
            "the migration ended {other:?} before the cancel took effect"
        )),
    };
    outcome.and(shown)
}

fn migrate(args: MigrateArgs) -> Result<(), String> {
    if args.cancel {
        return cancel_migration(&args);
    }
    let Some(to) = args.to.clone() else {
        return Err("--to URL is required".into());
    };
    let c = client(&args.conn)?;
    let req = MigrationRequest {
        downtime_ms: args.downtime_ms,
        free_page_hints: !args.no_hints,
        max_rounds: args.max_rounds,
        ack_timeout_ms: args.ack_timeout_ms,
        write_timeout_ms: args.write_timeout_ms,
        source_exits: !args.source_stays,
        source_exit_delay_ms: args.source_exit_delay_ms,
        ..MigrationRequest::new(to.clone())
    };
    c.start_migration(&req).map_err(err)?;
    if args.no_wait {
        if !args.conn.json {
            out!("migration to {to} started");
        }
        return Ok(());
    }
    let bar = if args.conn.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(1)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:40}] {percent:>3}% {msg} ({elapsed})")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    let mut cancel_sent = false;
    let mut follow = Follow::new(&req, &args.conn);
    let status = loop {
        if let Some(m) = follow.poll(&c)? {
            bar.set_length(m.total_pages.max(1));
            bar.set_position(m.total_pages.saturating_sub(m.remaining_pages));
            bar.set_message(format!(
                "{:?}, round {}, {} sent",
                m.state,
                m.round,
                format_bytes(m.stream_bytes.max(m.bytes_sent))
            ));
            if m.state.is_finished() || m.state == MigrationState::Idle {
                break m;
            }
        }
        if !cancel_sent && interrupted() {
            bar.suspend(|| {
                errln!(
                    "blimp: interrupted: cancelling the migration (the guest keeps running here)"
                )
            });
            match c.cancel_migration() {
                Ok(()) => {}
                // It ended meanwhile: the next poll shows how.
                Err(e) if e.status() == Some(409) => {}
                Err(e) => return Err(follow.error(e)),
            }
            cancel_sent = true;
        }
        std::thread::sleep(MIGRATE_POLL);
    };
    if status.state == MigrationState::Completed {
        bar.finish();
    } else {
        bar.abandon();
    }
    // How it ended decides the exit status, even when stdout is closed.
    let shown = show(args.conn.json, &status, print_migration);
    let outcome = match status.state {
        MigrationState::Completed => Ok(()),
        MigrationState::Failed => Err(format!(
            "migration failed: {}",
            status.error.as_deref().unwrap_or("no reason given")
        )),
        MigrationState::Cancelled if cancel_sent => {
            Err("migration cancelled (Ctrl-C); the guest runs here again".into())
        }
        MigrationState::Cancelled => Err("migration was cancelled".into()),
        other => Err(format!("migration ended in state {other:?}")),
    };
    outcome.and(shown)
}

/// Polls of `blimp migrate` between which the whole migration, and the
/// source's exit after it, may happen.
const MIGRATE_POLL: Duration = Duration::from_millis(200);

/// Whether `e` says the API socket is gone or its blimp closed the
/// connection (as a blimp that exits does), rather than that it answered.
fn source_went_away(e: &ClientError) -> bool {
    matches!(e, ClientError::Connect { .. } | ClientError::Http(_))
}

/// How long `blimp migrate` asks again while the source answers only 503:
/// its VMM is busy, or has stopped and the blimp is about to exit (as a
/// source does after its migration) and remove its socket.
const MIGRATE_UNAVAILABLE: Duration = Duration::from_secs(30);

/// What `blimp migrate` knows of the source while it follows a migration.
struct Follow<'a> {
    req: &'a MigrationRequest,
    conn: &'a Conn,
    /// The state the last `GET /migration` showed.
    last: MigrationState,
    /// Since when the source has answered only 503.
    unavailable_since: Option<Instant>,
}

impl<'a> Follow<'a> {
    fn new(req: &'a MigrationRequest, conn: &'a Conn) -> Self {
        Follow {
            req,
            conn,
            last: MigrationState::Setup,
            unavailable_since: None,
        }
    }

    /// One `GET /migration`; `Ok(None)`: ask again at the next poll (a
    /// 503, for up to [`MIGRATE_UNAVAILABLE`]).
    fn poll(&mut self, c: &ApiClient) -> Result<Option<MigrationStatus>, String> {
        match c.migration() {
            Ok(m) => {
                self.last = m.state;
                self.unavailable_since = None;
                Ok(Some(m))
            }
            Err(e)
                if e.status() == Some(503)
                    && self
                        .unavailable_since
                        .get_or_insert_with(Instant::now)
                        .elapsed()
                        < MIGRATE_UNAVAILABLE =>
            {
                Ok(None)
            }
            Err(e) => Err(self.error(e)),
        }
    }

    /// Why following the migration failed. A source that exits after the
    /// migration (`source_exits`) may do so between two polls: then say
    /// what is known (it exits by itself only after Completed) and what is
    /// not (this command did not see it), and exit with status 3 instead
    /// of reporting a failure.
    fn error(&self, e: ClientError) -> String {
        if !(self.req.source_exits && source_went_away(&e)) {
            return err(e);
        }
        SOURCE_GONE.store(true, std::sync::atomic::Ordering::Relaxed);
        let (likely, check) = match &self.req.destination {
            MigrationDestination::File(p) => (
                format!("{} was most likely written in full", p.display()),
                "`blimp restore --from` refuses it if it is not",
            ),
            d => (
                format!("the VM most likely runs at {d} now"),
                "e.g. `blimp vm info --api-sock` with its API socket",
            ),
        };
        let how = match &e {
            ClientError::Connect { reason, .. } => format!("its API socket: {reason}"),
            other => other.to_string(),
        };
        format!(
            "the source blimp at {} exited before this command read how the migration ended \
             (last seen: {:?}; {how}). A source blimp exits by itself only after a Completed \
             migration (here {} ms after it, --source-exit-delay-ms; this command polls every {} \
             ms), so {likely}, unless the source was killed or crashed: this command cannot tell \
             which. Check the destination ({check})",
            self.conn.api_sock.display(),
            self.last,
            self.req.source_exit_delay_ms,
            MIGRATE_POLL.as_millis(),
        )
    }
}

fn snapshot(args: SnapshotArgs) -> Result<(), String> {
    let path = std::path::absolute(&args.path)
        .map_err(|e| format!("cannot resolve {}: {e}", args.path.display()))?;
    let c = client(&args.conn)?;
    c.snapshot(&SnapshotRequest { path: path.clone() })
        .map_err(err)?;
    // The snapshot runs in the background (the guest keeps answering hint
    // requests until it is paused): wait for it.
    let status = wait_job_end(&c)?;
    if status.state != MigrationState::Completed {
        return Err(format!(
            "snapshot failed: {}",
            status.error.as_deref().unwrap_or("no reason given")
        ));
    }
    if args.conn.json {
        print_json(&status)?;
    } else {
        out!(
            "snapshot written to {} ({} of page data, {} pages hinted free, {} zero)",
            path.display(),
            format_bytes(status.bytes_sent),
            status.pages_hinted,
            status.pages_zero
        );
    }
    Ok(())
}

fn events(args: EventsArgs) -> Result<(), String> {
    let c = client(&args.conn)?.with_timeout(Duration::from_secs(5));
    let mut stream = c.events().map_err(err)?;
    let mut seen = 0u64;
    // After a ShuttingDown event the VMM exits, and the stream ends with
    // it, cut short (no last chunk): that is the stream's normal end.
    let mut shutting_down = false;
    while args.count.is_none_or(|n| seen < n) {
        // A second at a time: a reader that went away (`| head -1`) ends
        // the command even while no event comes to be written.
        if reader_gone() {
            return Ok(());
        }
        match stream.next_event(Duration::from_secs(1)) {
            Ok(Some(ev)) => {
                seen += 1;
                shutting_down |= matches!(ev.event, api::events::ApiEvent::ShuttingDown { .. });
                if args.conn.json {
                    let line = serde_json::to_string(&ev).map_err(|e| e.to_string())?;
                    out!("{line}");
                } else {
                    let mut fields = serde_json::to_value(&ev.event).unwrap_or(Value::Null);
                    if let Some(o) = fields.as_object_mut() {
                        o.remove("type");
                    }
                    out!("{:>6} {} {}", ev.seq, ev.event.kind(), fields);
                }
            }
            Ok(None) => return Ok(()),
            Err(ClientError::Timeout { .. }) => continue,
            Err(_) if shutting_down => return Ok(()),
            Err(e) => return Err(err(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: ClientCommand,
    }

    fn parse(args: &[&str]) -> Result<ClientCommand, String> {
        Cli::try_parse_from(std::iter::once("blimp").chain(args.iter().copied()))
            .map(|c| c.cmd)
            .map_err(|e| e.to_string())
    }

    /// A one-connection API server standing in for a source blimp: it
    /// answers the requests on its first connection with `replies`
    /// (status, JSON body) in turn (or until the client hangs up), then
    /// closes it and removes its socket, as a source that exits after its
    /// migration does.
    fn exiting_source(
        path: &std::path::Path,
        replies: Vec<(u16, String)>,
    ) -> std::thread::JoinHandle<()> {
        use std::io::{BufRead, BufReader, Read, Write};
        let _ = std::fs::remove_file(path);
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut out = stream;
            'replies: for (status, body) in replies {
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    // The client hung up (it stopped early): done.
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break 'replies;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                reader.read_exact(&mut vec![0; len]).unwrap();
                write!(
                    out,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
            drop((reader, out, listener));
            std::fs::remove_file(&path).unwrap();
        })
    }

    fn migrate_args(sock: &std::path::Path, to: &str, stays: bool) -> MigrateArgs {
        let Ok(ClientCommand::Migrate(mut args)) = parse(&[
            "migrate",
            "--api-sock",
            sock.to_str().unwrap(),
            "--to",
            to,
            "--source-exit-delay-ms",
            "0",
            "--json",
        ]) else {
            panic!("migrate arguments");
        };
        args.source_stays = stays;
        args
    }

    fn status(state: MigrationState) -> String {
        serde_json::to_string(&MigrationStatus {
            state,
            ..MigrationStatus::idle()
        })
        .unwrap()
    }

    /// `--source-exit-delay-ms 0`: the source completed and exited between
    /// two polls. That was reported as a failed migration ("cannot connect
    /// ... is blimp running"); it is now reported as what it is, with the
    /// last state seen, and exit status 3.
    #[test]
    fn a_source_that_exits_between_polls_is_not_a_failed_migration() {
        let sock =
            std::env::temp_dir().join(format!("blimp-client-gone-{}.sock", std::process::id()));
        let server = exiting_source(
            &sock,
            vec![
                (204, String::new()),
                (200, status(MigrationState::Switchover)),
            ],
        );
        let e = migrate(migrate_args(&sock, "unix:///tmp/blimp-dst.sock", false)).unwrap_err();
        server.join().unwrap();
        assert!(
            e.starts_with(&format!(
                "the source blimp at {} exited before this command read how the migration ended (last seen: Switchover; its API socket: no such file)",
                sock.display()
            )),
            "{e}"
        );
        assert!(
            e.contains("the VM most likely runs at unix:///tmp/blimp-dst.sock now")
                && e.contains("killed or crashed"),
            "{e}"
        );
        assert!(source_gone(), "exit status 3");
    }

    /// The source's VMM stopped first (the API answers 503 "the VMM is not
    /// running" until the blimp exits): ask again, then report the exit.
    #[test]
    fn a_source_answering_503_then_gone_is_not_a_failed_migration() {
        let sock =
            std::env::temp_dir().join(format!("blimp-client-503-{}.sock", std::process::id()));
        let not_running = r#"{"error":"the VMM is not running"}"#.to_string();
        let server = exiting_source(
            &sock,
            vec![
                (204, String::new()),
                (200, status(MigrationState::Active)),
                (503, not_running.clone()),
                (503, not_running),
            ],
        );
        let e = migrate(migrate_args(&sock, "file:///tmp/blimp-vm.mig", false)).unwrap_err();
        server.join().unwrap();
        assert!(
            e.contains(
                "exited before this command read how the migration ended (last seen: Active;"
            ) && e.contains("/tmp/blimp-vm.mig was most likely written in full"),
            "{e}"
        );
    }

    /// With --source-stays the source never exits by itself: a vanished
    /// one is an error as before.
    #[test]
    fn a_source_that_stays_and_vanishes_is_an_error() {
        let sock =
            std::env::temp_dir().join(format!("blimp-client-stays-{}.sock", std::process::id()));
        let server = exiting_source(
            &sock,
            vec![(204, String::new()), (200, status(MigrationState::Active))],
        );
        let e = migrate(migrate_args(&sock, "file:///tmp/blimp-vm.mig", true)).unwrap_err();
        server.join().unwrap();
        assert!(e.starts_with("cannot connect to"), "{e}");
    }

    /// An absurd --timeout was taken and overflowed `Instant + Duration`
    /// (a panic); it is now refused by the parser, naming the limit.
    #[test]
    fn balloon_wait_timeout_is_bounded() {
        let set = |t: &str| {
            parse(&[
                "balloon",
                "set",
                "128M",
                "--wait",
                "--timeout",
                t,
                "--api-sock",
                "S",
            ])
        };
        for t in ["18446744073709551615", "86401"] {
            let e = set(t).unwrap_err();
            assert!(e.contains("--timeout") && e.contains("86400"), "{t}: {e}");
        }
        for (t, want) in [("86400", 86_400), ("0", 0)] {
            match set(t) {
                Ok(ClientCommand::Balloon {
                    cmd: BalloonCommand::Set(a),
                }) => assert_eq!(a.timeout, want),
                other => panic!("{t}: {other:?}"),
            }
        }
    }
}
