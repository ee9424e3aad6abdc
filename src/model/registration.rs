//! What an instance said about itself when it registered: the record the registry store
//! keeps, persists and syncs, and that [`super::Instance`] carries.
//!
//! Must not: hold run-time state (health and sidecar state are the instance's).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// What an instance said about itself when it registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub service: String,
    pub id: String,
    pub address: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SocketAddr>,
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    pub ttl_secs: u64,
    /// The instance said whether it speaks TLS (`"tls": true`): reached over TLS with its
    /// service's `[service.tls]` settings. `None`: it did not say (its service's
    /// `protocol` decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
}
