//! Gray release: which version of a service a request goes to, and changing that at run
//! time.
//!
//! Owns: the effective split of each route (the admin override when there is one, else
//! the file's `[route.split]`), choosing a version per request (rules, then weights
//! sticky per user, then stable), the fallback to stable, share counters, the override
//! file and its etcd sync, and the config history with its rollback.
//! Must not: pick instances (the balancer does, with [`Want`] in its eligibility
//! test), await anything on the request path, or rewrite the user's config file.

pub mod admin;
pub mod history;
pub mod persist;
pub mod sync;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::header::COOKIE;
use http::HeaderMap;
use prometheus::IntCounter;

use crate::config::{Config, RegistryBackend, RuleMatch, SplitConfig, USER_BUCKETS};
use crate::metrics::METRICS;
use crate::model::balance::hash_key;
use crate::model::InstanceSet;

pub use crate::model::versions::{VersionIndex, Want};

/// The override file, under `server.runtime_dir`.
pub const OVERRIDE_FILE: &str = "busbar-releases.json";

/// Why a release change did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{0}")]
    Invalid(String),
    #[error("no route \"{0}\"")]
    NoRoute(String),
    #[error("the release store (etcd) is unavailable: {0}")]
    Unavailable(String),
}

/// Where a route's effective split comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `[route.split]` in the config file.
    File,
    /// Set through the admin API (here or on another node).
    Override,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::File => "file",
            Origin::Override => "override",
        }
    }
}

/// A split compiled for the request path, with what it has served since it applied.
#[derive(Debug)]
pub struct Split {
    pub config: SplitConfig,
    pub origin: Origin,
    pub since: SystemTime,
    /// Versions the split names, stable first.
    versions: Vec<String>,
    /// (version index, matcher), in order.
    rules: Vec<(u16, RuleMatch)>,
    /// (bucket upper bound, version index): a user in bucket b takes the first with b < bound.
    weights: Vec<(u8, u16)>,
    /// Requests served per version, and a last slot for "another version" (last resort).
    served: Vec<AtomicU64>,
    fallbacks: AtomicU64,
    fallback_metric: IntCounter,
}

/// What a split looks at in a request.
pub struct Facts<'a> {
    pub headers: &'a HeaderMap,
    pub client_ip: Option<IpAddr>,
    /// The user admission identified, if any.
    pub user: Option<&'a str>,
}

impl Facts<'_> {
    /// The user's bucket: the identity when admission found one, else the client
    /// address, so one user keeps one version.
    fn bucket(&self) -> u8 {
        let h = match (self.user, self.client_ip) {
            (Some(u), _) => hash_key(u.as_bytes()),
            (None, Some(IpAddr::V4(ip))) => hash_key(&ip.octets()),
            (None, Some(IpAddr::V6(ip))) => hash_key(&ip.octets()),
            (None, None) => hash_key(b""),
        };
        // The high half: the sticky balancer's ring uses the whole hash of its own key.
        ((h >> 32) % u64::from(USER_BUCKETS)) as u8
    }

    fn cookie(&self, name: &str) -> Option<&[u8]> {
        self.headers.get_all(COOKIE).iter().find_map(|v| {
            v.as_bytes().split(|&b| b == b';').find_map(|pair| {
                let pair = pair.trim_ascii_start();
                let eq = pair.iter().position(|&b| b == b'=')?;
                let (k, val) = pair.split_at(eq);
                (k == name.as_bytes()).then(|| val.get(1..).unwrap_or_default())
            })
        })
    }
}

impl Split {
    pub fn new(route: &str, config: SplitConfig, origin: Origin) -> Split {
        let versions: Vec<String> = config.versions().into_iter().map(String::from).collect();
        let idx = |v: &str| versions.iter().position(|x| x == v).unwrap_or(0) as u16;
        let rules = config
            .rules
            .iter()
            .map(|r| (idx(&r.version), r.when.clone()))
            .collect();
        let mut bound = 0u8;
        let weights = config
            .weights
            .iter()
            .map(|(v, w)| {
                bound = bound.saturating_add(*w).min(USER_BUCKETS);
                (bound, idx(v))
            })
            .collect();
        let served = (0..=versions.len()).map(|_| AtomicU64::new(0)).collect();
        Split {
            rules,
            weights,
            served,
            fallbacks: AtomicU64::new(0),
            fallback_metric: METRICS.release_fallback.with_label_values(&[route]),
            versions,
            config,
            origin,
            since: SystemTime::now(),
        }
    }

    /// The version for this request (index into the split's versions; 0 is stable).
    pub fn choose(&self, f: &Facts<'_>) -> u16 {
        let mut bucket = None;
        for (v, m) in &self.rules {
            let hit = match m {
                RuleMatch::Header(name, value) => f
                    .headers
                    .get_all(name)
                    .iter()
                    .any(|h| h.as_bytes() == value.as_bytes()),
                RuleMatch::Cookie(name, value) => f.cookie(name) == Some(value.as_bytes()),
                RuleMatch::Users(users) => f
                    .user
                    .is_some_and(|u| users.binary_search_by(|x| x.as_str().cmp(u)).is_ok()),
                RuleMatch::UserHash { from, to } => {
                    let b = *bucket.get_or_insert_with(|| f.bucket());
                    (*from..*to).contains(&b)
                }
                // Canonical: a `[::]` listener's `::ffff:a.b.c.d` is the IPv4 client.
                RuleMatch::ClientCidr(nets) => f
                    .client_ip
                    .is_some_and(|ip| nets.iter().any(|n| n.contains(&ip.to_canonical()))),
            };
            if hit {
                return *v;
            }
        }
        if self.weights.is_empty() {
            return 0;
        }
        let b = bucket.unwrap_or_else(|| f.bucket());
        self.weights
            .iter()
            .find(|(bound, _)| b < *bound)
            .map_or(0, |(_, v)| *v)
    }

    /// (version, requests served) since the split applied; `"*other"` counts requests that
    /// went to another version because neither theirs nor stable had an instance.
    pub fn served(&self) -> Vec<(&str, u64)> {
        self.versions
            .iter()
            .map(String::as_str)
            .chain(std::iter::once("*other"))
            .zip(self.served.iter().map(|c| c.load(Relaxed)))
            .collect()
    }

    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Relaxed)
    }
}

/// Which step of the pick found the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Step {
    /// The version chosen for the request (or any, without a split).
    #[default]
    Chosen,
    /// Stable, because the chosen version had no instance to take it.
    Stable,
    /// Any version, because stable had none either: a split never fails a request.
    Any,
}

/// One request's release decision, kept in its context.
#[derive(Debug, Default)]
pub struct RequestRelease {
    split: Option<Arc<Split>>,
    /// The split's version chosen (0: stable).
    chosen: u16,
    /// The chosen and stable versions in the request's instance set; `None` when no
    /// instance runs them.
    target: Option<u16>,
    stable: Option<u16>,
    /// The instance of the last pick, and the split's version slot it counts for.
    served: Option<(usize, usize)>,
    fell_back: bool,
}

impl RequestRelease {
    /// Picks with `pick(want)`: the chosen version, else stable, else any version.
    #[inline]
    pub fn pick(&self, pick: impl Fn(Want) -> Option<usize>) -> Option<(usize, Step)> {
        if self.split.is_none() {
            return pick(Want::Any).map(|i| (i, Step::Chosen));
        }
        if let Some(i) = self.target.and_then(|t| pick(Want::Only(t))) {
            return Some((i, Step::Chosen));
        }
        if self.chosen != 0 {
            if let Some(i) = self.stable.and_then(|s| pick(Want::Only(s))) {
                return Some((i, Step::Stable));
            }
        }
        pick(Want::Any).map(|i| (i, Step::Any))
    }

    /// Records the instance picked; a fallback is counted once per request.
    pub fn note(&mut self, set: &InstanceSet, instance: usize, step: Step) {
        let Some(split) = &self.split else {
            self.served = Some((instance, 0));
            return;
        };
        let slot = match step {
            Step::Chosen => self.chosen as usize,
            Step::Stable => 0,
            Step::Any => {
                let v = set.versions.name_of(instance);
                split
                    .versions
                    .iter()
                    .position(|x| x == v)
                    .unwrap_or(split.versions.len())
            }
        };
        if step != Step::Chosen && !self.fell_back {
            self.fell_back = true;
            split.fallbacks.fetch_add(1, Relaxed);
            split.fallback_metric.inc();
        }
        self.served = Some((instance, slot));
    }

    /// The index (in the request's instance set) of the instance that served the
    /// request, until [`RequestRelease::finish`].
    pub fn served_instance(&self) -> Option<usize> {
        self.served.map(|(i, _)| i)
    }

    /// Counts the response by version (metrics and the split's live share).
    pub fn finish(&mut self, set: Option<&InstanceSet>, status: u16) {
        let Some((instance, slot)) = self.served.take() else {
            return;
        };
        if let (Some(set), true) = (set, status > 0) {
            set.versions.count(instance, status);
        }
        if let Some(c) = self.split.as_ref().and_then(|s| s.served.get(slot)) {
            c.fetch_add(1, Relaxed);
        }
    }
}

/// Overrides by route name.
pub type Overrides = BTreeMap<String, SplitConfig>;

/// Every route's effective split and the overrides that make it.
pub struct Releases {
    active: ArcSwap<HashMap<String, Arc<Split>>>,
    overrides: Mutex<Overrides>,
    /// Where overrides are persisted on this node.
    pub file: PathBuf,
    /// With `[registry] backend = "etcd"`: overrides are shared through it.
    pub cluster: Option<Arc<sync::ReleaseEtcd>>,
}

impl Releases {
    /// Loads the override file; a bad file is reported and ignored.
    pub fn open(config: &Config) -> Releases {
        let file = config.server.runtime_dir.join(OVERRIDE_FILE);
        let overrides = match persist::load(&file) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(path = %file.display(), "release overrides ignored: {e}");
                Overrides::new()
            }
        };
        if !overrides.is_empty() {
            tracing::info!(n = overrides.len(), path = %file.display(), "release overrides restored");
        }
        let cluster = match &config.registry.backend {
            RegistryBackend::Embedded => None,
            RegistryBackend::Etcd { endpoints, prefix } => Some(Arc::new(sync::ReleaseEtcd::new(
                endpoints.clone(),
                sync::releases_prefix(prefix),
            ))),
        };
        Releases {
            active: ArcSwap::from_pointee(HashMap::new()),
            overrides: Mutex::new(overrides),
            file,
            cluster,
        }
    }

    /// The request's version decision. Cheap when no route splits: one atomic load.
    #[inline]
    pub fn begin(&self, route: &str, set: Option<&InstanceSet>, f: &Facts<'_>) -> RequestRelease {
        let active = self.active.load();
        if active.is_empty() {
            return RequestRelease::default();
        }
        let Some(split) = active.get(route) else {
            return RequestRelease::default();
        };
        let chosen = split.choose(f);
        let find = |v: u16| {
            let name = split.versions.get(v as usize)?;
            set?.versions.find(name)
        };
        RequestRelease {
            chosen,
            target: find(chosen),
            stable: find(0),
            split: Some(split.clone()),
            served: None,
            fell_back: false,
        }
    }

    /// The effective splits, by route.
    pub fn active(&self) -> Arc<HashMap<String, Arc<Split>>> {
        self.active.load_full()
    }

    pub fn overrides(&self) -> Overrides {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Overrides> {
        self.overrides.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the functions below need of the running node. The runtime's `State` is one; a
/// release module that took the `State` itself would import the layer above it.
pub trait Running {
    /// The splits and their run-time overrides.
    fn releases(&self) -> &Releases;
    /// The config history, where override changes are recorded.
    fn history(&self) -> &history::History;
    /// The configuration now serving.
    fn config(&self) -> Arc<Config>;
}

/// Recomputes the effective splits from the current snapshot and the overrides. A split
/// whose config did not change keeps its counters.
pub fn refresh(node: &dyn Running) {
    let releases = node.releases();
    let overrides = releases.lock();
    // Loaded under the lock: the last refresh always sees the newest snapshot.
    let current = node.config();
    let old = releases.active.load();
    let mut next = HashMap::new();
    for r in &current.routes {
        let (config, origin) = match overrides.get(&r.name) {
            Some(o) => (o, Origin::Override),
            None => match current.splits.get(&r.name) {
                Some(s) => (s, Origin::File),
                None => continue,
            },
        };
        let split = match old.get(&r.name) {
            Some(s) if s.config == *config && s.origin == origin => s.clone(),
            _ => Arc::new(Split::new(&r.name, config.clone(), origin)),
        };
        next.insert(r.name.clone(), split);
    }
    releases.active.store(Arc::new(next));
}

/// Applies overrides on this node (from the admin API, the cluster, or a config
/// rollback): persists them, refreshes, and records the change in the history.
/// `set` replaces the named routes' overrides (`None` removes one); with `replace_all`,
/// routes not named lose theirs.
pub fn apply_local(
    node: &dyn Running,
    changes: &[(String, Option<SplitConfig>)],
    replace_all: bool,
    source: &'static str,
) {
    let changed = {
        let mut o = node.releases().lock();
        let before = o.clone();
        if replace_all {
            o.clear();
        }
        for (route, split) in changes {
            match split {
                Some(s) => o.insert(route.clone(), s.clone()),
                None => o.remove(route),
            };
        }
        let changed = *o != before;
        if changed {
            if let Err(e) = persist::save(&node.releases().file, &o) {
                tracing::warn!(path = %node.releases().file.display(), "release overrides not written: {e}");
            }
        }
        changed
    };
    if !changed {
        return;
    }
    refresh(node);
    METRICS.release_changes.with_label_values(&[source]).inc();
    tracing::info!(source, routes = ?changes.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(), "release overrides applied");
    node.history()
        .record_releases(source, node.releases().overrides());
}

/// Changes overrides everywhere they apply: etcd first in a cluster (so every node,
/// this one included, sees the same), then this node at once.
pub async fn apply(
    node: &(dyn Running + Sync),
    changes: Vec<(String, Option<SplitConfig>)>,
    source: &'static str,
) -> Result<(), ReleaseError> {
    if let Some(etcd) = &node.releases().cluster {
        for (route, split) in &changes {
            etcd.write(route, split.as_ref()).await?;
        }
    }
    apply_local(node, &changes, false, source);
    Ok(())
}

/// Called once the first snapshot exists: effective splits and the first history entry.
pub fn started(node: &dyn Running) {
    refresh(node);
    let path = node.config().source.clone();
    match std::fs::read_to_string(&path) {
        Ok(text) => node
            .history()
            .record_text("start", &text, node.releases().overrides()),
        Err(e) => tracing::warn!(path = %path.display(), "config history starts empty: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(json: &str) -> Split {
        let c = crate::config::parse_split_json(json.as_bytes()).unwrap();
        Split::new("t", c, Origin::File)
    }

    fn facts<'a>(h: &'a HeaderMap, user: Option<&'a str>) -> Facts<'a> {
        Facts {
            headers: h,
            client_ip: Some([10, 1, 2, 3].into()),
            user,
        }
    }

    #[test]
    fn weights_are_sticky_and_close_to_their_share() {
        let s = split(r#"{"stable":"v1","weights":{"v2":10}}"#);
        let h = HeaderMap::new();
        let mut canary = 0;
        for i in 0..10_000 {
            let u = format!("user-{i}");
            let v = s.choose(&facts(&h, Some(&u)));
            assert_eq!(v, s.choose(&facts(&h, Some(&u))), "{u} flipped");
            canary += usize::from(v == 1);
        }
        assert!((900..1100).contains(&canary), "{canary}");
    }

    #[test]
    fn widening_a_canary_keeps_its_users() {
        let narrow = split(r#"{"stable":"v1","weights":{"v2":5}}"#);
        let wide = split(r#"{"stable":"v1","weights":{"v2":20}}"#);
        let h = HeaderMap::new();
        for i in 0..2000 {
            let u = format!("u{i}");
            if narrow.choose(&facts(&h, Some(&u))) == 1 {
                assert_eq!(wide.choose(&facts(&h, Some(&u))), 1, "{u}");
            }
        }
    }

    #[test]
    fn rules_come_before_weights_in_order() {
        let s = split(
            r#"{"stable":"v1","weights":{"v2":100},"rules":[
                {"version":"v1","header":{"name":"x-canary","value":"never"}},
                {"version":"v3","cookie":{"name":"c","value":"3"}},
                {"version":"v3","users":["alice"]},
                {"version":"v4","client_cidr":["10.1.0.0/16"]}]}"#,
        );
        let ver =
            |h: &HeaderMap, u: Option<&str>| s.versions[s.choose(&facts(h, u)) as usize].clone();
        let mut h = HeaderMap::new();
        assert_eq!(ver(&h, Some("alice")), "v3");
        assert_eq!(ver(&h, Some("bob")), "v4");
        h.insert("cookie", "a=1; c=3".parse().unwrap());
        assert_eq!(ver(&h, None), "v3");
        h.insert("x-canary", "never".parse().unwrap());
        assert_eq!(ver(&h, Some("alice")), "v1");
        let no_ip = Facts {
            headers: &HeaderMap::new(),
            client_ip: None,
            user: Some("bob"),
        };
        assert_eq!(s.versions[s.choose(&no_ip) as usize], "v2");
        let mapped = Facts {
            headers: &HeaderMap::new(),
            client_ip: Some("::ffff:10.1.2.3".parse().unwrap()),
            user: Some("bob"),
        };
        assert_eq!(s.versions[s.choose(&mapped) as usize], "v4", "IPv4-mapped");
    }

    #[test]
    fn user_hash_range_matches_the_weight_buckets() {
        let hashed =
            split(r#"{"stable":"v1","rules":[{"version":"v2","user_hash":{"from":0,"to":10}}]}"#);
        let weighted = split(r#"{"stable":"v1","weights":{"v2":10}}"#);
        let h = HeaderMap::new();
        for i in 0..2000 {
            let u = format!("u{i}");
            assert_eq!(
                hashed.choose(&facts(&h, Some(&u))),
                weighted.choose(&facts(&h, Some(&u)))
            );
        }
    }

    #[test]
    fn pick_falls_back_to_stable_then_any() {
        let r = RequestRelease {
            split: Some(Arc::new(split(r#"{"stable":"v1","weights":{"v2":100}}"#))),
            chosen: 1,
            target: Some(1),
            stable: Some(0),
            served: None,
            fell_back: false,
        };
        assert_eq!(
            r.pick(|w| (w == Want::Only(1)).then_some(7)),
            Some((7, Step::Chosen))
        );
        assert_eq!(
            r.pick(|w| (w == Want::Only(0)).then_some(3)),
            Some((3, Step::Stable))
        );
        assert_eq!(
            r.pick(|w| (w == Want::Any).then_some(5)),
            Some((5, Step::Any))
        );
        assert_eq!(r.pick(|_| None), None);
        let none = RequestRelease::default();
        assert_eq!(
            none.pick(|w| (w == Want::Any).then_some(2)),
            Some((2, Step::Chosen))
        );
    }
}
