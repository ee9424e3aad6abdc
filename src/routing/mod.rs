//! The route table: compiled from config, matched on every request. Pure: no I/O.
//!
//! Owns: host/path/method/header matching and path rewriting.
//! Precedence: the first route in file order that matches wins. Routes naming exact
//! hosts are indexed by host, so a lookup only scans routes that could match.
//! Must not: know about instances, health or pingora.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, Method};

use crate::config::{HostMatch, PathMatch, Rewrite, RouteConfig};
use crate::metrics::RouteMetrics;
use crate::model::Service;

/// A route with what it resolves to at run time.
#[derive(Debug)]
pub struct Route {
    pub config: RouteConfig,
    pub service: Arc<Service>,
    pub metrics: RouteMetrics,
}

impl Route {
    pub fn name(&self) -> &str {
        &self.config.name
    }
}

/// The parts of a request that routing looks at.
pub struct RequestView<'a> {
    /// Host without port, any case.
    pub host: &'a str,
    /// Path without query.
    pub path: &'a str,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    /// Exact host → every route that can match it (exact, wildcard or host-less), in file order.
    by_host: HashMap<String, Candidates>,
    /// Routes that can match a host not in `by_host` (wildcard or host-less), in file order.
    other: Candidates,
}

/// Above this many candidates, a lookup goes through the path index instead of a scan.
const SCAN_MAX: usize = 16;

/// The routes that may match one host, in file order, indexed by path when there are many.
#[derive(Debug, Default)]
struct Candidates {
    all: Vec<u32>,
    by_path: Option<PathIndex>,
}

/// Routes by the path they match; each list in file order.
#[derive(Debug, Default)]
struct PathIndex {
    exact: HashMap<Box<str>, Vec<u32>>,
    prefix: HashMap<Box<str>, Vec<u32>>,
    /// The distinct lengths of the prefixes: a lookup probes only these, so its cost
    /// is bounded by the configuration, not by the request's path.
    prefix_lens: Vec<usize>,
    any: Vec<u32>,
}

impl Candidates {
    fn new(all: Vec<u32>, routes: &[Arc<Route>]) -> Candidates {
        let by_path = (all.len() > SCAN_MAX).then(|| {
            let mut index = PathIndex::default();
            for &i in &all {
                match &routes[i as usize].config.path {
                    PathMatch::Any => index.any.push(i),
                    PathMatch::Exact(p) => {
                        index.exact.entry(p.as_str().into()).or_default().push(i)
                    }
                    PathMatch::Prefix(p) => {
                        index.prefix.entry(p.as_str().into()).or_default().push(i)
                    }
                }
            }
            index.prefix_lens = index.prefix.keys().map(|p| p.len()).collect();
            index.prefix_lens.sort_unstable();
            index.prefix_lens.dedup();
            index
        });
        Candidates { all, by_path }
    }

    /// The first route in file order for which `ok` holds, among those whose path matches.
    fn first(&self, path: &str, ok: impl Fn(u32) -> bool) -> Option<u32> {
        let Some(index) = &self.by_path else {
            return self.all.iter().copied().find(|&i| ok(i));
        };
        // Each list is in file order: the earliest passing entry of each, then the earliest of those.
        let mut best: Option<u32> = None;
        let mut consider = |list: Option<&Vec<u32>>| {
            let first = list?
                .iter()
                .copied()
                .take_while(|&i| best.is_none_or(|b| i < b))
                .find(|&i| ok(i))?;
            best = Some(first);
            Some(())
        };
        consider(Some(&index.any));
        consider(index.exact.get(path));
        // A prefix matches at a segment boundary: `/a` and `/a/` both match `/a/b`.
        let bytes = path.as_bytes();
        for &len in &index.prefix_lens {
            let Some(head) = path.get(..len) else {
                // Longer than the path, or not on a character boundary.
                continue;
            };
            let boundary = len == bytes.len() || bytes[len] == b'/' || head.ends_with('/');
            if boundary {
                consider(index.prefix.get(head));
            }
        }
        best
    }
}

impl RouteTable {
    /// Compiles the configured `routes`, each bound to the service of `services` it names
    /// and given its metrics. The one way a table is built from config: the snapshot, the
    /// fuzz targets and the tests all come here, so they test what runs. A route naming a
    /// service not in `services` is left out (validation has refused such a config).
    pub fn from_config(routes: &[RouteConfig], services: &[Arc<Service>]) -> Self {
        let by_name: HashMap<&str, &Arc<Service>> =
            services.iter().map(|s| (s.name(), s)).collect();
        let routes = routes
            .iter()
            .filter_map(|r| {
                let service = Arc::clone(by_name.get(r.service.as_str())?);
                Some(Arc::new(Route {
                    metrics: RouteMetrics::new(&r.name, &r.service),
                    config: r.clone(),
                    service,
                }))
            })
            .collect();
        RouteTable::new(routes)
    }

    /// Indexes routes already bound to their services; file order is `routes`' order.
    fn new(routes: Vec<Arc<Route>>) -> Self {
        let mut exact_hosts: Vec<&str> = Vec::new();
        let mut other = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            let mut wildcard = r.config.hosts.is_empty();
            for h in &r.config.hosts {
                match h {
                    HostMatch::Exact(name) => exact_hosts.push(name),
                    HostMatch::Suffix(_) => wildcard = true,
                }
            }
            if wildcard {
                other.push(i as u32);
            }
        }
        let mut by_host = HashMap::with_capacity(exact_hosts.len());
        for host in exact_hosts {
            if by_host.contains_key(host) {
                continue;
            }
            let candidates: Vec<u32> = routes
                .iter()
                .enumerate()
                .filter(|(_, r)| host_matches(&r.config.hosts, host))
                .map(|(i, _)| i as u32)
                .collect();
            by_host.insert(host.to_string(), Candidates::new(candidates, &routes));
        }
        let other = Candidates::new(other, &routes);
        RouteTable {
            routes,
            by_host,
            other,
        }
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The first route that matches, in file order.
    pub fn find(&self, req: &RequestView<'_>) -> Option<&Arc<Route>> {
        let mut buf = [0u8; 255];
        let long;
        // A host too long for the buffer may still name an exact-host route.
        let host = match lowercase(req.host, &mut buf) {
            Some(h) => Some(h),
            None => {
                long = req.host.to_ascii_lowercase();
                Some(long.as_str())
            }
        };
        let (candidates, host_checked) = match host.and_then(|h| self.by_host.get(h)) {
            Some(c) => (c, true),
            None => (&self.other, false),
        };
        let i = candidates.first(req.path, |i| {
            let r = &self.routes[i as usize];
            (host_checked || host_matches(&r.config.hosts, req.host))
                && matches_rest(&r.config, req)
        })?;
        self.routes.get(i as usize)
    }
}

/// Lower-cases a host into `buf` without allocating; `None` if it does not fit or isn't UTF-8.
fn lowercase<'b>(host: &str, buf: &'b mut [u8; 255]) -> Option<&'b str> {
    let bytes = host.as_bytes();
    let out = buf.get_mut(..bytes.len())?;
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = b.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

fn host_matches(hosts: &[HostMatch], host: &str) -> bool {
    hosts.is_empty()
        || hosts.iter().any(|h| match h {
            HostMatch::Exact(name) => name.eq_ignore_ascii_case(host),
            HostMatch::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host
                        .get(host.len() - suffix.len()..)
                        .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
            }
        })
}

fn matches_rest(r: &RouteConfig, req: &RequestView<'_>) -> bool {
    let path_ok = match &r.path {
        PathMatch::Any => true,
        PathMatch::Exact(p) => req.path == p,
        PathMatch::Prefix(p) => prefix_matches(p, req.path),
    };
    path_ok
        && (r.methods.is_empty() || r.methods.iter().any(|m| m == req.method))
        && r.headers
            .iter()
            .all(|(name, value)| req.headers.get_all(name).iter().any(|v| v == value))
}

/// Segment-aware prefix: `/api` matches `/api` and `/api/x`, not `/apix`.
/// A prefix ending in `/` is a plain prefix.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// The upstream path and query for a request, or `None` when the route keeps them as they are.
pub fn rewrite(route: &RouteConfig, path_and_query: &str) -> Option<String> {
    let (Rewrite::Prefix(replacement), PathMatch::Prefix(prefix)) = (&route.rewrite, &route.path)
    else {
        return None;
    };
    let rest = path_and_query.strip_prefix(prefix.as_str())?;
    let mut out = String::with_capacity(replacement.len() + rest.len() + 1);
    out.push_str(replacement);
    if out.ends_with('/') && rest.starts_with('/') {
        out.pop();
    }
    out.push_str(rest);
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use std::path::Path;

    fn table(routes: &str) -> RouteTable {
        let src = format!(
            "[listen]\nhttp=[\"127.0.0.1:1\"]\n[[service]]\nname=\"s\"\nendpoints=[{{addr=\"127.0.0.1:2\"}}]\n{routes}"
        );
        let c = config::parse(Path::new("t.toml"), &src).unwrap();
        let services = [Arc::new(Service::new(c.services[0].clone(), None, &[]))];
        RouteTable::from_config(&c.routes, &services)
    }

    fn find<'t>(
        t: &'t RouteTable,
        host: &str,
        method: &str,
        path: &str,
        h: &[(&str, &str)],
    ) -> Option<&'t str> {
        let mut headers = HeaderMap::new();
        for (k, v) in h {
            headers.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        t.find(&RequestView {
            host,
            path,
            method: &m,
            headers: &headers,
        })
        .map(|r| r.name())
    }

    #[test]
    fn first_match_in_file_order() {
        let t = table(
            r#"
[[route]]
name = "wild"
hosts = ["*.example.com"]
path_prefix = "/api"
service = "s"
[[route]]
name = "exact"
hosts = ["api.example.com"]
service = "s"
[[route]]
name = "post"
methods = ["post"]
service = "s"
[[route]]
name = "canary"
headers = { "x-canary" = "1" }
service = "s"
[[route]]
name = "fallback"
path = "/"
service = "s"
"#,
        );
        assert_eq!(
            find(&t, "api.example.com", "GET", "/api/x", &[]),
            Some("wild")
        );
        assert_eq!(
            find(&t, "API.Example.com", "GET", "/other", &[]),
            Some("exact")
        );
        assert_eq!(find(&t, "b.example.com", "GET", "/apix", &[]), None);
        assert_eq!(find(&t, "example.com", "GET", "/api", &[]), None);
        assert_eq!(find(&t, "x.org", "POST", "/p", &[]), Some("post"));
        assert_eq!(
            find(&t, "x.org", "GET", "/p", &[("x-canary", "1")]),
            Some("canary")
        );
        assert_eq!(find(&t, "x.org", "GET", "/p", &[("x-canary", "2")]), None);
        assert_eq!(find(&t, "x.org", "GET", "/", &[]), Some("fallback"));
    }

    /// The path index (more than 16 candidates): multi-byte characters at a probed
    /// length don't panic, and a long path costs one probe per configured prefix length.
    #[test]
    fn indexed_lookup_handles_any_path() {
        let mut routes = String::new();
        for i in 0..20 {
            routes.push_str(&format!(
                "[[route]]\nname = \"r{i}\"\npath_prefix = \"/r{i}\"\nservice = \"s\"\n"
            ));
        }
        routes.push_str("[[route]]\nname = \"e\"\npath_prefix = \"/é\"\nservice = \"s\"\n");
        let t = table(&routes);
        assert!(t.other.by_path.is_some(), "the table is indexed");
        assert_eq!(find(&t, "h", "GET", "/r7/x", &[]), Some("r7"));
        assert_eq!(find(&t, "h", "GET", "/r17", &[]), Some("r17"));
        assert_eq!(find(&t, "h", "GET", "/r1x", &[]), None);
        assert_eq!(find(&t, "h", "GET", "/é/a", &[]), Some("e"));
        assert_eq!(find(&t, "h", "GET", "/éx", &[]), None);
        assert_eq!(find(&t, "h", "GET", "/€€", &[]), None);
        let long = "/a".repeat(30_000);
        assert_eq!(find(&t, "h", "GET", &long, &[]), None);
    }

    #[test]
    fn prefixes_are_segment_aware() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/v1"));
        assert!(!prefix_matches("/api", "/apis"));
        assert!(prefix_matches("/api/", "/api/v1"));
    }

    #[test]
    fn rewrites_replace_the_prefix() {
        let t = table(
            r#"
[[route]]
name = "strip"
path_prefix = "/api"
strip_prefix = true
service = "s"
[[route]]
name = "v2"
path_prefix = "/old"
prefix_rewrite = "/new"
service = "s"
"#,
        );
        let strip = &t.routes()[0].config;
        assert_eq!(
            rewrite(strip, "/api/users?x=1").as_deref(),
            Some("/users?x=1")
        );
        assert_eq!(rewrite(strip, "/api").as_deref(), Some("/"));
        assert_eq!(rewrite(strip, "/api?q").as_deref(), Some("/?q"));
        let v2 = &t.routes()[1].config;
        assert_eq!(rewrite(v2, "/old/a").as_deref(), Some("/new/a"));
    }
}
