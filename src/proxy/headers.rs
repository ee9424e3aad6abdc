//! What busbar writes into the upstream request: forwarding headers, trace context,
//! route header edits. Client-sent forwarding headers are replaced, never trusted.

use std::net::IpAddr;

use http::header::{HeaderName, HOST};
use pingora_http::{RequestHeader, ResponseHeader};

use crate::config::HeaderEdit;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Replaces `X-Forwarded-*` and `Forwarded` with what busbar itself saw.
pub fn set_forwarded(
    req: &mut RequestHeader,
    client: Option<IpAddr>,
    tls: bool,
) -> pingora_error::Result<()> {
    let proto = if tls { "https" } else { "http" };
    let host = req
        .headers
        .get(HOST)
        .cloned()
        .or_else(|| req.uri.authority().and_then(|a| a.as_str().parse().ok()));
    req.remove_header(&FORWARDED);
    match client {
        Some(ip) => {
            let mut buf = itoa_ip(ip);
            req.insert_header(X_FORWARDED_FOR.clone(), buf.as_str())?;
            // RFC 7239: IPv6 addresses are quoted and bracketed.
            buf = match ip {
                IpAddr::V4(_) => format!("for={buf};proto={proto}"),
                IpAddr::V6(_) => format!("for=\"[{buf}]\";proto={proto}"),
            };
            req.insert_header(FORWARDED.clone(), buf)?;
        }
        None => {
            req.remove_header(&X_FORWARDED_FOR);
            req.insert_header(FORWARDED.clone(), format!("proto={proto}"))?;
        }
    }
    req.insert_header(X_FORWARDED_PROTO.clone(), proto)?;
    match host {
        Some(h) => {
            req.insert_header(X_FORWARDED_HOST.clone(), h)?;
        }
        None => {
            req.remove_header(&X_FORWARDED_HOST);
        }
    }
    Ok(())
}

fn itoa_ip(ip: IpAddr) -> String {
    ip.to_string()
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
