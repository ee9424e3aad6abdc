//! Property test: `RouteTable::find` agrees with a naive reference matcher on generated
//! route tables and requests.
//!
//! The tables are written as TOML and go through `config::parse`, as a user's would. The
//! reference works on the generated specs, not on busbar's types, and applies the rules
//! the README documents with a linear scan: the first route in file order wins; a host is
//! exact (any case) or `*.suffix` (at least one label before the suffix); a path is exact
//! or a segment-aware prefix (`/api` matches `/api` and `/api/x`, not `/apix`; a prefix
//! ending in `/` is a plain prefix; `/` matches everything); methods any case; every
//! configured header must be present with exactly that value.

use std::path::Path;
use std::sync::Arc;

use busbar::config;
use busbar::model::Service;
use busbar::routing::{RequestView, RouteTable};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum PathSpec {
    None,
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone)]
struct RouteSpec {
    hosts: Vec<String>,
    path: PathSpec,
    methods: Vec<String>,
    headers: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
struct Req {
    host: String,
    path: String,
    method: String,
    headers: Vec<(String, String)>,
}

/// Host names from a small pool so that routes and requests collide often; one name
/// longer than 255 bytes (hosts are matched through a fixed-size buffer).
fn host_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a.com".to_string()),
        Just("b.a.com".to_string()),
        Just("x.b.a.com".to_string()),
        Just("c.org".to_string()),
        Just("com".to_string()),
        Just(format!("{}.a.com", "l".repeat(260))),
    ]
}

fn config_host() -> impl Strategy<Value = String> {
    (host_name(), any::<bool>(), any::<bool>()).prop_map(|(h, wild, upper)| {
        let h = if upper { h.to_ascii_uppercase() } else { h };
        if wild {
            format!("*.{h}")
        } else {
            h
        }
    })
}

fn request_host() -> impl Strategy<Value = String> {
    (host_name(), any::<bool>()).prop_map(
        |(h, upper)| {
            if upper {
                h.to_ascii_uppercase()
            } else {
                h
            }
        },
    )
}

fn segments(min: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![Just("api"), Just("apix"), Just("v1"), Just("x"), Just("")],
        min..4,
    )
    .prop_map(|segs| format!("/{}", segs.join("/")))
}

fn path_spec() -> impl Strategy<Value = PathSpec> {
    prop_oneof![
        Just(PathSpec::None),
        segments(0).prop_map(PathSpec::Exact),
        segments(0).prop_map(PathSpec::Prefix),
    ]
}

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE"];

fn header_pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(
        (
            prop_oneof![Just("x-a"), Just("x-b")],
            prop_oneof![Just("1"), Just("2")],
        )
            .prop_map(|(n, v)| (n.to_string(), v.to_string())),
        0..3,
    )
}

fn route_spec() -> impl Strategy<Value = RouteSpec> {
    (
        prop::collection::vec(config_host(), 0..3),
        path_spec(),
        prop::collection::vec(prop::sample::select(METHODS), 0..3),
        header_pairs(),
        any::<bool>(),
    )
        .prop_map(|(hosts, path, methods, mut headers, lower)| {
            // One value per header name in a route (a TOML table can't repeat a key).
            headers.sort();
            headers.dedup_by(|a, b| a.0 == b.0);
            RouteSpec {
                hosts,
                path,
                methods: methods
                    .into_iter()
                    .map(|m| {
                        if lower {
                            m.to_ascii_lowercase()
                        } else {
                            m.to_string()
                        }
                    })
                    .collect(),
                headers,
            }
        })
}

fn request() -> impl Strategy<Value = Req> {
    (
        request_host(),
        segments(0),
        prop::sample::select(METHODS),
        header_pairs(),
    )
        .prop_map(|(host, path, method, headers)| Req {
            host,
            path,
            method: method.to_string(),
            headers,
        })
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

fn table(specs: &[RouteSpec]) -> RouteTable {
    let mut src = String::from(
        "[listen]\nhttp = [\"127.0.0.1:1\"]\n[[service]]\nname = \"s\"\nendpoints = [{ addr = \"127.0.0.1:2\" }]\n",
    );
    for (i, r) in specs.iter().enumerate() {
        src.push_str(&format!("[[route]]\nname = \"r{i}\"\nservice = \"s\"\n"));
        if !r.hosts.is_empty() {
            src.push_str(&format!("hosts = {}\n", toml_list(&r.hosts)));
        }
        match &r.path {
            PathSpec::None => {}
            PathSpec::Exact(p) => src.push_str(&format!("path = {p:?}\n")),
            PathSpec::Prefix(p) => src.push_str(&format!("path_prefix = {p:?}\n")),
        }
        if !r.methods.is_empty() {
            src.push_str(&format!("methods = {}\n", toml_list(&r.methods)));
        }
        if !r.headers.is_empty() {
            let pairs: Vec<String> = r
                .headers
                .iter()
                .map(|(n, v)| format!("{n:?} = {v:?}"))
                .collect();
            src.push_str(&format!("headers = {{ {} }}\n", pairs.join(", ")));
        }
    }
    let c = config::parse(Path::new("props.toml"), &src)
        .unwrap_or_else(|e| panic!("generated config must parse: {e}\n{src}"));
    let services = [Arc::new(Service::new(c.services[0].clone(), None, &[]))];
    RouteTable::from_config(&c.routes, &services)
}

fn ref_host(hosts: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    hosts.is_empty()
        || hosts.iter().any(|h| {
            let h = h.to_ascii_lowercase();
            match h.strip_prefix("*.") {
                Some(suffix) => {
                    host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}"))
                }
                None => h == host,
            }
        })
}

fn ref_path(spec: &PathSpec, path: &str) -> bool {
    match spec {
        PathSpec::None => true,
        PathSpec::Exact(p) => p == path,
        PathSpec::Prefix(p) if p == "/" || p.ends_with('/') => path.starts_with(p.as_str()),
        PathSpec::Prefix(p) => path == p || path.starts_with(&format!("{p}/")),
    }
}

/// The documented rules, one route after another.
fn reference(specs: &[RouteSpec], req: &Req) -> Option<usize> {
    specs.iter().position(|r| {
        ref_host(&r.hosts, &req.host)
            && ref_path(&r.path, &req.path)
            && (r.methods.is_empty()
                || r.methods
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(&req.method)))
            && r.headers
                .iter()
                .all(|(n, v)| req.headers.iter().any(|(rn, rv)| rn == n && rv == v))
    })
}

fn busbar_find(t: &RouteTable, req: &Req) -> Option<usize> {
    let mut headers = HeaderMap::new();
    for (n, v) in &req.headers {
        headers.append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let method = Method::from_bytes(req.method.as_bytes()).unwrap();
    let found = t.find(&RequestView {
        host: &req.host,
        path: &req.path,
        method: &method,
        headers: &headers,
    })?;
    Some(found.name()[1..].parse().unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn find_agrees_with_the_reference(
        specs in prop::collection::vec(route_spec(), 0..8),
        reqs in prop::collection::vec(request(), 1..8),
    ) {
        let t = table(&specs);
        for req in &reqs {
            prop_assert_eq!(busbar_find(&t, req), reference(&specs, req), "request {:?}", req);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Tables large enough (more than 16 candidates for a host) that lookups go
    /// through the path index rather than a scan.
    #[test]
    fn find_agrees_with_the_reference_on_large_tables(
        specs in prop::collection::vec(route_spec(), 17..60),
        reqs in prop::collection::vec(request(), 1..16),
    ) {
        let t = table(&specs);
        for req in &reqs {
            prop_assert_eq!(busbar_find(&t, req), reference(&specs, req), "request {:?}", req);
        }
    }
}

/// Found by the property above: an exact host longer than the 255-byte lookup buffer
/// never matched, because the lookup fell back to the wildcard-only list.
#[test]
fn an_exact_host_longer_than_255_bytes_matches() {
    let host = format!("{}.a.com", "l".repeat(260));
    let specs = vec![RouteSpec {
        hosts: vec![host.clone()],
        path: PathSpec::None,
        methods: vec![],
        headers: vec![],
    }];
    let t = table(&specs);
    let req = Req {
        host: host.to_ascii_uppercase(),
        path: "/".to_string(),
        method: "GET".to_string(),
        headers: vec![],
    };
    assert_eq!(busbar_find(&t, &req), Some(0));
    assert_eq!(reference(&specs, &req), Some(0));
}
