//! Health: active probes and passive outlier detection.
//!
//! Owns: the background checker that probes instances, ends ejections whose time is up
//! and recomputes panic mode. The per-instance health state it writes is
//! `model::health` (instances carry it).
//! Must not: pick instances or touch routes.

pub mod checker;
