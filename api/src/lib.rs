//! Blimp's REST API over a unix socket: server thread, request/response
//! types, openapi.yaml, and a client.
//!
//! VMM side, in short:
//! ```no_run
//! use api::{ApiRequest, ApiResponse, ApiServer, ApiEvent, types::*};
//! # fn eventfd_write() {}
//! let (chan, rx) = api::channel(|| eventfd_write());
//! let events = rx.event_hub();
//! let server = ApiServer::start("/tmp/blimp.sock".as_ref(), chan)?;
//! // in the event loop, when the eventfd fires:
//! while let Some((req, responder)) = rx.try_recv() {
//!     let resp = match req {
//!         ApiRequest::GetVm => ApiResponse::ok(&VmInfo {
//!             state: VmState::Running, memory_mib: 512, vcpus: 1, uptime_s: 3, balloon: true,
//!         }),
//!         _ => ApiResponse::bad_request("not yet"),
//!     };
//!     responder.respond(resp);
//! }
//! events.publish(ApiEvent::VmStateChanged { state: VmState::Running });
//! drop(server); // removes the socket
//! # Ok::<(), api::Error>(())
//! ```

#![forbid(unsafe_code)]

pub mod channel;
pub mod client;
pub mod events;
mod metrics;
pub mod routes;
pub mod server;
pub mod size;
pub mod types;

pub use channel::{ApiReceiver, ApiRequest, ApiResponse, Responder, VmmChannel, channel};
pub use events::{ApiEvent, EventEnvelope, EventHub};
pub use server::{ApiServer, ApiServerHandle, Error, ServerConfig};

/// Re-exported so the root binary's CLI client can draw progress bars
/// without a dependency of its own.
pub use indicatif;

/// The OpenAPI description of this API.
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");
