//! The per-request context every phase shares.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pace::BodyPace;
use crate::base::http::Names;
use crate::model::{Instance, InstanceSet};
use crate::proxy::grpc::Caller;
use crate::proxy::reply::Cause;
use crate::proxy::trace::TraceContext;
use crate::routing::Route;
use crate::snapshot::Snapshot;

/// Instances tried by this request, as indices into its instance set.
/// Retries are few (≤ 10), so a small array beats a set.
#[derive(Debug, Default)]
pub struct Tried {
    idx: [u32; 12],
    len: usize,
}

impl Tried {
    pub fn contains(&self, i: usize) -> bool {
        self.idx[..self.len].iter().any(|&t| t as usize == i)
    }

    pub fn push(&mut self, i: usize) {
        if self.len < self.idx.len() {
            self.idx[self.len] = i as u32;
            self.len += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the last instance tried, so it may be picked again.
    pub fn pop(&mut self) {
        self.len = self.len.saturating_sub(1);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }
}

pub struct RequestCtx {
    pub start: Instant,
    /// Loaded once in `request_filter`; every later phase uses this version.
    pub snapshot: Option<Arc<Snapshot>>,
    pub route: Option<Arc<Route>>,
    pub set: Option<Arc<InstanceSet>>,
    /// The instance of the current try; released when the try ends.
    pub instance: Option<Arc<Instance>>,
    /// The last instance tried, kept for the access log.
    pub last_addr: Option<std::net::SocketAddr>,
    pub tried: Tried,
    /// The path of the current try to an instance with a sidecar.
    pub path: Option<crate::model::sidecar::Path>,
    /// A failed sidecar connect was already retried on the app port.
    pub sidecar_failover: bool,
    pub tries: u32,
    pub deadline: Option<Instant>,
    pub upstream_start: Option<Instant>,
    pub upstream_time: Option<Duration>,
    pub cause: Option<Cause>,
    /// The real client address (`client_addr::real_client`): the peer, unless the
    /// peer is a trusted proxy. Set before routing; admission, sticky hashing, the
    /// release split and the access log use it.
    pub client: Option<std::net::IpAddr>,
    pub trace: TraceContext,
    /// The client's connection is TLS (set by the driver before `setup`).
    pub tls: bool,
    /// The names of the request's header lines as the client sent them, when the
    /// driver's codec recorded them (`Names::ANY` otherwise): lookups of a header the
    /// request surely lacks are skipped (set by the driver before `setup`).
    pub names: Names,
    /// The request as the client sent it, for the access log (and its request id).
    pub seen: Option<crate::accesslog::Seen>,
    /// The HTTP version the client spoke: the protocol of busbar's `Via` entry.
    pub client_version: http::Version,
    /// Who is calling, by the request's `content-type` (set in `setup`): the shape of
    /// busbar's own answers (JSON, or gRPC's Trailers-Only).
    pub caller: Caller,
    pub sticky_key: u64,
    pub body_bytes: u64,
    /// How slowly the request body may arrive (set in `request_filter`).
    pub body_pace: BodyPace,
    pub counted: bool,
    /// Admission's verdict; holds the service slot until the request ends.
    pub admitted: Option<crate::admission::Admitted>,
    /// gRPC-Web translation state, when the route translates and the caller speaks it.
    pub grpc_web: Option<crate::translate::grpc_web::WebCall>,
    /// Gray release: the version chosen for this request and what it was served by.
    pub release: crate::release::RequestRelease,
    /// Why busbar ended the tunnel an upgrade opened (`tunnel_idle`, `tunnel_drained`),
    /// for the access log's `error`; `None` when the peers ended it, or there was none.
    pub tunnel_end: Option<&'static str>,
    /// The `grpc-status` the caller got (the upstream's trailers, its Trailers-Only head,
    /// or busbar's own answer), for the access log; set only while the log is on.
    pub grpc_status: Option<u16>,
}

impl RequestCtx {
    pub fn new() -> Self {
        RequestCtx {
            // The turn's reading (`base::clock`): the request came in this poll.
            start: crate::base::clock::now(),
            snapshot: None,
            route: None,
            set: None,
            instance: None,
            last_addr: None,
            tried: Tried::default(),
            path: None,
            sidecar_failover: false,
            tries: 0,
            deadline: None,
            upstream_start: None,
            upstream_time: None,
            cause: None,
            client: None,
            trace: TraceContext::default(),
            tls: false,
            names: Names::ANY,
            seen: None,
            client_version: http::Version::HTTP_11,
            caller: Caller::Http,
            sticky_key: 0,
            body_bytes: 0,
            body_pace: BodyPace::new(crate::config::DEFAULT_CLIENT_TIMEOUT, 0),
            counted: false,
            admitted: None,
            grpc_web: None,
            release: Default::default(),
            tunnel_end: None,
            grpc_status: None,
        }
    }

    /// The next instance to try, for every caller that picks one (the proxy's
    /// `upstream_peer`, the JSON→gRPC call): one not tried yet and available (or any, in
    /// panic mode), of the version gray release chose for this request, else stable;
    /// with none left untried, a tried one beats failing. Records the release step.
    pub fn pick_instance(&mut self) -> Option<(usize, Arc<Instance>)> {
        let route = self.route.as_ref()?;
        let set = self.set.clone()?;
        let panic = route
            .service
            .panic
            .load(std::sync::atomic::Ordering::Relaxed);
        let (instances, tried, key) = (&set.instances, &self.tried, self.sticky_key);
        let pick = |tried_ok: bool, want: crate::release::Want| {
            set.pick(key, |i| {
                (tried_ok || !tried.contains(i))
                    && (panic || instances.get(i).is_some_and(|x| x.is_available()))
                    && set.versions.admits(i, want)
            })
        };
        let (idx, step) = self.release.pick(|v| pick(false, v)).or_else(|| {
            if tried.is_empty() {
                None
            } else {
                self.release.pick(|v| pick(true, v))
            }
        })?;
        let instance = instances.get(idx)?.clone();
        self.release.note(&set, idx, step);
        Some((idx, instance))
    }

    /// Ends the current try's claim on its instance (in-flight count).
    pub fn release_instance(&mut self) -> Option<Arc<Instance>> {
        let i = self.instance.take()?;
        i.health.end_request();
        Some(i)
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        // A request cancelled between phases must not leave an instance looking busy.
        self.release_instance();
        if self.counted {
            crate::metrics::METRICS.in_flight.dec();
        }
    }
}
