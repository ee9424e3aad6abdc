//! The TLS record layer of a client connection over rustls's unbuffered API: busbar owns
//! the buffers, so an idle connection holds none.
//!
//! rustls's buffered `ServerConnection` keeps a 4 KiB zero-filled read buffer (its
//! deframer's) for every connection's whole life, idle or not. Here the received records
//! are read into a buffer on the stack and handed to `process_tls_records` there; only
//! the bytes of a record that has not fully arrived are kept, on the heap, until it has
//! ([`Records::incoming`]). Plaintext a reader had no room for waits in [`Plain`], and
//! what is encrypted waits in [`Out`] until it is sent; each is given back when empty.
//!
//! rustls 0.23 copies each record's plaintext into a `Vec` of its own after decrypting it
//! in place; [`turn`] copies it on into the reader's buffer at once, so that `Vec` lives
//! only for the call.
//!
//! Owns: [`turn`] (one pass of rustls over the received bytes: plaintext out, its own
//! messages encoded, the caller's plaintext encrypted or a close_notify queued), [`Out`],
//! [`Plain`].
//! Must not: do I/O (the stream does, `tls::TlsClient`), or keep a buffer that is empty.

use std::io::IoSlice;

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, WriteTraffic};
use tokio::io::ReadBuf;

/// Most plaintext one record carries (RFC 8446 §5.1).
pub const RECORD: usize = 16 * 1024;

/// Most plaintext one write encrypts before what it encrypted is sent: four full records,
/// so a large body goes out in 64 KiB sends, and a connection holds no more than that.
pub const MAX_BATCH: usize = 4 * RECORD;

/// What encryption adds to a record, at most: the header (5), TLS 1.2's explicit nonce (8)
/// or TLS 1.3's content type (1), the tag (16), with room to spare.
const OVERHEAD: usize = 64;

/// What one pass over the received bytes is asked to do besides processing them.
pub enum Ask<'a, 'b> {
    /// Hand plaintext out into this buffer (what does not fit goes to [`Plain`]).
    Read(&'a mut ReadBuf<'b>),
    /// Encrypt these, up to [`MAX_BATCH`] bytes, once the connection may send.
    Write(&'a [IoSlice<'a>]),
    /// Queue a close_notify, once the connection may send.
    Close,
    /// Only process: the handshake, or rustls's own messages.
    Nothing,
}

/// How a pass ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Came {
    /// Everything received was processed; more input is needed to go on (the handshake
    /// is blocked, or the connection waits for traffic).
    Input,
    /// `n` bytes of the caller's plaintext were encrypted into [`Out`].
    Wrote(usize),
    /// Both sides sent close_notify: nothing more can be sent or received.
    Closed,
}

/// One pass of rustls over `input` (the received bytes not yet processed, in order; a
/// partial record stays at its end): records are processed until more input is needed,
/// rustls's own messages (handshake flights, session tickets, a KeyUpdate's answer,
/// alerts) are encoded into `out`, plaintext is handed out as `ask` says, and the ask's
/// plaintext or close_notify is encrypted once the connection may send.
///
/// Returns how many bytes of `input` were used (the caller removes them before the next
/// pass, as rustls requires), and the outcome. `peer_closed` is set when the peer's
/// close_notify is processed.
pub fn turn(
    conn: &mut UnbufferedServerConnection,
    input: &mut [u8],
    out: &mut Out,
    plain: &mut Plain,
    peer_closed: &mut bool,
    ask: &mut Ask<'_, '_>,
) -> (usize, Result<Came, rustls::Error>) {
    let mut used = 0;
    loop {
        let Some(rest) = input.get_mut(used..) else {
            return (
                used,
                Err(rustls::Error::General("TLS discard past the input".into())),
            );
        };
        let status = conn.process_tls_records(rest);
        let mut discard = status.discard;
        let state = match status.state {
            Ok(state) => state,
            Err(e) => return (used + discard, Err(e)),
        };
        let came = match state {
            ConnectionState::ReadTraffic(mut records) => {
                while let Some(record) = records.next_record() {
                    match record {
                        Ok(r) => {
                            discard += r.discard;
                            deliver(r.payload, ask, plain);
                        }
                        Err(e) => return (used + discard, Err(e)),
                    }
                }
                None
            }
            ConnectionState::EncodeTlsData(mut encode) => {
                out.encode(|buf| encode.encode(buf));
                None
            }
            // `out` is sent in order before the connection waits for input again.
            ConnectionState::TransmitTlsData(transmit) => {
                transmit.done();
                None
            }
            ConnectionState::PeerClosed => {
                *peer_closed = true;
                None
            }
            ConnectionState::WriteTraffic(mut w) => Some(match ask {
                Ask::Write(bufs) => match out.encrypt(&mut w, bufs) {
                    Ok(n) => Ok(Came::Wrote(n)),
                    Err(e) => Err(e),
                },
                Ask::Close => {
                    out.encode(|buf| w.queue_close_notify(buf).map_err(encrypt_to_encode));
                    Ok(Came::Input)
                }
                Ask::Read(_) | Ask::Nothing => Ok(Came::Input),
            }),
            ConnectionState::BlockedHandshake => Some(Ok(Came::Input)),
            ConnectionState::Closed => Some(Ok(Came::Closed)),
            // Early data is never enabled (`max_early_data_size` is 0), nor is anything
            // a later rustls may add.
            _ => Some(Err(rustls::Error::General("unexpected TLS state".into()))),
        };
        used += discard;
        if let Some(came) = came {
            return (used, came);
        }
    }
}

/// Encodes what rustls queued to send after a fatal error (its alert), without processing
/// anything more of `input`: rustls hands queued messages out before it deframes, and
/// going on past an error would make it raise (and assert on) a second alert.
pub fn alerts(conn: &mut UnbufferedServerConnection, input: &mut [u8], out: &mut Out) {
    for _ in 0..8 {
        if !conn.wants_write() {
            return;
        }
        match conn.process_tls_records(input).state {
            Ok(ConnectionState::EncodeTlsData(mut e)) => out.encode(|buf| e.encode(buf)),
            _ => return,
        }
    }
}

fn encrypt_to_encode(e: EncryptError) -> EncodeError {
    match e {
        EncryptError::InsufficientSize(s) => EncodeError::InsufficientSize(s),
        EncryptError::EncryptExhausted => EncodeError::AlreadyEncoded,
    }
}

/// Plaintext of a record: into the reader's buffer as far as it goes, the rest kept.
fn deliver(payload: &[u8], ask: &mut Ask<'_, '_>, plain: &mut Plain) {
    let mut rest = payload;
    if let Ask::Read(buf) = ask {
        if plain.is_empty() {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }
    if !rest.is_empty() {
        plain.push(rest);
    }
}

/// Plaintext received and not yet read: the rest of a record the reader had no room for,
/// and bytes put back (`unread`). Unallocated while empty.
#[derive(Debug, Default)]
pub struct Plain {
    buf: Vec<u8>,
    /// Read up to here.
    at: usize,
}

impl Plain {
    pub fn is_empty(&self) -> bool {
        self.at == self.buf.len()
    }

    /// The memory held.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Puts `bytes` back before everything held.
    pub fn unread(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.buf.drain(..self.at);
        self.at = 0;
        self.buf.splice(0..0, bytes.iter().copied());
    }

    /// Moves what fits into `buf`; whether anything was held.
    pub fn take_into(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let held = &self.buf[self.at..];
        let n = held.len().min(buf.remaining());
        buf.put_slice(&held[..n]);
        self.at += n;
        if self.is_empty() {
            *self = Plain::default();
        }
        true
    }
}

/// Encrypted bytes not yet sent: `buf[sent..filled]`. Given back once all are sent, so
/// an idle connection holds none; a busy one's is sized to what it has to send.
#[derive(Debug, Default)]
pub struct Out {
    /// Zero-filled up to its length (rustls encrypts into initialised bytes).
    buf: Vec<u8>,
    sent: usize,
    filled: usize,
}

impl Out {
    /// What is waiting to be sent.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.sent..self.filled]
    }

    pub fn is_empty(&self) -> bool {
        self.sent == self.filled
    }

    /// The memory held.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// `n` bytes went out; the buffer is given back once everything has.
    pub fn sent(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.filled);
        if self.is_empty() {
            *self = Out::default();
        }
    }

    /// At least `n` writable bytes after what is filled.
    fn room(&mut self, n: usize) -> &mut [u8] {
        let want = self.filled + n;
        if self.buf.len() < want {
            if self.buf.is_empty() {
                // A fresh zeroed allocation (often already zero pages), not a grow.
                self.buf = vec![0; want];
            } else {
                self.buf.resize(want, 0);
            }
        }
        &mut self.buf[self.filled..]
    }

    /// Encodes one of rustls's own messages, growing the buffer as rustls asks.
    fn encode(&mut self, mut f: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>) {
        let mut need = 512;
        loop {
            match f(self.room(need)) {
                Ok(n) => {
                    self.filled += n;
                    return;
                }
                Err(EncodeError::InsufficientSize(s)) if s.required_size > need => {
                    need = s.required_size;
                }
                // Already encoded, or rustls asked for less than it was given: nothing
                // more this message can do.
                Err(_) => return,
            }
        }
    }

    /// Encrypts a prefix of `bufs` (at most [`MAX_BATCH`] bytes), one record for each
    /// run of slices that fits one together (a response head and a small body, an h2
    /// frame header and its payload), a large slice straight from where it is; how many
    /// bytes were taken.
    fn encrypt(
        &mut self,
        w: &mut WriteTraffic<'_, ServerConnectionData>,
        bufs: &[IoSlice<'_>],
    ) -> Result<usize, rustls::Error> {
        let total: usize = bufs.iter().map(|b| b.len()).sum::<usize>().min(MAX_BATCH);
        self.room(total + (total / RECORD + bufs.len().min(8) + 1) * OVERHEAD);
        let mut taken = 0;
        let mut i = 0;
        while i < bufs.len() && taken < MAX_BATCH {
            let budget = MAX_BATCH - taken;
            let mut j = i;
            let mut run = 0;
            while let Some(b) = bufs.get(j) {
                if run + b.len() > RECORD.min(budget) {
                    break;
                }
                run += b.len();
                j += 1;
            }
            if j - i >= 2 {
                let mut joined = Vec::with_capacity(run);
                for b in &bufs[i..j] {
                    joined.extend_from_slice(b);
                }
                self.seal(w, &joined)?;
                taken += run;
                i = j;
                continue;
            }
            let b = &bufs[i];
            let piece = &b[..b.len().min(budget)];
            if !piece.is_empty() {
                self.seal(w, piece)?;
            }
            taken += piece.len();
            i += 1;
            if piece.len() < b.len() {
                break;
            }
        }
        Ok(taken)
    }

    /// Encrypts `data` (rustls cuts it into records).
    fn seal(
        &mut self,
        w: &mut WriteTraffic<'_, ServerConnectionData>,
        data: &[u8],
    ) -> Result<(), rustls::Error> {
        let mut need = data.len() + (data.len() / RECORD + 1) * OVERHEAD;
        loop {
            match w.encrypt(data, self.room(need)) {
                Ok(n) => {
                    self.filled += n;
                    return Ok(());
                }
                Err(EncryptError::InsufficientSize(s)) if s.required_size > need => {
                    need = s.required_size;
                }
                Err(EncryptError::InsufficientSize(_)) | Err(EncryptError::EncryptExhausted) => {
                    return Err(rustls::Error::EncryptError);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_hands_out_in_order_and_lets_go() {
        let mut p = Plain::default();
        p.push(b"world");
        p.unread(b"hello ");
        let mut space = [0u8; 4];
        let mut buf = ReadBuf::new(&mut space);
        assert!(p.take_into(&mut buf));
        assert_eq!(buf.filled(), b"hell");
        p.unread(b"l");
        let mut space = [0u8; 64];
        let mut buf = ReadBuf::new(&mut space);
        assert!(p.take_into(&mut buf));
        assert_eq!(buf.filled(), b"lo world");
        assert!(p.is_empty());
        assert_eq!(p.capacity(), 0);
        assert!(!p.take_into(&mut buf));
    }

    #[test]
    fn out_lets_go_once_sent() {
        let mut o = Out::default();
        o.encode(|b| {
            b[..3].copy_from_slice(b"abc");
            Ok(3)
        });
        assert_eq!(o.pending(), b"abc");
        o.sent(2);
        assert_eq!(o.pending(), b"c");
        o.sent(1);
        assert!(o.is_empty());
        assert_eq!(o.capacity(), 0);
    }
}
