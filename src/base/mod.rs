//! Small helpers every layer may use: the one JSON shape of busbar's own answers and the
//! HTTP plumbing the control APIs share.
//!
//! Owns: [`reply::Refusal`] (the body of every answer busbar writes itself) and
//! [`http`] (JSON replies, a size-capped body read, the refusal of forwarded requests).
//! Must not: import anything of busbar's but other leaf helpers (`via`): it sits at the
//! bottom of the layers (see ARCHITECTURE.md).

pub mod http;
pub mod path;
pub mod reply;
