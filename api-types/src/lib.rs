//! Blimp's API vocabulary: what the VMM and the HTTP server (the `api`
//! crate) say to each other, and nothing about HTTP.
//!
//! - [`types`]: request and response bodies (serde), their validation;
//! - [`routes`]: the one table of `(method, path)` → [`routes::Endpoint`];
//! - [`channel`]: the queue from the server thread to the VMM thread
//!   ([`ApiRequest`] in, [`ApiResponse`] back through a [`Responder`]);
//! - [`events`]: what the VMM publishes for `GET /events` ([`EventHub`]);
//! - [`size`]: the one parser and formatter of byte sizes (`512M`, `2G`).
//!
//! The VMM depends on this crate only, so it links no HTTP stack or async
//! runtime; the server attaches to the channel and the hub at start.

#![forbid(unsafe_code)]

pub mod channel;
pub mod events;
pub mod policy;
pub mod routes;
pub mod size;
pub mod types;

pub use channel::{ApiReceiver, ApiRequest, ApiResponse, Responder, VmmChannel, channel};
pub use events::{ApiEvent, EventEnvelope, EventHub, EventSink};
