//! Configuration: TOML file → validated [`Config`].
//!
//! Owns: reading, parsing and validating `busbar.toml`; every error names file:line:col.
//! Must not: touch runtime state; building snapshots from a `Config` is `snapshot`'s job.

pub mod address;
mod admission;
mod auth;
mod cluster;
mod dns;
mod error;
mod file;
mod mesh;
mod model;
mod registry;
mod release;
pub mod runtime_dir;
mod tls;
mod tracing;
mod translate;
mod upstream_tls;
mod validate;

pub use admission::{
    parse_rate, IdentitySource, LimitScope, QueuePolicy, Rate, RateLimitConfig, RouteAdmission,
    DEFAULT_IDENTITY_HEADER,
};
pub use auth::{ApiKey, AuthConfig, JwtIssuer, JwtKey};
pub use cluster::{ClusterConfig, RedisTarget};
pub use dns::{DnsConfig, DnsName};
pub use error::{ConfigError, ConfigErrors};
pub use mesh::{MeshConfig, PathPreference, DEFAULT_HOLD_DOWN};
pub use model::*;
pub use registry::{RegistryBackend, RegistryConfig, RegistryToken, MAX_TTL, MIN_TTL};
pub use release::{
    check_version, parse_split_json, RuleMatch, SplitConfig, SplitRule, Splits, USER_BUCKETS,
};
pub use tls::{dns_names, load_identity, valid_server_name, SniCerts, TlsError};
pub use tracing::{sample_below, OtlpEndpoint, TracingConfig, DEFAULT_QUEUE_SIZE};
pub use translate::{Translations, DEFAULT_DENY_UNKNOWN_FIELDS, DEFAULT_EMIT_DEFAULTS};
pub use upstream_tls::UpstreamTls;
pub use validate::{valid_identifier, Purpose};

use std::path::Path;

/// Reads and validates a configuration file to run with. All problems are reported at once.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    parse(path, &read(path)?)
}

/// Parses and validates configuration text to run with; `path` names it in errors and
/// anchors relative paths.
pub fn parse(path: &Path, src: &str) -> Result<Config, ConfigErrors> {
    validate::validate(path, src)
}

/// What `busbar check` found in one file.
pub struct CheckReport {
    /// The file's own problems refuse it, as they would `busbar run`.
    pub result: Result<Config, ConfigErrors>,
    /// What this host could not confirm: names that do not resolve here, secrets not in
    /// this environment. `busbar run` refuses the file while they remain.
    pub warnings: Vec<ConfigError>,
}

/// Validates a file without needing the production host: see [`Purpose::Check`].
pub fn check(path: &Path) -> CheckReport {
    match read(path) {
        Ok(src) => {
            let (result, warnings) = validate::validate_for(path, &src, Purpose::Check);
            CheckReport { result, warnings }
        }
        Err(e) => CheckReport {
            result: Err(e),
            warnings: Vec::new(),
        },
    }
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.display().to_string(),
            line: 0,
            col: 0,
            context: String::new(),
            message: format!("cannot read: {e}"),
        }])
    })
}

/// The admin API address a configuration file names (`listen.admin`, else the default),
/// read without validating the rest: `busbar reload` and `busbar status` run in a shell
/// that may lack the secrets the file's `token_env` and `secret_env` name.
pub fn admin_address(path: &Path) -> Result<std::net::SocketAddr, ConfigErrors> {
    validate::admin_address(path, &read(path)?)
}
