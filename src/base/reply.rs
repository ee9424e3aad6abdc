//! The one shape of busbar's own answers: `{"error": code, "message": text}`, plus
//! `field` when a registration names the field at fault, `reason` and `retry_after` when
//! admission refuses. Every place busbar speaks for itself (the proxy's answers, the
//! front door's refusals, admission, the admin, registration and release APIs) builds
//! its body here, so a client parses one shape. A gRPC or gRPC-Web caller gets busbar's
//! own answers as Trailers-Only gRPC instead (`proxy::reply`, with the same code in
//! `grpc-message`); a JSON caller of a translated route gets the service's grpc-status
//! mapped to HTTP (`translate::status`: the service's answer, not busbar's).
//!
//! Must not: pick the status or the code (the caller's policy), or allocate more than
//! the one body buffer on the request path.

use serde::Serialize;

/// A refusal or failure busbar answers itself.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Refusal<'a> {
    /// A stable, machine-readable code (`no_route`, `invalid_field`, …).
    pub error: &'a str,
    /// What happened, for a human.
    pub message: &'a str,
    /// The request field at fault (registration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'a str>,
    /// Which rule refused (admission: `acl`, `rate_limit`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// Seconds before a retry may succeed (also sent as `Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl<'a> Refusal<'a> {
    pub fn new(error: &'a str, message: &'a str) -> Self {
        Refusal {
            error,
            message,
            field: None,
            reason: None,
            retry_after: None,
        }
    }

    pub fn field(self, field: &'a str) -> Self {
        Refusal {
            field: Some(field),
            ..self
        }
    }

    pub fn reason(self, reason: &'a str) -> Self {
        Refusal {
            reason: Some(reason),
            ..self
        }
    }

    pub fn retry_after(self, secs: Option<u64>) -> Self {
        Refusal {
            retry_after: secs,
            ..self
        }
    }

    /// The body: compact JSON and a newline, in one buffer.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.error.len() + self.message.len());
        // Serialising string slices and integers into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, self);
        out.push(b'\n');
        out
    }

    /// A whole HTTP/1.1 answer that ends its connection, for the places that write raw
    /// bytes (the front door's refusals, a refused `CONNECT`): `status`'s line,
    /// `Content-Type: application/json`, the body's `Content-Length`,
    /// `Connection: close`, then this body. With the body's length.
    pub fn to_closing_answer(&self, status: http::StatusCode) -> (Vec<u8>, usize) {
        let body = self.to_json();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Unknown"),
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        (out, body.len())
    }

    /// The same object as a JSON value, for the control APIs that build theirs so.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shape_with_optional_fields_and_escaping() {
        assert_eq!(
            Refusal::new("no_route", "no route matches this request").to_json(),
            b"{\"error\":\"no_route\",\"message\":\"no route matches this request\"}\n"
        );
        let v: serde_json::Value = serde_json::from_slice(
            &Refusal::new("invalid_field", "a \"quoted\"\nline")
                .field("address")
                .to_json(),
        )
        .unwrap();
        assert_eq!(v["field"], "address");
        assert_eq!(v["message"], "a \"quoted\"\nline");
        let r = Refusal::new("too_many_requests", "slow down")
            .reason("rate_limit")
            .retry_after(Some(3))
            .to_value();
        assert_eq!(r["reason"], "rate_limit");
        assert_eq!(r["retry_after"], 3);
        assert!(r.get("field").is_none());
    }

    /// RFC 9112: the status line with its reason phrase, a `Content-Length` that frames
    /// exactly the body, and the close the answer promises.
    #[test]
    fn a_closing_answer_is_framed_by_its_length() {
        let r = Refusal::new("not_a_service", "CONNECT only reaches services");
        let (answer, body) = r.to_closing_answer(http::StatusCode::FORBIDDEN);
        let text = String::from_utf8(answer).unwrap();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(
            head,
            format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close",
                rest.len()
            )
        );
        assert_eq!(body, rest.len());
        assert_eq!(rest.as_bytes(), r.to_json());
    }
}
