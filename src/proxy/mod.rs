//! What busbar says for itself on the request path: its own answers (`reply`) and the
//! W3C trace context it propagates (`trace`). The phases (`phases`) and the drivers
//! (`drivers`) use both.
//!
//! Must not: import the phases or the drivers.

pub mod reply;
pub mod trace;
