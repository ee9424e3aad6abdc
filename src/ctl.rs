//! The operator's commands that talk to a running node through its admin API, as
//! `nginx -s reload` and `kong reload` do: `busbar reload` and `busbar status`. And where
//! every command finds the configuration file when it is not given.
//!
//! The admin address comes from the config file (`listen.admin`; a wildcard bind is
//! reached on loopback) unless `--admin` names one; the token from `BUSBAR_ADMIN_TOKEN`,
//! as the node reads it, sent on every call but `/readyz` (the reads `status` makes need
//! it too unless the node sets `[admin] open_reads`). A plain HTTP/1.1 client on a blocking socket: one request per
//! connection, answers capped in size, nothing a node sends can make it panic.
//! Owns: those commands' requests and their output. Must not: change the node any other
//! way than its admin API allows.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::admin::TOKEN_ENV;

/// Overrides the default configuration file of `run`, `check`, `reload` and `status`.
pub const CONFIG_ENV: &str = "BUSBAR_CONFIG";
/// The installed configuration file (the package's conffile).
pub const INSTALLED_CONFIG: &str = "/etc/busbar/busbar.toml";
/// The configuration in a source checkout.
pub const DEV_CONFIG: &str = "conf/busbar.toml";

/// Connecting to a node on this host or its LAN takes far less.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A reload compiles protos and builds the whole snapshot: give it time.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest answer read (the route and service listings of a big node fit).
const MAX_ANSWER: u64 = 16 * 1024 * 1024;

/// The config file to use: `-c FILE` when given, else `$BUSBAR_CONFIG`, else the
/// installed file for an installed binary (one under `/usr/`), else `conf/busbar.toml`.
pub fn config_path(flag: Option<PathBuf>) -> PathBuf {
    if let Some(p) = flag {
        return p;
    }
    if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let installed = std::env::current_exe().is_ok_and(|exe| exe.starts_with("/usr/"));
    PathBuf::from(if installed {
        INSTALLED_CONFIG
    } else {
        DEV_CONFIG
    })
}

/// Why a command failed; printed as is.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Config(String),
    #[error(
        "cannot reach the admin API at {addr}: {source} (is busbar running with this config?)"
    )]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin API at {addr}: {message}")]
    Protocol { addr: SocketAddr, message: String },
    #[error("{0}")]
    Refused(String),
}

/// An admin answer: status code and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// The admin address of the node running `config`, or `admin` when given. Only
/// `listen.admin` is read: the rest of the file may name secrets this shell lacks.
pub fn admin_addr(config: &Path, admin: Option<SocketAddr>) -> Result<SocketAddr, CtlError> {
    let addr = match admin {
        Some(a) => a,
        None => {
            crate::config::admin_address(config).map_err(|e| CtlError::Config(e.to_string()))?
        }
    };
    Ok(match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    })
}

/// One request to the admin API (`Connection: close`), with the token when there is one.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<Answer, CtlError> {
    let io = |source| CtlError::Connect { addr, source };
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(io)?;
    s.set_read_timeout(Some(READ_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(CONNECT_TIMEOUT)).map_err(io)?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: busbar-ctl/{}\r\nContent-Length: 0\r\nConnection: close\r\n",
        crate::version::VERSION
    );
    if let Some(t) = token {
        req.push_str("Authorization: Bearer ");
        req.push_str(t);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    s.take(MAX_ANSWER).read_to_end(&mut raw).map_err(io)?;
    parse_answer(&raw).map_err(|message| CtlError::Protocol { addr, message })
}

/// Status and body of a whole HTTP/1.1 answer read to the connection's end.
fn parse_answer(raw: &[u8]) -> Result<Answer, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("the answer ended before its head did".into()),
        Err(e) => return Err(format!("not an HTTP answer: {e}")),
    };
    let status = resp.code.ok_or("an answer without a status")?;
    let rest = raw.get(head_len..).unwrap_or_default();
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    let body = match length {
        Some(n) => rest
            .get(..n)
            .ok_or("the answer is shorter than its Content-Length")?,
        None => rest,
    };
    Ok(Answer {
        status,
        body: body.to_vec(),
    })
}

fn token() -> Option<String> {
    std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty())
}

/// `busbar reload`: POST /v1/reload. The text to print on success.
pub fn reload(addr: SocketAddr) -> Result<String, CtlError> {
    let token = token();
    let answer = request(addr, "POST", "/v1/reload", token.as_deref())?;
    let v = answer.json();
    if answer.status != 200 {
        let mut msg = format!(
            "reload refused ({}): {}",
            answer.status,
            v.get("message")
                .and_then(Value::as_str)
                .unwrap_or_else(|| std::str::from_utf8(&answer.body).unwrap_or("").trim())
        );
        if token.is_none() && answer.status != 400 {
            msg.push_str(&format!("\n(set {TOKEN_ENV} to the node's admin token)"));
        }
        return Err(CtlError::Refused(msg));
    }
    let mut out = format!(
        "reloaded: configuration generation {}",
        v.get("generation").unwrap_or(&Value::Null)
    );
    if let Some(list) = v.get("not_applied").and_then(Value::as_array) {
        if !list.is_empty() {
            let names: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
            out.push_str(&format!(
                "\nnot applied (needs a restart or a graceful upgrade): {}",
                names.join(", ")
            ));
        }
    }
    Ok(out)
}

/// `busbar status`: readiness, build, and each service's instances by health. `Err` when
/// the node is unreachable or not ready (the text still says what it knows).
pub fn status(addr: SocketAddr) -> Result<String, CtlError> {
    let ready = request(addr, "GET", "/readyz", None)?;
    let r = ready.json();
    let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let mut out = format!(
        "busbar at {addr}: {}\n  version {} (commit {}), pid {}, configuration generation {}\n",
        s("status"),
        s("version"),
        s("commit"),
        r.get("pid").unwrap_or(&Value::Null),
        r.get("generation").unwrap_or(&Value::Null),
    );
    // The registry and services reads need the admin token unless the node opens them.
    let token = token();
    let reg = request(addr, "GET", "/v1/registry", token.as_deref()).ok();
    let readable = reg.as_ref().is_some_and(|a| a.status == 200);
    if let Some(refused) = reg.as_ref().filter(|_| !readable) {
        out.push_str(&format!(
            "  registry and services not shown: the admin API refused the read ({}: {}){}\n",
            refused.status,
            refused
                .json()
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("?"),
            if token.is_none() {
                format!("; set {TOKEN_ENV} to the node's admin token")
            } else {
                String::new()
            },
        ));
    }
    if let Some(reg) = reg.as_ref().filter(|_| readable) {
        let g = reg.json();
        out.push_str(&format!(
            "  registry {}: {} registered instances{}{}\n",
            g.get("backend").and_then(Value::as_str).unwrap_or("?"),
            g.get("instances").unwrap_or(&Value::Null),
            if g.get("degraded") == Some(&Value::Bool(true)) {
                ", DEGRADED (store unreachable, routing from memory)"
            } else {
                ""
            },
            if g.get("self_preservation") == Some(&Value::Bool(true)) {
                ", self-preservation ON"
            } else {
                ""
            },
        ));
    }
    let services = readable
        .then(|| request(addr, "GET", "/v1/services", token.as_deref()).ok())
        .flatten();
    if let Some(svc) = services.filter(|a| a.status == 200) {
        let v = svc.json();
        for s in v
            .get("services")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let instances = s
                .get("instances")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let healthy = instances
                .iter()
                .filter(|i| i.get("health").and_then(Value::as_str) == Some("healthy"))
                .count();
            out.push_str(&format!(
                "  service {}: {healthy}/{} instances healthy{}\n",
                s.get("name").and_then(Value::as_str).unwrap_or("?"),
                instances.len(),
                if s.get("panic_mode") == Some(&Value::Bool(true)) {
                    " (panic mode)"
                } else {
                    ""
                },
            ));
        }
    }
    if ready.status == 200 {
        Ok(out)
    } else {
        Err(CtlError::Refused(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_by_their_length() {
        let a = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA").unwrap();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"ok"[..]));
        let a = parse_answer(b"HTTP/1.1 503 x\r\n\r\nuntil the end").unwrap();
        assert_eq!((a.status, a.body.as_slice()), (503, &b"until the end"[..]));
    }

    #[test]
    fn broken_answers_are_errors_not_panics() {
        for raw in [
            &b""[..],
            b"HTTP/1.1 200",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        ] {
            let _ = parse_answer(raw);
        }
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nshort").is_err());
    }

    #[test]
    fn the_flag_beats_the_environment() {
        assert_eq!(
            config_path(Some(PathBuf::from("x.toml"))),
            PathBuf::from("x.toml")
        );
    }
}
