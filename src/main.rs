//! The `busbar` command: run, check, demo. Nothing else lives here.

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
    /// What only the production host can provide (DNS names that resolve, secrets in the
    /// environment) is printed as a warning, and does not fail the check.
    Check {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Fail on warnings too, as `busbar run` would on this host.
        #[arg(long)]
        strict: bool,
    },
    /// Run small HTTP backends that answer with what they received, to try busbar out.
    Demo {
        /// Addresses to listen on.
        #[arg(short, long = "listen", required = true)]
        listen: Vec<SocketAddr>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files, strict } => {
            let mut ok = true;
            for f in &files {
                let report = busbar::config::check(f);
                for w in &report.warnings {
                    eprintln!("warning: {w}");
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
            let config = match busbar::config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let log = busbar::logging::init(&config.log.level);
            match busbar::app::run(config, busbar::app::RunOptions { upgrade, log }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("busbar: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo { listen } => {
            busbar::logging::init("info");
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
