//! The drivers: each speaks one shape of traffic to clients and upstreams and is a thin
//! loop over the request phases (`phases`), so every driver gets every feature.
//!
//! - `pingora`: pingora's `ProxyHttp` adapter: upgrades, h2c services, gRPC and gRPC-Web
//!   pass-through, HTTP/2 clients while the snapshot has routes `h2` does not serve; and
//!   the JSON→gRPC call (`json_grpc`) from its `request_filter`.
//! - `h1`: busbar's own HTTP/1.1 engine for plaintext bodyless requests (the front door,
//!   `edge`, hands them over).
//! - `h2`: busbar's own HTTP/2 engine for clients (h2c, TLS with ALPN `h2`) to HTTP/1
//!   services; the front door hands it whole connections.
//! - `json_grpc`: JSON/HTTP callers → unary and server-streaming gRPC over h2c.
//! - `gone`: the pingora session's "client went away" future for admission's waits.
//!
//! Must not: hold policy. Route, admission, tries, retries, outlier detection, header
//! edits, metrics and the access log are the phases'; a driver frames bytes, owns its
//! connections and says what happened in the phases' words.

pub(crate) mod gone;
pub mod h1;
pub(crate) mod h2;
pub(crate) mod json_grpc;
pub mod pingora;
