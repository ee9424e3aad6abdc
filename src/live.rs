//! What a reload changes outside the snapshot, and what it cannot change at all.
//!
//! A reload swaps the snapshot: routes, services, limits, the registry's policy and the
//! grace period (the drain reads it when it starts) take effect with it. Two settings live
//! outside it and are applied here: the log level, and the registration listener, which
//! opens, moves or closes as the services that take registrations and `registry.listen`
//! change. The rest is fixed when the process starts (pingora's listeners and threads, the
//! access log's target, the runtime directory, the upstream pool, the registry backend):
//! a reload lists each one whose value in the file differs from the running one as needing
//! a restart. Everything is compared with what runs, never with the previous file, so a
//! change reverted before the next reload is no change.
//! Owns: [`Running`] (the start-up-only settings as this process runs them) and [`Live`].
//! Must not: build snapshots (`snapshot`) or serve the registration API (`registry::listener`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{AccessLogTarget, Config, Listen, RegistryBackend};
use crate::logging::{LevelChange, LogLevel};
use crate::registry::listener::RegistrationListener;

/// The settings a process reads once, when it starts, as this one runs them.
#[derive(Debug, Clone, PartialEq)]
pub struct Running {
    listen: Listen,
    threads: usize,
    runtime_dir: PathBuf,
    upstream_keepalive_pool: usize,
    access_log: AccessLogTarget,
    log_format: crate::config::LogFormat,
    registry_backend: RegistryBackend,
    tracing_queue: usize,
}

impl Running {
    /// What a process started on `config` runs.
    pub fn of(config: &Config) -> Running {
        // `trusted_proxies` is read from each request's (and each proxied connection's)
        // snapshot: a reload applies it, so it is no difference that needs a restart.
        let mut listen = config.listen.clone();
        listen.trusted_proxies.clear();
        Running {
            listen,
            threads: config.server.threads,
            runtime_dir: config.server.runtime_dir.clone(),
            upstream_keepalive_pool: config.server.upstream_keepalive_pool,
            access_log: config.log.access.clone(),
            log_format: config.log.format,
            registry_backend: config.registry.backend.clone(),
            tracing_queue: config.tracing.queue_size,
        }
    }

    /// The settings whose value in `config` differs from the running one, named as in the
    /// file: a restart (or a graceful upgrade) applies them.
    pub fn differences(&self, config: &Config) -> Vec<&'static str> {
        let file = Running::of(config);
        let mut differ = Vec::new();
        let mut check = |name: &'static str, same: bool| {
            if !same {
                differ.push(name);
            }
        };
        check("listen", file.listen == self.listen);
        check("server.threads", file.threads == self.threads);
        check("server.runtime_dir", file.runtime_dir == self.runtime_dir);
        check(
            "server.upstream_keepalive_pool",
            file.upstream_keepalive_pool == self.upstream_keepalive_pool,
        );
        check("log.access", file.access_log == self.access_log);
        check("log.format", file.log_format == self.log_format);
        check(
            "registry.backend",
            file.registry_backend == self.registry_backend,
        );
        check(
            "tracing.queue_size",
            file.tracing_queue == self.tracing_queue,
        );
        differ
    }
}

/// Where `config` wants the registration API: `registry.listen` when some service takes
/// registrations, else nowhere (a node that takes none opens no port for them).
pub fn registration_addr(config: &Config) -> Option<SocketAddr> {
    config
        .services
        .iter()
        .any(|s| s.registration)
        .then_some(config.registry.listen)
}

/// What a reload did beside swapping the snapshot.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Settings outside routes and services that now run with the file's value.
    pub applied: Vec<&'static str>,
    /// Settings whose value in the file differs from the running one and needs a restart.
    pub needs_restart: Vec<&'static str>,
}

/// The running process's settings outside the snapshot.
pub struct Live {
    running: Running,
    /// `None` when busbar did not install the log subscriber (a test process).
    log: Option<LogLevel>,
    /// The registration API's socket.
    pub registration: Arc<RegistrationListener>,
}

impl Live {
    /// The live settings of a process started on `config`, whose log level is `log` and
    /// whose registration socket (already opened, or to be opened) is `registration`.
    pub fn new(
        config: &Config,
        log: Option<LogLevel>,
        registration: Arc<RegistrationListener>,
    ) -> Live {
        Live {
            running: Running::of(config),
            log,
            registration,
        }
    }

    /// Brings the live settings to `new`'s, `old` being the configuration that runs. The
    /// registration socket is bound first, as the one step that can fail: an error
    /// changes nothing and refuses the reload.
    pub fn apply(&self, old: &Config, new: &Config) -> Result<Applied, String> {
        let mut applied = Vec::new();
        let want = registration_addr(new);
        match self.registration.set(want) {
            Ok(false) => {}
            // The service logs where it listens now.
            Ok(true) => applied.push("registry.listen"),
            Err(e) => {
                let addr = want.map_or_else(String::new, |a| a.to_string());
                return Err(format!(
                    "{}: registry.listen: cannot listen on {addr}: {e}",
                    new.source.display()
                ));
            }
        }
        if let Some(log) = &self.log {
            match log.set(&new.log.level) {
                Ok(LevelChange::Applied) => applied.push("log.level"),
                Ok(LevelChange::Same) => {}
                Ok(LevelChange::Overridden) => {
                    if new.log.level != old.log.level {
                        tracing::warn!(
                            "log.level is not applied: {} decides the level",
                            crate::logging::FILTER_ENV
                        );
                    }
                }
                Err(e) => tracing::warn!("log.level is not applied: {e}"),
            }
        }
        if new.server.grace_period != old.server.grace_period {
            applied.push("server.grace_period");
        }
        // Read from the snapshot by each admin call.
        if new.admin != old.admin {
            applied.push("admin.open_reads");
        }
        Ok(Applied {
            applied,
            needs_restart: self.running.differences(new),
        })
    }
}
