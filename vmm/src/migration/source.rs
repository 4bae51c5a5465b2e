//! The sending side of a migration: Blimp's own pre-copy over the KVM dirty
//! log, asking the guest for free page hints each round and clearing hinted
//! pages from the round's to-send bitmap, so free memory is never copied.
//!
//! Hint ordering (what makes skipping safe):
//! 1. dirty logging starts before round 1, which sends every page;
//! 2. each round: start a new hint id; hints carrying it clear pages not yet
//!    sent; stop the id; sync the dirty log (KVM ∪ the VMM's own writes)
//!    into the bitmap for the next round, so a hinted page the guest wrote
//!    later is sent again;
//! 3. the final round runs paused with hinting stopped; the destination's
//!    balloon is told DONE on resume so the guest frees its hinted blocks.
//!
//! Ownership (see [`super::handshake`] and `docs/migration.md`): over a
//! socket the source keeps the guest paused after the last byte until the
//! destination acknowledges; any failure before the destination confirms it
//! runs resumes the guest here. A completed live migration leaves this VM in
//! the terminal Migrated state. Cancel and a stalled destination are noticed
//! within [`super::link::POLL`] in every phase.

use std::io::BufWriter;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api_types::types::{MigrationDestination, MigrationState, MigrationStatus};
use api_types::{ApiEvent, EventHub};
use devices::PAGE_SIZE;
use devices::virtio::balloon::Balloon;

use super::convergence::{Convergence, ConvergenceConfig, Decision};
use super::dirty::{self, AtomicPageBitmap};
use super::file_dest::{self, AtomicFile};
use super::handshake::{self, HandshakeError, Message, Waiter};
use super::hints::{HintSource, RoundHints};
use super::link::{self, Guarded, Peer, Sink};
use super::state::{self, StateSupport, VmState};
use super::stream::{FLAG_LIVE, StreamWriter, layout_ranges};
use crate::exit::{ExitReason, VmExit};
use crate::memory::GuestRam;
use crate::vcpu::Vcpus;
use crate::vm::Vm;

/// How long the first hinting round may take before we send without waiting
/// for it: most free memory is skipped thanks to this round.
const FIRST_HINT_ROUND_TIMEOUT: Duration = Duration::from_secs(10);
/// Later rounds find little new free memory (hinted blocks stay held until
/// DONE) and must not hold back a converging migration.
const LATER_HINT_ROUND_TIMEOUT: Duration = Duration::from_millis(100);

/// Captures device state (serial, transports, balloon) as JSON; called with
/// the VM paused and the balloon locked (its guard is passed in).
pub type DeviceCapture =
    Arc<dyn Fn(Option<&Balloon>) -> Result<serde_json::Value, String> + Send + Sync>;

/// What the sender needs from the running VM.
#[derive(Clone)]
pub struct SourceContext {
    pub vm: Arc<Mutex<Vm>>,
    pub ram: Arc<GuestRam>,
    pub vcpus: Arc<Vcpus>,
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    pub exit: Arc<VmExit>,
    pub events: Option<EventHub>,
    pub capture_devices: DeviceCapture,
    pub support: Arc<StateSupport>,
    /// The files the guest was booted from, with their option (`--kernel`,
    /// `--initrd`): a file destination must never replace one of them.
    pub boot_files: Vec<(&'static str, std::path::PathBuf)>,
}

/// Live migration, or a snapshot (pause + one full round, the VM resumes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Live,
    Snapshot,
}

/// Options of one migration.
#[derive(Clone, Debug)]
pub struct MigrationOptions {
    pub destination: MigrationDestination,
    pub downtime: Duration,
    pub free_page_hints: bool,
    pub max_rounds: u32,
    pub mode: Mode,
    /// How long the paused source waits for the destination's ACK, and then
    /// for its RUN (sockets only).
    pub ack_timeout: Duration,
    /// How long the destination may accept no data before the migration fails.
    pub write_timeout: Duration,
    /// After a completed live migration: exit after this delay (`None`:
    /// stay, serving GET requests, until shut down).
    pub source_exit: Option<Duration>,
}

impl MigrationOptions {
    /// Options with the API's defaults.
    pub fn new(destination: MigrationDestination, mode: Mode) -> Self {
        Self {
            destination,
            downtime: Duration::from_millis(api_types::types::DEFAULT_DOWNTIME_MS),
            free_page_hints: true,
            max_rounds: super::convergence::DEFAULT_MAX_ROUNDS,
            mode,
            ack_timeout: Duration::from_millis(api_types::types::DEFAULT_ACK_TIMEOUT_MS),
            write_timeout: Duration::from_millis(api_types::types::DEFAULT_WRITE_TIMEOUT_MS),
            source_exit: Some(Duration::from_millis(
                api_types::types::DEFAULT_SOURCE_EXIT_DELAY_MS,
            )),
        }
    }
}

/// A migration running on its own thread.
pub struct Migration {
    status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    /// Set (under `status`'s lock) once the job passed the point where a
    /// cancel could still take effect (see [`Migration::cancel`]).
    handed_over: Arc<AtomicBool>,
    /// Bytes written to the destination so far (live progress).
    written: Arc<AtomicU64>,
    mode: Mode,
    thread: Option<JoinHandle<()>>,
    /// When the job started: `elapsed_ms` counts from here while it runs.
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("cannot open destination {dest}: {source}{}", no_listener(source))]
    Destination {
        dest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("file destination: {0}")]
    File(#[from] file_dest::Error),
    #[error("{0}")]
    Write(#[from] super::stream::WriteError),
    #[error("dirty tracking: {0}")]
    Dirty(#[from] super::dirty::DirtyError),
    #[error("capturing state: {0}")]
    State(#[from] super::state::StateError),
    #[error("capturing vCPU {0} state: the vCPU did not answer")]
    VcpuTimeout(usize),
    #[error("capturing device state: {0}")]
    Devices(String),
    #[error("cancelled")]
    Cancelled,
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error(
        "writing the migration stream at byte {offset}: {source}: the destination closed the connection before the handshake, without a word (no NAK): is it a `blimp run --incoming`, and is it still running?"
    )]
    Closed {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("switchover: {0}; the guest runs here again")]
    Switchover(#[source] HandshakeError),
    #[error(
        "switchover: {0}, after this source gave the VM up: the destination may or may not run it, so the guest stays paused here; resume it (PATCH /vm Running) only if the destination does not run it"
    )]
    Unconfirmed(#[source] HandshakeError),
}

/// What a refused or missing socket may mean, for
/// [`MigrationError::Destination`].
fn no_listener(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            " (nothing listens there: is a `blimp run --incoming` waiting on it, and not already receiving another VM?)"
        }
        _ => "",
    }
}

impl MigrationError {
    /// A write that failed because the migration was cancelled is a cancel.
    fn from_write(e: super::stream::WriteError) -> Self {
        match &e {
            super::stream::WriteError::Io { source, .. } if link::is_cancelled(source) => {
                MigrationError::Cancelled
            }
            _ => MigrationError::Write(e),
        }
    }

    /// Whether the guest must stay paused here (ownership is unknown).
    fn keeps_paused(&self) -> bool {
        matches!(self, MigrationError::Unconfirmed(_))
    }
}

impl Migration {
    /// Start a migration thread.
    pub fn start(ctx: SourceContext, opts: MigrationOptions) -> Migration {
        let mut st = MigrationStatus::idle();
        st.state = MigrationState::Setup;
        st.destination = Some(opts.destination.to_string());
        st.total_pages = ctx.ram.layout().size() / PAGE_SIZE;
        st.remaining_pages = st.total_pages;
        let status = Arc::new(Mutex::new(st));
        let cancel = Arc::new(AtomicBool::new(false));
        let handed_over = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let mode = opts.mode;
        let started = Instant::now();
        let job = Job {
            status: status.clone(),
            cancel: cancel.clone(),
            handed_over: handed_over.clone(),
            written: written.clone(),
            started,
        };
        // Started through the seccomp spawner: this worker may open network
        // sockets, which the event loop that asks for it may not.
        let thread = crate::seccomp::spawn(
            "migration",
            crate::seccomp::ThreadKind::Migration,
            move || run(ctx, opts, job),
        )
        .ok();
        if thread.is_none() {
            let mut s = lock(&status);
            s.state = MigrationState::Failed;
            s.error = Some("cannot spawn the migration thread".into());
        }
        Migration {
            status,
            cancel,
            handed_over,
            written,
            mode,
            thread,
            started,
        }
    }

    pub fn status(&self) -> MigrationStatus {
        let mut s = lock(&self.status).clone();
        s.stream_bytes = s.stream_bytes.max(self.written.load(Ordering::Relaxed));
        // The job updates its status at each step; between them (a long
        // wait for hints or for the destination) the clock still runs.
        if !s.state.is_finished() {
            s.elapsed_ms = s.elapsed_ms.max(self.started.elapsed().as_millis() as u64);
        }
        s
    }

    pub fn is_running(&self) -> bool {
        !lock(&self.status).state.is_finished()
    }

    /// A live migration (or migrate-to-file) completed: the VM is the
    /// destination's now, and this one must never run again.
    pub fn migrated(&self) -> bool {
        self.mode == Mode::Live && lock(&self.status).state == MigrationState::Completed
    }

    /// Ask the migration to stop; the guest runs here again. Noticed within
    /// [`link::POLL`]. Refused (false) once it is too late: the
    /// destination acknowledged the stream and the VM is being handed over,
    /// or a file destination is being put in place. Decided under the
    /// status lock, as the job decides to go on, so the answer is the
    /// outcome.
    pub fn cancel(&self) -> bool {
        let _status = lock(&self.status);
        if self.handed_over.load(Ordering::SeqCst) {
            return false;
        }
        self.cancel.store(true, Ordering::SeqCst);
        true
    }

    /// Wait for the thread to end.
    pub fn join(mut self) -> MigrationStatus {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.status()
    }
}

impl Drop for Migration {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.cancel.store(true, Ordering::SeqCst);
            let _ = t.join();
        }
    }
}

/// What the migration thread shares with its [`Migration`] handle.
struct Job {
    status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    handed_over: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    started: Instant,
}

fn run(ctx: SourceContext, opts: MigrationOptions, job: Job) {
    let started = job.started;
    let was_paused = ctx.vcpus.is_paused();
    let hints = Arc::new(RoundHints::new());
    let source: Option<Arc<dyn HintSource>> = ctx.balloon.clone().map(|b| b as Arc<dyn HintSource>);
    let mut sender = Sender {
        ctx: &ctx,
        opts: &opts,
        status: &job.status,
        cancel: &job.cancel,
        handed_over: &job.handed_over,
        written: &job.written,
        hints,
        source: source.clone(),
        started,
        was_paused,
        peer: None,
    };
    let result = sender.run();
    // The balloon serves the guest again, whatever happened (a migrated
    // VM's guest never runs here again; its device may as well).
    thaw(&ctx);
    // A destination still waiting for GO learns the migration is over.
    if result.is_err()
        && let Some(p) = &sender.peer
    {
        p.shutdown();
    }
    // Whatever happened: no more dirty logging, hinting handed back to the guest.
    {
        let mut vm = lock(&ctx.vm);
        if let Err(e) = dirty::stop_dirty_logging(&mut vm, &ctx.ram) {
            log::error!("migration: cannot stop dirty logging: {e}");
        }
    }
    if let Some(source) = &source {
        source.set_sink(None);
        source.release();
    }
    let mut s = lock(&job.status);
    s.elapsed_ms = started.elapsed().as_millis() as u64;
    s.stream_bytes = job.written.load(Ordering::Relaxed);
    let dest = s.destination.clone().unwrap_or_default();
    match result {
        Ok(()) => {
            s.state = MigrationState::Completed;
            log::info!(
                "migration to {dest} completed: {} pages sent ({} zero, {} hinted), {} bytes of page data, {} ms",
                s.pages_sent,
                s.pages_zero,
                s.pages_hinted,
                s.bytes_sent,
                s.elapsed_ms
            );
            match opts.mode {
                Mode::Live => hand_over(&ctx, &dest, opts.source_exit),
                Mode::Snapshot if !was_paused => ctx.vcpus.resume(),
                Mode::Snapshot => {}
            }
        }
        Err(e) => {
            s.state = if matches!(e, MigrationError::Cancelled) {
                MigrationState::Cancelled
            } else {
                MigrationState::Failed
            };
            if e.keeps_paused() {
                log::error!("migration to {dest}: {e}");
            } else {
                log::warn!("migration to {dest}: {e}");
                if !was_paused {
                    ctx.vcpus.resume();
                }
            }
            // A file destination was dropped uncommitted: its temporary
            // file is gone and the target is as it was.
            s.error = Some(e.to_string());
        }
    }
    if let Some(h) = &ctx.events {
        h.publish(ApiEvent::MigrationProgress(s.clone()));
    }
}

/// See [`Sender::past_cancelling`].
fn past_cancelling(
    status: &Mutex<MigrationStatus>,
    cancel: &AtomicBool,
    handed_over: &AtomicBool,
) -> Result<(), MigrationError> {
    let _status = lock(status);
    if cancel.load(Ordering::SeqCst) {
        return Err(MigrationError::Cancelled);
    }
    handed_over.store(true, Ordering::SeqCst);
    Ok(())
}

/// Undo the final round's [`Balloon::freeze`](devices::virtio::balloon::Balloon::freeze).
fn thaw(ctx: &SourceContext) {
    if let Some(b) = &ctx.balloon {
        lock(b).thaw();
    }
}

/// The VM lives on at `dest`: say so, and end this blimp after `exit_after`
/// (or keep it, in the terminal Migrated state, until it is shut down).
fn hand_over(ctx: &SourceContext, dest: &str, exit_after: Option<Duration>) {
    if let Some(h) = &ctx.events {
        h.publish(ApiEvent::VmStateChanged {
            state: api_types::types::VmState::Migrated,
        });
    }
    match exit_after {
        Some(delay) => {
            log::info!(
                target: "console",
                "the VM was migrated to {dest} and runs there now; this blimp only answers GET requests and exits in {} ms",
                delay.as_millis()
            );
            let exit = ctx.exit.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                exit.stop(ExitReason::Migrated);
            });
        }
        None => log::info!(
            target: "console",
            "the VM was migrated to {dest} and runs there now; this blimp only answers GET requests and stays until PUT /vm/shutdown or a signal"
        ),
    }
}

struct Sender<'a> {
    ctx: &'a SourceContext,
    opts: &'a MigrationOptions,
    status: &'a Mutex<MigrationStatus>,
    cancel: &'a Arc<AtomicBool>,
    handed_over: &'a Arc<AtomicBool>,
    written: &'a Arc<AtomicU64>,
    hints: Arc<RoundHints>,
    /// Who hints free pages (the balloon), if anyone.
    source: Option<Arc<dyn HintSource>>,
    started: Instant,
    /// Whether the user had paused the VM before the job started.
    was_paused: bool,
    /// The destination blimp (socket destinations), for the handshake.
    peer: Option<Peer>,
}

type Writer = StreamWriter<BufWriter<Guarded<Sink>>>;

impl Sender<'_> {
    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }

    /// From here on a cancel is refused (see [`Migration::cancel`]); one
    /// that came first ends the job now.
    fn past_cancelling(&self) -> Result<(), MigrationError> {
        past_cancelling(self.status, self.cancel, self.handed_over)
    }

    fn hints_available(&self) -> bool {
        let Some(source) = &self.source else {
            return false;
        };
        source.hints_negotiated() && self.opts.free_page_hints
    }

    /// Start a hint round for `bitmap` and wait (at most `timeout`, woken
    /// by the guest's end of the round) until the guest finished it; hints
    /// arriving later still clear unsent pages.
    fn hint_round(&self, bitmap: &Arc<AtomicPageBitmap>, timeout: Duration) -> Option<u32> {
        let source = self.source.as_ref()?;
        let id = source.start_round(&mut |id| self.hints.begin(id, bitmap.clone()))?;
        if !self.hints.wait_stopped(id, timeout, self.cancel) {
            log::debug!("migration: hint round {id} still running after {timeout:?}; sending");
        }
        Some(id)
    }

    fn end_hint_round(&self) {
        if let Some(source) = &self.source {
            source.stop_round();
        }
        self.hints.end();
    }

    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        let mut s = lock(self.status);
        f(&mut s);
        s.elapsed_ms = self.started.elapsed().as_millis() as u64;
        s.pages_hinted = self.hints.hinted_pages();
        s.stream_bytes = self.written.load(Ordering::Relaxed);
        if let Some(h) = &self.ctx.events {
            h.publish(ApiEvent::MigrationProgress(s.clone()));
        }
    }

    /// Connect (or create the file) and wrap it so every write can be
    /// cancelled and a stalled destination is noticed.
    fn open(&mut self) -> Result<Writer, MigrationError> {
        let dest = &self.opts.destination;
        let err = |source| MigrationError::Destination {
            dest: dest.to_string(),
            source,
        };
        let sink = match link::connect(dest, self.cancel).map_err(|e| {
            if link::is_cancelled(&e) {
                MigrationError::Cancelled
            } else {
                err(e)
            }
        })? {
            Some(peer) => {
                let sink = Sink::Peer(peer.try_clone().map_err(err)?);
                self.peer = Some(peer);
                sink
            }
            None => match dest {
                MigrationDestination::File(p) => Sink::File(AtomicFile::create(p)?),
                _ => unreachable!("connect returns a peer for socket destinations"),
            },
        };
        let guarded = Guarded::new(
            sink,
            self.cancel.clone(),
            self.opts.write_timeout,
            self.written.clone(),
        );
        Ok(StreamWriter::new(BufWriter::with_capacity(
            4 << 20,
            guarded,
        )))
    }

    fn run(&mut self) -> Result<(), MigrationError> {
        let result = self.send();
        match result {
            Err(MigrationError::Write(e)) => {
                Err(self.refusal().unwrap_or_else(|| self.write_failed(e)))
            }
            other => other,
        }
    }

    /// A write that failed, said in the destination's terms: at the byte the
    /// destination had taken (`stream_bytes` in the status; the stream
    /// writer counts what it handed to its buffer, up to 4 MiB more), and
    /// for a socket that was closed without a word, what that may mean.
    fn write_failed(&self, e: super::stream::WriteError) -> MigrationError {
        let super::stream::WriteError::Io { source, .. } = e else {
            return MigrationError::Write(e);
        };
        let offset = self.written.load(Ordering::Relaxed);
        let closed = matches!(
            source.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        );
        if self.peer.is_some() && closed {
            return MigrationError::Closed { offset, source };
        }
        MigrationError::Write(super::stream::WriteError::Io { offset, source })
    }

    /// After a failed write: a destination that refused the stream early
    /// (it cannot build this VM) sent its reason before it closed.
    fn refusal(&mut self) -> Option<MigrationError> {
        let peer = self.peer.as_mut()?;
        let never = || false;
        let w = Waiter {
            cancelled: &never,
            timeout: Duration::from_millis(200),
        };
        match w.recv(peer, "NAK") {
            Ok(Message::Nak(reason)) => Some(MigrationError::Refused(reason)),
            _ => None,
        }
    }

    fn send(&mut self) -> Result<(), MigrationError> {
        let mut w = self.open()?;
        let layout = self.ctx.ram.layout();
        w.header(&layout_ranges(layout), FLAG_LIVE)
            .map_err(MigrationError::from_write)?;
        let bitmap = Arc::new(AtomicPageBitmap::new(layout));
        dirty::start_dirty_logging(&mut lock(&self.ctx.vm), &self.ctx.ram)?;
        // A paused guest cannot answer a hint request: asking would only
        // wait out the round's timeout.
        let hints = self.hints_available() && !self.was_paused;
        if self.was_paused && self.hints_available() {
            log::info!(
                "migration: the VM is paused, so no free page hinting (the guest cannot answer)"
            );
        }
        if hints && let Some(source) = &self.source {
            source.set_sink(Some(self.hints.clone()));
        }
        bitmap.set_all();
        self.update(|s| s.state = MigrationState::Active);
        let round = self.precopy(&mut w, &bitmap, hints)?;
        self.check_cancel()?;
        self.update(|s| s.state = MigrationState::Completing);
        let sink = self.final_round(w, &bitmap, round + 1)?;
        match sink {
            Sink::File(f) => {
                // A snapshot's guest need not wait for the fsync; a
                // migrated one stays paused until the file is in place.
                if self.opts.mode == Mode::Snapshot && !self.was_paused {
                    thaw(self.ctx);
                    self.ctx.vcpus.resume();
                }
                self.past_cancelling()?;
                Ok(f.commit()?)
            }
            Sink::Peer(_) => self.switchover(),
        }
    }

    /// Pre-copy rounds with the guest running; returns the last round's number.
    fn precopy(
        &self,
        w: &mut Writer,
        bitmap: &Arc<AtomicPageBitmap>,
        hints: bool,
    ) -> Result<u32, MigrationError> {
        let ram = &self.ctx.ram;
        let mut conv = Convergence::new(ConvergenceConfig {
            downtime: self.opts.downtime,
            max_rounds: self.opts.max_rounds,
            ..Default::default()
        });
        let mut round = 1u32;
        loop {
            self.check_cancel()?;
            self.update(|s| {
                s.round = round;
                s.remaining_pages = bitmap.count();
            });
            if hints {
                let timeout = if round == 1 {
                    FIRST_HINT_ROUND_TIMEOUT
                } else {
                    LATER_HINT_ROUND_TIMEOUT
                };
                self.hint_round(bitmap, timeout);
            }
            if self.opts.mode == Mode::Snapshot {
                // A snapshot only collects hints while running; it copies paused.
                self.end_hint_round();
                return Ok(round - 1);
            }
            let t = Instant::now();
            let bytes_before = w.stats().page_bytes;
            let sent = w
                .send_bitmap(&**ram, round, bitmap)
                .map_err(MigrationError::from_write)?;
            w.flush().map_err(MigrationError::from_write)?;
            self.end_hint_round();
            let bytes = w.stats().page_bytes - bytes_before;
            conv.round_done(bytes, t.elapsed());
            let sync = dirty::sync(&lock(&self.ctx.vm), ram, bitmap)?;
            let dirty_pages = bitmap.count();
            let secs = t.elapsed().as_secs_f64().max(1e-6);
            log::info!(
                "migration round {round}: sent {sent} pages ({} MiB of data) in {:.0} ms, {:.0} MiB/s; dirty since: {dirty_pages} pages ({} by the guest, {} by the VMM), {:.0} pages/s; hinted so far {}",
                bytes >> 20,
                secs * 1e3,
                bytes as f64 / secs / (1 << 20) as f64,
                sync.kvm_pages,
                sync.vmm_pages,
                dirty_pages as f64 / secs,
                self.hints.hinted_pages()
            );
            let stats = *w.stats();
            self.update(|s| {
                s.pages_sent = stats.data_pages + stats.zero_pages;
                s.pages_zero = stats.zero_pages;
                s.bytes_sent = stats.page_bytes;
                s.remaining_pages = dirty_pages;
            });
            match conv.decide(dirty_pages) {
                Decision::AnotherRound => round += 1,
                Decision::StopAndCopy {
                    why,
                    expected_downtime,
                } => {
                    log::info!(
                        "migration: stop-and-copy ({why:?}, expected downtime {expected_downtime:?})"
                    );
                    return Ok(round);
                }
            }
        }
    }

    /// The final round: paused, hinting stopped, devices locked so nothing
    /// writes guest memory after the last sync; then the state and the
    /// trailer. Returns the output, everything flushed.
    fn final_round(
        &self,
        mut w: Writer,
        bitmap: &AtomicPageBitmap,
        round: u32,
    ) -> Result<Sink, MigrationError> {
        let ram = &self.ctx.ram;
        let pause_start = Instant::now();
        self.ctx.vcpus.pause();
        // The balloon writes nothing to guest memory from here until the
        // job ends (`run` thaws it), so the copy and the captured device
        // agree; its lock is held only to freeze and to capture, so the
        // event loop and the API go on meanwhile.
        if let Some(b) = &self.ctx.balloon {
            lock(b).freeze();
        }
        dirty::sync(&lock(&self.ctx.vm), ram, bitmap)?;
        w.send_bitmap(&**ram, round, bitmap)
            .map_err(MigrationError::from_write)?;
        let mut vcpus = Vec::new();
        for id in 0..self.ctx.vcpus.count() {
            self.check_cancel()?;
            let support = self.ctx.support.clone();
            let st = self
                .ctx
                .vcpus
                .run_paused(id, move |fd| {
                    state::flush_pending_exit(id as u8, fd)?;
                    state::capture_vcpu(&support, id as u8, fd)
                })
                .ok_or(MigrationError::VcpuTimeout(id))??;
            vcpus.push(st);
        }
        let vm_state = state::capture_vm(lock(&self.ctx.vm).fd())?;
        let devices = {
            let balloon = self.ctx.balloon.as_ref().map(|b| lock(b));
            (self.ctx.capture_devices)(balloon.as_deref()).map_err(MigrationError::Devices)?
        };
        let blob = VmState::new(ram.layout(), vcpus, vm_state, devices).to_bytes()?;
        w.state(&blob).map_err(MigrationError::from_write)?;
        let (out, stats) = w.finish().map_err(MigrationError::from_write)?;
        let sink = out
            .into_inner()
            .map_err(|e| {
                MigrationError::from_write(super::stream::WriteError::Io {
                    offset: stats.stream_bytes,
                    source: e.into_error(),
                })
            })?
            .into_inner();
        let downtime = pause_start.elapsed();
        log::info!(
            "migration: final round {round} sent, {} ms paused so far, stream {} bytes",
            downtime.as_millis(),
            stats.stream_bytes
        );
        self.update(|s| {
            s.round = round;
            s.pages_sent = stats.data_pages + stats.zero_pages;
            s.pages_zero = stats.zero_pages;
            s.bytes_sent = stats.page_bytes;
            s.remaining_pages = 0;
            s.downtime_ms = Some(downtime.as_millis() as u64);
        });
        Ok(sink)
    }

    /// Wait for the destination's ACK, give the VM up (GO), and wait for its
    /// RUN. See [`super::handshake`] for what each failure means.
    fn switchover(&mut self) -> Result<(), MigrationError> {
        self.update(|s| s.state = MigrationState::Switchover);
        let pause_start = Instant::now();
        let (status, cancel_flag, handed_over) = (self.status, self.cancel, self.handed_over);
        let Some(peer) = &mut self.peer else {
            return Ok(());
        };
        let cancel = self.cancel.clone();
        let cancelled = move || cancel.load(Ordering::SeqCst);
        let ack = Waiter {
            cancelled: &cancelled,
            timeout: self.opts.ack_timeout,
        };
        match ack.recv(peer, "ACK") {
            Ok(Message::Ack) => {}
            Ok(Message::Nak(reason)) => return Err(MigrationError::Refused(reason)),
            Ok(other) => {
                return Err(MigrationError::Switchover(HandshakeError::Unexpected {
                    expected: "ACK",
                    got: other.name(),
                }));
            }
            Err(HandshakeError::Cancelled { .. }) => return Err(MigrationError::Cancelled),
            Err(e) => return Err(MigrationError::Switchover(e)),
        }
        // From here on the VM is the destination's unless it says it did
        // not start: a cancel is too late (and one that came first wins).
        past_cancelling(status, cancel_flag, handed_over)?;
        log::info!("migration: the destination acknowledged; handing the VM over");
        handshake::send(peer, &Message::Go).map_err(MigrationError::Switchover)?;
        let never = || false;
        let run = Waiter {
            cancelled: &never,
            timeout: self.opts.ack_timeout,
        };
        let result = match run.recv(peer, "RUN") {
            Ok(Message::Run) => Ok(()),
            Ok(Message::Nak(reason)) => Err(MigrationError::Refused(reason)),
            // It closed without RUN: it starts only after writing RUN, so it
            // does not run the VM.
            Err(e @ HandshakeError::Closed { .. }) => Err(MigrationError::Switchover(e)),
            Ok(other) => Err(MigrationError::Unconfirmed(HandshakeError::Unexpected {
                expected: "RUN",
                got: other.name(),
            })),
            Err(e) => Err(MigrationError::Unconfirmed(e)),
        };
        let paused = pause_start.elapsed().as_millis() as u64;
        self.update(|s| s.downtime_ms = Some(s.downtime_ms.unwrap_or(0) + paused));
        result
    }
}
