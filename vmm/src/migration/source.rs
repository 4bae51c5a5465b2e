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

use std::io::{BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api::types::{MigrationDestination, MigrationState, MigrationStatus};
use api::{ApiEvent, EventHub};
use devices::GpaRange;
use devices::virtio::VirtioDevice;
use devices::virtio::balloon::{Balloon, HintSink, HintingState, VIRTIO_BALLOON_F_FREE_PAGE_HINT};

use super::convergence::{Convergence, ConvergenceConfig, Decision};
use super::dirty::{self, PageBitmap};
use super::file_dest::{self, AtomicFile};
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
}

/// A migration running on its own thread.
pub struct Migration {
    status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Clears hinted ranges from the current round's bitmap.
struct RoundHints {
    current: Mutex<Option<(u32, Arc<PageBitmap>)>>,
    hinted_pages: AtomicU64,
}

impl HintSink for RoundHints {
    fn hinted(&self, cmd_id: u32, range: GpaRange) {
        if let Some((id, bitmap)) = &*lock(&self.current)
            && *id == cmd_id
        {
            let cleared = bitmap.clear_range(range);
            self.hinted_pages.fetch_add(cleared, Ordering::Relaxed);
        }
    }
}

/// Why a migration failed.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_that_starts_listening_late_is_reached() {
        let path = std::env::temp_dir().join(format!("blimp-late-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let p2 = path.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let l = std::os::unix::net::UnixListener::bind(&p2).unwrap();
            l.accept().map(|_| ()).unwrap();
        });
        let dest = MigrationDestination::Unix(path.clone());
        assert!(
            open(&dest).is_ok(),
            "connect retried until the listener was up"
        );
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
        // Nobody ever listens: a clear error after the retry window.
        let t = Instant::now();
        let e = open(&MigrationDestination::Unix(
            "/nonexistent/blimp.sock".into(),
        ))
        .err()
        .unwrap();
        assert!(e.to_string().contains("/nonexistent/blimp.sock"), "{e}");
        assert!(t.elapsed() >= CONNECT_RETRY);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("cannot open destination {dest}: {source}")]
    Destination {
        dest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("file destination: {0}")]
    File(#[from] file_dest::Error),
    #[error("writing the migration stream: {0}")]
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
}

pub fn describe(dest: &MigrationDestination) -> String {
    match dest {
        MigrationDestination::File(p) => format!("file://{}", p.display()),
        MigrationDestination::Unix(p) => format!("unix://{}", p.display()),
        MigrationDestination::Tcp(a) => format!("tcp://{a}"),
    }
}

/// How long to keep retrying a destination that refuses the connection (a
/// destination blimp that is still starting up, between bind and listen).
const CONNECT_RETRY: Duration = Duration::from_secs(3);

/// Connect with `connect`, retrying refused or not-yet-existing endpoints
/// for [`CONNECT_RETRY`].
fn connect_retrying<T>(mut connect: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let deadline = Instant::now() + CONNECT_RETRY;
    loop {
        match connect() {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Where the stream goes. A file is written to a temporary file next to it
/// and replaces it only on [`Output::commit`]; dropped uncommitted (a failure
/// or a cancel), only that temporary file is removed.
enum Output {
    File(AtomicFile),
    Stream(Box<dyn Write + Send>),
}

impl Output {
    /// The whole stream, trailer included, was written and flushed.
    fn commit(self) -> Result<(), MigrationError> {
        match self {
            Output::File(f) => Ok(f.commit()?),
            Output::Stream(_) => Ok(()),
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Output::File(f) => f.write(buf),
            Output::Stream(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Output::File(f) => f.flush(),
            Output::Stream(s) => s.flush(),
        }
    }
}

fn open(dest: &MigrationDestination) -> Result<Output, MigrationError> {
    let err = |source| MigrationError::Destination {
        dest: describe(dest),
        source,
    };
    Ok(match dest {
        MigrationDestination::File(p) => Output::File(AtomicFile::create(p)?),
        MigrationDestination::Unix(p) => Output::Stream(Box::new(
            connect_retrying(|| UnixStream::connect(p)).map_err(err)?,
        )),
        MigrationDestination::Tcp(a) => Output::Stream(Box::new(
            connect_retrying(|| std::net::TcpStream::connect(a)).map_err(err)?,
        )),
    })
}

impl Migration {
    /// Start a migration thread.
    pub fn start(ctx: SourceContext, opts: MigrationOptions) -> Migration {
        let mut st = MigrationStatus::idle();
        st.state = MigrationState::Setup;
        st.destination = Some(describe(&opts.destination));
        st.total_pages = ctx.ram.layout().size() / 4096;
        let status = Arc::new(Mutex::new(st));
        let cancel = Arc::new(AtomicBool::new(false));
        let (s, c) = (status.clone(), cancel.clone());
        let thread = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || run(ctx, opts, s, c))
            .ok();
        if thread.is_none() {
            let mut s = lock(&status);
            s.state = MigrationState::Failed;
            s.error = Some("cannot spawn the migration thread".into());
        }
        Migration {
            status,
            cancel,
            thread,
        }
    }

    pub fn status(&self) -> MigrationStatus {
        lock(&self.status).clone()
    }

    pub fn is_running(&self) -> bool {
        !lock(&self.status).state.is_finished()
    }

    /// Ask the migration to stop; the source keeps running.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
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

fn run(
    ctx: SourceContext,
    opts: MigrationOptions,
    status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
) {
    let started = Instant::now();
    let was_paused = ctx.vcpus.is_paused();
    let hints = Arc::new(RoundHints {
        current: Mutex::new(None),
        hinted_pages: AtomicU64::new(0),
    });
    let result = Sender {
        ctx: &ctx,
        opts: &opts,
        status: &status,
        cancel: &cancel,
        hints: hints.clone(),
        started,
    }
    .run();
    // Whatever happened: no more dirty logging, hinting handed back to the guest.
    {
        let mut vm = lock(&ctx.vm);
        if let Err(e) = dirty::stop_dirty_logging(&mut vm, &ctx.ram) {
            log::error!("migration: cannot stop dirty logging: {e}");
        }
    }
    if let Some(b) = &ctx.balloon {
        let mut b = lock(b);
        b.set_hint_sink(None);
        if b.hinting_status().state != HintingState::Idle {
            let _ = b.stop_hinting();
            let _ = b.hinting_done();
        }
    }
    let mut s = lock(&status);
    s.elapsed_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(()) => {
            s.state = MigrationState::Completed;
            log::info!(
                "migration to {} completed: {} pages sent ({} zero, {} hinted), {} bytes of page data, {} ms",
                s.destination.as_deref().unwrap_or("?"),
                s.pages_sent,
                s.pages_zero,
                s.pages_hinted,
                s.bytes_sent,
                s.elapsed_ms
            );
            match opts.mode {
                // The VM lives on at the destination: the source stays paused,
                // and ends shortly after, once pollers have seen "Completed".
                Mode::Live => {
                    let exit = ctx.exit.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_secs(2));
                        exit.stop(ExitReason::Migrated);
                    });
                }
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
            log::warn!(
                "migration to {}: {e}",
                s.destination.as_deref().unwrap_or("?")
            );
            s.error = Some(e.to_string());
            // A file destination was dropped uncommitted: its temporary
            // file is gone and the target is as it was.
            if !was_paused {
                ctx.vcpus.resume();
            }
        }
    }
    if let Some(h) = &ctx.events {
        h.publish(ApiEvent::MigrationProgress(s.clone()));
    }
}

struct Sender<'a> {
    ctx: &'a SourceContext,
    opts: &'a MigrationOptions,
    status: &'a Mutex<MigrationStatus>,
    cancel: &'a AtomicBool,
    hints: Arc<RoundHints>,
    started: Instant,
}

impl Sender<'_> {
    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }

    fn hints_available(&self) -> bool {
        let Some(b) = &self.ctx.balloon else {
            return false;
        };
        let b = lock(b);
        let negotiated = b.acked_features() & (1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT) != 0;
        negotiated && self.opts.free_page_hints
    }

    /// Start a hint round for `bitmap` and wait (at most `timeout`) until the
    /// guest finished it; hints arriving later still clear unsent pages.
    fn hint_round(&self, bitmap: &Arc<PageBitmap>, timeout: Duration) -> Option<u32> {
        let b = self.ctx.balloon.as_ref()?;
        let id = {
            let mut b = lock(b);
            let id = b.start_hinting().ok()?;
            *lock(&self.hints.current) = Some((id, bitmap.clone()));
            id
        };
        let deadline = Instant::now() + timeout;
        loop {
            let s = lock(b).hinting_status();
            if s.guest_cmd_id == id && s.state == HintingState::Stopped {
                break;
            }
            if Instant::now() > deadline || self.cancel.load(Ordering::SeqCst) {
                log::debug!("migration: hint round {id} still running after {timeout:?}; sending");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Some(id)
    }

    fn end_hint_round(&self) {
        if let Some(b) = &self.ctx.balloon {
            let _ = lock(b).stop_hinting();
        }
        *lock(&self.hints.current) = None;
    }

    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        let mut s = lock(self.status);
        f(&mut s);
        s.elapsed_ms = self.started.elapsed().as_millis() as u64;
        s.pages_hinted = self.hints.hinted_pages.load(Ordering::Relaxed);
        if let Some(h) = &self.ctx.events {
            h.publish(ApiEvent::MigrationProgress(s.clone()));
        }
    }

    fn run(&self) -> Result<(), MigrationError> {
        let ram = &self.ctx.ram;
        let mem = ram.memory();
        let layout = ram.layout();
        let out = open(&self.opts.destination)?;
        let mut w = StreamWriter::new(BufWriter::with_capacity(4 << 20, out));
        w.header(&layout_ranges(layout), FLAG_LIVE)?;
        let bitmap = Arc::new(PageBitmap::new(layout));
        dirty::start_dirty_logging(&mut lock(&self.ctx.vm), ram)?;
        let hints = self.hints_available();
        if hints && let Some(b) = &self.ctx.balloon {
            lock(b).set_hint_sink(Some(self.hints.clone()));
        }
        bitmap.set_all();
        let mut conv = Convergence::new(ConvergenceConfig {
            downtime: self.opts.downtime,
            max_rounds: self.opts.max_rounds,
            ..Default::default()
        });
        self.update(|s| s.state = MigrationState::Active);
        let mut round = 1u32;
        loop {
            self.check_cancel()?;
            if hints {
                let timeout = if round == 1 {
                    FIRST_HINT_ROUND_TIMEOUT
                } else {
                    LATER_HINT_ROUND_TIMEOUT
                };
                self.hint_round(&bitmap, timeout);
            }
            if self.opts.mode == Mode::Snapshot {
                // A snapshot only collects hints while running; it copies paused.
                self.end_hint_round();
                break;
            }
            let t = Instant::now();
            let bytes_before = w.stats().page_bytes;
            let sent = w.send_bitmap(mem, round, &bitmap)?;
            w.flush()?;
            self.end_hint_round();
            let bytes = w.stats().page_bytes - bytes_before;
            conv.round_done(bytes, t.elapsed());
            let sync = dirty::sync(&lock(&self.ctx.vm), ram, &bitmap)?;
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
                self.hints.hinted_pages.load(Ordering::Relaxed)
            );
            let stats = *w.stats();
            self.update(|s| {
                s.round = round;
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
                    break;
                }
            }
        }
        self.check_cancel()?;
        self.update(|s| s.state = MigrationState::Completing);

        // Final round: paused, hinting stopped, devices locked so nothing
        // writes guest memory after the last sync.
        let pause_start = Instant::now();
        self.ctx.vcpus.pause();
        let balloon_guard = self.ctx.balloon.as_ref().map(|b| lock(b));
        dirty::sync(&lock(&self.ctx.vm), ram, &bitmap)?;
        round += 1;
        w.send_bitmap(mem, round, &bitmap)?;
        let mut vcpus = Vec::new();
        for id in 0..self.ctx.vcpus.count() {
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
        let devices = (self.ctx.capture_devices)(balloon_guard.as_deref())
            .map_err(MigrationError::Devices)?;
        drop(balloon_guard);
        let blob = VmState::new(layout, vcpus, vm_state, devices).to_bytes()?;
        w.state(&blob)?;
        let (mut out, stats) = w.finish()?;
        out.flush().map_err(|e| {
            MigrationError::Write(super::stream::WriteError::Io {
                offset: stats.stream_bytes,
                source: e,
            })
        })?;
        // Flushed above: nothing is left in the buffer.
        let out = out.into_inner().map_err(|e| {
            MigrationError::Write(super::stream::WriteError::Io {
                offset: stats.stream_bytes,
                source: e.into_error(),
            })
        })?;
        out.commit()?;
        let downtime = pause_start.elapsed();
        log::info!(
            "migration: final round {round} done, downtime {} ms, stream {} bytes",
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
        Ok(())
    }
}
