//! The admin API's release and config-history calls; `admin` routes them here after its
//! token check (for a GET, unless `[admin] open_reads`).
//!
//! - `GET /v1/releases` — every split, where it comes from, and what each version served
//! - `PUT /v1/releases/{route}` — set a route's split (JSON body, same shape as `[route.split]`)
//! - `POST /v1/releases/{route}/rollback` — everything to stable, at once
//! - `DELETE /v1/releases/{route}` — drop the override: the file's split applies again
//! - `GET /v1/config/history`, `POST /v1/config/rollback` — the last applied configurations
//!
//! Must not: write HTTP responses (it returns a status and a JSON value).

use http::{Method, StatusCode};
use pingora_core::protocols::http::ServerSession;
use serde_json::{json, Value};

use super::{apply, apply_local, ReleaseError};
use crate::base::reply::Refusal;
use crate::config::SplitConfig;
use crate::snapshot::State;

/// Largest release body: room for a users list of a few thousand ids.
pub const MAX_BODY: usize = 256 * 1024;

type Answer = (StatusCode, Value);

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Answer {
    (status, Refusal::new(code, &message.into()).to_value())
}

fn release_error(e: ReleaseError) -> Answer {
    let (status, code) = match &e {
        ReleaseError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_split"),
        ReleaseError::NoRoute(_) => (StatusCode::NOT_FOUND, "no_route"),
        ReleaseError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
    };
    error(status, code, e.to_string())
}

/// Paths this module answers.
pub fn handles(path: &str) -> bool {
    path == "/v1/releases"
        || path.starts_with("/v1/releases/")
        || path == "/v1/config/history"
        || path == "/v1/config/rollback"
}

/// Answers a call under [`handles`]; writes are already authorised.
pub async fn serve(
    state: &State,
    session: &mut ServerSession,
    method: &Method,
    path: &str,
) -> Answer {
    if let Some(rest) = path.strip_prefix("/v1/releases/") {
        let (route, to_stable) = match rest.strip_suffix("/rollback") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        return match (method, to_stable) {
            (&Method::PUT, false) => match read_body(session).await {
                Ok(body) => put(state, route, &body).await,
                Err(e) => e,
            },
            (&Method::DELETE, false) => change(state, route, None, "release").await,
            (&Method::POST, true) => rollback(state, route).await,
            _ => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "see \"Gray release\" in README.md",
            ),
        };
    }
    match (method, path) {
        (&Method::GET, "/v1/releases") => (StatusCode::OK, list(state)),
        (&Method::GET, "/v1/config/history") => (StatusCode::OK, history(state)),
        (&Method::POST, "/v1/config/rollback") => config_rollback(state).await,
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "see \"Gray release\" in README.md",
        ),
    }
}

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Answer> {
    crate::base::api::read_body(session, MAX_BODY, "a release body")
        .await
        .map_err(|(status, code, message)| error(status, code, message))
}

fn ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn list(state: &State) -> Value {
    let snap = state.load();
    let active = state.releases.active();
    let releases: Vec<Value> = snap
        .config
        .routes
        .iter()
        .filter_map(|r| {
            let split = active.get(&r.name)?;
            let served = split.served();
            let total: u64 = served.iter().map(|(_, n)| n).sum();
            let share: serde_json::Map<String, Value> = served
                .iter()
                .filter(|(v, n)| *n > 0 || !v.starts_with('*'))
                .map(|(v, n)| {
                    let s = if total == 0 {
                        0.0
                    } else {
                        *n as f64 / total as f64
                    };
                    (
                        v.to_string(),
                        json!({ "requests": n, "share": (s * 10_000.0).round() / 10_000.0 }),
                    )
                })
                .collect();
            Some(json!({
                "route": r.name,
                "service": r.service,
                "origin": split.origin.as_str(),
                "since_ms": ms(split.since),
                "split": split.config.to_json(),
                "served": share,
                "fallbacks": split.fallbacks(),
            }))
        })
        .collect();
    json!({ "generation": snap.generation, "releases": releases })
}

/// Validates a split for a route of the current configuration.
fn validate(
    state: &State,
    route: &str,
    split: Result<SplitConfig, String>,
) -> Result<SplitConfig, ReleaseError> {
    let snap = state.load();
    let Some(r) = snap.config.routes.iter().find(|r| r.name == route) else {
        return Err(ReleaseError::NoRoute(route.to_string()));
    };
    let split = split.map_err(ReleaseError::Invalid)?;
    if let Some(svc) = snap.config.services.iter().find(|s| s.name == r.service) {
        split.check_service(svc).map_err(ReleaseError::Invalid)?;
    }
    Ok(split)
}

async fn put(state: &State, route: &str, body: &[u8]) -> Answer {
    let split = match validate(state, route, crate::config::parse_split_json(body)) {
        Ok(s) => s,
        Err(e) => return release_error(e),
    };
    change(state, route, Some(split), "release").await
}

async fn change(
    state: &State,
    route: &str,
    split: Option<SplitConfig>,
    source: &'static str,
) -> Answer {
    if split.is_none() && !state.load().config.routes.iter().any(|r| r.name == route) {
        return release_error(ReleaseError::NoRoute(route.to_string()));
    }
    let json = split.as_ref().map(SplitConfig::to_json);
    match apply(state, vec![(route.to_string(), split)], source).await {
        Ok(()) => (
            StatusCode::OK,
            json!({ "status": "applied", "route": route, "split": json }),
        ),
        Err(e) => release_error(e),
    }
}

/// Everything to the stable version of the route's current split.
async fn rollback(state: &State, route: &str) -> Answer {
    let Some(split) = state.releases.active().get(route).cloned() else {
        let known = state.load().config.routes.iter().any(|r| r.name == route);
        return if known {
            error(
                StatusCode::CONFLICT,
                "no_split",
                format!("route \"{route}\" has no split to roll back"),
            )
        } else {
            release_error(ReleaseError::NoRoute(route.to_string()))
        };
    };
    let stable = SplitConfig::all_stable(&split.config.stable);
    change(state, route, Some(stable), "rollback").await
}

fn history(state: &State) -> Value {
    let entries: Vec<Value> = state
        .history
        .entries()
        .iter()
        .rev()
        .map(|e| {
            json!({
                "at": humantime::format_rfc3339_millis(e.at).to_string(),
                "source": e.source,
                "digest": e.digest,
                "bytes": e.text.len(),
                "releases": e.releases.iter().map(|(r, s)| (r.clone(), s.to_json())).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    json!({ "newest_first": entries })
}

/// Back to the configuration before the newest: its text through the reload path (the
/// file is not rewritten) and its release overrides everywhere they apply.
async fn config_rollback(state: &State) -> Answer {
    let Some(target) = state.history.previous() else {
        return error(
            StatusCode::CONFLICT,
            "no_history",
            "there is no earlier configuration to return to",
        );
    };
    // Validate first, so a text that no longer loads changes nothing.
    let source = state.load().config.source.clone();
    if let Err(e) = crate::config::parse(&source, &target.text) {
        return error(StatusCode::BAD_REQUEST, "config_invalid", e.to_string());
    }
    let current = state.releases.overrides();
    if *target.releases != current {
        let mut changes: Vec<(String, Option<SplitConfig>)> = target
            .releases
            .iter()
            .filter(|(r, s)| current.get(*r) != Some(*s))
            .map(|(r, s)| (r.clone(), Some(s.clone())))
            .collect();
        changes.extend(
            current
                .keys()
                .filter(|r| !target.releases.contains_key(*r))
                .map(|r| (r.clone(), None)),
        );
        if let Some(etcd) = &state.releases.cluster {
            for (route, split) in &changes {
                if let Err(e) = etcd.write(route, split.as_ref()).await {
                    return release_error(e);
                }
            }
        }
        apply_local(state, &changes, false, "rollback");
        // That recorded an entry; the rollback rewinds past it below.
        state.history.drop_newest();
    }
    let newest_text = state.history.entries().last().map(|e| e.text.clone());
    if newest_text.as_deref() != Some(&*target.text) {
        if let Err(e) = state.apply_text(&target.text, None) {
            return error(StatusCode::BAD_REQUEST, "config_invalid", e);
        }
    }
    state.history.drop_newest();
    (
        StatusCode::OK,
        json!({
            "status": "rolled_back",
            "digest": target.digest,
            "generation": state.load().generation,
            "note": "the configuration file was not rewritten: a reload reads it again",
        }),
    )
}
