//! The `busbar` command: run, check, demo. Nothing else lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

// glibc's malloc took ~12% of busbar's CPU per request (perf: _int_malloc, _int_free,
// malloc_consolidate after the request's large boxed futures). With mimalloc a proxied
// request costs 106k instructions instead of 124k (callgrind); the price is memory:
// idle RSS 29 MiB instead of 14 and ~1.6 KiB more per open connection (RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "busbar",
    version,
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
        /// The configuration file.
        #[arg(short = 'c', long = "config", default_value = "conf/busbar.toml")]
        config: PathBuf,
        /// Take the listening sockets over from a running busbar (graceful upgrade);
        /// then send SIGQUIT to the old process.
        #[arg(short = 'u', long)]
        upgrade: bool,
    },
    /// Validate configuration files; print every problem as file:line:col and exit non-zero.
    Check {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run small HTTP backends that answer with what they received, to try busbar out.
    Demo {
        /// Addresses to listen on.
        #[arg(short, long = "listen", required = true)]
        listen: Vec<SocketAddr>,
    },
}

/// The redis crate's own level for busbar's `level`: two steps quieter. During a Redis
/// Cluster failover it logs every reconnect attempt at WARN and INFO (hundreds of lines a
/// second); busbar logs each shard's switch once with what an operator needs, so the
/// crate's lines show only when busbar itself logs at debug (its WARN) or trace (all).
fn redis_level(level: &str) -> &'static str {
    match level.split(',').next().unwrap_or("").trim() {
        "trace" => "trace",
        "debug" => "warn",
        _ => "error",
    }
}

fn init_tracing(level: &str) {
    let from_env = EnvFilter::try_from_env("BUSBAR_LOG").ok();
    // pingora logs through `log`: without a max level every `debug!` on its request
    // path would reach the bridge (about 25 calls per request) only to be dropped.
    let log_max = match &from_env {
        Some(_) => log::LevelFilter::Trace,
        // A bare level caps it; a filter with directives ("warn,rustls=debug") lets
        // everything through to the tracing filter.
        None => level
            .parse::<log::LevelFilter>()
            .unwrap_or(log::LevelFilter::Trace)
            .max(log::LevelFilter::Warn),
    };
    let filter = from_env.unwrap_or_else(|| {
        EnvFilter::new(format!(
            "{level},pingora_core=warn,pingora_proxy=warn,redis={}",
            redis_level(level)
        ))
    });
    let _ = tracing_log::LogTracer::builder()
        .with_max_level(log_max)
        .init();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files } => {
            let mut ok = true;
            for f in &files {
                match busbar::config::load(f) {
                    Ok(c) => println!(
                        "{}: ok ({} services, {} routes)",
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
            let config = match busbar::config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            init_tracing(&config.log.level);
            match busbar::app::run(config, busbar::app::RunOptions { upgrade }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("busbar: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo { listen } => {
            init_tracing("info");
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
