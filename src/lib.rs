//! busbar: a centralized service bus and global proxy gateway on pingora.
//!
//! The request path, in order: routing → admission → pick an instance (`model`: instance
//! sets and their balancers, health) → proxy → log and metrics. `app.rs` wires it all;
//! each module owns one step. `ARCHITECTURE.md` lists the layers; imports point down
//! them only (`tests/architecture.rs` checks it).
#![forbid(unsafe_code)]

pub mod accesslog;
pub mod admin;
pub mod admission;
pub mod app;
pub mod base;
pub mod client_addr;
pub mod cluster;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod durable;
pub mod edge;
pub mod fallback;
pub mod health;
pub mod listeners;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod proxy_header;
pub mod ready;
pub mod registry;
pub mod release;
pub mod routing;
pub mod snapshot;
pub mod statedir;
pub mod supervisor;
pub mod text;
pub mod translate;
pub mod upgrade;
pub mod version;
pub mod via;
