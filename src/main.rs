//! The `busbar` command: run, check, reload, status, demo. Nothing else lives here.
//!
//! Every command that reads a configuration takes it the same way: `-c FILE`, else
//! `$BUSBAR_CONFIG`, else `/etc/busbar/busbar.toml` for an installed binary (under `/usr/`)
//! and `conf/busbar.toml` in a checkout (`busbar::ctl::config_path`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// glibc's malloc took ~12% of busbar's CPU per request (perf: _int_malloc, _int_free,
// malloc_consolidate after the request's large boxed futures). With mimalloc a proxied
// request costs 106k instructions instead of 124k (callgrind); the price is memory:
// idle RSS 29 MiB instead of 14 and ~1.6 KiB more per open connection (RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs mimalloc's due purges: pages freed more than `purge_delay` (1 s) ago go back to the
/// OS. mimalloc runs them only from inside an allocation or a collect, so a node that went
/// quiet after a spike kept the spike's memory for good: 10 s after 10,000 idle
/// connections closed, RSS was 2.4× idle (TLS: 2.6×); with this called each second,
/// 1.09× (TLS: 0.98×), back within 1 s of the close.
/// `all = false`: only what is due; the purge is process-wide, whichever thread calls it.
/// `all = true` (once a spike of connections is over, `base::memory::AfterSpike`): every
/// freed page now, due or not, also those a purge racing with frees on another thread
/// left unmarked, which the due-only purge never finds again.
fn release_freed_memory(all: bool) {
    // The crate declares it only with its `extended` feature (and another dependency);
    // the symbol is in the mimalloc that `GLOBAL` links.
    extern "C" {
        fn mi_collect(force: bool);
    }
    // SAFETY: a mimalloc entry point with no preconditions, callable from any thread.
    unsafe { mi_collect(all) }
}

/// Turns transparent huge pages off for this process, before the server allocates.
///
/// mimalloc `madvise`s its arenas `MADV_HUGEPAGE`, and on a kernel with THP in `madvise`
/// mode (Debian's default) each 2 MiB of the arena it touches becomes resident whole:
/// every idle connection's buffers, and whatever is freed but not yet purged, then cost
/// their full size in RSS, not just the pages written. Measured with 2,000 idle h2c
/// connections (release): 40.0 → 25.7 KiB each, idle RSS 32.5 → 23.0 MiB. h2c under
/// `h2load -c16 -m10` on a busy machine: 13.9 → 14.0 and 14.6 → 14.9 µs CPU a request in
/// two runs, within their noise (a proxy's hot set is small). mimalloc does the
/// same `prctl` itself only with `MIMALLOC_ALLOW_THP=0` in the environment at start (idle
/// 18.4 MiB then: the few pages touched before `main` are huge ones here).
fn no_transparent_huge_pages() {
    extern "C" {
        fn prctl(option: std::ffi::c_int, ...) -> std::ffi::c_int;
    }
    const PR_SET_THP_DISABLE: std::ffi::c_int = 41;
    // SAFETY: prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) only sets a flag of this process (and
    // of the processes it starts); it reads no memory of ours. On failure (an old kernel)
    // THP stays as the system has it.
    let _ = unsafe {
        prctl(
            PR_SET_THP_DISABLE,
            1 as std::ffi::c_ulong,
            0 as std::ffi::c_ulong,
            0 as std::ffi::c_ulong,
            0 as std::ffi::c_ulong,
        )
    };
}

#[derive(Parser)]
#[command(
    name = "busbar",
    version = busbar::version::LONG,
    about = "A centralized service bus and proxy gateway on pingora"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run busbar on a configuration file.
    Run {
        /// The configuration file [default: $BUSBAR_CONFIG, else /etc/busbar/busbar.toml
        /// when installed, else conf/busbar.toml].
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// Take the listening sockets over from a running busbar (graceful upgrade);
        /// then send SIGQUIT to the old process.
        #[arg(short = 'u', long)]
        upgrade: bool,
    },
    /// Validate configuration files; print every problem as file:line:col and exit non-zero.
    /// What only the production host can provide (DNS names that resolve, secrets in the
    /// environment) is printed as a warning, and does not fail the check.
    Check {
        /// The configuration file, as `run` takes it (when no FILES are given).
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// Files to check [default: the configuration file].
        files: Vec<PathBuf>,
        /// Fail on warnings too, as `busbar run` would on this host.
        #[arg(long)]
        strict: bool,
    },
    /// Ask the running node to reload its configuration (POST /v1/reload on its admin API,
    /// with the token from BUSBAR_ADMIN_TOKEN); prints what it could not apply.
    Reload {
        /// The configuration file of the node: its `listen.admin` is where to ask.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// The admin API address instead of the one in the configuration file.
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// Show whether the running node is ready, its build, registry and instances' health;
    /// exits non-zero when it is not ready or cannot be reached.
    Status {
        /// The configuration file of the node: its `listen.admin` is where to ask.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// The admin API address instead of the one in the configuration file.
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// Run small HTTP backends that answer with what they received, to try busbar out.
    Demo {
        /// Addresses to listen on.
        #[arg(short, long = "listen", required = true)]
        listen: Vec<SocketAddr>,
    },
}

fn main() -> ExitCode {
    no_transparent_huge_pages();
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            config,
            files,
            strict,
        } => {
            let files = if files.is_empty() {
                vec![busbar::ctl::config_path(config)]
            } else {
                files
            };
            let mut ok = true;
            for f in &files {
                let report = busbar::config::check(f);
                for w in &report.warnings {
                    eprintln!("warning: {w}");
                }
                // Allowed, and `busbar run` says it too at every load: not a refusal.
                if let Ok(c) = &report.result {
                    for w in &c.cautions {
                        eprintln!("warning: {w}");
                    }
                }
                let n = report.warnings.len();
                let warned = match n {
                    0 => String::new(),
                    1 => "; 1 warning: `busbar run` refuses the file while it stands".into(),
                    n => format!("; {n} warnings: `busbar run` refuses the file while they stand"),
                };
                match report.result {
                    Ok(_) if strict && n > 0 => {
                        let s = if n == 1 { "" } else { "s" };
                        eprintln!("{}: refused (--strict): {n} warning{s}", f.display());
                        ok = false;
                    }
                    Ok(c) => println!(
                        "{}: ok ({} services, {} routes{warned})",
                        f.display(),
                        c.services.len(),
                        c.routes.len()
                    ),
                    Err(e) => {
                        eprintln!("{e}");
                        ok = false;
                    }
                }
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Run { config, upgrade } => {
            let config = match busbar::config::load(&busbar::ctl::config_path(config)) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let log = busbar::logging::init(&config.log.level, config.log.format);
            match busbar::app::run(
                config,
                busbar::app::RunOptions {
                    upgrade,
                    log,
                    release_memory: Some(release_freed_memory),
                },
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("busbar: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Reload { config, admin } => ctl(config, admin, busbar::ctl::reload),
        Command::Status { config, admin } => ctl(config, admin, busbar::ctl::status),
        Command::Demo { listen } => {
            busbar::logging::init("info", Default::default());
            match busbar::demo::run(&listen) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("busbar demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs an admin API command against the node of `config` (or at `admin`).
fn ctl(
    config: Option<PathBuf>,
    admin: Option<SocketAddr>,
    command: fn(SocketAddr) -> Result<String, busbar::ctl::CtlError>,
) -> ExitCode {
    let config = busbar::ctl::config_path(config);
    match busbar::ctl::admin_addr(&config, admin).and_then(command) {
        Ok(out) => {
            println!("{}", out.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", e.to_string().trim_end());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// Resident memory of this process, from the kernel.
    fn rss_kib() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Memory freed and left alone stays resident; the housekeeping's call hands it back.
    #[test]
    fn freed_memory_goes_back_to_the_os_when_released() {
        const BLOCKS: usize = 8192; // 8,192 × 4 KiB = 32 MiB, written so it is resident
        let blocks: Vec<Vec<u8>> = (0..BLOCKS).map(|i| vec![i as u8; 4096]).collect();
        let full = rss_kib();
        drop(blocks);
        // Past mimalloc's purge delay (1 s); nothing allocates meanwhile, as on a quiet node.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let before = rss_kib();
        super::release_freed_memory(false);
        let after = rss_kib();
        assert!(
            before > after + 24 * 1024,
            "32 MiB freed: {full} KiB resident with them, {before} KiB 1.5 s after they \
             were freed, {after} KiB after the release"
        );
    }
}
