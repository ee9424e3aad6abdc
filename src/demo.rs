//! `busbar demo`: a tiny HTTP backend to route to when trying busbar out.
//!
//! Owns: answering every request with JSON describing what it received.
//! Must not: be used as a production backend.

use std::net::SocketAddr;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::json;

pub struct DemoBackend {
    pub name: String,
}

#[async_trait]
impl ServeHttp for DemoBackend {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // Read and count the body so the demo shows what arrived.
        let mut body_len = 0usize;
        while let Ok(Some(chunk)) = session.read_request_body().await {
            body_len += chunk.len();
        }
        let req = session.req_header();
        let headers: serde_json::Map<String, serde_json::Value> = req
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    json!(String::from_utf8_lossy(v.as_bytes())),
                )
            })
            .collect();
        let body = json!({
            "backend": self.name,
            "method": req.method.as_str(),
            "path": req.uri.to_string(),
            "headers": headers,
            "body_bytes": body_len,
        });
        let mut bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
        bytes.push(b'\n');
        Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_LENGTH, bytes.len())
            .body(bytes)
            .unwrap_or_default()
    }
}

/// Runs demo backends on the given addresses until the process is stopped.
pub fn run(addrs: &[SocketAddr]) -> anyhow::Result<()> {
    let conf = pingora_core::server::configuration::ServerConf {
        threads: 1,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        pid_file: std::env::temp_dir()
            .join(format!("busbar-demo-{}.pid", std::process::id()))
            .display()
            .to_string(),
        upgrade_sock: std::env::temp_dir()
            .join(format!("busbar-demo-{}.sock", std::process::id()))
            .display()
            .to_string(),
        ..Default::default()
    };
    let mut server = pingora_core::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    for addr in addrs {
        let mut svc = pingora_core::services::listening::Service::new(
            format!("demo {addr}"),
            DemoBackend {
                name: addr.to_string(),
            },
        );
        svc.add_tcp(&addr.to_string());
        server.add_service(svc);
    }
    tracing::info!(?addrs, "demo backends listening");
    server.run_forever()
}
