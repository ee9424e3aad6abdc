//! Small HTTP helpers shared by the admin, registration and release APIs and the console: JSON replies,
//! a size-capped body read, and the refusal of requests the data plane forwarded.
//!
//! Must not: know any one API's routes or state.

use http::{Response, StatusCode};
use pingora_core::protocols::http::ServerSession;
use serde_json::Value;

use super::reply::Refusal;

pub fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .unwrap_or_default()
}

pub fn json_reply(status: StatusCode, v: Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(&v).unwrap_or_default();
    body.push(b'\n');
    reply(status, "application/json", body)
}

/// `{"error": code, "message": message}` (the shape of [`Refusal`]).
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Vec<u8>> {
    refusal(status, &Refusal::new(code, &message.into()))
}

/// Any [`Refusal`] as the reply, pretty-printed like the APIs' other answers.
pub fn refusal(status: StatusCode, r: &Refusal<'_>) -> Response<Vec<u8>> {
    json_reply(status, r.to_value())
}

/// Why a body could not be read: status, error code and message.
pub type BodyError = (StatusCode, &'static str, String);

/// Reads a request body of at most `max` bytes; `what` names it in the 413 message.
pub async fn read_body(
    session: &mut ServerSession,
    max: usize,
    what: &str,
) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max {
                    return Err((
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!("{what} is at most {max} bytes"),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err((StatusCode::BAD_REQUEST, "bad_body", e.to_string())),
        }
    }
}

/// The refusal for a request that came through a busbar service listener (its `Via`
/// names a busbar hop, this node's or another's), whatever the routing that led here:
/// an instance registered at a control listener's address must not make the admin or
/// registration API readable by callers of a service. `None` for everything else.
pub fn forwarded_by_busbar(session: &ServerSession) -> Option<Response<Vec<u8>>> {
    let passed = crate::via::node().passed(&session.req_header().headers);
    (passed.busbar_hops > 0).then(|| {
        error(
            StatusCode::FORBIDDEN,
            "forwarded_by_busbar",
            "this listener does not answer requests forwarded by a busbar service listener",
        )
    })
}
