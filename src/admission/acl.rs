//! Access control: CIDR allow/deny and path-prefix rules.
//!
//! Owns: the compiled [`Acl`] of a route. The path readings it judges come from
//! [`normalize`] (`base::path`, which explains them).
//! Must not: decide what goes upstream: the proxy keeps the client's path unless the
//! route sets `normalize_path = true`.

use std::net::IpAddr;

use ipnet::IpNet;

pub use crate::base::path::{normalize, normalize_path, Normalized};
use crate::config::RouteAdmission;

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
    /// `path` is the parameter-free reading, `literal` the literal one when it differs
    /// ([`normalize`]): a deny rule that matches either refuses, an allow list must hold both.
    pub fn check(
        &self,
        client: Option<IpAddr>,
        path: &str,
        literal: Option<&str>,
    ) -> Result<(), Denied> {
        let client = client.map(|ip| match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        });
        let in_list =
            |list: &[IpNet]| client.is_some_and(|ip| list.iter().any(|n| n.contains(&ip)));
        if in_list(&self.deny) || (!self.allow.is_empty() && !in_list(&self.allow)) {
            return Err(Denied::ClientAddress);
        }
        let readings = || std::iter::once(path).chain(literal);
        let denied = |p: &str| self.deny_paths.iter().any(|rule| prefix_matches(rule, p));
        let allowed = |p: &str| self.allow_paths.iter().any(|rule| prefix_matches(rule, p));
        if readings().any(denied) || (!self.allow_paths.is_empty() && !readings().all(allowed)) {
            return Err(Denied::Path);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

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

    #[test]
    fn parameters_are_dropped_from_every_segment_as_tomcat_does() {
        for (raw, canonical, literal) in [
            ("/api;x/admin", "/api/admin", Some("/api;x/admin")),
            ("/api/x/..;/admin", "/api/admin", Some("/api/x/..;/admin")),
            (
                "/api/x/..;y=1/admin",
                "/api/admin",
                Some("/api/x/..;y=1/admin"),
            ),
            (
                "/api/x/%2e%2e;/admin",
                "/api/admin",
                Some("/api/x/..;/admin"),
            ),
            ("/api%3Bx/admin", "/api/admin", Some("/api%3Bx/admin")),
            (
                "/api/x/..%3b/admin",
                "/api/admin",
                Some("/api/x/..%3B/admin"),
            ),
            ("/a/b;jsessionid=1", "/a/b", Some("/a/b;jsessionid=1")),
            ("/a/;x/b", "/a/b", Some("/a/;x/b")),
            ("/a/b/;x", "/a/b/", Some("/a/b/;x")),
            ("/a/.;x/b", "/a/b", Some("/a/.;x/b")),
            // The literal reading resolves `..` too: here it climbs, the other does not.
            ("/api/admin/..;x/..", "/", Some("/api/admin/")),
            (";x", "/", Some("/;x")),
        ] {
            let n = normalize(raw);
            assert_eq!(n.path, canonical, "{raw}");
            assert_eq!(n.literal.as_deref(), literal, "{raw}");
        }
        assert!(normalize("/a/..;/b").split);
        assert!(normalize("/a/%2E;x/b").split);
        assert!(!normalize("/a;x/b").split);
        assert!(!normalize("/a/b;jsessionid=1").split);
        // No `;`, no literal reading; one that reads the same both ways has none either.
        assert_eq!(normalize("/a/../b").literal, None);
        assert!(matches!(normalize("/a/b").path, Cow::Borrowed(_)));
        assert!(matches!(normalize("/a;b").path, Cow::Owned(_)));
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
        assert_eq!(a.check(ip("10.2.3.4"), "/", None), Ok(()));
        assert_eq!(
            a.check(ip("10.1.3.4"), "/", None),
            Err(Denied::ClientAddress)
        );
        assert_eq!(
            a.check(ip("192.168.1.1"), "/", None),
            Err(Denied::ClientAddress)
        );
        assert_eq!(a.check(ip("::ffff:10.2.3.4"), "/", None), Ok(()));
        assert_eq!(a.check(None, "/", None), Err(Denied::ClientAddress));
    }

    #[test]
    fn path_rules_match_whole_segments() {
        let a = acl(&[], &[], &[], &["/admin"]);
        for p in ["/admin", "/admin/", "/admin/users", "/admin;jsessionid=1"] {
            assert_eq!(a.check(None, p, None), Err(Denied::Path), "{p}");
        }
        assert_eq!(a.check(None, "/administrator", None), Ok(()));
        let a = acl(&[], &[], &["/public"], &["/public/secret"]);
        assert_eq!(a.check(None, "/public/x", None), Ok(()));
        assert_eq!(a.check(None, "/public/secret/x", None), Err(Denied::Path));
        assert_eq!(a.check(None, "/private", None), Err(Denied::Path));
    }

    /// What the ACL says of a raw path, both readings judged.
    fn judge(a: &Acl, raw: &str) -> Result<(), Denied> {
        let n = normalize(raw);
        a.check(None, &n.path, n.literal.as_deref())
    }

    #[test]
    fn deny_rules_hold_for_either_reading() {
        let a = acl(&[], &[], &[], &["/api/admin"]);
        for p in [
            "/api;x/admin",
            "/api/x/..;/admin",
            "/api/x/%2e%2e;/admin",
            "/api%3Bx/admin",
            "/api;/admin;jsessionid=1/users",
            // Tomcat reads `/`, a literal server `/api/admin`.
            "/api/admin/..;x/..",
        ] {
            assert_eq!(judge(&a, p), Err(Denied::Path), "{p}");
        }
        for p in ["/api/x;y", "/api/administrator", "/api/x/..;/public"] {
            assert_eq!(judge(&a, p), Ok(()), "{p}");
        }
    }

    #[test]
    fn allow_lists_must_hold_for_both_readings() {
        let a = acl(&[], &[], &["/public"], &[]);
        for p in [
            "/public;jsessionid=1",
            "/public/a;x/b",
            "/public;x/a",
            "/x;y/../public",
        ] {
            assert_eq!(judge(&a, p), Ok(()), "{p}");
        }
        for p in [
            // Tomcat: `/admin`.
            "/public/..;/admin",
            // Tomcat: `/public`; a literal server: `/admin/public`.
            "/admin/..;x/../public",
            // Tomcat: `/public/a`; a literal server: a path outside `/public`.
            "/x/..;/public/a",
        ] {
            assert_eq!(judge(&a, p), Err(Denied::Path), "{p}");
        }
    }
}
