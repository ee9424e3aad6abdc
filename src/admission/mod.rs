//! Admission: who may call a route, as whom, how often and how many at once.
//!
//! Owns: the per-route [`RoutePolicy`] compiled from config (ACL → identity → rate limit
//! → queue, in that order) and the [`Stores`] of per-user state (rate-limit cells,
//! service queues) that outlive a snapshot, so a reload resets nobody's limits.
//! Must not: write responses or read from pingora sessions (only [`watch`] waits on one,
//! for the client to close); the proxy asks, writes what a [`Rejection`] says, and keeps
//! the [`Admitted`] (with its queue permit) in its context.
//!
//! A route whose limit has `scope = "cluster"` gets a `cluster::ClusterLimiter` (Redis,
//! with the node's share as its fallback) instead, checked in [`RoutePolicy::wait`]
//! because it may wait on Redis.

pub mod acl;
pub mod cluster;
pub mod identity;
pub mod queue;
pub mod rate;
pub mod refused;
pub mod reject;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use http::{HeaderMap, HeaderName};
use pingora_http::{RequestHeader, ResponseHeader};

use crate::base::http::Names;
use crate::config::{Config, LimitScope, QueuePolicy, RateLimitConfig, DEFAULT_IDENTITY_HEADER};
use crate::metrics::{AdmissionMetrics, METRICS};

pub use acl::{normalize, normalize_path, Normalized};
pub use identity::Identity;
pub use queue::Permit;
pub use rate::RateInfo;
pub use reject::{RejectKind, Rejection};
pub use watch::{enter_watched, Refused};

/// How often idle rate-limit cells are swept and queue gauges sampled.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Users one service queues for at most; beyond, newcomers share one overflow queue.
pub const MAX_QUEUED_USERS: usize = 10_000;
/// What a 429/503 from the queue tells the caller to wait, in seconds.
const QUEUE_RETRY_AFTER_SECS: u64 = 1;

/// Who sent a request: the real client (see `client_addr`) and the TCP peer.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    /// ACLs, `client_ip` identities and rate limits key on this.
    pub client: Option<IpAddr>,
    /// A header identity is believed only from a trusted peer.
    pub peer: Option<IpAddr>,
}

/// What admission looks at in a request.
pub struct RequestParts<'a> {
    /// The real client address.
    pub client_ip: Option<IpAddr>,
    /// The TCP peer (a load balancer, when one is in front).
    pub peer: Option<IpAddr>,
    /// The normalised path (see [`normalize`]: its parameter-free reading).
    pub path: &'a str,
    /// Its literal reading, when that differs (a path with `;` in it).
    pub literal: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// A request let through; kept in the request context until the request ends.
#[derive(Debug, Default)]
pub struct Admitted {
    /// The caller, as admission resolved it: its key for limiters and queues, and the
    /// user for `identity_header` when authenticated.
    who: Option<identity::Identity>,
    pub identity_header: Option<HeaderName>,
    pub rate: Option<RateInfo>,
    /// The service slot; released when this is dropped.
    pub permit: Option<Permit>,
    /// The normalised path, when the route sends it upstream.
    pub upstream_path: Option<String>,
    /// The route's `header:` identity sources, when none of them is who the caller is:
    /// removed from the upstream request, so the upstream never reads an identity
    /// busbar did not believe.
    unbelieved: Option<Arc<[HeaderName]>>,
}

impl Admitted {
    /// Removes a client-sent identity header (and the route's identity source headers
    /// busbar did not believe) and applies a normalised path; the caller then sends
    /// [`identity`](Self::identity) (inserted into the map, or written as a line by
    /// busbar's own HTTP/1 path).
    ///
    /// `sent`: the names of the request's header lines (`Names::ANY` when not known); a
    /// name it surely lacks is not looked up.
    pub fn clear_upstream(&self, upstream: &mut RequestHeader, sent: Names) {
        let name = self.identity_name();
        if !sent.lacks(name) && upstream.headers.contains_key(name) {
            upstream.remove_header(name);
        }
        for name in self.unbelieved.iter().flat_map(|names| names.iter()) {
            if !sent.lacks(name) && upstream.headers.contains_key(name) {
                upstream.remove_header(name);
            }
        }
        if let Some(path) = &self.upstream_path {
            let pq = match upstream.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            if let Ok(uri) = http::Uri::try_from(pq) {
                upstream.set_uri(uri);
            }
        }
    }

    /// The identity header busbar sends upstream and the verified user in it; `None` for
    /// an anonymous caller (no such header goes).
    pub fn identity(&self) -> Option<(&HeaderName, &str)> {
        Some((self.identity_name(), self.user()?))
    }

    /// The authenticated user; `None` for an anonymous caller.
    pub fn user(&self) -> Option<&str> {
        let who = self.who.as_ref()?;
        who.is_authenticated().then(|| who.user())
    }

    /// The limiter and queue key of the caller.
    fn key(&self) -> &str {
        self.who.as_ref().map_or("", |w| w.key())
    }

    fn identity_name(&self) -> &HeaderName {
        static DEFAULT: HeaderName = HeaderName::from_static(DEFAULT_IDENTITY_HEADER);
        self.identity_header.as_ref().unwrap_or(&DEFAULT)
    }

    /// Adds the `RateLimit-*` headers.
    pub fn apply_response(&self, resp: &mut ResponseHeader) {
        if let Some(r) = &self.rate {
            reject::rate_headers(resp, r);
        }
    }
}

/// Removes a client-sent identity header from a request of a route without admission.
pub fn strip_identity(upstream: &mut RequestHeader, sent: Names) {
    Admitted::default().clear_upstream(upstream, sent);
}

/// One route's compiled admission.
#[derive(Debug)]
pub struct RoutePolicy {
    acl: acl::Acl,
    resolver: identity::Resolver,
    /// The names of the route's `header:` identity sources (usually none).
    header_sources: Option<Arc<[HeaderName]>>,
    identity_header: HeaderName,
    normalize_path: bool,
    limiter: Option<Arc<rate::RouteLimiter>>,
    /// Set instead of `limiter` for `scope = "cluster"`.
    cluster_limiter: Option<Arc<cluster::ClusterLimiter>>,
    queue: Option<Arc<queue::ServiceQueue>>,
    queue_policy: QueuePolicy,
    metrics: AdmissionMetrics,
    /// The route's name, for the top list of refused users.
    route: Arc<str>,
    refused: Arc<refused::TopRefused>,
}

impl RoutePolicy {
    /// ACL, identity and rate limit: everything that needs no waiting.
    pub fn check(&self, req: &RequestParts<'_>) -> Result<Admitted, Rejection> {
        if let Err(denied) = self.acl.check(req.client_ip, req.path, req.literal) {
            self.metrics.forbidden.inc();
            return Err(match denied {
                acl::Denied::ClientAddress => Rejection::new(
                    RejectKind::Forbidden,
                    "client_address",
                    "this client address may not use this route",
                ),
                acl::Denied::Path => {
                    Rejection::new(RejectKind::Forbidden, "path", "this path is not allowed")
                }
            });
        }
        let who = self
            .resolver
            .resolve_via(req.client_ip, req.peer, req.headers)
            .map_err(|e| {
                self.metrics.unauthorized.inc();
                Rejection::new(RejectKind::Unauthorized, e.reason, e.message)
            })?;
        let mut admitted = Admitted {
            identity_header: Some(self.identity_header.clone()),
            unbelieved: self
                .header_sources
                .clone()
                .filter(|_| who.kind != identity::Kind::Header),
            ..Admitted::default()
        };
        if self.normalize_path {
            admitted.upstream_path = Some(req.path.to_string());
        }
        if let Some(limiter) = &self.limiter {
            let rated = self.rated(limiter.check(who.key()));
            if rated.is_err() {
                self.refused.note(who.key(), &self.route, "rate_limited");
            }
            admitted.rate = Some(rated?);
        }
        admitted.who = Some(who);
        Ok(admitted)
    }

    /// A rate decision as the request's `RateInfo`, or the 429 to send.
    fn rated(&self, decision: rate::RateDecision) -> Result<RateInfo, Rejection> {
        let (info, retry_after, scope) = match decision {
            rate::RateDecision::Allowed(info) => return Ok(info),
            rate::RateDecision::Limited {
                info,
                retry_after,
                scope,
            } => (info, retry_after, scope),
        };
        let reason = match scope {
            rate::Scope::User => {
                self.metrics.limited_user.inc();
                "user"
            }
            rate::Scope::Route => {
                self.metrics.limited_route.inc();
                "route"
            }
        };
        let mut r = Rejection::new(
            RejectKind::RateLimited,
            reason,
            "too many requests; retry after the number of seconds in Retry-After",
        );
        r.retry_after_secs = Some(retry_after.as_nanos().div_ceil(1_000_000_000).max(1) as u64);
        r.rate = Some(info);
        Err(r)
    }

    /// What follows [`check`](Self::check) and may wait: the cluster-wide rate limit if
    /// the route has one, then a service slot. Needs nothing from the request, so
    /// [`enter_watched`] races it against the client going away; dropping the future
    /// leaves the queue.
    pub async fn wait(&self, mut admitted: Admitted) -> Result<Admitted, Rejection> {
        if let Some(limiter) = &self.cluster_limiter {
            let rated = self.rated(limiter.check(admitted.key()).await);
            if rated.is_err() {
                self.refused
                    .note(admitted.key(), &self.route, "rate_limited");
            }
            admitted.rate = Some(rated?);
        }
        self.enter(&mut admitted).await?;
        Ok(admitted)
    }

    /// [`wait`](Self::wait) when nothing needs waiting for: no cluster-wide limit, and
    /// no cap on the service or a slot free at once. `false`: the caller awaits `wait`.
    /// Lets a connection skip building and polling the waits (and watching its client)
    /// for the everyday request.
    pub fn enter_now(&self, admitted: &mut Admitted) -> bool {
        if self.cluster_limiter.is_some() {
            return false;
        }
        if let Some(q) = &self.queue {
            match q.acquire_now() {
                Some(permit) => admitted.permit = Some(permit),
                None => return false,
            }
        }
        self.metrics.admitted.inc();
        true
    }

    /// Waits for a service slot when the service has a cap.
    pub async fn enter(&self, admitted: &mut Admitted) -> Result<(), Rejection> {
        let Some(q) = &self.queue else {
            self.metrics.admitted.inc();
            return Ok(());
        };
        match q.acquire(admitted.key(), &self.queue_policy).await {
            Ok((permit, waited)) => {
                admitted.permit = Some(permit);
                if waited.is_zero() {
                    self.metrics.admitted.inc();
                } else {
                    self.metrics.queued.inc();
                    self.metrics.queue_wait.observe(waited.as_secs_f64());
                }
                Ok(())
            }
            Err(e) => {
                let (kind, counter, message) = match e {
                    queue::QueueError::Full => (
                        RejectKind::QueueFull,
                        &self.metrics.queue_full,
                        "too many of your requests are waiting for this service",
                    ),
                    queue::QueueError::Timeout => (
                        RejectKind::QueueTimeout,
                        &self.metrics.queue_timeout,
                        "the service stayed busy for longer than this route waits",
                    ),
                };
                counter.inc();
                self.refused.note(admitted.key(), &self.route, kind.code());
                let mut r = Rejection::new(kind, kind.code(), message);
                r.retry_after_secs = Some(QUEUE_RETRY_AFTER_SECS);
                r.rate = admitted.rate;
                Err(r)
            }
        }
    }
}

/// The names of a route's `header:` identity sources; `None` when it has none.
fn header_sources(a: &crate::config::RouteAdmission) -> Option<Arc<[HeaderName]>> {
    let names: Arc<[HeaderName]> = a
        .identity
        .iter()
        .filter_map(|s| match s {
            crate::config::IdentitySource::Header(name) => Some(name.clone()),
            _ => None,
        })
        .collect();
    (!names.is_empty()).then_some(names)
}

/// Per-user state that survives reloads: rate-limit cells by route, queues by service.
#[derive(Debug, Default)]
pub struct Stores {
    limiters: DashMap<String, Arc<rate::RouteLimiter>>,
    cluster_limiters: DashMap<String, Arc<cluster::ClusterLimiter>>,
    /// The `[cluster]` Redis; replaced when a reload changes `[cluster]`.
    redis: arc_swap::ArcSwapOption<crate::cluster::redis::RedisLimits>,
    queues: DashMap<String, Arc<queue::ServiceQueue>>,
    /// The users refused most often (rate limit, queue), bounded.
    refused: Arc<refused::TopRefused>,
}

impl Stores {
    /// The users refused most often, for the console.
    pub fn top_refused(&self, n: usize) -> Vec<refused::RefusedUser> {
        self.refused.top(n)
    }

    /// The route's limiter; kept when its settings are unchanged, else started afresh.
    fn limiter(&self, route: &str, config: &RateLimitConfig) -> Arc<rate::RouteLimiter> {
        if let Some(l) = self.limiters.get(route) {
            if l.config() == config {
                return l.clone();
            }
        }
        let l = Arc::new(rate::RouteLimiter::new(config.clone()));
        self.limiters.insert(route.to_string(), l.clone());
        l
    }

    /// The route's cluster-wide limiter; kept while its settings and Redis are unchanged.
    fn cluster_limiter(
        &self,
        route: &str,
        config: &RateLimitConfig,
        redis: &Arc<crate::cluster::redis::RedisLimits>,
    ) -> Arc<cluster::ClusterLimiter> {
        if let Some(l) = self.cluster_limiters.get(route) {
            if l.config() == config && Arc::ptr_eq(l.redis(), redis) {
                return l.clone();
            }
        }
        let l = Arc::new(cluster::ClusterLimiter::new(
            route,
            config.clone(),
            redis.clone(),
        ));
        self.cluster_limiters.insert(route.to_string(), l.clone());
        l
    }

    /// The `[cluster]` Redis handle, made (not connected) when the section is new or changed.
    fn set_redis(
        &self,
        config: Option<&crate::config::ClusterConfig>,
    ) -> Option<Arc<crate::cluster::redis::RedisLimits>> {
        let Some(config) = config else {
            self.redis.store(None);
            return None;
        };
        if let Some(r) = self.redis.load_full() {
            if r.config() == config {
                return Some(r);
            }
        }
        let r = Arc::new(crate::cluster::redis::RedisLimits::new(config.clone()));
        self.redis.store(Some(r.clone()));
        Some(r)
    }

    /// The `[cluster]` Redis, for the upkeep service.
    pub fn redis(&self) -> Option<Arc<crate::cluster::redis::RedisLimits>> {
        self.redis.load_full()
    }

    fn queue(&self, service: &str, max_in_flight: u32) -> Arc<queue::ServiceQueue> {
        let q = self
            .queues
            .entry(service.to_string())
            .or_insert_with(|| {
                Arc::new(queue::ServiceQueue::new(
                    max_in_flight as usize,
                    MAX_QUEUED_USERS,
                ))
            })
            .clone();
        q.set_max_in_flight(max_in_flight as usize);
        q
    }

    /// Drops idle rate-limit cells and samples the queue gauges.
    pub fn sweep(&self) {
        for l in self.limiters.iter() {
            l.sweep();
        }
        for l in self.cluster_limiters.iter() {
            l.sweep();
        }
        for q in self.queues.iter() {
            q.sweep();
            let svc = q.key().as_str();
            METRICS
                .service_in_flight
                .with_label_values(&[svc])
                .set(q.in_flight() as i64);
            METRICS
                .queue_waiting
                .with_label_values(&[svc])
                .set(q.waiting() as i64);
        }
    }
}

/// The admission part of a snapshot: compiled policies by route name, and the stores.
#[derive(Debug, Default)]
pub struct Admission {
    policies: HashMap<String, Arc<RoutePolicy>>,
    stores: Arc<Stores>,
}

impl Admission {
    /// Compiles every route's policy (the file's routes and `implicit` ones, such as the
    /// mesh fallback's per-service routes); per-user state comes over from `previous`.
    pub fn build(
        config: &Config,
        implicit: &[&crate::config::RouteConfig],
        previous: Option<&Admission>,
    ) -> Admission {
        let stores = previous.map(|p| p.stores.clone()).unwrap_or_default();
        let keyring = Arc::new(identity::Keyring::new(&config.auth));
        let redis = stores.set_redis(config.cluster.as_ref());
        let mut policies = HashMap::new();
        let mut used = HashSet::new();
        for r in config.routes.iter().chain(implicit.iter().copied()) {
            let max_in_flight = config
                .services
                .iter()
                .find(|s| s.name == r.service)
                .and_then(|s| s.max_in_flight);
            let a = &r.admission;
            if !a.configured && max_in_flight.is_none() {
                continue;
            }
            // The route's counts, or its group's: kept under one key in the stores.
            let key = a.rate_limit.as_ref().map(|c| c.counter_key(&r.name));
            if let Some(k) = &key {
                used.insert(k.clone());
            }
            let limit = key.as_deref().zip(a.rate_limit.as_ref());
            let policy = RoutePolicy {
                acl: acl::Acl::new(a),
                resolver: identity::Resolver::new(a, keyring.clone()),
                header_sources: header_sources(a),
                identity_header: a.identity_header.clone(),
                normalize_path: a.normalize_path,
                limiter: limit
                    .filter(|(_, c)| c.scope == LimitScope::Node || redis.is_none())
                    .map(|(key, c)| stores.limiter(key, c)),
                cluster_limiter: limit
                    .filter(|(_, c)| c.scope == LimitScope::Cluster)
                    .and_then(|(key, c)| Some(stores.cluster_limiter(key, c, redis.as_ref()?))),
                queue: max_in_flight.map(|m| stores.queue(&r.service, m)),
                queue_policy: a.queue.clone(),
                metrics: AdmissionMetrics::new(&r.name, &r.service),
                route: Arc::from(r.name.as_str()),
                refused: stores.refused.clone(),
            };
            policies.insert(r.name.clone(), Arc::new(policy));
        }
        stores.limiters.retain(|key, _| used.contains(key));
        stores.cluster_limiters.retain(|key, _| used.contains(key));
        stores.queues.retain(|name, _| {
            config
                .services
                .iter()
                .any(|s| &s.name == name && s.max_in_flight.is_some())
        });
        Admission { policies, stores }
    }

    /// The route's policy; `None` when the route has no admission and its service no cap.
    #[inline]
    pub fn policy(&self, route: &str) -> Option<&Arc<RoutePolicy>> {
        if self.policies.is_empty() {
            return None;
        }
        self.policies.get(route)
    }

    pub fn stores(&self) -> &Arc<Stores> {
        &self.stores
    }
}
