//! The request path's phases: what happens to every proxied request, whichever driver
//! (pingora's proxy, busbar's own HTTP/1 engine, the JSON→gRPC call) brought it.
//!
//! In request order:
//! - `setup`: in-flight count, real client, trace context, route on the normalised path,
//!   the refusals before policy, admission (its waits race the driver's "client went
//!   away" future);
//! - `plan`: deadline, sticky key, instance set, gray-release version;
//! - `attempt`: each try's instance and path (sidecar or app port, `fallback::target`),
//!   its outcome, outlier accounting and the retry decision;
//! - `upstream_head`: the one builder of the upstream request head (a map or wire lines);
//! - `response_head`: the one editor of the response head (route edits, `RateLimit-*`,
//!   hop-by-hop removal);
//! - `fail`: the one error path (how a request failed → busbar's answer);
//! - `finish`: metrics and the access log, once per request.
//!
//! Owns: the per-request context (`ctx`) and the order of the calls into the modules
//! that own each policy (routing, admission, balance, fallback, health, release,
//! metrics, the access log).
//! Must not: hold a driver's type (a pingora `Session`, a socket): the phases take
//! busbar's request context, the request head and plain values, so every driver gets
//! every feature. Must not write to the client: drivers write what the phases return.

pub mod ctx;
pub mod forwarding;
pub mod pace;

pub(crate) mod attempt;
pub(crate) mod fail;
pub(crate) mod finish;
pub(crate) mod plan;
pub(crate) mod request;
pub(crate) mod response_head;
pub(crate) mod setup;
pub(crate) mod upstream_head;

use std::sync::Arc;

use crate::accesslog::AccessLog;
use crate::snapshot::State;

pub(crate) use attempt::{Try, UPSTREAM_IDLE};
pub(crate) use finish::Done;
pub(crate) use setup::Routing;

/// What the phases need beyond the request: the state (releases) and the access log.
/// One per server, shared by every driver.
pub struct Phases {
    pub state: Arc<State>,
    pub access_log: Arc<AccessLog>,
}
