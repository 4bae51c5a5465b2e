//! `blimp`: a small KVM hypervisor whose memory balloon is a first-class citizen.

mod balloon_opts;
#[macro_use]
mod client;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::{MemoryBackend, VmConfig, Vmm};

/// Exit status for usage errors (bad arguments, unusable files).
const EXIT_USAGE: u8 = 2;
/// Exit status for runtime errors.
const EXIT_RUNTIME: u8 = 1;
/// `blimp migrate`: the source blimp exited before the command read how
/// the migration ended (most likely Completed; see `blimp migrate --help`).
const EXIT_SOURCE_GONE: u8 = 3;

#[derive(Parser)]
#[command(
    name = "blimp",
    version,
    about = "A small KVM hypervisor whose memory balloon is a first-class citizen",
    long_about = "Blimp boots a Linux-protocol guest (an ELF vmlinux or a bzImage) on KVM, \
with a serial console on stdin/stdout.\n\n\
Example: boot the test guest with 512 MiB and let it end the VM with its own exit status:\n  \
blimp run --kernel \"$(resources/build.sh testguest | tail -1)\" --memory 512M --debug-exit \\\n    \
--cmdline 'testguest.run=\"fill 256 7;verify;exit 0\"'"
)]
struct Cli {
    /// Log level for messages on stderr: error, warn, info, debug or trace
    /// (RUST_LOG overrides it, and takes per-module filters).
    #[arg(
        long,
        global = true,
        default_value = "warn",
        value_name = "LEVEL",
        value_parser = ["error", "warn", "info", "debug", "trace"],
        ignore_case = true
    )]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until the guest resets, writes to the debug-exit
    /// port, or blimp receives a terminating signal (SIGTERM, SIGINT,
    /// SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM: exit 128 + the signal).
    Run(RunArgs),
    /// Restore a VM from a migration file (written by `PUT /migration` with a
    /// file:// destination, `blimp migrate --to file://...` or `PUT /snapshot`)
    /// and run it. A damaged or truncated file is refused before anything runs.
    Restore(RestoreArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
}

#[derive(Args)]
struct RestoreArgs {
    /// The migration file.
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    #[command(flatten)]
    host: HostArgs,
}

/// How a restored or incoming VM is hosted here.
#[derive(Args)]
struct HostArgs {
    /// How guest RAM is backed here (anon, memfd, hugetlb, file=PATH). A
    /// restore onto file=PATH builds the RAM in a new, unnamed file in
    /// PATH's directory and puts it in PATH's place only once the VM is
    /// restored (or, incoming, handed over): a refused or killed restore
    /// leaves PATH as it was. A PATH that a running VM uses is refused.
    #[arg(long, value_name = "KIND", default_value = "anon", value_parser = parse_backend)]
    memory_backend: MemoryBackend,
    /// Back guest RAM with transparent huge pages where this host allows
    /// them (see `blimp run --help`).
    #[arg(long)]
    memory_thp: bool,
    /// Serve the REST API on this unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Do not read stdin: the serial console is output-only. Implied when
    /// stdin is a terminal and blimp is not its foreground job (started
    /// with `&`): blimp then neither reads nor reconfigures the terminal.
    /// On a terminal it owns, the console is raw; Ctrl-A x quits (the VM
    /// stops, exit status 0), Ctrl-A Ctrl-A sends a Ctrl-A.
    #[arg(long)]
    no_stdin: bool,
    #[command(flatten)]
    seccomp: SeccompArg,
}

/// How the threads of a running VM are confined.
#[derive(Args, Clone, Copy)]
struct SeccompArg {
    /// Seccomp filters per thread: kill (a syscall outside the thread's
    /// allow-list kills blimp with SIGSYS), log (it is allowed and logged by
    /// the kernel, see dmesg: for finding missing syscalls) or off.
    #[arg(long = "seccomp", value_name = "MODE", default_value = "kill", value_parser = parse_seccomp)]
    mode: vmm::seccomp::Mode,
}

fn parse_seccomp(s: &str) -> Result<vmm::seccomp::Mode, String> {
    s.parse().map_err(|e: vmm::seccomp::Error| e.to_string())
}

/// Compile the filters and confine the main thread, before blimp reads
/// anything a peer or a file controls. With memfd RAM, first fork the
/// punch helper processes (`vmm::punch`), one per discard thread, while
/// blimp is still one small thread.
fn confine_main(arg: SeccompArg, backing: &MemoryBackend) -> Result<(), String> {
    let parts = vmm::discard_workers::host_parts();
    if matches!(backing, MemoryBackend::Memfd) && parts > 1 {
        vmm::punch::start(parts, arg.mode);
    }
    vmm::seccomp::init(arg.mode).map_err(|e| e.to_string())?;
    vmm::seccomp::enter(vmm::seccomp::ThreadKind::Main).map_err(|e| e.to_string())
}

#[derive(Args)]
struct RunArgs {
    /// Guest kernel: an uncompressed ELF vmlinux (or the test guest), or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "incoming")]
    kernel: Option<PathBuf>,
    /// Instead of booting a kernel, wait for a live migration from another
    /// blimp on unix:///PATH or tcp://IP:PORT, then run the received VM.
    /// The stream sets the guest (kernel, memory, vCPUs, devices), so the
    /// options that describe one are refused with it.
    #[arg(
        long,
        value_name = "URL",
        conflicts_with_all = [
            "kernel", "initrd", "cmdline", "memory", "vcpus", "debug_exit",
            "balloon", "balloon_target", "balloon_policy",
        ]
    )]
    incoming: Option<String>,
    /// Initial ramdisk, loaded at the top of RAM below 3 GiB.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line. Blimp appends one `virtio_mmio.device=` entry per
    /// virtio device.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Guest RAM: a number with a binary unit (512M, 1.5G, 8G, 1024MiB;
    /// MB/GB mean MiB/GiB); a plain number is MiB; a whole number of 4 KiB
    /// pages. RAM beyond 3 GiB is placed above 4 GiB.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "512M",
        allow_hyphen_values = true
    )]
    memory: String,
    /// Number of vCPUs (1 to 254).
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    /// Let the guest end the VM by writing a value to I/O port 0xf4: blimp
    /// exits with that value as its status.
    #[arg(long)]
    debug_exit: bool,
    /// How guest RAM is backed: anon (private anonymous memory), memfd
    /// (shared memfd), hugetlb (memfd on 2 MiB huge pages, reserved in
    /// /proc/sys/vm/nr_hugepages) or file=PATH (shared mapping of a file:
    /// created if missing, grown to the RAM's size, its first SIZE bytes
    /// overwritten by guest RAM; never the kernel or initrd; locked while
    /// the VM runs, so a second blimp cannot use it too; with --incoming,
    /// replaced only once the VM is handed over).
    #[arg(long, value_name = "KIND", default_value = "anon", value_parser = parse_backend)]
    memory_backend: MemoryBackend,
    /// Back guest RAM with transparent huge pages (MADV_HUGEPAGE on its
    /// mapping) where this host allows them: anon needs
    /// /sys/kernel/mm/transparent_hugepage/enabled at madvise or always,
    /// memfd needs .../shmem_enabled at advise, within_size or always
    /// (blimp says at start when the host will not). Fewer, larger pages:
    /// a chunked inflate (--balloon sg=on) frees 2 MiB at a time. A 4 KiB
    /// balloon page splits its huge page: memfd frees it at once; anon
    /// leaves it out of blimp's RSS at once but frees it when the host
    /// kernel splits the huge page (its deferred-split shrinker, under
    /// memory pressure). Not with hugetlb (already huge).
    #[arg(long)]
    memory_thp: bool,
    /// Do not read stdin: the serial console is output-only. Implied when
    /// stdin is a terminal and blimp is not its foreground job (started
    /// with `&`): blimp then neither reads nor reconfigures the terminal.
    /// On a terminal it owns, the console is raw; Ctrl-A x quits (the VM
    /// stops, exit status 0), Ctrl-A Ctrl-A sends a Ctrl-A.
    #[arg(long)]
    no_stdin: bool,
    /// Add a virtio balloon. Optional comma-separated switches; a bare
    /// switch means =on: deflate_on_oom[=on|off] (default off),
    /// must_tell_host[=on|off] (on), stats_interval=SECS (0 = off),
    /// free_page_hint[=on|off] (off), free_page_reporting[=on|off] (off),
    /// page_poison[=on|off] (off), hint_discard[=on|off] (off),
    /// sg[=on|off] (off; chunked inflate/deflate ranges, Blimp-experimental
    /// feature bit 23), notify_suppression[=on|off] (on),
    /// floor=SIZE (memory every balloon target must leave the guest;
    /// default 64M, at most a quarter of guest memory; 0 = none; never
    /// more than --memory).
    /// Example: --balloon deflate_on_oom,free_page_hint,stats_interval=1
    #[arg(long, value_name = "OPTS", num_args = 0..=1, default_missing_value = "")]
    balloon: Option<String>,
    /// Initial balloon size: memory taken from the guest at boot (like
    /// Firecracker's amount_mib), e.g. 256M or 1.5G; it must leave the
    /// guest its floor (see --balloon floor=SIZE). Implies --balloon.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    balloon_target: Option<String>,
    /// The automatic balloon policy: give idle guest memory back to the
    /// host, return it when the guest needs it (from the guest's statistics
    /// and host memory pressure). `on` for the defaults, or KEY=VALUE,...
    /// (implies on; enabled=off keeps it off until the API turns it on).
    /// Needs --balloon; turns statistics on at the policy's interval (also
    /// with enabled=off, so that the API can turn the policy on later).
    /// Keys (sizes as 256M, durations as 10, 10s, 500ms or 10m):
    /// floor=SIZE (256M; the guest never keeps less), headroom=SIZE (192M)
    /// plus headroom_fraction=F (8% of RAM; 0..1 or N%): available memory
    /// the guest keeps; min_headroom=SIZE (64M; under host pressure);
    /// settle=DUR (10s; how long an excess lasts before inflating);
    /// max_step=SIZE (256M; largest inflate per decision);
    /// pressure_step=SIZE (64M; smallest deflate on pressure);
    /// cooldown=DUR (30s; no inflate after a deflate for pressure);
    /// stale_after=DUR (5s; older statistics never inflate);
    /// major_faults_per_s=N (50); host_psi_high=N (10; PSI some avg10
    /// percent that halves the headroom and settle time);
    /// psi_path=PATH (/proc/pressure/memory, or a cgroup's memory.pressure);
    /// interval=DUR (1s; decision and statistics interval).
    /// A manual target (PATCH /balloon, `blimp balloon set`) pauses it
    /// until `blimp balloon policy on`.
    /// Example: --balloon-policy headroom=256M,settle=5s
    #[arg(long, value_name = "on|KEY=VALUE,...")]
    balloon_policy: Option<String>,
    /// Serve the REST API (HTTP/1.1 + JSON) on this unix socket, e.g.
    /// /tmp/blimp.sock; try `curl --unix-socket /tmp/blimp.sock http://localhost/vm`.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    #[command(flatten)]
    seccomp: SeccompArg,
}

fn parse_backend(s: &str) -> Result<MemoryBackend, String> {
    match s {
        "anon" => Ok(MemoryBackend::Anon),
        "memfd" => Ok(MemoryBackend::Memfd),
        "hugetlb" => Ok(MemoryBackend::Hugetlb),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(MemoryBackend::File(PathBuf::from(p))),
            _ => Err(format!(
                "unknown memory backend '{s}': use anon, memfd, hugetlb or file=PATH"
            )),
        },
    }
}

/// A usage error: printed, exit status 2.
struct Usage(String);

fn check_readable(what: &str, path: &Path) -> Result<(), Usage> {
    let meta =
        std::fs::metadata(path).map_err(|e| Usage(format!("{what} {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(Usage(format!(
            "{what} {}: not a regular file",
            path.display()
        )));
    }
    std::fs::File::open(path).map_err(|e| Usage(format!("{what} {}: {e}", path.display())))?;
    Ok(())
}

/// The kernel and initrd can be read, and neither is the file guest RAM
/// would be kept in.
fn check_inputs(args: &RunArgs, kernel: &Path) -> Result<(), Usage> {
    check_readable("kernel", kernel)?;
    if let Some(initrd) = &args.initrd {
        check_readable("initrd", initrd)?;
    }
    if let MemoryBackend::File(file) = &args.memory_backend {
        for (flag, input) in [
            ("--kernel", Some(kernel)),
            ("--initrd", args.initrd.as_deref()),
        ] {
            if let Some(input) = input
                && vmm::migration::file_dest::same_file(input, file)
            {
                return Err(Usage(format!(
                    "--memory-backend file={} is the {flag} file itself: guest RAM would overwrite it; back the guest with another file",
                    file.display()
                )));
            }
        }
    }
    Ok(())
}

fn vm_config(args: &RunArgs) -> Result<VmConfig, Usage> {
    let Some(kernel) = &args.kernel else {
        return Err(Usage("--kernel is required".into()));
    };
    check_inputs(args, kernel)?;
    let memory =
        api::size::parse_page_bytes(&args.memory).map_err(|e| Usage(format!("--memory: {e}")))?;
    if memory == 0 {
        return Err(Usage("--memory: guest memory cannot be 0".into()));
    }
    if memory < arch::layout::MIN_MEMORY {
        return Err(Usage(format!(
            "--memory {}: at least {} MiB is needed",
            args.memory,
            arch::layout::MIN_MEMORY >> 20
        )));
    }
    if let Some(host) = vmm::memory::host_ram_bytes()
        && memory > host
    {
        return Err(Usage(format!(
            "--memory {}: larger than this host's RAM ({} MiB)",
            args.memory,
            host >> 20
        )));
    }
    if args.vcpus == 0 || args.vcpus > 254 {
        return Err(Usage(format!(
            "--vcpus {}: must be between 1 and 254",
            args.vcpus
        )));
    }
    vmm::boot::validate_cmdline(&args.cmdline).map_err(|e| Usage(format!("--cmdline: {e}")))?;
    let mut cfg = VmConfig::new(kernel.clone());
    cfg.initrd = args.initrd.clone();
    cfg.cmdline = args.cmdline.clone();
    cfg.memory_bytes = memory;
    cfg.vcpus = args.vcpus as u8;
    cfg.debug_exit = args.debug_exit;
    cfg.memory_backend = args.memory_backend.clone();
    cfg.memory_thp = args.memory_thp;
    cfg.serial_input = !args.no_stdin;
    if args.balloon.is_some() || args.balloon_target.is_some() {
        let opts =
            balloon_opts::parse_opts(args.balloon.as_deref().unwrap_or("")).map_err(Usage)?;
        opts.check_floor(memory).map_err(Usage)?;
        let mut b = opts.device;
        cfg.balloon_floor_bytes = opts.floor_bytes;
        if let Some(t) = &args.balloon_target {
            let bytes = api::size::parse_page_bytes(t)
                .map_err(|e| Usage(format!("--balloon-target: {e}")))?;
            if bytes > memory {
                return Err(Usage(format!(
                    "--balloon-target {t}: larger than guest memory ({} MiB)",
                    memory >> 20
                )));
            }
            let floor = api::types::balloon_floor_bytes(memory, opts.floor_bytes);
            api::types::check_balloon_floor(bytes, memory, floor)
                .map_err(|msg| Usage(format!("--balloon-target {t}: {msg}")))?;
            b.initial_target_pages = u32::try_from(bytes / 4096)
                .map_err(|_| Usage(format!("--balloon-target {t}: too large")))?;
        }
        if let Some(p) = &args.balloon_policy {
            let (enabled, settings) = api::policy::PolicySettings::parse_cli(p).map_err(Usage)?;
            settings
                .check(memory)
                .and_then(|_| vmm::policy::check_psi_path(&settings.psi_path))
                .map_err(|e| Usage(format!("--balloon-policy: {e}")))?;
            // The policy decides from the guest's statistics: the queue is
            // offered (and polled) even with enabled=off, so that the API
            // can turn the policy on later.
            b.stats_polling_interval_s = settings.stats_interval_s();
            cfg.balloon_policy = Some((enabled, settings));
        }
        cfg.balloon = Some(b);
    } else if args.balloon_policy.is_some() {
        return Err(Usage(
            "--balloon-policy needs a balloon: add --balloon (the policy sizes the balloon from the guest's statistics)".into(),
        ));
    }
    cfg.api_socket = args.api_sock.clone();
    // Last, so that the options' own errors come first; before anything
    // is set up (guest RAM in a file).
    vmm::boot::check_kernel_header(kernel).map_err(|e| Usage(e.to_string()))?;
    Ok(cfg)
}

/// Print an error with its chain of causes.
fn report(e: &dyn std::error::Error) {
    errln!("blimp: error: {}", vmm::error_chain(e));
}

fn start_api(vmm: &mut Vmm, path: &Path) -> Result<api::ApiServerHandle, String> {
    let chan = vmm.api_channel().map_err(|e| e.to_string())?;
    let config = api::ServerConfig {
        thread_init: Some(|| {
            vmm::sched::api_thread();
            vmm::seccomp::enter_or_exit(vmm::seccomp::ThreadKind::Api)
        }),
        ..Default::default()
    };
    api::ApiServer::start_with_config(path, chan, config).map_err(|e| e.to_string())
}

/// The options `run`, `restore` and `run --incoming` share, checked
/// before anything is set up (RAM, a listening socket, a migration
/// accepted): `--memory-thp` with the hugetlb backing is a usage error,
/// and so is an `--api-sock` path that cannot be a socket (too long, not
/// a socket, no such directory; [`api::Error::is_usage`]); a socket
/// another process has, or a directory that refuses the bind, is a
/// runtime error (see [`api::check_socket_path`]).
fn check_host_options(
    backend: &MemoryBackend,
    thp: bool,
    api_sock: Option<&Path>,
) -> Result<(), ExitCode> {
    if thp && *backend == MemoryBackend::Hugetlb {
        errln!("blimp: error: {}", vmm::memory::MemoryError::ThpOnHugetlb);
        return Err(ExitCode::from(EXIT_USAGE));
    }
    match api_sock.map(api::check_socket_path) {
        Some(Err(e)) => {
            errln!("blimp: error: {e}");
            Err(ExitCode::from(if e.is_usage() {
                EXIT_USAGE
            } else {
                EXIT_RUNTIME
            }))
        }
        _ => Ok(()),
    }
}

/// Run a built VM with its API server until it ends. `handed_over`: the
/// VM came from a live migration and exists nowhere else now, so an API
/// that cannot start does not end it.
fn run_vmm(mut vmm: Vmm, api_sock: Option<PathBuf>, handed_over: bool) -> ExitCode {
    // The API server runs on its own thread until `_server` is dropped, which
    // also removes the socket.
    let _server = match api_sock.map(|p| start_api(&mut vmm, &p)).transpose() {
        Ok(s) => s,
        Err(msg) if handed_over => {
            errln!(
                "blimp: error: {msg}; the VM was handed over by its source and exists only here, so it runs on without an API (SIGTERM or the guest's own shutdown ends it)"
            );
            None
        }
        Err(msg) => {
            errln!("blimp: error: {msg}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match vmm.run() {
        Ok(reason) => {
            log::info!("VM ended: {reason}");
            if let vmm::ExitReason::Error(msg) = &reason {
                errln!("blimp: error: {msg}");
            }
            ExitCode::from(reason.exit_code().clamp(0, 255) as u8)
        }
        Err(e) => {
            report(&e);
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Where a restored VM comes from.
enum Source {
    File(Result<Box<dyn std::io::Read + Send>, vmm::restore::RestoreError>),
    Incoming(Result<vmm::restore::Incoming, vmm::restore::RestoreError>),
}

/// A destination stopped by `signal` before it took a VM over (waiting or
/// receiving): the VM stays with its source; exit 128 + the signal.
fn stopped_by_signal(url: &str, signal: i32) -> ExitCode {
    log::info!("signal {signal} before an incoming migration on {url} was taken over: exiting");
    ExitCode::from((128 + signal).clamp(0, 255) as u8)
}

/// Restore from a stream (a file or an incoming migration) and run.
fn restore_and_run(source: Source, host: &HostArgs) -> ExitCode {
    let cfg = vmm::restore::RestoreConfig {
        memory_backend: host.memory_backend.clone(),
        memory_thp: host.memory_thp,
        serial_input: !host.no_stdin,
    };
    let handed_over = matches!(&source, Source::Incoming(Ok(i)) if i.is_live());
    let built = match source {
        Source::File(Ok(input)) => Vmm::restore(cfg, input),
        Source::Incoming(Ok(incoming)) => Vmm::restore_incoming(cfg, incoming),
        Source::Incoming(Err(vmm::restore::RestoreError::Interrupted { url, signal })) => {
            return stopped_by_signal(&url, signal);
        }
        Source::File(Err(e)) | Source::Incoming(Err(e)) => {
            report(&e);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match built {
        Ok(vmm) => run_vmm(vmm, host.api_sock.clone(), handed_over),
        Err(vmm::Error::Restore(vmm::restore::RestoreError::Interrupted { url, signal })) => {
            stopped_by_signal(&url, signal)
        }
        // The same as the check before the restore started, lost to a
        // blimp that took the file meanwhile.
        Err(e @ vmm::Error::Memory(vmm::memory::MemoryError::FileInUse { .. })) => {
            report(&e);
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            report(&e);
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    if let Err(msg) = confine_main(args.seccomp, &args.memory_backend) {
        errln!("blimp: error: seccomp: {msg}");
        return ExitCode::from(EXIT_RUNTIME);
    }
    if let Some(url) = &args.incoming {
        if let Ok(api::types::MigrationDestination::File(stream)) =
            api::types::MigrationDestination::parse(url)
            && let Err(msg) = backing_is_not_the_stream(&stream, "--incoming", &args.memory_backend)
        {
            errln!("blimp: error: {msg}");
            return ExitCode::from(EXIT_USAGE);
        }
        if let Err(msg) = backing_not_in_use(&args.memory_backend) {
            eprintln!("blimp: error: {msg}");
            return ExitCode::from(EXIT_USAGE);
        }
        if let Err(code) = check_host_options(
            &args.memory_backend,
            args.memory_thp,
            args.api_sock.as_deref(),
        ) {
            return code;
        }
        let host = HostArgs {
            memory_backend: args.memory_backend.clone(),
            memory_thp: args.memory_thp,
            api_sock: args.api_sock.clone(),
            no_stdin: args.no_stdin,
            seccomp: args.seccomp,
        };
        return restore_and_run(Source::Incoming(vmm::restore::accept_incoming(url)), &host);
    }
    let cfg = match vm_config(&args) {
        Ok(c) => c,
        Err(Usage(msg)) => {
            errln!("blimp: error: {msg}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let api_sock = cfg.api_socket.clone();
    if let Err(code) = check_host_options(&cfg.memory_backend, cfg.memory_thp, api_sock.as_deref())
    {
        return code;
    }
    let vmm = match Vmm::build(cfg) {
        Ok(v) => v,
        Err(e) => {
            report(&e);
            return ExitCode::from(if e.is_usage() {
                EXIT_USAGE
            } else {
                EXIT_RUNTIME
            });
        }
    };
    run_vmm(vmm, api_sock, false)
}

/// Restored RAM starts zeroed: a backing file that is the migration file
/// itself (`flag`) would be emptied before the stream is read, and after a
/// migration to a file that stream is the only copy of the VM.
fn backing_is_not_the_stream(
    stream: &Path,
    flag: &str,
    backing: &MemoryBackend,
) -> Result<(), String> {
    match backing {
        MemoryBackend::File(file) if vmm::migration::file_dest::same_file(stream, file) => {
            Err(format!(
                "--memory-backend file={} is the migration file itself ({flag}): its RAM would overwrite the stream; back the guest with another file",
                file.display()
            ))
        }
        _ => Ok(()),
    }
}

/// A `file=PATH` that a running VM uses as its RAM (it holds the file's
/// lock) is refused before anything is read or listened for: the restore
/// would replace it. (A restore puts its RAM in PATH's place only once it
/// succeeded; see `vmm::restore`.)
fn backing_not_in_use(backing: &MemoryBackend) -> Result<(), String> {
    // (It also refuses a device node, FIFO or directory at PATH, which a
    // restore would replace: file=/dev/null.)
    match backing {
        MemoryBackend::File(path) => vmm::memory::hold_backing_file(path)
            .map(drop)
            .map_err(|e| e.to_string()),
        _ => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        // What the VMM tells its user (a migration completed, a VM handed
        // over) shows at any --log-level (RUST_LOG=console=off hides it).
        .filter_module("console", log::LevelFilter::Info)
        .parse_filters(&cli.log_level)
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    if matches!(cli.command, Command::Run(_) | Command::Restore(_)) {
        // A descriptor per API connection, vCPU, device and stripe: take
        // what the host allows, before the seccomp filter is in place.
        let limit = vmm::limits::raise_open_files();
        log::debug!("open files: up to {limit}");
    }
    match cli.command {
        Command::Run(args) => run(args),
        Command::Restore(args) => {
            if let Err(msg) =
                backing_is_not_the_stream(&args.from, "--from", &args.host.memory_backend)
                    .and_then(|()| backing_not_in_use(&args.host.memory_backend))
            {
                errln!("blimp: error: {msg}");
                return ExitCode::from(EXIT_USAGE);
            }
            if let Err(msg) = confine_main(args.host.seccomp, &args.host.memory_backend) {
                errln!("blimp: error: seccomp: {msg}");
                return ExitCode::from(EXIT_RUNTIME);
            }
            if let Err(code) = check_host_options(
                &args.host.memory_backend,
                args.host.memory_thp,
                args.host.api_sock.as_deref(),
            ) {
                return code;
            }
            restore_and_run(
                Source::File(vmm::restore::open_file(&args.from)),
                &args.host,
            )
        }
        Command::Client(cmd) => {
            if matches!(cmd, client::ClientCommand::Migrate(_)) {
                watch_interrupts();
            }
            client::set_reader_gone_check(vmm::console::stdout_reader_gone);
            match client::run(cmd) {
                Ok(()) => ExitCode::SUCCESS,
                Err(msg) => {
                    errln!("blimp: error: {msg}");
                    // A request the API refused as invalid (400), or the
                    // client before sending it, is a usage error, like a
                    // bad argument.
                    ExitCode::from(if client::refused_as_invalid() {
                        EXIT_USAGE
                    } else if client::source_gone() {
                        EXIT_SOURCE_GONE
                    } else {
                        EXIT_RUNTIME
                    })
                }
            }
        }
    }
}

/// `blimp migrate` turns Ctrl-C and the other terminating signals
/// (vmm::signals::SIGNALS) into a cancel of the
/// migration instead of dying with it running.
fn watch_interrupts() {
    match vmm::signals::TerminationSignals::new() {
        Ok(signals) => client::set_interrupt_check(Box::new(move || signals.read().is_some())),
        Err(e) => log::warn!("Ctrl-C will not cancel the migration: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// `blimp run --help` lists every `--balloon` key the parser takes (one
    /// vocabulary with README, which a test of README checks too).
    #[test]
    fn run_help_lists_every_balloon_key() {
        let mut cmd = super::Cli::command();
        let run = cmd.find_subcommand_mut("run").expect("run");
        let help = run.render_long_help().to_string();
        for (k, v) in crate::balloon_opts::KEYS {
            let form = if v.starts_with('[') {
                format!("{k}[=on|off]")
            } else {
                format!("{k}=")
            };
            assert!(help.contains(&form), "--help lacks {form}: {help}");
        }
        let readme = include_str!("../README.md");
        for (k, _) in crate::balloon_opts::KEYS {
            assert!(readme.contains(&format!("`{k}")), "README lacks `{k}`");
        }
    }

    /// `--balloon floor=4G --memory 1G` was taken, and every nonzero
    /// target refused afterwards; it is a usage error naming both.
    #[test]
    fn a_balloon_floor_above_memory_is_a_usage_error() {
        use clap::Parser;
        let kernel =
            std::env::temp_dir().join(format!("blimp-floor-kernel-{}", std::process::id()));
        // Never booted: only its header is read (an ELF's magic).
        std::fs::write(&kernel, b"\x7fELF, not booted").unwrap();
        let config = |floor: &str| {
            let cli = super::Cli::try_parse_from([
                "blimp",
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--memory",
                "1G",
                "--balloon",
                floor,
            ])
            .unwrap();
            match cli.command {
                super::Command::Run(args) => super::vm_config(&args).map_err(|u| u.0),
                _ => unreachable!("parsed as run"),
            }
        };
        let refused = config("floor=4G");
        let taken = config("floor=1G");
        std::fs::remove_file(&kernel).unwrap();
        let e = refused.expect_err("floor=4G with --memory 1G was taken");
        assert!(
            e.contains("floor=4 GiB") && e.contains("--memory 1 GiB"),
            "{e}"
        );
        assert_eq!(
            taken.ok().and_then(|c| c.balloon_floor_bytes),
            Some(1 << 30)
        );
    }

    /// `blimp run --help` and README list every `--balloon-policy` key of
    /// the one table (api_types::policy::KEYS).
    #[test]
    fn run_help_lists_every_policy_key() {
        let mut cmd = super::Cli::command();
        let run = cmd.find_subcommand_mut("run").expect("run");
        let help = run.render_long_help().to_string();
        let readme = include_str!("../README.md");
        for k in api::policy::KEYS {
            assert!(
                help.contains(&format!("{}=", k.name)),
                "--help lacks {}: {help}",
                k.name
            );
            assert!(
                help.contains(&format!("({}", k.default)),
                "--help lacks the default of {}",
                k.name
            );
            assert!(
                readme.contains(&format!("`{}`", k.name)),
                "README lacks `{}`",
                k.name
            );
        }
    }
}
