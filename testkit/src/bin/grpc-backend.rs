//! The test `bookstore.v1` service as a standalone h2c gRPC server, for load tests
//! (`load-tests/grpc-bench.sh`). It keeps no call log and runs until it is signalled.
//!
//! Usage: `grpc-backend ADDR [THREADS]` — ADDR like `127.0.0.1:50051`; THREADS is the
//! number of tokio worker threads (default 1, so a pinned CPU is all it uses).

use std::net::SocketAddr;
use std::process::ExitCode;

use busbar_testkit::GrpcBackend;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: grpc-backend ADDR [THREADS]";
    let Some(addr) = args.first().and_then(|a| a.parse::<SocketAddr>().ok()) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let threads = match args.get(1).map(|t| t.parse::<usize>()) {
        None => 1,
        Some(Ok(n)) if n >= 1 => n,
        Some(_) => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("grpc-backend: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("grpc-backend: bind {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let backend = GrpcBackend::serve(listener, 1, false);
        println!("grpc-backend listening on {}", backend.addr);
        // Serve until SIGTERM/SIGINT end the process (their default action).
        std::future::pending::<()>().await;
        ExitCode::SUCCESS
    })
}
