//! The seam between the API server thread and the VMM thread.
//!
//! The server sends `(ApiRequest, Responder)` pairs through a bounded std
//! channel and then calls the VMM's wake closure (which writes the VMM's
//! eventfd). The VMM drains [`ApiReceiver::try_recv`] from its event loop and
//! answers each request with [`Responder::respond`]; answering never blocks.

use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use crate::events::EventHub;
use crate::policy::{PolicyPatch, PolicyPut};
use crate::types::{
    BalloonPatch, BalloonPut, HintingStartCmd, MigrationRequest, SnapshotRequest, StatsPatch,
    VmState, VmStatePatch,
};

/// Requests queued for the VMM at most; more get 503 at once.
pub const REQUEST_QUEUE_LEN: usize = 64;

/// One API call, validated as far as the api crate can without VM state.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    /// `GET /vm` → [`crate::types::VmInfo`].
    GetVm,
    /// `PATCH /vm`. Pausing a paused VM (or resuming a running one) → 409.
    PatchVm(VmStatePatch),
    /// `PUT /vm/shutdown` → 204.
    Shutdown,
    /// `GET /balloon` → [`crate::types::BalloonInfo`]; no balloon → 400.
    GetBalloon,
    /// `PATCH /balloon` → 204 (target above guest RAM → 400).
    PatchBalloon(BalloonPatch),
    /// `PUT /balloon` (Firecracker) → 204 when it restates the configured
    /// device, 400 otherwise (see [`BalloonPut`]).
    PutBalloon(BalloonPut),
    /// `GET /balloon/statistics` → [`crate::types::BalloonStats`].
    GetBalloonStats,
    /// `PATCH /balloon/statistics` → 204.
    PatchBalloonStats(StatsPatch),
    /// `GET /balloon/policy` → [`crate::policy::PolicyStatus`].
    GetBalloonPolicy,
    /// `PUT /balloon/policy` → 204 (bad value, no balloon or no statistics → 400).
    PutBalloonPolicy(PolicyPut),
    /// `PATCH /balloon/policy` → 204.
    PatchBalloonPolicy(PolicyPatch),
    /// `GET /metrics` → [`crate::types::VmmMetrics`] (the server renders it).
    GetMetrics,
    /// `PUT /balloon/hinting/start` → [`crate::types::HintingStarted`].
    HintingStart,
    /// `PATCH /balloon/hinting/start` (Firecracker) → 204.
    FcHintingStart(HintingStartCmd),
    /// `GET /balloon/hinting/status` → [`crate::types::HintingStatus`].
    HintingStatus,
    /// `PUT /balloon/hinting/stop` → 204.
    HintingStop,
    /// `PUT /balloon/hinting/done` → 204; also `PATCH /balloon/hinting/stop`
    /// (Firecracker's stop sends DONE: the guest gets its hinted pages back).
    HintingDone,
    /// `PUT /migration` → 200 with [`crate::types::MigrationStarted`];
    /// one already running → 409.
    PutMigration(MigrationRequest),
    /// `GET /migration` → [`crate::types::MigrationStatus`].
    GetMigration,
    /// `DELETE /migration` → 204; none running → 409.
    CancelMigration,
    /// `PUT /snapshot` → 200 with [`crate::types::MigrationStarted`]: a job
    /// followed through `GET /migration`; one already running → 409.
    PutSnapshot(SnapshotRequest),
}

/// The VMM's answer: an HTTP status and a JSON body. Errors carry
/// `{"error": "..."}`; 204 answers have `Value::Null` (sent without a body).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Value,
}

impl ApiResponse {
    /// 200 with `body` serialised (a serialisation failure becomes a 500).
    pub fn ok<T: Serialize>(body: &T) -> Self {
        match serde_json::to_value(body) {
            Ok(v) => ApiResponse::ok_json(v),
            Err(e) => ApiResponse::internal(format!("cannot serialise response: {e}")),
        }
    }
    /// 200 with a ready JSON value.
    pub fn ok_json(body: Value) -> Self {
        ApiResponse { status: 200, body }
    }
    /// 204 No Content: the usual answer to a PATCH/PUT/DELETE that succeeded.
    pub fn no_content() -> Self {
        ApiResponse {
            status: 204,
            body: Value::Null,
        }
    }
    /// An error with `{"error": msg}`.
    pub fn error(status: u16, msg: impl Into<String>) -> Self {
        ApiResponse {
            status,
            body: json!({ "error": msg.into() }),
        }
    }
    /// 400: the request is well-formed but not acceptable for this VM.
    pub fn bad_request(msg: impl Into<String>) -> Self {
        ApiResponse::error(400, msg)
    }
    /// 409: the request conflicts with the VM's current state.
    pub fn conflict(msg: impl Into<String>) -> Self {
        ApiResponse::error(409, msg)
    }
    /// 500.
    pub fn internal(msg: impl Into<String>) -> Self {
        ApiResponse::error(500, msg)
    }
    /// 503: the VMM cannot serve the request right now.
    pub fn unavailable(msg: impl Into<String>) -> Self {
        ApiResponse::error(503, msg)
    }
    /// 409 "VM is already Paused" for `PATCH /vm` to the current state.
    pub fn already_in_state(state: VmState) -> Self {
        ApiResponse::conflict(format!("VM is already {state}"))
    }
    /// 400 for balloon endpoints on a VM without a balloon device.
    pub fn no_balloon() -> Self {
        ApiResponse::bad_request("the VM has no balloon device (start it with a balloon)")
    }
    /// 400 for a balloon target the guest cannot give.
    pub fn target_too_large(target_mib: u64, guest_mib: u64) -> Self {
        ApiResponse::bad_request(format!(
            "target_mib {target_mib} is larger than guest memory ({guest_mib} MiB)"
        ))
    }
    /// 400 when the guest did not negotiate a feature an endpoint needs
    /// (e.g. `free_page_hint`).
    pub fn feature_not_negotiated(feature: &str) -> Self {
        ApiResponse::bad_request(format!(
            "the balloon device does not have {feature} (not enabled or not negotiated by the guest)"
        ))
    }
    /// 409 for `PUT /migration` while one runs.
    pub fn migration_in_progress() -> Self {
        ApiResponse::conflict("a migration is already in progress")
    }
    /// 409 for `DELETE /migration` when none runs.
    pub fn no_migration() -> Self {
        ApiResponse::conflict("no migration is in progress")
    }
}

/// Answers one request. Dropping it unanswered (the VMM stops with it
/// queued) makes the client get 503 "the VM is shutting down".
pub struct Responder {
    deliver: Box<dyn FnOnce(ApiResponse) + Send>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Responder")
    }
}

impl Responder {
    /// A responder that hands the answer to `deliver` (the server's side of
    /// a one-shot channel). `deliver` must not block.
    pub fn new(deliver: impl FnOnce(ApiResponse) + Send + 'static) -> Self {
        Responder {
            deliver: Box::new(deliver),
        }
    }

    /// Send the answer. Never blocks; if the client went away it is dropped.
    pub fn respond(self, response: ApiResponse) {
        (self.deliver)(response);
    }
}

/// Answers some requests at once on the server's thread, without the trip
/// through the channel and the VMM's event loop (see
/// [`ApiReceiver::set_direct`]). `None` means "send it to the VMM".
pub type DirectHandler = Box<dyn Fn(&ApiRequest) -> Option<ApiResponse> + Send + Sync>;

/// Server side of the channel: handed to the HTTP server (`api::ApiServer`).
pub struct VmmChannel {
    sender: mpsc::SyncSender<(ApiRequest, Responder)>,
    wake: Arc<dyn Fn() + Send + Sync>,
    events: EventHub,
    direct: Arc<OnceLock<DirectHandler>>,
}

/// Why a request could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The queue is full (the VMM is not draining it).
    Full,
    /// The VMM dropped its [`ApiReceiver`].
    Gone,
}

impl VmmChannel {
    /// Queue a request and wake the VMM; `responder` carries the answer back.
    pub fn send(&self, req: ApiRequest, responder: Responder) -> Result<(), SendError> {
        match self.sender.try_send((req, responder)) {
            Ok(()) => {
                (self.wake)();
                Ok(())
            }
            Err(mpsc::TrySendError::Full(_)) => {
                // Wake anyway: maybe the VMM missed a wakeup.
                (self.wake)();
                Err(SendError::Full)
            }
            Err(mpsc::TrySendError::Disconnected(_)) => Err(SendError::Gone),
        }
    }

    pub fn events(&self) -> &EventHub {
        &self.events
    }

    /// The VMM's answer to `req` given on the calling thread, if the VMM
    /// installed a [`DirectHandler`] that takes it; `None`: use [`send`](Self::send).
    pub fn try_direct(&self, req: &ApiRequest) -> Option<ApiResponse> {
        self.direct.get().and_then(|f| f(req))
    }
}

/// VMM side of the channel.
pub struct ApiReceiver {
    receiver: mpsc::Receiver<(ApiRequest, Responder)>,
    events: EventHub,
    direct: Arc<OnceLock<DirectHandler>>,
}

impl ApiReceiver {
    /// The next queued request, if any. Call it until `None` each time the
    /// wake eventfd fires (several requests may share one wakeup).
    pub fn try_recv(&self) -> Option<(ApiRequest, Responder)> {
        self.receiver.try_recv().ok()
    }

    /// Blocking variant for VMMs (or tests) that do not poll an eventfd.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<(ApiRequest, Responder)> {
        self.receiver.recv_timeout(timeout).ok()
    }

    /// The hub through which the VMM publishes events to `GET /events`.
    pub fn event_hub(&self) -> EventHub {
        self.events.clone()
    }

    /// Install the handler the server calls on its own thread before it
    /// queues a request (once; a second call returns false and changes
    /// nothing). It must not block for long: it runs on the server's only
    /// thread. The VMM uses it for requests that need just a short device
    /// lock, so that they do not wait behind the event loop's work (e.g. a
    /// burst of inflate discards).
    pub fn set_direct(&self, handler: DirectHandler) -> bool {
        self.direct.set(handler).is_ok()
    }
}

/// Make the channel. `wake` is called after each queued request, from the API
/// thread; it must not block (typically it writes 1 to the VMM's eventfd).
pub fn channel(wake: impl Fn() + Send + Sync + 'static) -> (VmmChannel, ApiReceiver) {
    let (sender, receiver) = mpsc::sync_channel(REQUEST_QUEUE_LEN);
    let events = EventHub::new();
    let direct = Arc::new(OnceLock::new());
    (
        VmmChannel {
            sender,
            wake: Arc::new(wake),
            events: events.clone(),
            direct: direct.clone(),
        },
        ApiReceiver {
            receiver,
            events,
            direct,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn send_wakes_and_respond_arrives() {
        let woke = Arc::new(AtomicUsize::new(0));
        let w = woke.clone();
        let (chan, rx) = channel(move || {
            w.fetch_add(1, Ordering::SeqCst);
        });
        let (tx, answer) = mpsc::channel();
        chan.send(
            ApiRequest::GetVm,
            Responder::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .unwrap();
        assert_eq!(woke.load(Ordering::SeqCst), 1);
        let (req, responder) = rx.try_recv().unwrap();
        assert_eq!(req, ApiRequest::GetVm);
        assert!(rx.try_recv().is_none());
        responder.respond(ApiResponse::conflict("x"));
        let got = answer.try_recv().unwrap();
        assert_eq!(got.status, 409);
        assert_eq!(got.body["error"], "x");
    }

    #[test]
    fn full_and_gone() {
        let (chan, rx) = channel(|| {});
        let send = || chan.send(ApiRequest::GetVm, Responder::new(|_| {}));
        for _ in 0..REQUEST_QUEUE_LEN {
            send().unwrap();
        }
        assert_eq!(send().unwrap_err(), SendError::Full);
        drop(rx);
        assert_eq!(send().unwrap_err(), SendError::Gone);
    }

    #[test]
    fn direct_handler_answers_before_the_queue() {
        let (chan, rx) = channel(|| {});
        assert!(chan.try_direct(&ApiRequest::GetBalloon).is_none());
        assert!(rx.set_direct(Box::new(|r| {
            (*r == ApiRequest::GetBalloon).then(|| ApiResponse::conflict("direct"))
        })));
        assert!(!rx.set_direct(Box::new(|_| None)));
        let got = chan.try_direct(&ApiRequest::GetBalloon).unwrap();
        assert_eq!(got.body["error"], "direct");
        assert!(chan.try_direct(&ApiRequest::GetVm).is_none());
    }

    #[test]
    fn constructors() {
        assert_eq!(ApiResponse::already_in_state(VmState::Paused).status, 409);
        assert_eq!(
            ApiResponse::already_in_state(VmState::Paused).body["error"],
            "VM is already Paused"
        );
        assert_eq!(ApiResponse::target_too_large(9, 8).status, 400);
        assert_eq!(ApiResponse::no_content().status, 204);
        assert_eq!(ApiResponse::ok(&crate::types::Empty {}).body, json!({}));
    }
}
