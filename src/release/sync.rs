//! Release overrides shared through etcd: `<releases prefix><route>` holds a route's
//! override as JSON. An admin change on any node writes there; every node watches the
//! prefix and applies what it sees, so a change takes effect cluster-wide. At start and
//! after a lost watch, a node re-lists the prefix: etcd's overrides replace its own.
//!
//! Owns: the etcd client for releases and the watch loop.
//! Must not: be awaited by the request path.

use std::sync::Arc;

use async_trait::async_trait;
use etcd_client::{Event, EventType, KeyValue};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use super::ReleaseError;
use crate::cluster::etcd_conn::{self, timed, EtcdConn, Mirror};
use crate::config::SplitConfig;
use crate::snapshot::State;

/// Where release overrides live, beside the registry's instances: `/busbar/services/`
/// gives `/busbar/releases/`; a prefix not ending in `services/` gets `-releases/`
/// appended to it (outside the registry's prefix, so its watch never sees them).
pub fn releases_prefix(registry_prefix: &str) -> String {
    match registry_prefix.strip_suffix("services/") {
        Some(parent) if parent.is_empty() || parent.ends_with('/') => format!("{parent}releases/"),
        _ => format!("{}-releases/", registry_prefix.trim_end_matches('/')),
    }
}

pub struct ReleaseEtcd {
    conn: EtcdConn,
    pub prefix: String,
}

impl ReleaseEtcd {
    pub fn new(endpoints: Vec<String>, prefix: String) -> ReleaseEtcd {
        ReleaseEtcd {
            conn: EtcdConn::new(endpoints),
            prefix,
        }
    }

    /// Writes (or, with `None`, deletes) a route's override.
    pub async fn write(
        &self,
        route: &str,
        split: Option<&SplitConfig>,
    ) -> Result<(), ReleaseError> {
        let key = format!("{}{route}", self.prefix);
        let value = split.map(|s| s.to_json().to_string());
        self.conn
            .run(|mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move {
                    match value {
                        Some(v) => timed(c.put(key, v, None)).await.map(|_| ()),
                        None => timed(c.delete(key, None)).await.map(|_| ()),
                    }
                }
            })
            .await
            .map_err(|e| ReleaseError::Unavailable(e.to_string()))
    }

    fn parse(&self, key: &[u8], value: &[u8]) -> Option<(String, SplitConfig)> {
        let route = std::str::from_utf8(key)
            .ok()?
            .strip_prefix(self.prefix.as_str())?;
        match crate::config::parse_split_json(value) {
            Ok(s) => Some((route.to_string(), s)),
            Err(e) => {
                tracing::warn!(route, "ignoring an invalid release override in etcd: {e}");
                None
            }
        }
    }
}

/// This node's overrides as a mirror of the etcd prefix.
struct ReleaseMirror<'a> {
    etcd: &'a ReleaseEtcd,
    state: &'a State,
}

impl Mirror for ReleaseMirror<'_> {
    fn prefix(&self) -> &str {
        &self.etcd.prefix
    }

    fn reset(&self, kvs: &[KeyValue]) {
        let all: Vec<_> = kvs
            .iter()
            .filter_map(|kv| self.etcd.parse(kv.key(), kv.value()))
            .map(|(r, s)| (r, Some(s)))
            .collect();
        super::apply_local(self.state, &all, true, "cluster");
    }

    fn apply(&self, events: &[Event]) {
        let mut changes = Vec::new();
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => {
                    if let Some((r, s)) = self.etcd.parse(kv.key(), kv.value()) {
                        changes.push((r, Some(s)));
                    }
                }
                EventType::Delete => {
                    let key = String::from_utf8_lossy(kv.key());
                    if let Some(r) = key.strip_prefix(self.etcd.prefix.as_str()) {
                        changes.push((r.to_string(), None));
                    }
                }
            }
        }
        super::apply_local(self.state, &changes, false, "cluster");
    }

    fn reachable(&self, up: bool, why: &str) {
        if !up {
            tracing::warn!("etcd unreachable: release overrides stay as they are here: {why}");
        }
    }
}

/// The release watch as a background service; idle without etcd.
pub struct ReleaseSync {
    pub state: Arc<State>,
}

#[async_trait]
impl BackgroundService for ReleaseSync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(etcd) = self.state.releases.cluster.clone() else {
            return;
        };
        let mirror = ReleaseMirror {
            etcd: &etcd,
            state: &self.state,
        };
        etcd_conn::mirror(&etcd.conn, &mirror, &mut shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_sit_beside_the_registry() {
        assert_eq!(releases_prefix("/busbar/services/"), "/busbar/releases/");
        assert_eq!(
            releases_prefix("/busbar-test/services/"),
            "/busbar-test/releases/"
        );
        assert_eq!(releases_prefix("services/"), "releases/");
        assert_eq!(releases_prefix("/x/"), "/x-releases/");
        assert_eq!(releases_prefix("/myservices/"), "/myservices-releases/");
    }
}
