//! The HTTP/1.1 server: hyper on a current-thread tokio runtime in its own
//! thread, listening on a unix socket.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};

use crate::channel::{ApiRequest, ApiResponse, Responder, SendError, VmmChannel};
use crate::events::{ApiEvent, EventEnvelope, now_ms};
use crate::metrics::{self, Gauges, ServerStats};
use crate::parse_errors::JsonErrors;
use crate::policy::{PolicyPatch, PolicyPut};
use crate::routes::{self, Endpoint, Match};
use crate::sse::{SseRing, sse_frame};
use crate::types::{
    BalloonPatch, BalloonPut, Empty, HintingStartCmd, MigrationRequest, SnapshotRequest,
    StatsPatch, Validate, VmStatePatch, VmmMetrics,
};

/// Errors starting the server. Every message names the socket path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("API socket {0} is in use by another process")]
    InUse(PathBuf),
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot check API socket {path}: {source}")]
    Check { path: PathBuf, source: io::Error },
    #[error("cannot remove stale API socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot bind API socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error(
        "cannot bind API socket {path}: cannot create {dir}, the private directory next to it \
         where the socket is bound before it is linked into place: {source}"
    )]
    PrivateDir {
        path: PathBuf,
        dir: PathBuf,
        source: io::Error,
    },
    #[error(
        "API socket path {path} is {len} bytes, longer than a unix socket path may be \
         ({SUN_PATH_MAX} bytes)"
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error(
        "API socket path {path} is {len} bytes: blimp binds it first as {tmp} (in a private \
         directory next to it, then links it into place, so that it is mode 0600 from the \
         start), {extra} bytes longer, and a unix socket path may be {SUN_PATH_MAX} bytes: \
         here the API socket path may be at most {max} bytes"
    )]
    PrivatePathTooLong {
        path: PathBuf,
        len: usize,
        tmp: PathBuf,
        extra: usize,
        max: usize,
    },
    #[error("cannot set mode 0600 on API socket {path}: {source}")]
    Chmod { path: PathBuf, source: io::Error },
    #[error("cannot start the API server for {path}: {source}")]
    Runtime { path: PathBuf, source: io::Error },
}

impl Error {
    /// The path given cannot be an API socket, whatever else runs on the
    /// host: too long, something other than a socket, its directory
    /// missing or not a directory. A usage error (exit 2), where a socket
    /// in use or a directory that refuses the bind is a runtime one.
    pub fn is_usage(&self) -> bool {
        match self {
            Error::NotASocket(_) | Error::PathTooLong { .. } | Error::PrivatePathTooLong { .. } => {
                true
            }
            Error::Check { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ),
            _ => false,
        }
    }
}

/// Limits and timeouts; [`ServerConfig::default`] is what `start` uses.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request body; bigger ones get 413.
    pub max_body_bytes: usize,
    /// Time a client has to send a request's headers. It also bounds how long
    /// an idle keep-alive connection stays open.
    pub header_timeout: Duration,
    /// Time a client has to send a request's body (then 408).
    pub body_timeout: Duration,
    /// Time the VMM has to answer (then 503).
    pub vmm_timeout: Duration,
    /// Open connections at most. When full, the least recently active
    /// connection with nothing at the VMM (idle, mid-headers or waiting for
    /// its body) is closed at once to admit a new one; if every connection
    /// has a request at the VMM the new one gets 503 and is closed.
    pub max_connections: usize,
    /// Concurrent `GET /events` streams at most (they count as connections).
    pub max_event_readers: usize,
    /// How long a connection asked to close may take to finish its response.
    pub close_grace: Duration,
    /// Interval of SSE keep-alive comments.
    pub event_keepalive: Duration,
    /// An event stream whose client takes nothing (not even a keep-alive)
    /// for this long is ended and its connection closed: it held one of
    /// the `max_event_readers` slots for as long as its socket stayed open.
    pub event_stall: Duration,
    /// Run first on the server thread, before it accepts a connection (the
    /// VMM installs the thread's seccomp filter here).
    pub thread_init: Option<fn()>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 64 * 1024,
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(5),
            vmm_timeout: Duration::from_secs(5),
            max_connections: 64,
            max_event_readers: 16,
            close_grace: Duration::from_secs(1),
            event_keepalive: Duration::from_secs(15),
            event_stall: Duration::from_secs(30),
            thread_init: None,
        }
    }
}

type RespBody = UnsyncBoxBody<Bytes, Infallible>;

/// The API server; see [`ApiServer::start`].
pub struct ApiServer;

impl ApiServer {
    /// Create the socket at `path` (mode 0600) and serve the API on a thread
    /// of its own. Refuses a socket another process answers on; a stale
    /// socket file is replaced. The socket is removed when the returned
    /// handle is dropped.
    pub fn start(path: &Path, vmm: VmmChannel) -> Result<ApiServerHandle, Error> {
        Self::start_with_config(path, vmm, ServerConfig::default())
    }

    pub fn start_with_config(
        path: &Path,
        vmm: VmmChannel,
        config: ServerConfig,
    ) -> Result<ApiServerHandle, Error> {
        let rt = runtime(path)?;
        rt.block_on(clear_stale_socket(path))?;
        let listener = bind_private(path)?;
        let ident = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let cleanup_on_err = |source: io::Error| {
            let _ = std::fs::remove_file(path);
            Error::Runtime {
                path: path.to_path_buf(),
                source,
            }
        };
        listener.set_nonblocking(true).map_err(cleanup_on_err)?;
        let listener = {
            let _guard = rt.enter();
            UnixListener::from_std(listener).map_err(cleanup_on_err)?
        };
        let events = SseRing::new();
        if !vmm.events().attach(Box::new(events.clone())) {
            log::warn!("the VMM's event hub already feeds another server");
        }
        let ctx = Arc::new(Ctx {
            events,
            cfg: config,
            vmm,
            stats: ServerStats::default(),
            conns: Mutex::new(ConnTable::default()),
            epoch: Instant::now(),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("blimp-api".into())
            .spawn(move || {
                if let Some(init) = ctx.cfg.thread_init {
                    init();
                }
                rt.block_on(accept_loop(listener, ctx, shutdown_rx))
            })
            .map_err(cleanup_on_err)?;
        log::info!("API server listening on {}", path.display());
        Ok(ApiServerHandle {
            path: path.to_path_buf(),
            ident,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }
}

/// The current-thread runtime the server (or a check of its path) runs on.
fn runtime(path: &Path) -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|source| Error::Runtime {
            path: path.to_path_buf(),
            source,
        })
}

/// The directory `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Bind the socket with mode 0600 from the start: inside a fresh 0700
/// directory next to `path`, then linked into place, so no other user can
/// ever connect whatever the umask (changing the umask instead would race
/// with the process's other threads).
fn bind_private(path: &Path) -> Result<std::os::unix::net::UnixListener, Error> {
    let bind_err = |source: io::Error| Error::Bind {
        path: path.to_path_buf(),
        source,
    };
    let parent = parent_dir(path);
    let dir = private_dir(path, parent, NEXT_DIR.fetch_add(1, Ordering::Relaxed))?;
    let tmp = dir.join("s");
    let bound = std::os::unix::net::UnixListener::bind(&tmp)
        .map_err(bind_err)
        .and_then(|l| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| Error::Chmod {
                    path: path.to_path_buf(),
                    source,
                },
            )?;
            // A link, not a rename: it never replaces what another blimp,
            // started at the same moment, put there since our check.
            std::fs::hard_link(&tmp, path).map_err(|source| {
                if source.kind() == io::ErrorKind::AlreadyExists {
                    Error::InUse(path.to_path_buf())
                } else {
                    bind_err(source)
                }
            })?;
            Ok(l)
        });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    bound
}

/// Numbers the private directories this process binds in.
static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// Create private directory number `n` next to `path` (mode 0700), once
/// the bind path inside it is known to fit in a socket address.
fn private_dir(path: &Path, parent: &Path, n: u64) -> Result<PathBuf, Error> {
    // As short as it can be unique: it makes the path bound longer.
    let dir = parent.join(format!(".b{:x}.{n:x}", std::process::id()));
    check_path_len(path, &dir.join("s"))?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|source| Error::PrivateDir {
            path: path.to_path_buf(),
            dir: dir.clone(),
            source,
        })?;
    Ok(dir)
}

/// The longest unix socket path, without its NUL (`sun_path` is 108 bytes).
const SUN_PATH_MAX: usize = 107;

/// `path`, and `tmp` where it is bound first, fit in a socket address;
/// else say which limit the user's path has.
fn check_path_len(path: &Path, tmp: &Path) -> Result<(), Error> {
    use std::os::unix::ffi::OsStrExt;
    let (len, tmp_len) = (path.as_os_str().len(), tmp.as_os_str().as_bytes().len());
    if len > SUN_PATH_MAX {
        return Err(Error::PathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    if tmp_len > SUN_PATH_MAX {
        let extra = tmp_len - len;
        return Err(Error::PrivatePathTooLong {
            path: path.to_path_buf(),
            len,
            tmp: tmp.to_path_buf(),
            extra,
            max: SUN_PATH_MAX - extra,
        });
    }
    Ok(())
}

/// What is at an API socket path before the server binds it.
enum Found {
    Nothing,
    /// A socket nobody listens on (left by a blimp that was killed).
    Stale,
}

/// Refuse a live socket or anything else that is not a socket.
async fn probe_socket(path: &Path) -> Result<Found, Error> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Nothing),
        Err(source) => {
            return Err(Error::Check {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if !md.file_type().is_socket() {
        return Err(Error::NotASocket(path.to_path_buf()));
    }
    // A non-blocking connect: a live server with a full backlog answers
    // EAGAIN rather than hanging us.
    let probe = tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path)).await;
    match probe {
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(Found::Stale),
        Ok(Err(e)) if e.kind() == io::ErrorKind::PermissionDenied => Err(Error::Check {
            path: path.to_path_buf(),
            source: e,
        }),
        // Connected, would block (backlog full) or timed out: someone is there.
        _ => Err(Error::InUse(path.to_path_buf())),
    }
}

/// Refuse a live socket, remove a stale one.
async fn clear_stale_socket(path: &Path) -> Result<(), Error> {
    match probe_socket(path).await? {
        Found::Nothing => Ok(()),
        Found::Stale => {
            log::info!("removing stale API socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| Error::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
    }
}

/// Whether a server could start at `path` as far as the path goes: its
/// directory exists and takes the private directory the socket is bound
/// in (created and removed again: a dry run), the bind path fits in a
/// socket address, and nothing but a stale socket is at `path`. For a caller about to commit to something it cannot
/// take back without its API (accepting an incoming migration), so that a
/// mistyped `--api-sock` is refused before, not after.
pub fn check_socket_path(path: &Path) -> Result<(), Error> {
    let parent = parent_dir(path);
    let dir_err = |kind: io::ErrorKind, why: &dyn std::fmt::Display| Error::Check {
        path: path.to_path_buf(),
        source: io::Error::new(kind, format!("its directory {}: {why}", parent.display())),
    };
    match std::fs::metadata(parent) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => return Err(dir_err(io::ErrorKind::NotADirectory, &"not a directory")),
        Err(e) => return Err(dir_err(e.kind(), &e)),
    }
    let dir = private_dir(path, parent, NEXT_DIR.load(Ordering::Relaxed))?;
    let _ = std::fs::remove_dir(&dir);
    let rt = runtime(path)?;
    rt.block_on(probe_socket(path)).map(|_| ())
}

/// Running server. Dropping it (or [`ApiServerHandle::shutdown`]) stops the
/// server thread and removes the socket file.
pub struct ApiServerHandle {
    path: PathBuf,
    ident: Option<(u64, u64)>,
    shutdown: Option<watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServerHandle {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop serving, wait for the server thread and remove the socket.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Remove the socket only if it is still ours (not replaced since).
        let still_ours = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if still_ours.is_some() && still_ours == self.ident {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------- connections

#[derive(Default)]
struct ConnState {
    /// Requests being handled on this connection.
    busy: AtomicUsize,
    /// Waiting for the client to send a request body: evictable like an
    /// idle connection (a stalled body must not hold a slot).
    reading_body: AtomicBool,
    /// Carries an event stream: never evicted for being idle.
    pinned: AtomicBool,
    /// Milliseconds since server start of the last request end.
    last_active_ms: AtomicU64,
    /// Asks the connection to close.
    close: Notify,
}

struct ConnEntry {
    state: Arc<ConnState>,
    /// Asked to close (or a 503-and-close connection): not counted as live.
    closing: bool,
}

#[derive(Default)]
struct ConnTable {
    next_id: u64,
    map: HashMap<u64, ConnEntry>,
}

impl ConnTable {
    fn live(&self) -> usize {
        self.map.values().filter(|c| !c.closing).count()
    }
}

enum Admission {
    Serve(u64, Arc<ConnState>),
    Reject(u64),
    Drop,
}

struct Ctx {
    cfg: ServerConfig,
    vmm: VmmChannel,
    events: SseRing,
    stats: ServerStats,
    conns: Mutex<ConnTable>,
    epoch: Instant,
}

/// Removes a connection from the table however its task ends.
struct ConnGuard {
    ctx: Arc<Ctx>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Ok(mut t) = self.ctx.conns.lock() {
            t.map.remove(&self.id);
        }
    }
}

/// Marks a connection busy while a request is handled.
struct BusyGuard {
    state: Arc<ConnState>,
    ctx: Arc<Ctx>,
}

impl BusyGuard {
    fn new(state: Arc<ConnState>, ctx: Arc<Ctx>) -> Self {
        state.busy.fetch_add(1, Ordering::SeqCst);
        BusyGuard { state, ctx }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.state
            .last_active_ms
            .store(self.ctx.now_ms(), Ordering::Relaxed);
        self.state.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ConnState {
    /// Nothing is at the VMM for this connection: closing it loses no work.
    fn evictable(&self) -> bool {
        (self.busy.load(Ordering::SeqCst) == 0 || self.reading_body.load(Ordering::SeqCst))
            && !self.pinned.load(Ordering::SeqCst)
    }
}

impl Ctx {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn admit(&self) -> Admission {
        let Ok(mut t) = self.conns.lock() else {
            return Admission::Drop;
        };
        let max = self.cfg.max_connections.max(1);
        // Hard cap on everything incl. connections still closing.
        if t.map.len() >= max * 2 {
            return Admission::Drop;
        }
        let reject = t.live() >= max && !self.evict_oldest(&mut t);
        let id = t.next_id;
        t.next_id += 1;
        let state = Arc::new(ConnState::default());
        state.last_active_ms.store(self.now_ms(), Ordering::Relaxed);
        t.map.insert(
            id,
            ConnEntry {
                state: state.clone(),
                closing: reject,
            },
        );
        if reject {
            Admission::Reject(id)
        } else {
            Admission::Serve(id, state)
        }
    }

    /// Close the connection idle the longest (or stalled in its body) to
    /// make room; false when every connection is busy.
    fn evict_oldest(&self, t: &mut ConnTable) -> bool {
        let victim = t
            .map
            .iter()
            .filter(|(_, c)| !c.closing && c.state.evictable())
            .min_by_key(|(_, c)| c.state.last_active_ms.load(Ordering::Relaxed))
            .map(|(id, _)| *id);
        let Some(c) = victim.and_then(|id| t.map.get_mut(&id)) else {
            return false;
        };
        c.closing = true;
        c.state.close.notify_one();
        self.stats
            .connections_evicted
            .fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Out of file descriptors (EMFILE/ENFILE) at accept: the connection
    /// waiting the longest makes room, as one over the cap would.
    fn make_room(&self) -> bool {
        self.conns
            .lock()
            .is_ok_and(|mut t| self.evict_oldest(&mut t))
    }

    fn live_connections(&self) -> usize {
        self.conns.lock().map(|t| t.live()).unwrap_or(0)
    }
}

async fn accept_loop(listener: UnixListener, ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>) {
    let mut failures = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            res = listener.accept() => match res {
                Ok((stream, _)) => spawn_connection(&ctx, stream, shutdown.clone()),
                Err(e) => {
                    let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                    let evicted = out_of_fds && ctx.make_room();
                    // The first, then every 100th: a client hammering a
                    // full process cannot flood the log.
                    if failures.is_multiple_of(100) {
                        log::warn!(
                            "API accept failed: {e} ({} so far){}",
                            failures + 1,
                            if evicted { "; the longest idle connection is closed to make room" } else { "" }
                        );
                    }
                    failures += 1;
                    // Back off instead of spinning (an evicted connection
                    // closes on its own task meanwhile).
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    log::info!("API server stopped");
}

fn spawn_connection(ctx: &Arc<Ctx>, stream: UnixStream, shutdown: watch::Receiver<bool>) {
    ctx.stats.connections_total.fetch_add(1, Ordering::Relaxed);
    match ctx.admit() {
        Admission::Drop => {
            ctx.stats
                .connections_rejected
                .fetch_add(1, Ordering::Relaxed);
            drop(stream);
        }
        Admission::Reject(id) => {
            ctx.stats
                .connections_rejected
                .fetch_add(1, Ordering::Relaxed);
            let guard = ConnGuard {
                ctx: ctx.clone(),
                id,
            };
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let _guard = guard;
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let ctx = ctx.clone();
                    async move {
                        let resp = error_response(503, "too many API connections; try again");
                        ctx.stats.count_request(503);
                        Ok::<_, Infallible>(resp)
                    }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(1))
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(JsonErrors::new(stream)), svc);
                let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
            });
        }
        Admission::Serve(id, state) => {
            let guard = ConnGuard {
                ctx: ctx.clone(),
                id,
            };
            let ctx = ctx.clone();
            tokio::spawn(serve_connection(ctx, state, stream, shutdown, guard));
        }
    }
}

async fn serve_connection(
    ctx: Arc<Ctx>,
    state: Arc<ConnState>,
    stream: UnixStream,
    mut shutdown: watch::Receiver<bool>,
    _guard: ConnGuard,
) {
    let svc = {
        let ctx = ctx.clone();
        let state = state.clone();
        service_fn(move |req: Request<Incoming>| {
            let ctx = ctx.clone();
            let state = state.clone();
            async move {
                let _busy = BusyGuard::new(state.clone(), ctx.clone());
                Ok::<_, Infallible>(handle(&ctx, &state, req).await)
            }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.cfg.header_timeout)
        .max_headers(64)
        .max_buf_size(64 * 1024)
        .keep_alive(true)
        .serve_connection(TokioIo::new(JsonErrors::new(stream)), svc);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                log::debug!("API connection ended: {e}");
            }
            return;
        }
        _ = state.close.notified() => {
            // Evicted while idle, mid-headers or waiting for a body: close
            // at once so the slot is free for the client that asked for it.
            if state.evictable() {
                return;
            }
        }
        _ = shutdown.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(ctx.cfg.close_grace, conn).await;
}

// ---------------------------------------------------------------- requests

fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into()).boxed_unsync()
}

fn json_response(status: u16, body: &Value) -> Response<RespBody> {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if code == StatusCode::NO_CONTENT || code == StatusCode::NOT_MODIFIED {
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = code;
        return r;
    }
    let mut text = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    text.push(b'\n');
    let mut r = Response::new(full(text));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(status: u16, msg: impl Into<String>) -> Response<RespBody> {
    json_response(status, &json!({ "error": msg.into() }))
}

/// An error after which the connection is not reused (body left unread).
fn closing_error(status: u16, msg: impl Into<String>) -> Response<RespBody> {
    let mut r = error_response(status, msg);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Turn the VMM's answer into HTTP, enforcing the `{"error": ...}` shape.
fn vmm_response(resp: ApiResponse) -> Response<RespBody> {
    let ApiResponse { status, body } = resp;
    if !(200..=599).contains(&status) {
        return error_response(500, format!("VMM answered with invalid status {status}"));
    }
    if status >= 400 && !body.get("error").is_some_and(Value::is_string) {
        let reason = StatusCode::from_u16(status)
            .ok()
            .and_then(|c| c.canonical_reason())
            .unwrap_or("error");
        return json_response(status, &json!({ "error": reason, "detail": body }));
    }
    json_response(status, &body)
}

async fn handle(
    ctx: &Arc<Ctx>,
    conn: &Arc<ConnState>,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // HEAD is GET without the body (hyper leaves the body out).
    let head = method == hyper::Method::HEAD;
    let lookup = if head { "GET" } else { method.as_str() };
    let resp = match routes::route(lookup, &path) {
        _ if unsupported_transfer_encoding(req.headers()) => {
            closing_error(501, crate::parse_errors::UNSUPPORTED_TE)
        }
        Match::NotFound => error_response(404, format!("no such endpoint: {path}")),
        Match::MethodNotAllowed(allow) => {
            let allow = with_head(allow);
            let mut r = error_response(
                405,
                format!("method {method} is not allowed on {path} (allowed: {allow})"),
            );
            if let Ok(v) = HeaderValue::from_str(&allow) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            r
        }
        // The headers of an event stream, without subscribing a reader.
        Match::Found(Endpoint::GetEvents) if head => {
            let mut r = Response::new(full(Bytes::new()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            r
        }
        Match::Found(ep) => dispatch(ctx, conn, ep, req).await,
    };
    ctx.stats.count_request(resp.status().as_u16());
    log::debug!(
        "API {method} {path} -> {} in {:?}",
        resp.status().as_u16(),
        started.elapsed()
    );
    resp
}

/// A `Transfer-Encoding` with any coding but `chunked` (hyper itself
/// refuses a list that does not end in `chunked`, with a 400 that
/// [`JsonErrors`] turns into the same 501).
fn unsupported_transfer_encoding(headers: &hyper::HeaderMap) -> bool {
    headers.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
        v.to_str().map_or(true, |v| {
            v.split(',')
                .map(str::trim)
                .any(|c| !c.eq_ignore_ascii_case("chunked"))
        })
    })
}

/// An `Allow` list with HEAD wherever GET is allowed.
fn with_head(allow: String) -> String {
    if allow.split(", ").any(|m| m == "GET") {
        format!("{allow}, HEAD")
    } else {
        allow
    }
}

/// Read the whole body under the size limit and the body timeout.
async fn read_body(
    ctx: &Ctx,
    conn: &ConnState,
    req: Request<Incoming>,
) -> Result<Bytes, Box<Response<RespBody>>> {
    let limit = ctx.cfg.max_body_bytes;
    let too_large = || {
        closing_error(
            413,
            format!("request body too large (at most {limit} bytes)"),
        )
    };
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH) {
        match len.to_str().ok().and_then(|s| s.parse::<u64>().ok()) {
            Some(n) if n > limit as u64 => return Err(Box::new(too_large())),
            Some(_) => {}
            None => {
                return Err(Box::new(closing_error(
                    400,
                    "invalid Content-Length header",
                )));
            }
        }
    }
    let body = Limited::new(req.into_body(), limit);
    conn.reading_body.store(true, Ordering::SeqCst);
    let read = tokio::time::timeout(ctx.cfg.body_timeout, body.collect()).await;
    conn.reading_body.store(false, Ordering::SeqCst);
    match read {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(Box::new(too_large())),
        Ok(Err(e)) => Err(Box::new(closing_error(
            400,
            format!("cannot read request body: {e}"),
        ))),
        Err(_) => Err(Box::new(closing_error(
            408,
            format!(
                "request body not received within {} s",
                ctx.cfg.body_timeout.as_secs_f64()
            ),
        ))),
    }
}

fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

/// serde accepts a JSON array for a struct; the API only takes objects.
fn expect_object(body: &[u8]) -> Result<(), String> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        _ => Err("invalid request body: expected a JSON object".into()),
    }
}

/// Parse and range-check a JSON body; the error is a 400's message.
fn parse<T: DeserializeOwned + Validate>(body: &[u8]) -> Result<T, String> {
    if is_blank(body) {
        return Err("request body is empty (expected JSON)".into());
    }
    expect_object(body)?;
    let value: T =
        serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))?;
    value
        .validate()
        .map_err(|e| format!("invalid request body: {e}"))?;
    Ok(value)
}

/// Endpoints without parameters accept an empty body or `{}`.
fn parse_empty(body: &[u8]) -> Result<(), String> {
    if is_blank(body) {
        return Ok(());
    }
    expect_object(body).map_err(|_| "invalid request body: expected {} or nothing".to_string())?;
    serde_json::from_slice::<Empty>(body)
        .map(|_| ())
        .map_err(|e| format!("invalid request body (expected {{}}): {e}"))
}

async fn dispatch(
    ctx: &Arc<Ctx>,
    conn: &Arc<ConnState>,
    ep: Endpoint,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let body = match read_body(ctx, conn, req).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let request = match ep {
        Endpoint::GetMetrics => return get_metrics(ctx).await,
        Endpoint::GetEvents => return get_events(ctx, conn),
        Endpoint::GetVm => Ok(ApiRequest::GetVm),
        Endpoint::PatchVm => parse::<VmStatePatch>(&body).map(ApiRequest::PatchVm),
        Endpoint::ShutdownVm => parse_empty(&body).map(|_| ApiRequest::Shutdown),
        Endpoint::GetBalloon => Ok(ApiRequest::GetBalloon),
        Endpoint::PatchBalloon => parse::<BalloonPatch>(&body).map(ApiRequest::PatchBalloon),
        Endpoint::PutBalloon => parse::<BalloonPut>(&body).map(ApiRequest::PutBalloon),
        Endpoint::GetBalloonStats => Ok(ApiRequest::GetBalloonStats),
        Endpoint::PatchBalloonStats => {
            parse::<StatsPatch>(&body).map(ApiRequest::PatchBalloonStats)
        }
        Endpoint::GetBalloonPolicy => Ok(ApiRequest::GetBalloonPolicy),
        Endpoint::PutBalloonPolicy => parse::<PolicyPut>(&body).map(ApiRequest::PutBalloonPolicy),
        Endpoint::PatchBalloonPolicy => {
            parse::<PolicyPatch>(&body).map(ApiRequest::PatchBalloonPolicy)
        }
        Endpoint::HintingStart => parse_empty(&body).map(|_| ApiRequest::HintingStart),
        Endpoint::HintingStatus => Ok(ApiRequest::HintingStatus),
        Endpoint::HintingStop => parse_empty(&body).map(|_| ApiRequest::HintingStop),
        Endpoint::HintingDone => parse_empty(&body).map(|_| ApiRequest::HintingDone),
        Endpoint::FcHintingStart if is_blank(&body) => {
            Ok(ApiRequest::FcHintingStart(HintingStartCmd::default()))
        }
        Endpoint::FcHintingStart => parse::<HintingStartCmd>(&body).map(ApiRequest::FcHintingStart),
        Endpoint::FcHintingStop => parse_empty(&body).map(|_| ApiRequest::HintingDone),
        Endpoint::PutMigration => parse::<MigrationRequest>(&body).map(ApiRequest::PutMigration),
        Endpoint::GetMigration => Ok(ApiRequest::GetMigration),
        Endpoint::CancelMigration => Ok(ApiRequest::CancelMigration),
        Endpoint::PutSnapshot => parse::<SnapshotRequest>(&body).map(ApiRequest::PutSnapshot),
    };
    let answer = match request {
        Ok(r) => call_vmm(ctx, r, ctx.cfg.vmm_timeout).await,
        Err(msg) => ApiResponse::bad_request(msg),
    };
    vmm_response(if ep.is_balloon() {
        with_fault_message(answer)
    } else {
        answer
    })
}

/// Firecracker's error body is `{"fault_message": ...}`: on the routes it
/// shares with Blimp an error carries both fields, with the same text.
fn with_fault_message(mut resp: ApiResponse) -> ApiResponse {
    if resp.status >= 400
        && let Some(map) = resp.body.as_object_mut()
        && let Some(msg) = map.get("error").cloned()
    {
        map.insert("fault_message".into(), msg);
    }
    resp
}

/// The 503 for a request the VMM took but never answered: it ended its
/// event loop (and with it the VM) with the request still queued.
const VM_SHUTTING_DOWN: &str = "the VM is shutting down: the VMM stopped before answering";

/// Hand a request to the VMM and wait (without blocking the runtime).
async fn call_vmm(ctx: &Ctx, req: ApiRequest, timeout: Duration) -> ApiResponse {
    // Requests the VMM answers on this thread (balloon size and target)
    // skip the channel and the event loop, which may be busy (discards).
    if let Some(resp) = ctx.vmm.try_direct(&req) {
        return resp;
    }
    let (tx, rx) = oneshot::channel();
    let responder = Responder::new(move |resp| {
        let _ = tx.send(resp);
    });
    if let Err(e) = ctx.vmm.send(req, responder) {
        ctx.stats.vmm_unavailable.fetch_add(1, Ordering::Relaxed);
        return ApiResponse::unavailable(match e {
            SendError::Full => "the VMM is not taking requests (queue full)",
            SendError::Gone => "the VMM is not running",
        });
    }
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(resp)) => resp,
        // The VMM drops what it has not answered when its event loop ends:
        // the VM is stopping (a guest exit, a signal, PUT /vm/shutdown).
        Ok(Err(_)) => ApiResponse::unavailable(VM_SHUTTING_DOWN),
        Err(_) => {
            ctx.stats.vmm_timeouts.fetch_add(1, Ordering::Relaxed);
            ApiResponse::unavailable(format!(
                "the VMM did not answer within {} s",
                timeout.as_secs_f64()
            ))
        }
    }
}

async fn get_metrics(ctx: &Arc<Ctx>) -> Response<RespBody> {
    let timeout = ctx.cfg.vmm_timeout.min(Duration::from_secs(2));
    let answer = call_vmm(ctx, ApiRequest::GetMetrics, timeout).await;
    let vmm = if answer.status == 200 {
        match serde_json::from_value::<VmmMetrics>(answer.body) {
            Ok(m) => Some(m),
            Err(e) => {
                log::warn!("VMM metrics are malformed: {e}");
                None
            }
        }
    } else {
        None
    };
    let events = ctx.vmm.events();
    let text = metrics::render(
        vmm.as_ref(),
        &ctx.stats,
        &Gauges {
            connections_active: ctx.live_connections(),
            event_readers: events.subscribers(),
            events_published: events.published(),
            vmm_up: vmm.is_some(),
        },
    );
    let mut r = Response::new(full(text));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// A streaming body fed by a bounded channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn get_events(ctx: &Arc<Ctx>, conn: &Arc<ConnState>) -> Response<RespBody> {
    let hub = ctx.vmm.events();
    if hub.subscribers() >= ctx.cfg.max_event_readers {
        return error_response(
            503,
            format!(
                "too many event readers (at most {})",
                ctx.cfg.max_event_readers
            ),
        );
    }
    conn.pinned.store(true, Ordering::SeqCst);
    let mut events = ctx.events.subscribe();
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let keepalive = ctx.cfg.event_keepalive;
    let stall = ctx.cfg.event_stall;
    let ctx2 = ctx.clone();
    let conn = conn.clone();
    tokio::spawn(async move {
        if tx
            .send(Bytes::from_static(b": blimp event stream\n\n"))
            .await
            .is_err()
        {
            return;
        }
        let mut tick = tokio::time::interval(keepalive);
        tick.tick().await;
        loop {
            let frame = tokio::select! {
                _ = tx.closed() => break,
                _ = tick.tick() => Bytes::from_static(b": keepalive\n\n"),
                ev = events.recv() => match ev {
                    Ok(frame) => frame,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        ctx2.stats.events_dropped.fetch_add(missed, Ordering::Relaxed);
                        sse_frame(&EventEnvelope {
                            seq: 0,
                            timestamp_ms: now_ms(),
                            event: ApiEvent::Lagged { missed },
                        })
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            };
            // Waits while the client reads slowly; meanwhile the broadcast
            // ring keeps only the newest events, so the publisher never waits.
            match tokio::time::timeout(stall, tx.send(frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    log::warn!(
                        "API: an event stream's client took nothing for {} s: closed",
                        stall.as_secs()
                    );
                    conn.close.notify_one();
                    break;
                }
            }
        }
    });
    let mut r = Response::new(ChannelBody(rx).boxed_unsync());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// Two blimps started at the same moment both find the path free; the
    /// second to put its socket in place must not replace the first's.
    #[test]
    fn binding_never_replaces_a_socket_put_there_meanwhile() {
        let dir = std::env::temp_dir().join(format!("blimp-bind-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("api.sock");
        let first = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        match bind_private(&path) {
            Err(Error::InUse(p)) => assert_eq!(p, path),
            other => panic!("expected InUse, got {other:?}"),
        }
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            [std::ffi::OsString::from("api.sock")],
            "no temporary left"
        );
        drop(first);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
