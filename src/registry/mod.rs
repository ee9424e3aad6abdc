//! Registration: the API services register through, the store of what they registered,
//! its persistence and etcd sync, DNS discovery, and the address gate.
//!
//! Owns: the registration side of the registry. The runtime model it feeds (instances,
//! instance sets, services) is `model`'s.
//! Must not: be imported by `model` or anything below it (see ARCHITECTURE.md).

pub mod api;
pub mod dns;
pub mod gate;
pub mod listener;
pub mod persist;
pub mod store;
pub mod sync;
