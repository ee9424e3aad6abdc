//! What busbar writes into the upstream request: forwarding headers, trace context,
//! route header edits. Client-sent forwarding headers are replaced, never trusted.

use std::net::IpAddr;

use http::header::{HeaderName, HeaderValue, HOST};
use pingora_http::{RequestHeader, ResponseHeader};

use crate::config::HeaderEdit;

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

/// Replaces `X-Forwarded-*` and `Forwarded` with what busbar itself saw.
///
/// Runs on every proxied request: the values are formatted on the stack, and each
/// header costs one insert (no `format!`, no name copies).
pub fn set_forwarded(
    req: &mut RequestHeader,
    client: Option<IpAddr>,
    tls: bool,
) -> pingora_error::Result<()> {
    let proto: &'static str = if tls { "https" } else { "http" };
    let host = match req.headers.get(HOST) {
        Some(h) => Some(h.clone()),
        None => req
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    match client {
        Some(ip) => {
            let mut addr = StackBuf::new();
            crate::text::ip(&mut addr, ip);
            let mut forwarded = StackBuf::new();
            // RFC 7239: IPv6 addresses are quoted and bracketed.
            let (open, close): (&[u8], &[u8]) = match ip {
                IpAddr::V4(_) => (b"for=", b";proto="),
                IpAddr::V6(_) => (b"for=\"[", b"]\";proto="),
            };
            forwarded.push(open);
            forwarded.push(addr.as_bytes());
            forwarded.push(close);
            forwarded.push(proto.as_bytes());
            req.insert_header(XFF_NAME, value(addr.as_bytes())?)?;
            req.insert_header(FORWARDED_NAME, value(forwarded.as_bytes())?)?;
        }
        None => {
            req.remove_header(&X_FORWARDED_FOR);
            let v = if tls { "proto=https" } else { "proto=http" };
            req.insert_header(FORWARDED_NAME, HeaderValue::from_static(v))?;
        }
    }
    req.insert_header(XFP_NAME, HeaderValue::from_static(proto))?;
    match host {
        Some(h) => req.insert_header(XFH_NAME, h)?,
        None => {
            req.remove_header(&X_FORWARDED_HOST);
        }
    }
    Ok(())
}

fn value(bytes: &[u8]) -> pingora_error::Result<HeaderValue> {
    HeaderValue::from_bytes(bytes).map_err(|e| {
        pingora_error::Error::because(pingora_error::ErrorType::InternalError, "header value", e)
    })
}

/// A small stack buffer for header values (the longest, an IPv6 `Forwarded`, is < 80 bytes).
struct StackBuf {
    buf: [u8; 96],
    len: usize,
}

impl StackBuf {
    fn new() -> StackBuf {
        StackBuf {
            buf: [0; 96],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Appends `bytes` if they fit (the values written here always do); says whether.
    fn push(&mut self, bytes: &[u8]) -> bool {
        let end = self.len + bytes.len();
        let Some(dst) = self.buf.get_mut(self.len..end) else {
            return false;
        };
        dst.copy_from_slice(bytes);
        self.len = end;
        true
    }
}

impl crate::text::Sink for StackBuf {
    fn put(&mut self, bytes: &[u8]) {
        self.push(bytes);
    }
}

pub fn edit_request(req: &mut RequestHeader, edit: &HeaderEdit) -> pingora_error::Result<()> {
    for name in &edit.remove {
        req.remove_header(name);
    }
    for (name, value) in &edit.set {
        req.insert_header(name.clone(), value.clone())?;
    }
    Ok(())
}

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
            let mut out = StackBuf::new();
            crate::text::ip(&mut out, ip);
            assert_eq!(out.as_bytes(), ip.to_string().as_bytes());
        }
    }
}
