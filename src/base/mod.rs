//! The bottom layer: small pieces every other layer may use.
//!
//! Owns: the one JSON shape of busbar's own answers ([`reply::Refusal`]), the HTTP
//! plumbing the control APIs share ([`api`]: JSON replies, a size-capped body read, the
//! refusal of forwarded requests), HTTP facts that are no one's policy ([`http`]: the
//! hop-by-hop list, header lines, a declared body length), path normalisation
//! ([`path`]) and cheap deadlines for socket waits ([`deadline`]).
//! Must not: import anything of busbar's above it (see ARCHITECTURE.md).

pub mod api;
pub mod deadline;
pub mod http;
pub mod path;
pub mod reply;
