//! The immutable view the request path reads, and the reload that replaces it.
//!
//! Owns: building a [`Snapshot`] from a validated `Config` (carrying instance health
//! over from the previous snapshot), the `ArcSwap` that publishes it, and reload.
//! Must not: parse TOML (that is `config`) or run I/O other than reading the file (what a
//! reload changes outside the snapshot, such as the registration listener, is `live`'s).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::config::{self, Config};
use crate::metrics::METRICS;
use crate::model::Service;
use crate::routing::{Route, RouteTable};

/// One consistent version of routes and services.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    /// In file order.
    pub services: Vec<Arc<Service>>,
    pub generation: u64,
    pub loaded_at: SystemTime,
    /// Mesh fallback: one implicit route per service, by service name.
    pub mesh_routes: HashMap<String, Arc<Route>>,
    /// Compiled admission policies; per-user limiter and queue state carried over.
    pub admission: crate::admission::Admission,
}

impl Snapshot {
    /// Builds a snapshot; instances keep the health `previous` knew of them, and
    /// services that take registrations get their registered instances from `store`.
    pub fn build(
        config: Config,
        previous: Option<&Snapshot>,
        generation: u64,
        store: &crate::registry::store::Store,
    ) -> Snapshot {
        // Allowed but dangerous (`insecure_skip_verify`): said at every load.
        for c in &config.cautions {
            tracing::warn!("{c}");
        }
        let mut services = Vec::with_capacity(config.services.len());
        for s in &config.services {
            let old = previous.and_then(|p| p.service(&s.name));
            let registered = if s.registration {
                store.instances(&s.name)
            } else {
                Vec::new()
            };
            let svc = Arc::new(Service::new(s.clone(), old.map(|o| &**o), &registered));
            services.push(svc);
        }
        let routes = RouteTable::from_config(&config.routes, &services);
        let mesh_routes = crate::fallback::mesh_routes(&config, &services);
        let implicit: Vec<&crate::config::RouteConfig> =
            mesh_routes.values().map(|r| &r.config).collect();
        let admission =
            crate::admission::Admission::build(&config, &implicit, previous.map(|p| &p.admission));
        Snapshot {
            mesh_routes,
            admission,
            routes,
            services,
            generation,
            loaded_at: SystemTime::now(),
            config: Arc::new(config),
        }
    }

    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.iter().find(|s| s.name() == name)
    }
}

/// What `/metrics` says of the running configuration, once `s` is its snapshot: when it
/// was loaded, its hash, whether Redis is configured; after a reload (`previous` is the
/// snapshot it replaces), the series of routes and services it no longer has are removed.
fn published(s: &Snapshot, previous: Option<&Snapshot>) {
    let loaded = s
        .loaded_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    METRICS.config_reload_time.set(loaded.as_secs_f64());
    // 48 bits: exact in an f64.
    METRICS.config_hash.set(s.config.hash as f64);
    crate::metrics::set_redis_configured(s.config.cluster.is_some());
    if let Some(old) = previous {
        let routes: HashMap<&str, &str> = s
            .routes
            .routes()
            .iter()
            .chain(s.mesh_routes.values())
            .map(|r| (r.name(), r.service.name()))
            .collect();
        let services: HashSet<&str> = s.services.iter().map(|svc| svc.name()).collect();
        // First: requests still on the old snapshot must not resolve a removed series again.
        for r in old.routes.routes().iter().chain(old.mesh_routes.values()) {
            if routes.get(r.name()) != Some(&r.service.name()) {
                r.metrics.requests.retire();
            }
        }
        crate::metrics::forget_removed(&routes, &services);
    }
}

/// What reload reports back.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    pub generation: u64,
    /// Settings outside routes and services that now run with the file's value (log
    /// level, grace period, the registration listener).
    pub applied: Vec<&'static str>,
    /// Settings whose value in the file differs from the running one and that need a
    /// restart or an upgrade to apply.
    pub not_applied: Vec<&'static str>,
}

/// Shared state: the current snapshot and what is needed to replace it.
pub struct State {
    current: ArcSwap<Snapshot>,
    /// Registered instances (the embedded store, or the local view of etcd).
    pub registry: Arc<crate::registry::store::Store>,
    generation: AtomicU64,
    reload_lock: Mutex<()>,
    /// Gray-release splits and their run-time overrides.
    pub releases: Arc<crate::release::Releases>,
    /// The last applied configurations, for `POST /v1/config/rollback`.
    pub history: crate::release::history::History,
    /// The running settings outside the snapshot.
    pub live: crate::live::Live,
}

impl crate::release::Running for State {
    fn releases(&self) -> &crate::release::Releases {
        &self.releases
    }

    fn history(&self) -> &crate::release::history::History {
        &self.history
    }

    fn config(&self) -> Arc<Config> {
        self.load().config.clone()
    }
}

impl State {
    pub fn new(
        config: Config,
        registry: Arc<crate::registry::store::Store>,
        live: crate::live::Live,
    ) -> State {
        let releases = Arc::new(crate::release::Releases::open(&config));
        let first = Snapshot::build(config, None, 1, &registry);
        published(&first, None);
        let state = State {
            current: ArcSwap::from_pointee(first),
            registry,
            generation: AtomicU64::new(1),
            reload_lock: Mutex::new(()),
            releases,
            history: Default::default(),
            live,
        };
        crate::release::started(&state);
        state
    }

    /// The current snapshot; a request loads it once and keeps it.
    #[inline]
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Re-reads the config file, validates it in full and swaps it in; on any error the
    /// current snapshot keeps serving. Requests in flight keep the snapshot they loaded.
    pub fn reload(&self) -> Result<ReloadOutcome, String> {
        let path = self.load().config.source.clone();
        match std::fs::read_to_string(&path) {
            Ok(text) => self.apply_text(&text, Some("reload")),
            Err(e) => {
                METRICS.reloads.with_label_values(&["failed"]).inc();
                let e = format!("{}: cannot read: {e}", path.display());
                tracing::error!(
                    "configuration reload refused, the previous one keeps serving:\n{e}"
                );
                Err(e)
            }
        }
    }

    /// Validates `text` as the config file's content and swaps it in, like a reload.
    /// `record` names the change in the config history; `None` for a config rollback,
    /// which rewinds the history itself.
    pub fn apply_text(
        &self,
        text: &str,
        record: Option<&'static str>,
    ) -> Result<ReloadOutcome, String> {
        let _serial = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.load();
        let result = config::parse(&old.config.source, text)
            .map_err(|e| e.to_string())
            .and_then(|new| {
                // Before the swap: a listener that can't be bound refuses the reload.
                let live = self.live.apply(&old.config, &new)?;
                Ok((new, live))
            })
            .map(|(new, live)| {
                let generation = self.generation.fetch_add(1, Relaxed) + 1;
                self.registry
                    .set_policy(crate::registry::store::StorePolicy {
                        renewal_threshold: new.registry.renewal_threshold,
                        max_expiry_share: new.registry.max_expiry_share,
                    });
                let snapshot = Snapshot::build(new, Some(&old), generation, &self.registry);
                published(&snapshot, Some(&old));
                self.current.store(Arc::new(snapshot));
                crate::release::refresh(self);
                if let Some(source) = record {
                    self.history
                        .record_text(source, text, self.releases.overrides());
                }
                ReloadOutcome {
                    generation,
                    applied: live.applied,
                    not_applied: live.needs_restart,
                }
            });
        match &result {
            Ok(o) => {
                METRICS.reloads.with_label_values(&["ok"]).inc();
                tracing::info!(generation = o.generation, applied = ?o.applied, not_applied = ?o.not_applied, "configuration reloaded");
            }
            Err(e) => {
                METRICS.reloads.with_label_values(&["failed"]).inc();
                tracing::error!(
                    "configuration reload refused, the previous one keeps serving:\n{e}"
                );
            }
        }
        result
    }
}
