//! What busbar says for itself on the request path: its own answers (`reply`; `grpc`
//! for a gRPC or gRPC-Web caller's shape of them) and the W3C trace context it
//! propagates (`trace`). The phases (`phases`) and the drivers (`drivers`) use them.
//!
//! Must not: import the phases or the drivers.

pub mod grpc;
pub mod reply;
pub mod trace;
