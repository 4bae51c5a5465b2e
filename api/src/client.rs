//! A blocking client for the API, over hyper's HTTP/1.1 client on a unix
//! socket. One keep-alive connection is reused across calls.
//!
//! The client runs its own current-thread tokio runtime: call it from plain
//! threads, not from inside another tokio runtime.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::net::UnixStream;

use crate::events::EventEnvelope;
use crate::policy::{PolicyPatch, PolicyPut, PolicyStatus};
use crate::types::{
    BalloonInfo, BalloonStats, HintingStarted, HintingStatus, MigrationRequest, MigrationStatus,
    SnapshotRequest, VmInfo, VmState,
};

pub use hyper::Method;

/// Default time a whole request may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {reason} (is blimp running with --api-sock {path}?)")]
    Connect { path: String, reason: String },
    #[error("API request failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("no answer from the API socket {path} within {secs} s")]
    Timeout { path: String, secs: f64 },
    /// The server answered with an error status.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("unexpected answer from the API: {0}")]
    Decode(String),
    #[error("invalid API path {0:?}")]
    InvalidPath(String),
    #[error("cannot start the API client runtime: {0}")]
    Runtime(io::Error),
}

impl ClientError {
    /// The HTTP status, for [`ClientError::Api`].
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What `path` is when it exists and is not a socket: a connect to it
/// fails as one to a dead socket would (ECONNREFUSED).
fn not_a_socket(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = std::fs::metadata(path).ok()?.file_type();
    let kinds = [
        (t.is_dir(), "a directory"),
        (t.is_file(), "a regular file"),
        (t.is_fifo(), "a FIFO"),
        (t.is_char_device(), "a character device"),
        (t.is_block_device(), "a block device"),
    ];
    kinds.into_iter().find(|(is, _)| *is).map(|(_, kind)| kind)
}

fn connect_error(path: &Path, e: io::Error) -> ClientError {
    if let Some(kind) = not_a_socket(path) {
        return ClientError::Connect {
            path: path.display().to_string(),
            reason: format!("it is {kind}, not a socket"),
        };
    }
    let reason = match e.kind() {
        io::ErrorKind::NotFound => "no such file".to_string(),
        io::ErrorKind::ConnectionRefused => {
            "connection refused (nobody listens; stale socket file?)".to_string()
        }
        io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    };
    ClientError::Connect {
        path: path.display().to_string(),
        reason,
    }
}

/// Writing the request failed with EPIPE: the server had closed the
/// connection, so it cannot have seen the request.
fn never_read(err: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = src {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return io.kind() == io::ErrorKind::BrokenPipe;
        }
        src = e.source();
    }
    false
}

/// Raw answer: status, `Content-Type` and body bytes.
#[derive(Debug, Clone)]
pub struct RawReply {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl RawReply {
    /// The body as JSON: `Null` if empty, a JSON string if not JSON.
    pub fn json(&self) -> Value {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Value::Null;
        }
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()))
    }

    fn error_message(&self) -> String {
        match self.json() {
            Value::Object(o) => match o.get("error") {
                Some(Value::String(s)) => s.clone(),
                _ => Value::Object(o).to_string(),
            },
            Value::Null => format!("HTTP status {}", self.status),
            Value::String(s) => s,
            v => v.to_string(),
        }
    }

    /// `Err(ClientError::Api)` unless the status is 2xx.
    pub fn check(self) -> Result<Self, ClientError> {
        if (200..300).contains(&self.status) {
            Ok(self)
        } else {
            Err(ClientError::Api {
                status: self.status,
                message: self.error_message(),
            })
        }
    }
}

pub struct ApiClient {
    path: PathBuf,
    rt: tokio::runtime::Runtime,
    conn: Mutex<Option<SendRequest<Full<Bytes>>>>,
    timeout: Duration,
}

impl ApiClient {
    /// A client for the API socket at `sock_path`. Connects lazily, so a
    /// missing socket is reported by the first request.
    pub fn new(sock_path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(ApiClient {
            path: sock_path.as_ref().to_path_buf(),
            rt,
            conn: Mutex::new(None),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Time a whole request (connect, send, read the answer) may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn timeout_error(&self) -> ClientError {
        ClientError::Timeout {
            path: self.path.display().to_string(),
            secs: self.timeout.as_secs_f64(),
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let stream = UnixStream::connect(&self.path)
            .await
            .map_err(|e| connect_error(&self.path, e))?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                log::debug!("API client connection ended: {e}");
            }
        });
        Ok(sender)
    }

    fn build(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        if !path.starts_with('/') {
            return Err(ClientError::InvalidPath(path.to_string()));
        }
        let has_body = body.is_some();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost")
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|_| ClientError::InvalidPath(path.to_string()))?;
        if has_body {
            req.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        Ok(req)
    }

    /// Send on the cached connection, or a new one. A request that fails
    /// on a reused connection because the server had already closed it
    /// (it was never read) is sent once more on a fresh connection.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Response<Incoming>, ClientError> {
        if !path.starts_with('/') {
            return Err(ClientError::InvalidPath(path.to_string()));
        }
        let cached = self.conn.lock().ok().and_then(|mut c| c.take());
        let cached = match cached {
            Some(s) => {
                // Let the connection task see a close that happened while
                // the client was not running.
                tokio::task::yield_now().await;
                Some(s).filter(|s| !s.is_closed())
            }
            None => None,
        };
        let reused = cached.is_some();
        let mut sender = match cached {
            Some(s) => s,
            None => self.connect().await?,
        };
        let req = self.build(method.clone(), path, body.clone())?;
        let resp = match sender.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => {
                let unsent = e.take_message().is_some();
                let err = e.into_error();
                if !(reused && (unsent || never_read(&err))) {
                    return Err(ClientError::Http(err));
                }
                log::debug!("API connection was closed by the server; reconnecting");
                sender = self.connect().await?;
                sender.send_request(self.build(method, path, body)?).await?
            }
        };
        if !sender.is_closed()
            && let Ok(mut c) = self.conn.lock()
        {
            *c = Some(sender);
        }
        Ok(resp)
    }

    /// Any request; `body` is sent as-is (`None`: no body).
    pub fn request_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<RawReply, ClientError> {
        let fut = async {
            let resp = self.send(method, path, body).await?;
            let status = resp.status().as_u16();
            let content_type = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp.into_body().collect().await?.to_bytes();
            Ok(RawReply {
                status,
                content_type,
                body,
            })
        };
        self.rt
            .block_on(async { tokio::time::timeout(self.timeout, fut).await })
            .map_err(|_| self.timeout_error())?
    }

    /// A JSON request; `Value::Null` sends no body. Returns the status and the
    /// JSON answer (`Null` for an empty body). Error statuses are returned,
    /// not turned into `Err`.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        body: &Value,
    ) -> Result<(u16, Value), ClientError> {
        let bytes = if body.is_null() {
            None
        } else {
            Some(Bytes::from(
                serde_json::to_vec(body).map_err(|e| ClientError::Decode(e.to_string()))?,
            ))
        };
        let reply = self.request_raw(method, path, bytes)?;
        Ok((reply.status, reply.json()))
    }

    pub fn get(&self, path: &str) -> Result<(u16, Value), ClientError> {
        self.request(Method::GET, path, &Value::Null)
    }
    pub fn patch(&self, path: &str, body: &Value) -> Result<(u16, Value), ClientError> {
        self.request(Method::PATCH, path, body)
    }
    pub fn put(&self, path: &str, body: &Value) -> Result<(u16, Value), ClientError> {
        self.request(Method::PUT, path, body)
    }
    pub fn delete(&self, path: &str) -> Result<(u16, Value), ClientError> {
        self.request(Method::DELETE, path, &Value::Null)
    }

    /// A request whose 2xx answer is decoded as `T`; other statuses → `Err(Api)`.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &Value,
    ) -> Result<T, ClientError> {
        let (status, v) = self.request(method, path, body)?;
        if !(200..300).contains(&status) {
            let message = match v.get("error") {
                Some(Value::String(s)) => s.clone(),
                _ => v.to_string(),
            };
            return Err(ClientError::Api { status, message });
        }
        serde_json::from_value(v).map_err(|e| ClientError::Decode(format!("{path}: {e}")))
    }

    /// A request that only needs a 2xx answer.
    pub fn call_ok(&self, method: Method, path: &str, body: &Value) -> Result<(), ClientError> {
        let bytes = if body.is_null() {
            None
        } else {
            Some(Bytes::from(body.to_string()))
        };
        self.request_raw(method, path, bytes)?.check().map(|_| ())
    }

    /// [`call_ok`](Self::call_ok) with a typed body.
    fn send_ok(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<(), ClientError> {
        let body = serde_json::to_value(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.call_ok(method, path, &body)
    }

    // ------------------------------------------------------------ typed helpers

    pub fn vm_info(&self) -> Result<VmInfo, ClientError> {
        self.call(Method::GET, "/vm", &Value::Null)
    }
    pub fn set_vm_state(&self, state: VmState) -> Result<(), ClientError> {
        self.call_ok(Method::PATCH, "/vm", &json!({ "state": state }))
    }
    pub fn shutdown_vm(&self) -> Result<(), ClientError> {
        self.call_ok(Method::PUT, "/vm/shutdown", &Value::Null)
    }
    pub fn balloon(&self) -> Result<BalloonInfo, ClientError> {
        self.call(Method::GET, "/balloon", &Value::Null)
    }
    pub fn set_balloon(&self, target_mib: u64) -> Result<(), ClientError> {
        self.call_ok(
            Method::PATCH,
            "/balloon",
            &json!({ "target_mib": target_mib }),
        )
    }
    /// `GET /balloon/policy`.
    pub fn balloon_policy(&self) -> Result<PolicyStatus, ClientError> {
        self.call(Method::GET, "/balloon/policy", &Value::Null)
    }
    /// `PUT /balloon/policy`: the whole configuration.
    pub fn put_balloon_policy(&self, put: &PolicyPut) -> Result<(), ClientError> {
        self.send_ok(Method::PUT, "/balloon/policy", put)
    }
    /// `PATCH /balloon/policy`: some keys and/or `enabled`.
    pub fn patch_balloon_policy(&self, patch: &PolicyPatch) -> Result<(), ClientError> {
        self.send_ok(Method::PATCH, "/balloon/policy", patch)
    }
    pub fn balloon_stats(&self) -> Result<BalloonStats, ClientError> {
        self.call(Method::GET, "/balloon/statistics", &Value::Null)
    }
    pub fn set_stats_interval(&self, seconds: u32) -> Result<(), ClientError> {
        self.call_ok(
            Method::PATCH,
            "/balloon/statistics",
            &json!({ "stats_polling_interval_s": seconds }),
        )
    }
    pub fn hinting_start(&self) -> Result<HintingStarted, ClientError> {
        self.call(Method::PUT, "/balloon/hinting/start", &Value::Null)
    }
    pub fn hinting_status(&self) -> Result<HintingStatus, ClientError> {
        self.call(Method::GET, "/balloon/hinting/status", &Value::Null)
    }
    pub fn hinting_stop(&self) -> Result<(), ClientError> {
        self.call_ok(Method::PUT, "/balloon/hinting/stop", &Value::Null)
    }
    pub fn hinting_done(&self) -> Result<(), ClientError> {
        self.call_ok(Method::PUT, "/balloon/hinting/done", &Value::Null)
    }
    pub fn start_migration(&self, req: &MigrationRequest) -> Result<(), ClientError> {
        self.send_ok(Method::PUT, "/migration", req)
    }
    pub fn migration(&self) -> Result<MigrationStatus, ClientError> {
        self.call(Method::GET, "/migration", &Value::Null)
    }
    pub fn cancel_migration(&self) -> Result<(), ClientError> {
        self.call_ok(Method::DELETE, "/migration", &Value::Null)
    }
    pub fn snapshot(&self, req: &SnapshotRequest) -> Result<(), ClientError> {
        self.send_ok(Method::PUT, "/snapshot", req)
    }
    /// `GET /metrics` as Prometheus text.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let r = self.request_raw(Method::GET, "/metrics", None)?.check()?;
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// Open `GET /events` on a connection of its own.
    pub fn events(&self) -> Result<EventStream<'_>, ClientError> {
        let fut = async {
            let mut sender = self.connect().await?;
            let req = self.build(Method::GET, "/events", None)?;
            let resp = sender.send_request(req).await?;
            if !resp.status().is_success() {
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await?.to_bytes();
                let reply = RawReply {
                    status,
                    content_type: None,
                    body,
                };
                return Err(ClientError::Api {
                    status,
                    message: reply.error_message(),
                });
            }
            Ok(resp.into_body())
        };
        let body = self
            .rt
            .block_on(async { tokio::time::timeout(self.timeout, fut).await })
            .map_err(|_| self.timeout_error())??;
        Ok(EventStream {
            client: self,
            body,
            buf: Vec::new(),
        })
    }
}

/// Server-sent events from `GET /events`.
pub struct EventStream<'a> {
    client: &'a ApiClient,
    body: Incoming,
    buf: Vec<u8>,
}

impl EventStream<'_> {
    /// The next event; `Ok(None)` when the server closed the stream.
    /// Waits at most `timeout` (then `Err(Timeout)`; the stream stays usable).
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<EventEnvelope>, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // One SSE event ends at a blank line.
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&block);
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue; // a comment / keep-alive
                }
                let env = serde_json::from_str(&data.join("\n"))
                    .map_err(|e| ClientError::Decode(format!("event: {e}")))?;
                return Ok(Some(env));
            }
            let frame = self
                .client
                .rt
                .block_on(async { tokio::time::timeout_at(deadline, self.body.frame()).await });
            match frame {
                Err(_) => {
                    return Err(ClientError::Timeout {
                        path: self.client.path.display().to_string(),
                        secs: timeout.as_secs_f64(),
                    });
                }
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(ClientError::Http(e)),
                Ok(Some(Ok(f))) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
