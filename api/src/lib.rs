//! Blimp's REST API over a unix socket: server thread, request/response types, openapi.yaml.

pub mod routes;
pub mod size;
pub mod types;
