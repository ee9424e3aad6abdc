//! The plan for a request's tries: its deadline, its sticky key, the instance set it
//! picks from and the gray-release version it should reach.
//!
//! Owns: the order of those decisions and the retry budget's deposit.
//! Must not: pick an instance (each try picks: `attempt`), or hold balancing or release
//! policy (the balancer, `release`).

use std::net::IpAddr;

use http::header::COOKIE;
use pingora_http::RequestHeader;

use super::ctx::RequestCtx;
use super::Phases;
use crate::config::HashKey;
use crate::model::balance::hash_key;
use crate::routing;

impl Phases {
    /// The deadline, sticky key, instance set and gray-release version for the tries.
    pub(crate) fn plan(&self, ctx: &mut RequestCtx, req: &RequestHeader, route: &routing::Route) {
        let svc = &route.service;
        let client_ip = ctx.client;
        svc.retry_budget.deposit();
        ctx.deadline = Some(ctx.start + route.config.timeout.unwrap_or(svc.config.timeout));
        if svc.config.balance == crate::config::BalancePolicy::Sticky {
            ctx.sticky_key = sticky_key(&svc.config.hash_key, req, client_ip);
        }
        ctx.set = Some(svc.instances());
        ctx.release = self.state.releases.begin(
            route.name(),
            ctx.set.as_deref(),
            &crate::release::Facts {
                headers: &req.headers,
                client_ip,
                user: ctx.admitted.as_ref().and_then(|a| a.user()),
            },
        );
    }
}

fn cookie<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a [u8]> {
    req.headers.get_all(COOKIE).iter().find_map(|v| {
        v.as_bytes().split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii_start();
            let (k, val) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
            (k == name.as_bytes()).then(|| &val[1..])
        })
    })
}

fn sticky_key(key: &HashKey, req: &RequestHeader, client_ip: Option<IpAddr>) -> u64 {
    match key {
        HashKey::Header(name) => req.headers.get(name).map_or(0, |v| hash_key(v.as_bytes())),
        HashKey::Cookie(name) => cookie(req, name).map_or(0, hash_key),
        HashKey::Path => hash_key(req.uri.path().as_bytes()),
        HashKey::ClientIp => match client_ip {
            Some(IpAddr::V4(ip)) => hash_key(&ip.octets()),
            Some(IpAddr::V6(ip)) => hash_key(&ip.octets()),
            None => 0,
        },
    }
}
