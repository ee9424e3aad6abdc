//! busbar's own HTTP/2 engine for clients (h2c with prior knowledge, and TLS with ALPN
//! `h2`), on hyperium's `h2` crate: framing, HPACK, flow control and the protocol's
//! checks are the crate's; each stream runs the same phases as an HTTP/1 request.
//!
//! Upstream, it reaches HTTP/1 services (`protocol` `http1` and `https`) through the
//! HTTP/1 engine's try, per-thread pool and response codec (`drivers::h1`), and `h2c` /
//! `h2` services h2 on both sides through `pool` (`passthrough`: gRPC, or any HTTP/2
//! request). gRPC-Web routes are served with the codec of `translate::grpc_web` on the
//! pass-through; a JSON caller of a JSON→gRPC route is answered by the route's gRPC call
//! (`drivers::json_grpc`, through `json`), its plain gRPC callers pass through. Every
//! route of every snapshot is this engine's: the front door gives it every HTTP/2
//! connection.
//!
//! Files: `server` (the connection: settings, limits, drain), `stream` (one stream's
//! exchange), `json` (a JSON→gRPC call's caller on a stream), `response` (an HTTP/1
//! upstream's response to the client), `passthrough` (a stream to an HTTP/2 upstream,
//! both ways at once), `call` (the tries' streams to an HTTP/2 upstream, shared with the
//! HTTP/1 engine), `grpc_timeout` (the header's syntax), `request` (head
//! conversion, RFC 9113 §8.2.3), `body` (the request body with flow control, as HTTP/1
//! body bytes), and `pool`: the upstream side, per-thread pools of multiplexed
//! connections to instances (h2c with prior knowledge, h2 over TLS with ALPN `h2`), the
//! one way busbar opens an HTTP/2 stream to an instance (its first user is the JSON→gRPC
//! driver, `drivers::json_grpc`).
//! Must not: hold policy (the phases'), or frame HTTP/1 itself (`drivers::h1`'s codecs).

mod body;
pub(crate) mod call;
pub(crate) mod grpc_timeout;
mod json;
mod passthrough;
pub(crate) mod pool;
mod request;
mod response;
mod server;
mod stream;

pub(crate) use server::serve;
pub(crate) use stream::Conn;

/// The conversion of a stream's head into the HTTP/1.1 request busbar sends upstream
/// (`request::convert`, RFC 9113 §8.2.3), for the fuzz harness (`fuzz/src/lib.rs`,
/// target `h2_request`) and nothing else: `None` when the stream is refused, else the
/// request and its body framing (`Some(n)`: `n` bytes, 0 for none; `None`: chunked).
#[doc(hidden)]
pub fn convert_for_fuzzing(
    parts: http::request::Parts,
    end_stream: bool,
) -> Option<(pingora_http::RequestHeader, Option<u64>)> {
    use crate::drivers::h1::request::BodyFraming;
    let (head, framing) = request::convert(parts, end_stream).ok()?;
    let length = match framing {
        BodyFraming::None => Some(0),
        BodyFraming::Length(n) => Some(n),
        BodyFraming::Chunked => None,
    };
    Some((head, length))
}
