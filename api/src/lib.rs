//! Blimp's REST API over a unix socket: server thread, request/response types, openapi.yaml.
