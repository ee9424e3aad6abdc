//! The bottom layer: small pieces every other layer may use.
//!
//! Owns: HTTP facts that are not anyone's policy (`http`: the hop-by-hop list, header
//! lines, a declared body length), and cheap deadlines for socket waits (`deadline`).
//! Must not: import anything of busbar's above it.

pub mod deadline;
pub mod http;
