//! The bottom layer: small pieces every other layer may use.
//!
//! Owns: the one JSON shape of busbar's own answers ([`reply::Refusal`]), the HTTP
//! plumbing the control APIs share ([`api`]: JSON replies, a size-capped body read, the
//! refusal of forwarded requests), HTTP facts that are no one's policy ([`http`]: the
//! hop-by-hop list, header lines, a declared body length), path normalisation
//! ([`path`]), the clock read once per turn of a connection's task ([`clock`]), cheap
//! deadlines for socket waits ([`deadline`]), a connection's peer
//! address ([`peer_of`]) and when the allocator should give back all it holds freed
//! ([`memory`]).
//! Must not: import anything of busbar's above it (see ARCHITECTURE.md).

pub mod api;
pub mod clock;
pub mod deadline;
pub mod http;
pub mod memory;
pub mod path;
pub mod reply;

/// The peer address a connection's socket digest names: the TCP peer, or the client a
/// trusted PROXY header named (`listeners` sets it there). `None` for a Unix socket.
pub fn peer_of<S>(s: &S) -> Option<std::net::SocketAddr>
where
    S: pingora_core::protocols::GetSocketDigest + ?Sized,
{
    s.get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied())
}
