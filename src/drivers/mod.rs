//! The drivers: each speaks one shape of traffic to clients and upstreams and is a thin
//! loop over the request phases (`phases`), so every driver gets every feature.
//!
//! - `pingora`: pingora's `ProxyHttp` adapter for the HTTP/1 requests `h1` declines (an
//!   upgrade to an HTTP/2 service or on a JSON→gRPC route, heads httparse refuses); no
//!   HTTP/2. The JSON→gRPC call (`json_grpc`) runs from its `request_filter` for a JSON
//!   request among those.
//! - `h1`: busbar's own HTTP/1.x engine, plaintext and TLS: bodies, HTTP/1.0, upgrades,
//!   HTTP/2 services (`to_h2`), JSON→gRPC callers (the front door, `edge`, hands
//!   requests over).
//! - `tunnel`: the byte copy both ways behind an upgrade's `101` and a `CONNECT`'s `200`
//!   (idle timeout, drain), shared by `h1` and `fallback::connect`.
//! - `h2`: busbar's own HTTP/2 engine for clients (h2c, TLS with ALPN `h2`) to HTTP/1
//!   services and, h2 on both sides, to `h2c` / `h2` ones (gRPC pass-through; the front
//!   door hands it whole connections); `h2::pool` opens every HTTP/2 stream to an
//!   instance.
//! - `json_grpc`: JSON/HTTP callers → unary and streaming gRPC over `h2::pool`, on
//!   whichever driver serves the caller (`h1::json`, `h2::json`, `pingora`).
//! - `gone`: the pingora session's "client went away" future for admission's waits.
//!
//! Must not: hold policy. Route, admission, tries, retries, outlier detection, header
//! edits, metrics and the access log are the phases'; a driver frames bytes, owns its
//! connections and says what happened in the phases' words.

pub(crate) mod gone;
pub mod h1;
pub mod h2;
pub(crate) mod json_grpc;
pub mod pingora;
pub mod tunnel;
