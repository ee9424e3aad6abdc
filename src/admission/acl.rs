//! Access control: path normalisation, CIDR allow/deny and path-prefix rules.
//!
//! Owns: [`normalize_path`] (what routing and ACLs see) and the compiled [`Acl`] of a route.
//! Must not: decide what goes upstream: the proxy keeps the client's path unless the
//! route sets `normalize_path = true`.
//!
//! Normalisation, so that `//admin`, `/a/../admin`, `/%2e%2e/admin` and `/%2E%2E%2Fadmin`
//! are all `/admin`: percent-escapes of unreserved characters and of `/` are decoded
//! (other escapes are kept, hex upper-cased, so `%25` is never decoded twice); runs of
//! `/` collapse; `.` segments go; `..` removes the segment before it and never climbs
//! above the root. A trailing `/` is kept.

use std::borrow::Cow;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::RouteAdmission;

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// True when `path` can't change under normalisation (the common case: no work, no copy).
fn already_normal(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') || b.contains(&b'%') {
        return false;
    }
    !b.windows(2).any(|w| w == b"//")
        && !path.split('/').skip(1).any(|seg| seg == "." || seg == "..")
}

/// The normalised form of a request path (without query).
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    if already_normal(path) {
        return Cow::Borrowed(path);
    }
    // 1. Decode the escapes that are safe to decode.
    let b = path.as_bytes();
    let mut decoded = Vec::with_capacity(b.len() + 1);
    if b.first() != Some(&b'/') {
        decoded.push(b'/');
    }
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                let v = h * 16 + l;
                if is_unreserved(v) || v == b'/' {
                    decoded.push(v);
                } else {
                    decoded.push(b'%');
                    decoded
                        .extend_from_slice(&[b[i + 1], b[i + 2]].map(|x| x.to_ascii_uppercase()));
                }
                i += 3;
                continue;
            }
        }
        decoded.push(c);
        i += 1;
    }
    // 2. Resolve segments.
    let text = String::from_utf8_lossy(&decoded);
    let trailing = text.ends_with('/') || text.ends_with("/.") || text.ends_with("/..");
    let mut out: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(text.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() || (trailing && !s.ends_with('/')) {
        s.push('/');
    }
    Cow::Owned(s)
}

/// `prefix` matches `path` on a segment boundary; `;` counts as one, since some servers
/// drop `;params` from segments (`/admin;x` is `/admin` to Tomcat).
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix.is_empty() {
        return true; // the rule "/" (stored trimmed)
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with(';'))
}

/// Why the ACL refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    ClientAddress,
    Path,
}

/// A route's compiled ACL.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    allow_paths: Vec<String>,
    deny_paths: Vec<String>,
}

impl Acl {
    pub fn new(c: &RouteAdmission) -> Self {
        Acl {
            allow: c.allow.clone(),
            deny: c.deny.clone(),
            allow_paths: c.allow_paths.clone(),
            deny_paths: c.deny_paths.clone(),
        }
    }

    /// Deny wins over allow; a non-empty allow list admits only what it lists. A client
    /// without an IP address (a Unix socket) passes address rules only when no allow list is set.
    pub fn check(&self, client: Option<IpAddr>, normalized_path: &str) -> Result<(), Denied> {
        let client = client.map(|ip| match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        });
        let in_list =
            |list: &[IpNet]| client.is_some_and(|ip| list.iter().any(|n| n.contains(&ip)));
        if in_list(&self.deny) || (!self.allow.is_empty() && !in_list(&self.allow)) {
            return Err(Denied::ClientAddress);
        }
        let path = normalized_path;
        if self.deny_paths.iter().any(|p| prefix_matches(p, path))
            || (!self.allow_paths.is_empty()
                && !self.allow_paths.iter().any(|p| prefix_matches(p, path)))
        {
            return Err(Denied::Path);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bypass_attempts_normalise_to_the_real_path() {
        for p in [
            "//admin",
            "/a/../admin",
            "/%2e%2e/admin",
            "/%2E%2E%2Fadmin",
            "/./admin",
            "/a/b/../../admin",
            "/../../admin",
            "/%61dmin",
            "/x/%2e%2e%2fadmin",
            "///admin/.",
        ] {
            let n = normalize_path(p);
            assert!(n == "/admin" || n == "/admin/", "{p} → {n}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed_and_others_kept_safe() {
        assert!(matches!(normalize_path("/api/v1/x"), Cow::Borrowed(_)));
        assert_eq!(normalize_path("/api/"), "/api/");
        assert_eq!(normalize_path("/a/.."), "/");
        assert_eq!(normalize_path("/.."), "/");
        assert_eq!(normalize_path("/a/%2f/b"), "/a/b");
        assert_eq!(normalize_path("/a%20b/%2525"), "/a%20b/%2525");
        assert_eq!(normalize_path("/a%3fb"), "/a%3Fb");
        assert_eq!(normalize_path("/bad%zz%4"), "/bad%zz%4");
        assert_eq!(normalize_path("/...x/..."), "/...x/...");
        assert_eq!(normalize_path(""), "/");
    }

    fn acl(allow: &[&str], deny: &[&str], allow_paths: &[&str], deny_paths: &[&str]) -> Acl {
        Acl {
            allow: allow.iter().map(|s| s.parse().unwrap()).collect(),
            deny: deny.iter().map(|s| s.parse().unwrap()).collect(),
            allow_paths: allow_paths.iter().map(|s| s.to_string()).collect(),
            deny_paths: deny_paths.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn deny_wins_and_allow_lists_are_exclusive() {
        let a = acl(&["10.0.0.0/8"], &["10.1.0.0/16"], &[], &[]);
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(a.check(ip("10.2.3.4"), "/"), Ok(()));
        assert_eq!(a.check(ip("10.1.3.4"), "/"), Err(Denied::ClientAddress));
        assert_eq!(a.check(ip("192.168.1.1"), "/"), Err(Denied::ClientAddress));
        assert_eq!(a.check(ip("::ffff:10.2.3.4"), "/"), Ok(()));
        assert_eq!(a.check(None, "/"), Err(Denied::ClientAddress));
    }

    #[test]
    fn path_rules_match_whole_segments() {
        let a = acl(&[], &[], &[], &["/admin"]);
        for p in ["/admin", "/admin/", "/admin/users", "/admin;jsessionid=1"] {
            assert_eq!(a.check(None, p), Err(Denied::Path), "{p}");
        }
        assert_eq!(a.check(None, "/administrator"), Ok(()));
        let a = acl(&[], &[], &["/public"], &["/public/secret"]);
        assert_eq!(a.check(None, "/public/x"), Ok(()));
        assert_eq!(a.check(None, "/public/secret/x"), Err(Denied::Path));
        assert_eq!(a.check(None, "/private"), Err(Denied::Path));
    }
}
