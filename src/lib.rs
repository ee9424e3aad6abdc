//! busbar: a centralized service bus and global proxy gateway on pingora.
//!
//! The request path: a driver (`drivers`: pingora's proxy, busbar's own HTTP/1 engine,
//! JSON→gRPC) runs the phases (`phases`: setup, plan, tries, head edits, finish) over
//! the policy modules (routing, admission, fallback, health, release) and the runtime
//! model (`model`: instance sets, their balancers, health). `app.rs` wires it all.
//! `ARCHITECTURE.md` lists the layers; imports point down them only
//! (`tests/architecture.rs` checks it).
#![forbid(unsafe_code)]

pub mod accesslog;
pub mod admin;
pub mod admission;
pub mod app;
pub mod base;
pub mod bearer;
pub mod client_addr;
pub mod cluster;
pub mod config;
pub mod console;
pub mod ctl;
pub mod demo;
pub mod drivers;
pub mod durable;
pub mod edge;
pub mod fallback;
pub mod health;
pub mod listeners;
pub mod listing;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod otel;
pub mod phases;
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
