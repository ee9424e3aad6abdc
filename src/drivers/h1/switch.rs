//! An upgrade's answer on busbar's own engine: the upstream said `101 Switching
//! Protocols`, so its head goes to the client and the two connections become a tunnel
//! (`drivers::tunnel`).
//!
//! Owns: the 101 head for the client (the upstream's lines as the response-head editor
//! keeps them, busbar's, then `Upgrade` as the upstream chose and `Connection: upgrade`),
//! the order of the first bytes (what each side sent right behind its head goes before
//! anything the tunnel copies), freeing the request's buffers before the tunnel starts,
//! and what the access log and metrics get of a tunnel.
//! Must not: decide whether a request is an upgrade (the request codec) or whether the
//! 101 is acceptable (`upstream::round_trip`), or pool the upstream connection.

use tokio::io::AsyncWriteExt;

use super::client::{ClientStream, Downstream, Served};
use super::response::{self, upstream_header};
use super::{pool, upstream_broke};
use crate::base::deadline::within;
use crate::drivers::tunnel::{self, Bounds};
use crate::phases::ctx::RequestCtx;
use crate::phases::response_head;
use crate::phases::Phases;
use crate::proxy::reply::Cause;
use crate::routing::Route;
use pingora_core::server::ShutdownWatch;

/// An upstream that switched protocols for an upgrade: its connection, what was read of
/// it (the `101` head, and perhaps its first bytes past it), and how busbar's head edits
/// apply (see `exchange`).
pub(super) struct Switched<'a> {
    pub(super) up: pool::Conn,
    /// The 101's lines for the client, as `upstream::round_trip` wrote them.
    pub(super) lines: Vec<u8>,
    /// What was read of the upstream: the 101 head, and perhaps bytes past it.
    pub(super) buf: Vec<u8>,
    pub(super) head: &'a response::Head,
    pub(super) edits: bool,
    pub(super) rate: Option<&'a crate::admission::RateInfo>,
}

/// The upstream answered an upgrade with `101 Switching Protocols`: the 101 goes to the
/// client, and the two connections become a tunnel (`drivers::tunnel`) until both sides
/// close, the service's `tunnel_idle_timeout` passes without a byte, or a drain's grace
/// period ends (`drain`). What each side sent right behind its head goes first: the
/// upstream's with the 101, the client's (in `conn`, as the front door read it) before
/// anything the tunnel reads. The upstream connection is never pooled again. The access
/// log gets the bytes the client received (`bytes`); the bytes it sent count as the
/// request's (`busbar_request_bytes`).
pub(super) async fn switch<S: ClientStream>(
    phases: &Phases,
    down: &mut Downstream<'_, S>,
    route: &Route,
    ctx: &mut RequestCtx,
    conn: &mut Vec<u8>,
    switched: Switched<'_>,
    drain: &ShutdownWatch,
) -> Served {
    let Switched {
        mut up,
        lines: mut out,
        buf,
        head,
        edits,
        rate,
    } = switched;
    let raw = &buf[..head.len];
    // RFC 9110 §15.2.2: a 101 names the protocol it switched to.
    let Some(protocol) = response::switched_to(raw) else {
        return upstream_broke(phases, ctx, down).await;
    };
    if edits {
        let Ok(mut resp) = upstream_header(raw) else {
            return upstream_broke(phases, ctx, down).await;
        };
        if response_head::edit(ctx, &mut resp).is_err() {
            return down.answer(ctx, Cause::UpstreamError, false).await;
        }
        out.clear();
        response::write_switch(&mut out, &mut resp, protocol);
    } else {
        response::finish_switch(&mut out, rate, protocol);
    }
    let early = buf.len() - head.len;
    out.extend_from_slice(&buf[head.len..]);
    drop(buf);
    phases.on_response_health(ctx, head.status);
    if !down.send(&out).await {
        return Served::cut(101, 0);
    }
    drop(out);
    let mut to_upstream = conn.len() as u64;
    if !conn.is_empty() {
        let t = route.service.config.read_timeout;
        let sent = within(t, async {
            up.write_all(conn).await?;
            up.flush().await
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            ctx.body_bytes = to_upstream;
            return Served::cut(101, early);
        }
    }
    // The front door's buffer: the connection ends with the tunnel, so it goes now.
    *conn = Vec::new();
    let bounds = Bounds {
        idle: route.service.config.tunnel_idle_timeout,
        drain: drain.clone(),
        grace: ctx
            .snapshot
            .as_ref()
            .map_or(crate::config::DEFAULT_GRACE_PERIOD, |s| {
                s.config.server.grace_period
            }),
    };
    let copied = tunnel::copy(&mut *down.client, &mut up, bounds).await;
    to_upstream += copied.to_upstream;
    ctx.body_bytes = to_upstream;
    ctx.tunnel_end = copied.end.code();
    Served {
        status: 101,
        body_bytes: early + copied.to_client as usize,
        keep_alive: false,
    }
}
