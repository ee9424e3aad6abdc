//! The `[mesh]` section and the per-service path preference: busbar as the mesh's
//! fallback when sidecars are down.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::validate::Validator;

/// A recovered sidecar (or app port) must pass probes this long before traffic returns to
/// it, so a flapping sidecar does not drag traffic back and forth.
pub const DEFAULT_HOLD_DOWN: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshFile {
    pub enabled: Option<Spanned<bool>>,
    pub domains: Option<Vec<Spanned<String>>>,
}

/// Caller-side fallback: route by service name in `Host` / `:authority` / absolute-form
/// requests when no TOML route matches, and tunnel `CONNECT` to registered services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    pub enabled: bool,
    /// Suffixes stripped from a host to find a service: `orders.svc.cluster.local` → `orders`.
    /// Stored lower-case with a leading dot.
    pub domains: Vec<String>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            enabled: true,
            domains: vec![".svc.cluster.local".to_string()],
        }
    }
}

/// Which path to an instance with a sidecar is tried first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathPreference {
    Sidecar,
    Direct,
}

impl PathPreference {
    pub fn as_str(self) -> &'static str {
        match self {
            PathPreference::Sidecar => "sidecar",
            PathPreference::Direct => "direct",
        }
    }
}

impl Validator<'_> {
    pub(super) fn mesh(&mut self, f: Option<&MeshFile>) -> MeshConfig {
        let Some(f) = f else {
            return MeshConfig::default();
        };
        let mut domains = Vec::new();
        match &f.domains {
            None => domains = MeshConfig::default().domains,
            Some(list) => {
                for d in list {
                    let v = d.get_ref().trim_start_matches('.').to_ascii_lowercase();
                    if v.is_empty()
                        || !v
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                    {
                        self.err(
                            d.span(),
                            "[mesh]",
                            "a domain is a name like \"svc.cluster.local\"",
                        );
                        continue;
                    }
                    domains.push(format!(".{v}"));
                }
            }
        }
        MeshConfig {
            enabled: f.enabled.as_ref().is_none_or(|e| *e.get_ref()),
            domains,
        }
    }

    pub(super) fn path_preference(
        &mut self,
        prefer: &Option<Spanned<String>>,
        hold_down: &Option<Spanned<String>>,
        ctx: &str,
    ) -> (PathPreference, Duration) {
        let p = match prefer.as_ref().map(|p| p.get_ref().as_str()) {
            None | Some("sidecar") => PathPreference::Sidecar,
            Some("direct") => PathPreference::Direct,
            Some(_) => {
                let span = prefer.as_ref().map_or(0..0, |p| p.span());
                self.err(span, ctx, "prefer must be \"sidecar\" or \"direct\"");
                PathPreference::Sidecar
            }
        };
        (p, self.duration(hold_down, ctx, DEFAULT_HOLD_DOWN))
    }
}
