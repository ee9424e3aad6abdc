//! Health: active probes and passive outlier detection.
//!
//! Owns: per-instance health state and the background checker that probes instances,
//! ends ejections whose time is up and recomputes panic mode.
//! Must not: pick instances or touch routes.

pub mod checker;
pub mod state;
