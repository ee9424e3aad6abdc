//! Request-path normalisation: the readings of a path that routing and ACLs see, shared
//! by `admission` (ACLs), the request phases (routing) and `config` (which checks that an
//! ACL path is written in its normal form).
//!
//! Must not: decide what goes upstream: the proxy keeps the client's path unless the
//! route sets `normalize_path = true`.
//!
//! Normalisation, so that `//admin`, `/a/../admin`, `/%2e%2e/admin` and `/%2E%2E%2Fadmin`
//! are all `/admin`: percent-escapes of unreserved characters and of `/` are decoded
//! (other escapes are kept, hex upper-cased, so `%25` is never decoded twice); runs of
//! `/` collapse; `.` segments go; `..` removes the segment before it and never climbs
//! above the root. A trailing `/` is kept.
//!
//! Servers disagree on `;`. Tomcat and Jetty drop a `;params` suffix from every segment
//! before they resolve dot-segments (`/api;x/admin` and `/api/x/..;/admin` are
//! `/api/admin` to them); a server that follows RFC 3986 to the letter keeps `;` as part
//! of the segment's name (`..;` is a name, not a step up). So a path has two readings:
//! - the *parameter-free* one (every segment's `;params` removed, `%3B` counting as `;`,
//!   then dot-segments resolved): what routing sees, and what the upstream gets with
//!   `normalize_path = true`;
//! - the *literal* one (`;` kept), computed only for a path with a `;` in it.
//!
//! A route's ACL refuses a path if a `deny_paths` rule matches either reading, and an
//! `allow_paths` list admits it only if both readings are under it: whichever way the
//! application reads the path, it is a path the ACL allowed.

use std::borrow::Cow;

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

/// True when `path` can't change under normalisation and reads the same to every server
/// (the common case: no work, no copy).
fn already_normal(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') || b.iter().any(|&c| c == b'%' || c == b';') {
        return false;
    }
    !b.windows(2).any(|w| w == b"//")
        && !path.split('/').skip(1).any(|seg| seg == "." || seg == "..")
}

/// The readings of a request path (see the module header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized<'a> {
    /// The parameter-free reading: what routing and ACLs see, and what goes upstream
    /// with `normalize_path = true`. Borrowed when it is the path as it came.
    pub path: Cow<'a, str>,
    /// The literal reading (`;` kept in segment names), when it differs from `path`.
    pub literal: Option<String>,
    /// A `.` or `..` segment carried `;params`: the readings differ in more than
    /// parameters (one climbs where the other does not), so they may name different
    /// routes.
    pub split: bool,
}

/// Both readings of a request path (without query).
pub fn normalize(path: &str) -> Normalized<'_> {
    if already_normal(path) {
        return Normalized {
            path: Cow::Borrowed(path),
            literal: None,
            split: false,
        };
    }
    let (canonical, split) = resolve(path, true);
    let b = path.as_bytes();
    let has_params = b.contains(&b';')
        || b.windows(3)
            .any(|w| w[0] == b'%' && w[1] == b'3' && w[2].eq_ignore_ascii_case(&b'b'));
    let literal = has_params
        .then(|| resolve(path, false).0)
        .filter(|l| *l != canonical);
    Normalized {
        path: Cow::Owned(canonical),
        literal,
        split,
    }
}

/// The parameter-free reading of a request path (see [`normalize`]).
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    normalize(path).path
}

/// One reading of `path`: `strip_params` drops each segment's `;params` (and decodes
/// `%3B` to the `;` that starts them). Also says whether a dot-segment had parameters.
fn resolve(path: &str, strip_params: bool) -> (String, bool) {
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
                if is_unreserved(v) || v == b'/' || (strip_params && v == b';') {
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
    let mut split = false;
    let mut trailing = false;
    let mut out: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        let name = match seg.split_once(';') {
            Some((name, _)) if strip_params => {
                split |= name == "." || name == "..";
                name
            }
            _ => seg,
        };
        // A path ending in `/`, `/.` or `/..` names a directory.
        trailing = matches!(name, "" | "." | "..");
        match name {
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
    (s, split)
}
