//! gRPC status → HTTP: the code table, `grpc-message` decoding and the JSON error body.
//!
//! Owns: the mapping Envoy's transcoder and grpc-gateway share, and the error body
//! `{"code":…,"message":…,"details":[…]}` (details from `grpc-status-details-bin`).
//! Must not: do I/O.

use base64::Engine;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::{json, Value};

/// gRPC's codes by name, for messages.
const NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The HTTP status for a gRPC code (grpc-gateway's `HTTPStatusFromCode`, Envoy's table).
pub fn http_status(code: u32) -> u16 {
    match code {
        0 => 200,
        1 => 499,
        2 => 500,
        3 => 400,
        4 => 504,
        5 => 404,
        6 => 409,
        7 => 403,
        8 => 429,
        9 => 400,
        10 => 409,
        11 => 400,
        12 => 501,
        13 => 500,
        14 => 503,
        15 => 500,
        16 => 401,
        _ => 500,
    }
}

/// The gRPC code for an HTTP status a server answered instead of gRPC (gRPC's
/// "HTTP to gRPC status code mapping", what gRPC clients report).
pub fn code_of_http(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// The code's name (`NOT_FOUND`), or `CODE_<n>` for codes gRPC does not define.
pub fn code_name(code: u32) -> String {
    NAMES
        .get(code as usize)
        .map_or_else(|| format!("CODE_{code}"), |n| (*n).to_string())
}

/// Parses a `grpc-status` value.
pub fn parse_code(v: &[u8]) -> Option<u32> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// `grpc-message` is percent-encoded; a broken encoding is shown as received.
pub fn decode_message(v: &[u8]) -> String {
    percent_encoding::percent_decode(v)
        .decode_utf8()
        .map(|s| s.into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(v).into_owned())
}

/// `google.rpc.Status`, as sent base64 in `grpc-status-details-bin`.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types_any::Any>,
}

mod prost_types_any {
    /// `google.protobuf.Any`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }
}

/// The details of `grpc-status-details-bin` as proto3 JSON `Any`s: types one of `pools`
/// knows (the first that does; the driver passes the route's, then the built-in
/// `google.rpc` one with `ErrorInfo`, `RetryInfo`, `BadRequest`, …) are expanded, others
/// are given as `{"@type", "value": base64}`.
pub fn details(bin: Option<&[u8]>, pools: &[&DescriptorPool]) -> Vec<Value> {
    let Some(bin) = bin else { return Vec::new() };
    let trimmed: Vec<u8> = bin.iter().copied().filter(|b| *b != b'=').collect();
    let Ok(raw) = base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed) else {
        return Vec::new();
    };
    let Ok(status) = RpcStatus::decode(raw.as_slice()) else {
        return Vec::new();
    };
    status
        .details
        .into_iter()
        .map(|any| {
            let name = any.type_url.rsplit('/').next().unwrap_or("");
            let desc = pools.iter().find_map(|p| p.get_message_by_name(name));
            let expanded = desc.and_then(|desc| {
                let msg = DynamicMessage::decode(desc, any.value.as_slice()).ok()?;
                match serde_json::to_value(&msg).ok()? {
                    Value::Object(mut m) => {
                        m.insert("@type".into(), Value::String(any.type_url.clone()));
                        Some(Value::Object(m))
                    }
                    // Well-known types with a scalar JSON form.
                    v => Some(json!({"@type": any.type_url, "value": v})),
                }
            });
            expanded.unwrap_or_else(|| {
                json!({
                    "@type": any.type_url,
                    "value": base64::engine::general_purpose::STANDARD.encode(&any.value),
                })
            })
        })
        .collect()
}

/// The JSON error body for a gRPC status.
pub fn error_body(code: u32, message: &str, details: Vec<Value>) -> Vec<u8> {
    let mut v = serde_json::to_vec(&json!({
        "code": code,
        "message": message,
        "details": details,
    }))
    .unwrap_or_default();
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_envoys() {
        let want = [
            200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401,
        ];
        for (code, status) in want.iter().enumerate() {
            assert_eq!(http_status(code as u32), *status, "code {code}");
        }
        assert_eq!(http_status(99), 500);
        assert_eq!(code_name(5), "NOT_FOUND");
        assert_eq!(code_name(40), "CODE_40");
    }

    #[test]
    fn messages_are_percent_decoded() {
        assert_eq!(
            decode_message(b"no%20such%20book%3A%20%E2%9C%93"),
            "no such book: ✓"
        );
        assert_eq!(decode_message(b"plain"), "plain");
        assert_eq!(decode_message(b"bad%FFutf8"), "bad%FFutf8");
        assert_eq!(parse_code(b" 14"), Some(14));
        assert_eq!(parse_code(b"x"), None);
    }

    #[test]
    fn details_decode_unknown_types_as_base64() {
        let st = RpcStatus {
            code: 5,
            message: "m".into(),
            details: vec![prost_types_any::Any {
                type_url: "type.googleapis.com/x.Unknown".into(),
                value: vec![1, 2, 3],
            }],
        };
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(st.encode_to_vec());
        let d = details(Some(b64.as_bytes()), &[&DescriptorPool::new()]);
        assert_eq!(
            d,
            vec![json!({"@type": "type.googleapis.com/x.Unknown", "value": "AQID"})]
        );
        assert!(details(Some(b"!!"), &[&DescriptorPool::new()]).is_empty());
    }

    #[test]
    fn error_body_shape() {
        let b: Value = serde_json::from_slice(&error_body(5, "gone \"x\"", vec![])).unwrap();
        assert_eq!(
            b,
            json!({"code": 5, "message": "gone \"x\"", "details": []})
        );
    }
}
