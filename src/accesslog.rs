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
use crate::text::{self, Sink};

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
        use std::cell::RefCell;
        thread_local! {
            /// The line, formatted before the lock is taken; kept for the thread's next one.
            static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let Some(out) = &self.out else {
            return;
        };
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            write_entry(&mut line, e);
            let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
            // A failed log write must never fail the request; the flusher will report errors.
            let _ = w.write_all(&line);
            if w.buffer().len() >= FLUSH_AT {
                let _ = w.flush();
            }
        });
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

/// One JSON line, by hand: the formatting machinery (`write!`) cost more than the
/// rest of the request path's own work (~6.7k instructions a line, 2.6k of them for the
/// two socket addresses).
fn write_entry(w: &mut Vec<u8>, e: &Entry<'_>) {
    w.put(b"{\"time\":\"");
    write_time(w, SystemTime::now());
    w.put(b"\",\"client\":");
    client_or_null(w, e.client);
    // Each string field: one piece with the previous field's closing quote, the key and
    // the opening quote, then the escaped text.
    for (start, text) in [
        (&b",\"method\":\""[..], e.method),
        (b"\",\"host\":\"", e.host),
        (b"\",\"path\":\"", e.path),
        (b"\",\"route\":\"", e.route),
        (b"\",\"service\":\"", e.service),
    ] {
        w.put(start);
        json_text(w, text);
    }
    w.put(b"\",\"instance\":");
    addr_or_null(w, e.instance);
    w.put(b",\"status\":");
    text::decimal(w, u64::from(e.status));
    w.put(b",\"bytes\":");
    text::decimal(w, e.bytes as u64);
    w.put(b",\"duration_ms\":");
    write_ms(w, e.total);
    w.put(b",\"upstream_ms\":");
    match e.upstream {
        Some(u) => write_ms(w, u),
        None => w.put(b"null"),
    }
    w.put(b",\"tries\":");
    text::decimal(w, u64::from(e.tries));
    w.put(b",\"trace_id\":\"");
    w.put(e.trace_id);
    w.put(b"\"");
    if let Some(err) = e.error {
        w.put(b",\"error\":\"");
        json_text(w, err);
        w.put(b"\"");
    }
    w.put(b"}\n");
}

/// The client as `ip:port`, or `ip` when its port is unknown (0: a trusted proxy named
/// the client in a forwarding header).
fn client_or_null(w: &mut Vec<u8>, a: Option<std::net::SocketAddr>) {
    match a {
        Some(a) if a.port() == 0 => {
            w.put(b"\"");
            text::ip(w, a.ip());
            w.put(b"\"");
        }
        _ => addr_or_null(w, a),
    }
}

fn addr_or_null(w: &mut Vec<u8>, a: Option<std::net::SocketAddr>) {
    match a {
        Some(a) => {
            w.put(b"\"");
            text::socket_addr(w, a);
            w.put(b"\"");
        }
        None => w.put(b"null"),
    }
}

/// Milliseconds with three decimals, from integers (float formatting is slow).
fn write_ms(w: &mut Vec<u8>, d: Duration) {
    let micros = d.as_micros().min(u128::from(u64::MAX)) as u64;
    text::decimal(w, micros / 1000);
    w.put(b".");
    text::three_digits(w, (micros % 1000) as u32);
}

/// RFC 3339 UTC with milliseconds. The date and time of day are formatted once per
/// second (per thread); each line adds only the milliseconds.
fn write_time(w: &mut Vec<u8>, now: SystemTime) {
    use std::cell::RefCell;
    thread_local! {
        static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
    }
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let prefix = SECOND.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            // "YYYY-MM-DDTHH:MM:SS" from humantime's "YYYY-MM-DDTHH:MM:SSZ" (which
            // refuses years past 9999: then the epoch stands in, never a panic).
            use std::fmt::Write as _;
            let mut text = String::with_capacity(20);
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            if write!(text, "{}", humantime::format_rfc3339_seconds(at)).is_err() || text.len() < 19
            {
                text = "1970-01-01T00:00:00".to_string();
            }
            c.1.copy_from_slice(&text.as_bytes()[..19]);
            c.0 = secs;
        }
        c.1
    });
    w.put(&prefix);
    w.put(b".");
    text::three_digits(w, since.subsec_millis());
    w.put(b"Z");
}

/// Writes `s` as the inside of a JSON string; request-controlled text is escaped, never
/// trusted. Text with nothing to escape (the usual case) is copied as it is; the rest
/// is escaped by serde_json, less the quotes it adds (the caller writes its own).
fn json_text(w: &mut Vec<u8>, s: &str) {
    // A fold without an early exit: the compiler checks many bytes at a time.
    let plain = s
        .bytes()
        .fold(true, |ok, c| ok & (c >= 0x20) & (c != b'"') & (c != b'\\'));
    if plain {
        w.put(s.as_bytes());
    } else if let Ok(quoted) = serde_json::to_vec(s) {
        w.put(&quoted[1..quoted.len() - 1]);
    }
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
        write_entry(&mut out, &e);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/a\"b\n");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["instance"], serde_json::Value::Null);
        assert_eq!(v["upstream_ms"], 1.0);
    }

    #[test]
    fn every_character_survives_the_escaping() {
        let mut all: String = (0u8..0x80).map(char::from).collect();
        all.push_str("é€😀");
        let mut out = b"\"".to_vec();
        json_text(&mut out, &all);
        out.push(b'"');
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, all);
        // As serde_json writes it.
        assert_eq!(out, serde_json::to_vec(&all).unwrap());
    }

    #[test]
    fn time_is_rfc3339_with_milliseconds() {
        let mut out = Vec::new();
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        write_time(&mut out, t);
        write_time(&mut out, t + Duration::from_millis(5));
        write_time(&mut out, t + Duration::from_millis(1_000));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-11-18T11:06:40.123Z2026-11-18T11:06:40.128Z2026-11-18T11:06:41.123Z"
        );
    }
}
