//! Background work that keeps the registry moving: the expiry sweep, applying changes
//! to the services the request path reads, and writing the disk snapshot.
//!
//! Owns: timing (sweep interval, debounce). Must not: block the request path; the
//! snapshot file is written off the async threads.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::metrics::METRICS;
use crate::registry::persist;
use crate::snapshot::State;

/// How often leases are checked.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Changes are written to disk at most this often (the debounce).
const SAVE_DEBOUNCE: Duration = Duration::from_millis(200);
/// Even without a change notification, reconcile this often (covers a reload racing a registration).
const RECONCILE_EVERY: Duration = Duration::from_millis(500);

pub struct RegistrySync {
    pub state: Arc<State>,
}

impl RegistrySync {
    /// Applies the store's instances to every service that takes registrations.
    fn apply(&self) {
        let snap = self.state.load();
        let store = &self.state.registry;
        for svc in snap.services.iter().filter(|s| s.config.registration) {
            svc.set_registered(&store.instances(svc.name()));
        }
    }

    fn save(&self) {
        let path = self.state.load().config.registry.snapshot.clone();
        let instances: Vec<_> = self
            .state
            .registry
            .all()
            .iter()
            .map(|r| (**r).clone())
            .collect();
        match persist::save(&path, &instances) {
            Ok(()) => {
                tracing::debug!(path = %path.display(), n = instances.len(), "registry snapshot written")
            }
            Err(e) => tracing::warn!(path = %path.display(), "registry snapshot not written: {e}"),
        }
    }
}

#[async_trait]
impl BackgroundService for RegistrySync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut changes = self.state.registry.subscribe();
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
        let mut applied = (0u64, 0u64);
        let mut saved_version = self.state.registry.version();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = changes.changed() => {}
                _ = reconcile.tick() => {}
                _ = sweep.tick() => {
                    let (expired, p) = self.state.registry.expire();
                    for r in &expired {
                        tracing::info!(service = %r.service, id = %r.id, "registration expired");
                    }
                    METRICS.registry_expired.inc_by(expired.len() as u64);
                    METRICS.self_preservation.set(p.active as i64);
                }
            }
            let now = (self.state.load().generation, self.state.registry.version());
            if now != applied {
                self.apply();
                applied = now;
            }
            if now.1 != saved_version {
                tokio::time::sleep(SAVE_DEBOUNCE).await;
                saved_version = self.state.registry.version();
                let this = RegistrySync {
                    state: self.state.clone(),
                };
                // fsync must not stall an async worker.
                let _ = tokio::task::spawn_blocking(move || this.save()).await;
                // Changes that came during the debounce are applied on the next turn.
            }
        }
        if self.state.registry.version() != saved_version {
            self.save();
        }
    }
}
