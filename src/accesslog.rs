//! The access log: one JSON line per request, to stdout or a file.
//!
//! Owns: the line format and a buffered writer flushed by a background task (and at
//! exit), so the request path appends to memory and never waits on a disk.
//! Must not: decide what a request was; it writes what the proxy hands it.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::config::AccessLogTarget;

/// Buffered bytes that force a flush from the request path.
const FLUSH_AT: usize = 64 * 1024;
/// How often the background flusher empties the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

pub struct AccessLog {
    out: Option<Mutex<BufWriter<Box<dyn Write + Send>>>>,
}

/// One request as the access log records it.
pub struct Entry<'a> {
    pub client: Option<std::net::SocketAddr>,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub service: &'a str,
    pub instance: Option<std::net::SocketAddr>,
    pub status: u16,
    pub bytes: usize,
    pub total: Duration,
    pub upstream: Option<Duration>,
    pub tries: u32,
    pub trace_id: &'a [u8; 32],
    pub error: Option<&'a str>,
}

impl AccessLog {
    pub fn open(target: &AccessLogTarget) -> io::Result<AccessLog> {
        let out: Option<Box<dyn Write + Send>> = match target {
            AccessLogTarget::Off => None,
            AccessLogTarget::Stdout => Some(Box::new(io::stdout())),
            AccessLogTarget::File(p) => Some(Box::new(
                OpenOptions::new().create(true).append(true).open(p)?,
            )),
        };
        Ok(AccessLog {
            out: out.map(|w| Mutex::new(BufWriter::with_capacity(2 * FLUSH_AT, w))),
        })
    }

    pub fn enabled(&self) -> bool {
        self.out.is_some()
    }

    pub fn write(&self, e: &Entry<'_>) {
        let Some(out) = &self.out else {
            return;
        };
        let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
        // A failed log write must never fail the request; the flusher will report errors.
        let _ = write_entry(&mut *w, e);
        if w.buffer().len() >= FLUSH_AT {
            let _ = w.flush();
        }
    }

    pub fn flush(&self) {
        if let Some(out) = &self.out {
            let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = w.flush() {
                tracing::warn!("access log flush failed: {e}");
            }
        }
    }
}

fn write_entry(w: &mut impl Write, e: &Entry<'_>) -> io::Result<()> {
    write!(
        w,
        "{{\"time\":\"{}\",\"client\":",
        humantime::format_rfc3339_millis(SystemTime::now())
    )?;
    match e.client {
        Some(c) => write!(w, "\"{c}\"")?,
        None => w.write_all(b"null")?,
    }
    w.write_all(b",\"method\":")?;
    json_str(w, e.method)?;
    w.write_all(b",\"host\":")?;
    json_str(w, e.host)?;
    w.write_all(b",\"path\":")?;
    json_str(w, e.path)?;
    w.write_all(b",\"route\":")?;
    json_str(w, e.route)?;
    w.write_all(b",\"service\":")?;
    json_str(w, e.service)?;
    w.write_all(b",\"instance\":")?;
    match e.instance {
        Some(i) => write!(w, "\"{i}\"")?,
        None => w.write_all(b"null")?,
    }
    write!(
        w,
        ",\"status\":{},\"bytes\":{},\"duration_ms\":{:.3},\"upstream_ms\":",
        e.status,
        e.bytes,
        e.total.as_secs_f64() * 1000.0
    )?;
    match e.upstream {
        Some(u) => write!(w, "{:.3}", u.as_secs_f64() * 1000.0)?,
        None => w.write_all(b"null")?,
    }
    write!(w, ",\"tries\":{},\"trace_id\":\"", e.tries)?;
    w.write_all(e.trace_id)?;
    w.write_all(b"\"")?;
    if let Some(err) = e.error {
        w.write_all(b",\"error\":")?;
        json_str(w, err)?;
    }
    w.write_all(b"}\n")
}

/// Writes `s` as a JSON string; request-controlled text is escaped, never trusted.
fn json_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    serde_json::to_writer(&mut *w, s).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_escaped_fields() {
        let mut out = Vec::new();
        let e = Entry {
            client: Some("127.0.0.1:5000".parse().unwrap()),
            method: "GET",
            host: "h",
            path: "/a\"b\n",
            route: "r",
            service: "s",
            instance: None,
            status: 200,
            bytes: 5,
            total: Duration::from_micros(1500),
            upstream: Some(Duration::from_micros(1000)),
            tries: 1,
            trace_id: &[b'a'; 32],
            error: None,
        };
        write_entry(&mut out, &e).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/a\"b\n");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["instance"], serde_json::Value::Null);
    }
}
