//! What busbar writes into the upstream request: forwarding headers, trace context,
//! route header edits. Client-sent forwarding headers are replaced, unless the peer is a
//! trusted proxy (`listen.trusted_proxies`): then its `X-Forwarded-For` and `Forwarded`
//! chains go on with busbar's hop appended, as nginx's `$proxy_add_x_forwarded_for` does.

use std::net::IpAddr;

use http::header::{HeaderName, HeaderValue, HOST};
use pingora_http::{RequestHeader, ResponseHeader};

use crate::base::http::{line, Name, Names};
use crate::config::HeaderEdit;
use crate::text::Sink;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Names as busbar writes them upstream: title case, and static, so pingora's
/// case-preserving header map takes them without copying (a `HeaderName` would be
/// copied into a new title-case buffer on every insert).
const XFF_NAME: &str = "X-Forwarded-For";
const XFP_NAME: &str = "X-Forwarded-Proto";
const XFH_NAME: &str = "X-Forwarded-Host";
const FORWARDED_NAME: &str = "Forwarded";
pub const TRACEPARENT_NAME: &str = "traceparent";

/// A header busbar sets upstream: its name, and the same as busbar writes it on an
/// HTTP/1 wire (pingora's case-keeping map takes a static name without copying it).
pub struct Field {
    pub name: &'static HeaderName,
    pub cased: &'static str,
}

impl Field {
    pub const fn new(name: &'static HeaderName, cased: &'static str) -> Field {
        Field { name, cased }
    }
}

const XFF: Field = Field::new(&X_FORWARDED_FOR, XFF_NAME);
const FWD: Field = Field::new(&FORWARDED, FORWARDED_NAME);
const XFP: Field = Field::new(&X_FORWARDED_PROTO, XFP_NAME);
const XFH: Field = Field::new(&X_FORWARDED_HOST, XFH_NAME);
pub const TRACEPARENT_FIELD: Field = Field::new(&TRACEPARENT, TRACEPARENT_NAME);

/// Where busbar's own headers go: a head that keeps the case of its names (pingora's
/// `insert_header`, which parses the name it is given into a new `HeaderName`: an
/// allocation for any name `http` does not know), or a plain map, which takes the
/// static names as they are (an HTTP/2 head: names go lower case on its wire).
pub trait Put {
    /// Replaces every value of `f` with `v`.
    fn set(&mut self, f: &Field, v: HeaderValue) -> pingora_error::Result<()>;
    /// Adds `v` after `f`'s values.
    fn add(&mut self, f: &Field, v: HeaderValue) -> pingora_error::Result<()>;
    /// Replaces every value of a name known only at run time (a configured one).
    fn set_name(&mut self, name: &HeaderName, v: HeaderValue) -> pingora_error::Result<()>;
    fn unset(&mut self, name: &HeaderName);
}

impl Put for RequestHeader {
    fn set(&mut self, f: &Field, v: HeaderValue) -> pingora_error::Result<()> {
        self.insert_header(f.cased, v)
    }
    fn add(&mut self, f: &Field, v: HeaderValue) -> pingora_error::Result<()> {
        self.append_header(f.cased, v).map(|_| ())
    }
    fn set_name(&mut self, name: &HeaderName, v: HeaderValue) -> pingora_error::Result<()> {
        self.insert_header(name.clone(), v)
    }
    fn unset(&mut self, name: &HeaderName) {
        self.remove_header(name);
    }
}

impl Put for http::HeaderMap {
    fn set(&mut self, f: &Field, v: HeaderValue) -> pingora_error::Result<()> {
        self.insert(f.name.clone(), v);
        Ok(())
    }
    fn add(&mut self, f: &Field, v: HeaderValue) -> pingora_error::Result<()> {
        self.append(f.name.clone(), v);
        Ok(())
    }
    fn set_name(&mut self, name: &HeaderName, v: HeaderValue) -> pingora_error::Result<()> {
        self.insert(name.clone(), v);
        Ok(())
    }
    fn unset(&mut self, name: &HeaderName) {
        self.remove(name);
    }
}

/// busbar's own forwarding entries for one peer address and scheme: the same for every
/// request a connection carries, so busbar's HTTP/1 engine renders them once a connection
/// (`drivers::h1::Scratch`) and the other drivers once a request. Formatted on the stack.
pub(crate) struct Peer {
    ip: Option<IpAddr>,
    tls: bool,
    /// `X-Forwarded-For`'s entry; none when the client's address is unknown.
    xff: Option<StackBuf<48>>,
    /// `Forwarded`'s entry.
    forwarded: StackBuf<96>,
    /// The `X-Forwarded-For`, `Forwarded` and `X-Forwarded-Proto` lines as they go on an
    /// HTTP/1 wire for a request whose peer's chains are not kept.
    lines: StackBuf<256>,
}

impl Peer {
    pub(crate) fn new(ip: Option<IpAddr>, tls: bool) -> Peer {
        let mut forwarded = StackBuf::new();
        let xff = ip.map(|ip| {
            let mut addr = StackBuf::new();
            crate::text::ip(&mut addr, ip);
            // RFC 7239: IPv6 addresses are quoted and bracketed.
            let (open, close): (&[u8], &[u8]) = match ip {
                IpAddr::V4(_) => (b"for=", b";proto="),
                IpAddr::V6(_) => (b"for=\"[", b"]\";proto="),
            };
            forwarded.put(open);
            forwarded.put(addr.as_bytes());
            forwarded.put(close);
            addr
        });
        if xff.is_none() {
            forwarded.put(b"proto=");
        }
        forwarded.put(proto(tls).as_bytes());
        let mut lines = StackBuf::new();
        if let Some(addr) = &xff {
            line(&mut lines, XFF_NAME.as_bytes(), addr.as_bytes());
        }
        line(&mut lines, FORWARDED_NAME.as_bytes(), forwarded.as_bytes());
        line(&mut lines, XFP_NAME.as_bytes(), proto(tls).as_bytes());
        Peer {
            ip,
            tls,
            xff,
            forwarded,
            lines,
        }
    }

    /// These are the entries of a connection from `ip` (over TLS or not).
    pub(crate) fn is(&self, ip: Option<IpAddr>, tls: bool) -> bool {
        self.ip == ip && self.tls == tls
    }
}

fn proto(tls: bool) -> &'static str {
    if tls {
        "https"
    } else {
        "http"
    }
}

/// The forwarding headers busbar sends upstream, from what it saw itself.
pub(crate) struct Forwarding<'p> {
    peer: &'p Peer,
    /// A trusted peer's chains, kept before busbar's entries (`a, b`); none otherwise.
    xff_chain: Option<Vec<u8>>,
    forwarded_chain: Option<Vec<u8>>,
    /// `X-Forwarded-Host`: the request's `Host` (or authority).
    host: Option<HeaderValue>,
}

impl<'p> Forwarding<'p> {
    /// The values for a request from `peer`. `chain`: the peer is a trusted proxy, whose
    /// chains are kept (allocated, only then).
    pub(crate) fn of(req: &RequestHeader, peer: &'p Peer, chain: bool) -> Forwarding<'p> {
        let host = match req.headers.get(HOST) {
            Some(h) => Some(h.clone()),
            None => req
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        let (xff_chain, forwarded_chain) = if chain {
            (joined(req, &X_FORWARDED_FOR), joined(req, &FORWARDED))
        } else {
            (None, None)
        };
        Forwarding {
            peer,
            xff_chain,
            forwarded_chain,
            host,
        }
    }

    /// Replaces the request's forwarding headers with these (one insert each; the host
    /// value is moved into the request, taken out of these).
    pub fn apply(&mut self, req: &mut impl Put) -> pingora_error::Result<()> {
        let xff = self.peer.xff.as_ref();
        match (xff, &self.xff_chain) {
            (Some(addr), None) => req.set(&XFF, value(addr.as_bytes())?)?,
            (Some(addr), Some(chain)) => req.set(&XFF, value(&chained(chain, addr.as_bytes()))?)?,
            (None, Some(chain)) => req.set(&XFF, value(chain)?)?,
            (None, None) => req.unset(&X_FORWARDED_FOR),
        }
        let own = self.peer.forwarded.as_bytes();
        match &self.forwarded_chain {
            Some(chain) => req.set(&FWD, value(&chained(chain, own))?)?,
            None => req.set(&FWD, value(own)?)?,
        }
        req.set(&XFP, HeaderValue::from_static(proto(self.peer.tls)))?;
        match self.host.take() {
            Some(h) => req.set(&XFH, h)?,
            None => req.unset(&X_FORWARDED_HOST),
        }
        Ok(())
    }

    /// Writes these as HTTP/1 header lines, for a request whose own forwarding headers
    /// were removed ([`clear_forwarded`]): what [`Forwarding::apply`] then serialising
    /// writes, without the inserts.
    pub fn write(&self, wire: &mut Vec<u8>) {
        if self.xff_chain.is_none() && self.forwarded_chain.is_none() {
            // The peer's lines, rendered once.
            wire.extend_from_slice(self.peer.lines.as_bytes());
        } else {
            let own = self.peer.xff.as_ref().map(StackBuf::as_bytes);
            chain_line(wire, XFF_NAME, self.xff_chain.as_deref(), own);
            let own = Some(self.peer.forwarded.as_bytes());
            chain_line(wire, FORWARDED_NAME, self.forwarded_chain.as_deref(), own);
            line(wire, XFP_NAME.as_bytes(), proto(self.peer.tls).as_bytes());
        }
        if let Some(h) = &self.host {
            line(wire, XFH_NAME.as_bytes(), h.as_bytes());
        }
    }
}

/// A header's lines as one list, `a, b` (RFC 9110 §5.3); none when it has none.
fn joined(req: &RequestHeader, name: &HeaderName) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for v in req.headers.get_all(name) {
        let out = out.get_or_insert_with(|| Vec::with_capacity(v.len() + 48));
        if !out.is_empty() {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// `chain, own`.
fn chained(chain: &[u8], own: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(chain.len() + 2 + own.len());
    v.extend_from_slice(chain);
    v.extend_from_slice(b", ");
    v.extend_from_slice(own);
    v
}

/// A forwarding header's line: the kept chain, then busbar's own entry; nothing when
/// there is neither.
fn chain_line(wire: &mut Vec<u8>, name: &str, chain: Option<&[u8]>, own: Option<&[u8]>) {
    let (chain, own) = match (chain, own) {
        (None, None) => return,
        (Some(c), None) => (c, None),
        (None, Some(o)) => (o, None),
        (Some(c), Some(o)) => (c, Some(o)),
    };
    wire.extend_from_slice(name.as_bytes());
    wire.extend_from_slice(b": ");
    wire.extend_from_slice(chain);
    if let Some(own) = own {
        wire.extend_from_slice(b", ");
        wire.extend_from_slice(own);
    }
    wire.extend_from_slice(b"\r\n");
}

/// Removes client-sent forwarding headers and trace context (busbar writes its own).
/// `sent`: the names of the request's header lines (`Names::ANY` when not known).
pub fn clear_forwarded(req: &mut RequestHeader, sent: Names) {
    let names = [
        &X_FORWARDED_FOR,
        &X_FORWARDED_PROTO,
        &X_FORWARDED_HOST,
        &FORWARDED,
        &TRACEPARENT,
    ];
    // Usually there is nothing to remove: the filter says so for a few bit tests, else
    // one pass over the request's few names does (cheaper than hashing each of these
    // names for a lookup).
    // Their bits in `Names`, worked out when busbar is compiled.
    const BITS: [Name; 5] = [
        Name::of(XFF_NAME),
        Name::of(XFP_NAME),
        Name::of(XFH_NAME),
        Name::of(FORWARDED_NAME),
        Name::of(TRACEPARENT_NAME),
    ];
    if BITS.iter().all(|&b| sent.lacks_name(b)) || !req.headers.keys().any(|k| names.contains(&k)) {
        return;
    }
    for name in names {
        if req.headers.contains_key(name) {
            req.remove_header(name);
        }
    }
}

fn value(bytes: &[u8]) -> pingora_error::Result<HeaderValue> {
    HeaderValue::from_bytes(bytes).map_err(|e| {
        pingora_error::Error::because(pingora_error::ErrorType::InternalError, "header value", e)
    })
}

/// A small stack buffer for header values and lines (the longest value, an IPv6
/// `Forwarded`, is < 80 bytes; the three lines of one, < 200).
struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackBuf<N> {
    fn new() -> StackBuf<N> {
        StackBuf {
            buf: [0; N],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Sink for StackBuf<N> {
    /// Appends `bytes` if they fit (the values written here always do), else nothing.
    fn put(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        if let Some(dst) = self.buf.get_mut(self.len..end) {
            dst.copy_from_slice(bytes);
            self.len = end;
        }
    }
}

/// The route's `request_headers` edits: removals, then sets.
pub fn edit_request(req: &mut RequestHeader, edit: &HeaderEdit) -> pingora_error::Result<()> {
    for name in &edit.remove {
        req.remove_header(name);
    }
    for (name, value) in &edit.set {
        req.insert_header(name.clone(), value.clone())?;
    }
    Ok(())
}

/// The route's `response_headers` edits: removals, then sets.
pub fn edit_response(resp: &mut ResponseHeader, edit: &HeaderEdit) -> pingora_error::Result<()> {
    for name in &edit.remove {
        resp.remove_header(name);
    }
    for (name, value) in &edit.set {
        resp.insert_header(name.clone(), value.clone())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_std_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.99.100.9",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = StackBuf::<48>::new();
            crate::text::ip(&mut out, ip);
            assert_eq!(out.as_bytes(), ip.to_string().as_bytes());
        }
    }

    /// A connection's rendered lines are the three headers RFC 7239 and the de-facto
    /// `X-Forwarded-*` convention give for its peer: an IPv6 address quoted and
    /// bracketed in `Forwarded`, no `X-Forwarded-For` for an unknown peer.
    #[test]
    fn a_peers_lines_are_rendered_once_as_the_headers_say() {
        let cases: [(Option<&str>, bool, &str); 4] = [
            (
                Some("192.0.2.1"),
                false,
                "X-Forwarded-For: 192.0.2.1\r\nForwarded: for=192.0.2.1;proto=http\r\n\
                 X-Forwarded-Proto: http\r\n",
            ),
            (
                Some("2001:db8::8a2e:370:7334"),
                true,
                "X-Forwarded-For: 2001:db8::8a2e:370:7334\r\n\
                 Forwarded: for=\"[2001:db8::8a2e:370:7334]\";proto=https\r\n\
                 X-Forwarded-Proto: https\r\n",
            ),
            (
                Some("::ffff:255.255.255.255"),
                true,
                "X-Forwarded-For: ::ffff:255.255.255.255\r\n\
                 Forwarded: for=\"[::ffff:255.255.255.255]\";proto=https\r\n\
                 X-Forwarded-Proto: https\r\n",
            ),
            (
                None,
                false,
                "Forwarded: proto=http\r\nX-Forwarded-Proto: http\r\n",
            ),
        ];
        for (ip, tls, want) in cases {
            let ip = ip.map(|a| a.parse::<IpAddr>().unwrap());
            let peer = Peer::new(ip, tls);
            assert!(peer.is(ip, tls) && !peer.is(ip, !tls));
            let req = RequestHeader::build("GET", b"/", None).unwrap();
            let mut wire = Vec::new();
            Forwarding::of(&req, &peer, false).write(&mut wire);
            assert_eq!(String::from_utf8(wire).unwrap(), want);
        }
    }

    /// A trusted peer's chains go first, busbar's entry after them, whatever was
    /// rendered for the connection.
    #[test]
    fn a_trusted_peers_chain_goes_before_the_rendered_entry() {
        let peer = Peer::new(Some("10.0.0.2".parse().unwrap()), false);
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("x-forwarded-for", "203.0.113.7").unwrap();
        req.append_header("forwarded", "for=203.0.113.7").unwrap();
        req.append_header("host", "api.example").unwrap();
        let mut wire = Vec::new();
        Forwarding::of(&req, &peer, true).write(&mut wire);
        assert_eq!(
            String::from_utf8(wire).unwrap(),
            "X-Forwarded-For: 203.0.113.7, 10.0.0.2\r\n\
             Forwarded: for=203.0.113.7, for=10.0.0.2;proto=http\r\n\
             X-Forwarded-Proto: http\r\nX-Forwarded-Host: api.example\r\n"
        );
    }
}
