//! Which version each instance of an instance set runs, precomputed when the set is
//! built, so the version filter in the pick is an index compare and the per-version
//! metrics are pre-resolved handles.
//!
//! Must not: allocate, lock or format on the request path.

use std::sync::Arc;

use prometheus::IntCounter;

use crate::config::ServiceConfig;
use crate::metrics::{class_index, METRICS};
use crate::model::Instance;

/// Which instances a pick may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Want {
    /// Any version.
    #[default]
    Any,
    /// Only instances of this version (an index into the set's [`VersionIndex`]).
    Only(u16),
}

/// Versions of one instance set.
#[derive(Debug, Default)]
pub struct VersionIndex {
    /// Distinct versions; `""` for instances that name none.
    names: Vec<Arc<str>>,
    /// Per instance (same order as the set), its index in `names`.
    of_instance: Vec<u16>,
    /// `busbar_version_requests_total{service,version,class}` per version.
    by_class: Vec<[IntCounter; 5]>,
}

/// An instance's version: what it registered with, else its endpoint's `version`.
fn version_of<'a>(service: &'a ServiceConfig, i: &'a Instance) -> &'a str {
    match &i.registration {
        Some(r) => r.version.as_deref().unwrap_or(""),
        None => service
            .endpoints
            .iter()
            .find(|e| match (&i.dns, &e.dns) {
                (Some(name), Some(d)) => d.text == *name,
                _ => e.addr == Some(i.addr),
            })
            .and_then(|e| e.version.as_deref())
            .unwrap_or(""),
    }
}

impl VersionIndex {
    /// Built with the instance set (when instances change, not per request).
    pub fn new(service: &ServiceConfig, instances: &[Arc<Instance>]) -> Self {
        let mut names: Vec<Arc<str>> = Vec::new();
        let mut of_instance = Vec::with_capacity(instances.len());
        for i in instances {
            let v = version_of(service, i);
            let idx = match names.iter().position(|n| &**n == v) {
                Some(p) => p,
                None => {
                    names.push(Arc::from(v));
                    names.len() - 1
                }
            };
            of_instance.push(idx.min(u16::MAX as usize) as u16);
        }
        let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        let by_class = names
            .iter()
            .map(|v| {
                classes.map(|c| {
                    METRICS
                        .version_requests
                        .with_label_values(&[service.name.as_str(), v, c])
                })
            })
            .collect();
        VersionIndex {
            names,
            of_instance,
            by_class,
        }
    }

    /// The index of a version, if any instance of the set runs it.
    #[inline]
    pub fn find(&self, version: &str) -> Option<u16> {
        self.names
            .iter()
            .position(|n| &**n == version)
            .map(|p| p as u16)
    }

    /// May a pick that wants `want` take instance `i`?
    #[inline]
    pub fn admits(&self, i: usize, want: Want) -> bool {
        match want {
            Want::Any => true,
            Want::Only(v) => self.of_instance.get(i) == Some(&v),
        }
    }

    /// The version instance `i` runs (`""`: none named).
    pub fn name_of(&self, i: usize) -> &str {
        self.of_instance
            .get(i)
            .and_then(|&v| self.names.get(v as usize))
            .map_or("", |n| n)
    }

    /// Counts a response of instance `i` in `busbar_version_requests_total`.
    #[inline]
    pub fn count(&self, i: usize, status: u16) {
        if let Some(m) = self
            .of_instance
            .get(i)
            .and_then(|&v| self.by_class.get(v as usize))
        {
            m[class_index(status)].inc();
        }
    }
}
