//! The one place that wires busbar together: listeners, the proxy, the admin API and
//! every background task, in order. Read this file to learn the system.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use pingora_core::apps::HttpServerOptions;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service as ListeningService;

use crate::accesslog::{self, AccessLog};
use crate::admin::{AdminApi, TOKEN_ENV};
use crate::cluster::etcd::{Etcd, EtcdWatch};
use crate::config::address::OwnListeners;
use crate::config::{Config, RegistryBackend};
use crate::drivers::pingora::BusbarProxy;
use crate::edge::Edge;
use crate::health::checker::HealthChecker;
use crate::listeners::DrainedListeners;
use crate::live::Live;
use crate::metrics::METRICS;
use crate::phases::Phases;
use crate::registry::api::{Embedded, RegistrationApi, Writer};
use crate::registry::gate::{Gate, Source};
use crate::registry::listener::{RegistrationListener, RegistrationService};
use crate::registry::persist;
use crate::registry::store::{Store, StorePolicy};
use crate::registry::sync::RegistrySync;
use crate::snapshot::State;
use crate::supervisor::supervised;

/// How long pingora's runtimes get to stop once busbar has drained.
const RUNTIME_SHUTDOWN_SECONDS: u64 = 1;
/// pingora's own grace period, a backstop only: busbar's drain ([`Drain`]) ends the
/// process after the grace period that runs when the drain starts, which a reload may
/// have raised above the one busbar started with.
const PINGORA_GRACE_SECONDS: u64 = 24 * 3600;

pub struct RunOptions {
    /// Take the listening sockets over from a running busbar (graceful upgrade).
    pub upgrade: bool,
    /// The log level a reload changes (`None`: busbar did not install the subscriber).
    pub log: Option<crate::logging::LogLevel>,
    /// Gives the memory the allocator holds freed back to the OS; busbar's housekeeping
    /// calls it once a second, with `true` (all of it at once, not only what is due) when
    /// a spike of connections is over (`base::memory::AfterSpike`). The binary chooses
    /// the allocator, so it says how (`None`: nothing to do).
    pub release_memory: Option<fn(bool)>,
}

/// Builds and runs the server; returns only on a start-up error.
pub fn run(config: Config, opts: RunOptions) -> anyhow::Result<()> {
    let first_port = config
        .listen
        .http
        .first()
        .or(config.listen.tls.first().map(|t| &t.addr))
        .map_or(0, |a| a.port());
    let runtime_dir = &config.server.runtime_dir;
    // Held until the process exits: a second node on this folder is refused.
    let _state_lock = crate::statedir::claim(runtime_dir, opts.upgrade)?;
    let upgrade_sock = runtime_dir.join(format!("busbar-{first_port}.upgrade.sock"));
    let signals = crate::upgrade::Signals {
        // Read now: after a package upgrade replaced the file, /proc/self/exe no longer
        // names it, and this path names the new binary.
        exe: std::env::current_exe().context("finding busbar's own binary")?,
        config: config.source.clone(),
        upgrade_sock: upgrade_sock.clone(),
    };
    let server_conf = ServerConf {
        threads: config.server.threads,
        work_stealing: false,
        grace_period_seconds: Some(PINGORA_GRACE_SECONDS),
        graceful_shutdown_timeout_seconds: Some(RUNTIME_SHUTDOWN_SECONDS),
        upstream_keepalive_pool_size: config.server.upstream_keepalive_pool,
        // busbar decides retries itself (attempts and budget); this is only pingora's loop bound.
        max_retries: 12,
        pid_file: runtime_dir
            .join(format!("busbar-{first_port}.pid"))
            .display()
            .to_string(),
        upgrade_sock: upgrade_sock.display().to_string(),
        ..Default::default()
    };
    let opt = Opt {
        upgrade: opts.upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf);
    server.bootstrap();

    let access_log =
        Arc::new(AccessLog::open(&config.log.access).context("opening the access log")?);
    let listen = config.listen.clone();
    let registry_conf = config.registry.clone();

    // Every listener is made sure of before anything starts: a certificate that can't be
    // loaded, an address in use or not permitted stops busbar here, naming the file or
    // the address, before it says it started. (pingora would panic on the certificate in
    // the TLS service's thread, and retry a busy port, while the rest served.)
    let mut tls_endpoints = Vec::with_capacity(listen.tls.len());
    for tls in &listen.tls {
        let served = crate::tls::ServedCerts::load(tls)
            .with_context(|| format!("TLS listener {}", tls.addr))?;
        let endpoint = crate::tls::TlsEndpoint::new(Arc::new(served))
            .with_context(|| format!("TLS listener {}", tls.addr))?;
        tls_endpoints.push((tls.addr, Arc::new(endpoint)));
    }
    let registration_addr = crate::live::registration_addr(&config);
    let registration_listener = Arc::new(RegistrationListener::default());
    let own_plaintext = if opts.upgrade {
        Vec::new()
    } else {
        // Bound now and kept: the service endpoint accepts on these sockets, plaintext
        // and TLS (busbar runs the handshake: `tls`).
        let mut own = listen.http.clone();
        own.extend(listen.tls.iter().map(|t| t.addr));
        let bound = crate::listeners::bind_all(&own)
            .map_err(|(addr, e)| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        // pingora binds these itself once running; a bind now proves it can.
        for addr in [listen.admin].into_iter().chain(listen.metrics) {
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr}"))?;
        }
        if let Some(addr) = registration_addr {
            registration_listener
                .set(Some(addr))
                .with_context(|| format!("cannot listen on {addr} (registry.listen)"))?;
        }
        bound
    };

    // 0. The registry's last known instances come first, so a restarted node routes at once.
    //    What this node did not check itself (the snapshot, etcd) passes its address
    //    policy first: no instance at its own listeners or at cloud metadata.
    let own_listeners = OwnListeners::new(&listen, registration_addr);
    let gate = Arc::new(Gate::new(own_listeners.clone()));
    let store = Arc::new(Store::new(StorePolicy {
        renewal_threshold: registry_conf.renewal_threshold,
        max_expiry_share: registry_conf.max_expiry_share,
    }));
    let etcd = match &registry_conf.backend {
        RegistryBackend::Embedded => None,
        RegistryBackend::Etcd { endpoints, prefix } => Some(Etcd::new(
            endpoints.clone(),
            prefix.clone(),
            store.clone(),
            gate.clone(),
        )),
    };
    match persist::load(&registry_conf.snapshot) {
        Ok(instances) => {
            if !instances.is_empty() {
                tracing::info!(n = instances.len(), path = %registry_conf.snapshot.display(), "routing to the registry snapshot's instances");
            }
            for r in instances
                .into_iter()
                .filter(|r| gate.admit(r, Source::Snapshot))
            {
                // With etcd, leases live there: the snapshot's instances wait for the
                // re-list to confirm or remove them rather than expire here.
                if etcd.is_some() {
                    store.upsert_external(r);
                } else {
                    store.restore(r);
                }
            }
        }
        Err(e) => tracing::error!("registry snapshot ignored: {e}"),
    }
    let served = tls_endpoints
        .iter()
        .map(|(addr, e)| (*addr, e.served.clone()))
        .collect();
    let live = Live::new(&config, opts.log, registration_listener.clone(), served);
    let dns_wait = config.dns.start_wait;
    crate::otel::set_queue_size(config.tracing.queue_size);
    let state = Arc::new(State::new(config, store.clone(), live));
    // Endpoints named by host: every address an instance before the first request, or
    // after `[dns] start_wait` without those that did not answer (503 until they do).
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the first DNS lookups")?
        .block_on(crate::registry::dns::resolve_all_once(
            &state, &gate, dns_wait,
        ));

    // 1. The service endpoint: HTTP/1.1 and h2c on each plain port, TLS with ALPN h2
    //    (certificates by SNI name, swapped by a reload: `tls`, `live`).
    //    The front door reads each plaintext request head: CONNECT tunnels to registered
    //    services, the everyday HTTP/1.1 request goes through busbar's own path
    //    (`drivers::h1`), everything else to the pingora driver. Both run `phases`.
    let phases = Arc::new(Phases {
        state: state.clone(),
        access_log: access_log.clone(),
    });
    let mut http_proxy = pingora_proxy::http_proxy(
        &server.configuration,
        BusbarProxy {
            phases: phases.clone(),
        },
    );
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    http_proxy.server_options = Some(options);
    let http_proxy = Arc::new(http_proxy);
    // After --upgrade pingora accepts on every listener: the app reads the PROXY headers
    // of those with `proxy_protocol` and runs the TLS handshakes (`listeners::HandedOver`),
    // so they keep both.
    let handed_over = opts.upgrade.then(|| {
        let plain = listen
            .http
            .iter()
            .filter(|a| listen.proxy_protocol.contains(a))
            .map(|a| (*a, true, None));
        let tls = tls_endpoints
            .iter()
            .map(|(a, e)| (*a, listen.proxy_protocol.contains(a), Some(e.clone())));
        Arc::new(crate::listeners::HandedOver {
            listeners: plain.chain(tls).collect(),
            settings: {
                let state = state.clone();
                Arc::new(move || state.load().config.clone())
            },
        })
    });
    let edge = || Edge {
        proxy: http_proxy.clone(),
        phases: phases.clone(),
        state: state.clone(),
        handed_over: handed_over.clone(),
    };
    let mut proxy = ListeningService::new("busbar proxy".to_string(), edge());
    // busbar accepts on its service ports itself (`listeners`); after --upgrade their
    // sockets arrive as descriptors only pingora can take, so pingora accepts on them.
    if opts.upgrade {
        let tls = tls_endpoints.iter().map(|(a, _)| a);
        for addr in listen.http.iter().chain(tls) {
            // No L4 buffers on plaintext, as on the sockets busbar accepts on itself: a
            // read buffer is 64 KiB per connection (for TLS records; 10,000 idle keep-alive
            // connections cost ~300 MiB), and the front door writes through its own
            // buffer (`Lingering`) and never flushes pingora's, so a small answer left in
            // pingora's 1,460-byte write buffer never reached the client.
            proxy.add_listener(
                ListenerConfig::tcp(addr.to_string()).l4_buffer(L4BufferSettings::unbuffered()),
            );
        }
        tls_endpoints.clear();
    }
    // busbar's own accept loops: a connection costs ~100 bytes of task instead of
    // pingora's ~8 KiB, and a drain answers what the kernel queued before the close.
    // Listeners with `proxy_protocol` read each connection's PROXY header first; TLS
    // ones run the handshake (`tls`).
    let listeners_closed = Arc::new(AtomicBool::new(false));
    let proxy = DrainedListeners::new(
        proxy,
        Arc::new(edge()),
        own_plaintext,
        listeners_closed.clone(),
        (&listen.proxy_protocol, {
            let state = state.clone();
            Arc::new(move || state.load().config.clone())
        }),
        tls_endpoints,
    );

    // 2. The admin API, on its own (loopback by default) listener and thread.
    let token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
    if token.is_none() {
        tracing::warn!(
            "{TOKEN_ENV} is not set: state-changing admin calls are refused, and so are the admin reads unless [admin] open_reads = true"
        );
    }
    let readiness = Arc::new(crate::ready::Readiness::default());
    let mut admin = ListeningService::new(
        "busbar admin".to_string(),
        AdminApi {
            state: state.clone(),
            token,
            refused: gate.clone(),
            readiness: readiness.clone(),
            access_log: access_log.clone(),
        },
    );
    admin.threads = Some(1);
    admin.add_tcp(&listen.admin.to_string());
    // 2b. `listen.metrics`: `/metrics` alone, for a scraper that should not reach the admin API.
    let metrics = listen.metrics.map(|addr| {
        let mut m = ListeningService::new("busbar metrics".to_string(), crate::admin::MetricsApi);
        m.threads = Some(1);
        m.add_tcp(&addr.to_string());
        m
    });

    // 3. The registration API, on its own listener (other hosts must reach it; tokens
    //    guard it) — only while some service takes registrations: a node that has none
    //    opens no port for them. A reload opens, moves or closes it (`live`).
    let writer: Arc<dyn Writer> = match &etcd {
        Some(e) => e.clone(),
        None => Arc::new(Embedded(store)),
    };
    let registration = RegistrationService::new(
        registration_listener,
        RegistrationApi {
            state: state.clone(),
            writer,
            listeners: own_listeners,
            refused: gate.clone(),
        },
        registration_addr.filter(|_| opts.upgrade),
    );

    // 4. Background tasks: health, registry upkeep, endpoint names (DNS), reload on SIGHUP,
    //    access-log reopening (SIGUSR1) and flushing, drain on shutdown.
    let registry_sync = background_service(
        "registry sync",
        RegistrySync {
            state: state.clone(),
        },
    );
    let dns = background_service(
        "dns discovery",
        crate::registry::dns::DnsDiscovery {
            state: state.clone(),
            gate: gate.clone(),
        },
    );
    let health = background_service(
        "health checker",
        HealthChecker {
            state: state.clone(),
        },
    );
    let sighup = background_service(
        "reload on SIGHUP",
        ReloadOnHangup {
            state: state.clone(),
        },
    );
    let admission_sweep = background_service(
        "admission sweep",
        AdmissionSweep {
            state: state.clone(),
            release_memory: opts.release_memory,
        },
    );
    let reopen = background_service(
        "reopen the access log on SIGUSR1",
        accesslog::ReopenOnSignal {
            access_log: access_log.clone(),
        },
    );
    let flusher = background_service(
        "access log flusher",
        Drain {
            access_log,
            state: state.clone(),
            listeners_closed,
        },
    );

    // Every service is supervised: one that dies by a panic ends the process.
    server.add_service(supervised(proxy));
    server.add_service(supervised(admin));
    if let Some(m) = metrics {
        server.add_service(supervised(m));
    }
    if registration_addr.is_none() {
        tracing::info!(
            "no service takes registrations: the registration API opens when a reload adds one"
        );
    }
    server.add_service(supervised(registration));
    server.add_service(supervised(registry_sync));
    if let Some(e) = etcd {
        server.add_service(supervised(background_service("etcd watch", EtcdWatch(e))));
        // Gray-release overrides are shared through the same etcd.
        server.add_service(supervised(background_service(
            "release sync",
            crate::release::sync::ReleaseSync {
                state: state.clone(),
            },
        )));
    }
    server.add_service(supervised(dns));
    server.add_service(supervised(health));
    server.add_service(supervised(sighup));
    server.add_service(supervised(admission_sweep));
    server.add_service(supervised(background_service(
        "redis upkeep",
        crate::cluster::redis::RedisUpkeep {
            current: {
                let state = state.clone();
                Box::new(move || state.load().admission.stores().redis())
            },
        },
    )));
    server.add_service(supervised(reopen));
    server.add_service(supervised(flusher));
    // Sampled spans to the `[tracing]` collector; idle while nothing is sampled.
    server.add_service(supervised(background_service(
        "span export",
        crate::otel::export::SpanExport {
            state: state.clone(),
        },
    )));
    // Ready (`/readyz`, systemd's READY=1) once every listener accepts.
    let mut probed = listen.http.clone();
    probed.push(listen.admin);
    probed.extend(registration_addr);
    server.add_service(supervised(background_service(
        "readiness",
        crate::ready::ReadyWatch {
            readiness,
            addrs: probed,
        },
    )));
    tracing::info!(http = ?listen.http, tls = ?listen.tls.iter().map(|t| t.addr).collect::<Vec<_>>(), admin = %listen.admin, registration = ?registration_addr, via = crate::via::node().id(), "busbar started");
    // pingora's signals, and SIGUSR2: a graceful upgrade started from inside (`upgrade`).
    server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
    std::process::exit(0)
}

/// Evicts idle rate-limit cells and samples queue gauges, so per-user state stays bounded;
/// samples the upstream pool's idle connections per service; and lets the allocator give
/// back what it freed, so a spike of connections does not stay in RSS once it is over.
struct AdmissionSweep {
    state: Arc<State>,
    /// [`RunOptions::release_memory`].
    release_memory: Option<fn(bool)>,
}

#[async_trait]
impl BackgroundService for AdmissionSweep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(crate::admission::SWEEP_EVERY);
        let mut spike = crate::base::memory::AfterSpike::default();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    let snapshot = self.state.load();
                    snapshot.admission.stores().sweep();
                    crate::drivers::h1::pool::sample(&snapshot);
                    if let Some(release) = self.release_memory {
                        let all = spike.tick(METRICS.connections.get());
                        if all {
                            METRICS.memory_released_after_spike.inc();
                            // Each thread's heap is collected only on that thread.
                            crate::base::memory::ServingThreads::release_each(release);
                        }
                        release(all);
                    }
                }
            }
        }
    }
}

/// Reloads the configuration file on SIGHUP.
struct ReloadOnHangup {
    state: Arc<State>,
}

#[async_trait]
impl BackgroundService for ReloadOnHangup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP, reload with POST /v1/reload: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading configuration");
                    // Errors are logged and counted by reload; the old config keeps serving.
                    let _ = self.state.reload();
                }
            }
        }
    }
}

/// Flushes the access log while running; on shutdown waits for in-flight requests to
/// finish and client connections to close (or the grace period to pass), flushes,
/// and exits 0.
///
/// pingora stops accepting at once on SIGTERM but then sleeps its whole grace period;
/// exiting as soon as the last request is done makes a drain take as long as it needs.
struct Drain {
    access_log: Arc<AccessLog>,
    /// For the grace period running when the drain starts (a reload may change it).
    state: Arc<State>,
    /// Set once the last queued connections are accepted and the listeners closed.
    listeners_closed: Arc<AtomicBool>,
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(accesslog::FLUSH_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => self.access_log.flush(),
            }
        }
        let deadline = Instant::now() + self.state.load().config.server.grace_period;
        tracing::info!(
            in_flight = METRICS.in_flight.get(),
            "draining: no new connections, finishing requests in flight"
        );
        // Requests in flight, connections the front door keeps open a moment for a
        // request already on its way (`edge::DRAIN_LINGER`), and the connections still
        // queued on the listeners (`crate::listeners`).
        while (METRICS.in_flight.get() > 0
            || METRICS.connections.get() > 0
            || !self.listeners_closed.load(Ordering::Acquire))
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Let the last responses leave the socket buffers.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.access_log.flush();
        tracing::info!(in_flight = METRICS.in_flight.get(), "drained, exiting");
        std::process::exit(0);
    }
}
