//! busbar's HTTP/2 engine (the `h2` crate).
//!
//! - `pool`: the upstream side: per-thread pools of multiplexed connections to instances
//!   (h2c with prior knowledge, h2 over TLS with ALPN `h2`), the one way busbar opens an
//!   HTTP/2 stream to an instance. Its first user is the JSON→gRPC driver
//!   (`drivers::json_grpc`).
//!
//! Must not: hold policy (the phases do), as every driver.

pub(crate) mod pool;
