//! Blimp's REST API over a unix socket: the HTTP server thread, openapi.yaml
//! and a client. The request/response vocabulary (types, routes, events, the
//! channel to the VMM) is the `api-types` crate, re-exported here.
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

pub mod client;
mod metrics;
mod parse_errors;
pub mod server;
mod sse;

// The vocabulary lives in `api-types` (the VMM depends on it alone); it is
// re-exported so that clients of the HTTP side need one crate.
pub use api_types::{channel, events, policy, routes, size, types};

pub use channel::{ApiReceiver, ApiRequest, ApiResponse, Responder, VmmChannel};
pub use events::{ApiEvent, EventEnvelope, EventHub, EventSink};
pub use server::{ApiServer, ApiServerHandle, Error, ServerConfig, check_socket_path};

/// Re-exported so the root binary's CLI client can draw progress bars
/// without a dependency of its own.
pub use indicatif;

/// The OpenAPI description of this API.
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");
