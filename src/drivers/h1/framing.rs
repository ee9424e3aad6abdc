//! The framing rules an upstream's HTTP/1.1 answer is held to on busbar's own path
//! (`drivers::h1`): its `Content-Length` and `Transfer-Encoding` values, the headers its
//! `Connection` may nominate, and the chunked body (RFC 9112 §7.1), strictly. The same
//! chunk scanner reads a client's chunked request body: one grammar, one piece of code,
//! so a body busbar passes on is framed exactly as busbar read it, in both directions.
//!
//! A next hop that reads a lenient answer differently from busbar is how a response is
//! split or a connection desynchronised: `Content-Length: +5` (a signed number Rust's
//! parser takes), an empty chunk-size line taken as the last chunk, any bytes taken as
//! trailer lines, `Connection: content-length` stripping the framing. So busbar reads
//! only the grammar itself, and what it cannot be sure of is an error: the caller answers
//! 502 or, once the head went out, closes the client connection.
//! Owns: those verdicts. Pure: no I/O; the chunked scan holds only trailer bytes, and
//! only across reads. It also counts the chunk data (a request body's limit is on the
//! data, not the framing) and can hand the data out without the framing (a response for
//! an HTTP/1.0 client, which cannot read chunked).
//! Must not: decide what happens after a verdict (the caller and the phases do).

/// Most bytes of a chunk-size line (the size, leading zeros included, and its extensions)
/// busbar reads: a line that never ends is not a body.
pub const MAX_CHUNK_LINE: usize = 4096;

/// Most bytes of a trailer section busbar holds and passes on (pingora's limit).
pub const MAX_TRAILERS: usize = 64 * 1024;

/// The answer is not framing busbar can be sure of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// A `tchar` of an HTTP token (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A field value's byte (RFC 9110 §5.5): visible ASCII, SP, HTAB, or obs-text.
fn is_field_byte(b: u8) -> bool {
    matches!(b, b'\t' | b' '..=b'~' | 0x80..=0xff)
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// A `Content-Length` value: `1*DIGIT` (RFC 9110 §8.6) around optional whitespace, at most
/// 19 digits (so it fits a `u64`). No sign, no list, no hex: `None` for anything else.
pub fn content_length(value: &[u8]) -> Option<u64> {
    let start = value.iter().position(|&b| !is_ows(b))?;
    let end = value.iter().rposition(|&b| !is_ows(b))? + 1;
    let digits = &value[start..end];
    if digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

/// The transfer codings of a response, line by line (RFC 9112 §6.1): each must be a
/// token, and `chunked` may only come once and last.
#[derive(Debug, Default, Clone, Copy)]
pub struct Codings {
    /// The last coding seen is `chunked`.
    pub chunked: bool,
}

impl Codings {
    /// Adds one `Transfer-Encoding` line. `Err`: not a list of codings, or `chunked` is
    /// not the final one (`chunked, gzip`, `chunked, chunked`, an empty line).
    pub fn add(&mut self, value: &[u8]) -> Result<(), Malformed> {
        for coding in value.split(|&b| b == b',') {
            let coding = coding.trim_ascii();
            // A coding's parameters (`;q=…`) are not for transfer codings in a response.
            if coding.is_empty() || !coding.iter().all(|&b| is_tchar(b)) || self.chunked {
                return Err(Malformed);
            }
            self.chunked = coding.eq_ignore_ascii_case(b"chunked");
        }
        Ok(())
    }
}

/// Does a `Connection` value nominate a header that frames the message? Those are never
/// hop-by-hop: removing them would leave the body without an end.
pub fn nominates_framing(value: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|t| {
        let t = t.trim_ascii();
        t.eq_ignore_ascii_case(b"content-length") || t.eq_ignore_ascii_case(b"transfer-encoding")
    })
}

/// Where a chunked body ends, read strictly: fed the body's bytes in order, it says how
/// many of them may go to the client now and where the body ends. Chunk data and size
/// lines pass through unchanged (extensions, being well-formed, pass too). The trailer
/// section is held back while it is incomplete across reads, so that a trailer line that
/// turns out malformed never reaches the client even in part.
#[derive(Debug, Default)]
pub struct ChunkScan {
    state: Chunk,
    size: u64,
    /// Chunk data bytes read so far (the body without its framing).
    data: u64,
    /// Bytes of the current chunk-size line, or of the trailer section so far.
    line: usize,
    /// Trailer bytes from earlier reads, not passed on yet.
    held: Vec<u8>,
    /// Keep the whole trailer section in `kept` ([`ChunkScan::keeping_trailers`]).
    keep: bool,
    kept: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// At the start of a chunk-size line: a hex digit must come.
    #[default]
    Start,
    /// In the hex size.
    Size,
    /// Whitespace after the size or after an extension (BWS).
    Space,
    /// After `;`, before the extension's name.
    ExtStart,
    ExtName,
    /// Whitespace after an extension's name: `=`, `;` or the line's end must follow.
    ExtNameEnd,
    /// After `=`, before the value.
    ExtValueStart,
    ExtToken,
    ExtQuoted,
    /// After a backslash in a quoted value.
    ExtEscape,
    /// After a quoted value.
    ExtQuotedEnd,
    /// The CR of a chunk-size line was read.
    SizeLf,
    /// In the data; `size` bytes remain.
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line or of the final empty line.
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    FinalLf,
    Done,
}

impl Chunk {
    fn in_size_line(self) -> bool {
        use Chunk::*;
        matches!(
            self,
            Start
                | Size
                | Space
                | ExtStart
                | ExtName
                | ExtNameEnd
                | ExtValueStart
                | ExtToken
                | ExtQuoted
                | ExtEscape
                | ExtQuotedEnd
                | SizeLf
        )
    }

    fn in_trailers(self) -> bool {
        matches!(
            self,
            Chunk::TrailerStart
                | Chunk::TrailerName
                | Chunk::TrailerValue
                | Chunk::TrailerLf
                | Chunk::FinalLf
        )
    }
}

/// What [`ChunkScan::feed`] found in one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// The client gets `bytes[..pass]` now; when the body ended ([`Fed::end`]), followed
    /// by [`ChunkScan::held`].
    pub pass: usize,
    /// The body ends after `bytes[..end]`: what follows is not this response's.
    pub end: Option<usize>,
}

impl ChunkScan {
    /// Reads `bytes`, the body's next ones. `Err`: not chunked framing as RFC 9112 §7.1
    /// has it (an empty or non-hex size, a size over 64 bits, junk after the size, an
    /// extension that is not `;name[=value]`, data not followed by CRLF, a trailer line
    /// that is not `name: value`, a bare LF, or too long a size line or trailer section).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Fed, Malformed> {
        self.feed_with(bytes, |_| {})
    }

    /// [`ChunkScan::feed`], handing each run of chunk data in `bytes` to `data` as it is
    /// read (a run may be cut short by the end of `bytes`; none is handed out twice).
    /// `data` sees a body's data in order even when the framing turns out malformed
    /// later: a caller that must not pass on a bad body waits for the verdict.
    pub fn feed_with(
        &mut self,
        bytes: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<Fed, Malformed> {
        // Where this read's trailer bytes begin, once the trailer section has begun.
        let holding = self.state.in_trailers();
        let mut trailers = holding.then_some(0);
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if self.state == Chunk::Data {
                let take = self.size.min((bytes.len() - i) as u64) as usize;
                self.size -= take as u64;
                self.data += take as u64;
                data(&bytes[i..i + take]);
                i += take;
                if self.size == 0 {
                    self.state = Chunk::DataCr;
                }
                continue;
            }
            let trailer_byte = self.keep && self.state.in_trailers();
            self.state = self.step(b)?;
            if trailer_byte {
                self.kept.push(b);
            }
            i += 1;
            if self.state == Chunk::TrailerStart && trailers.is_none() {
                trailers = Some(i);
            }
            if self.state == Chunk::Done {
                return Ok(if holding {
                    self.held.extend_from_slice(&bytes[..i]);
                    Fed {
                        pass: 0,
                        end: Some(i),
                    }
                } else {
                    Fed {
                        pass: i,
                        end: Some(i),
                    }
                });
            }
        }
        match trailers {
            Some(t) => {
                self.held.extend_from_slice(&bytes[t..]);
                Ok(Fed { pass: t, end: None })
            }
            None => Ok(Fed {
                pass: bytes.len(),
                end: None,
            }),
        }
    }

    /// A scanner that also keeps the trailer section whole ([`ChunkScan::trailers`]),
    /// for a driver that passes the data on without its framing (HTTP/2 has a HEADERS
    /// frame for trailers).
    pub fn keeping_trailers() -> ChunkScan {
        ChunkScan {
            keep: true,
            ..ChunkScan::default()
        }
    }

    /// The trailer section read so far (its lines and the final empty line), when
    /// [`ChunkScan::keeping_trailers`]; complete once [`ChunkScan::done`]. Bounded by
    /// [`MAX_TRAILERS`].
    pub fn trailers(&self) -> &[u8] {
        &self.kept
    }

    /// Trailer bytes of earlier reads, for the client once the body has ended.
    pub fn held(&self) -> &[u8] {
        &self.held
    }

    /// Chunk data read so far: the body's length without its framing.
    pub fn data_bytes(&self) -> u64 {
        self.data
    }

    /// The body has ended (its final empty line was read).
    pub fn done(&self) -> bool {
        self.state == Chunk::Done
    }

    /// The state after byte `b` (any state but [`Chunk::Data`]).
    fn step(&mut self, b: u8) -> Result<Chunk, Malformed> {
        use Chunk::*;
        let limit = if self.state.in_size_line() {
            MAX_CHUNK_LINE
        } else if self.state.in_trailers() {
            MAX_TRAILERS
        } else {
            usize::MAX
        };
        self.line += 1;
        if self.line > limit {
            return Err(Malformed);
        }
        let hex = (b as char).to_digit(16);
        let next = match (self.state, b) {
            (Start | Size, _) if hex.is_some() => {
                let d = u64::from(hex.unwrap_or(0));
                self.size = self
                    .size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(d))
                    .ok_or(Malformed)?;
                Size
            }
            (Size | Space, b' ' | b'\t') => Space,
            (Size | Space | ExtToken | ExtQuotedEnd | ExtName, b';') => ExtStart,
            (Size | Space | ExtName | ExtToken | ExtQuotedEnd, b'\r') => SizeLf,
            (ExtStart, b' ' | b'\t') => ExtStart,
            (ExtStart | ExtName, _) if is_tchar(b) => ExtName,
            (ExtName | ExtNameEnd, b'=') => ExtValueStart,
            (ExtName | ExtNameEnd, b' ' | b'\t') => ExtNameEnd,
            (ExtNameEnd, b';') => ExtStart,
            (ExtNameEnd, b'\r') => SizeLf,
            (ExtValueStart, b' ' | b'\t') => ExtValueStart,
            (ExtValueStart, b'"') => ExtQuoted,
            (ExtValueStart | ExtToken, _) if is_tchar(b) => ExtToken,
            (ExtToken | ExtQuotedEnd, b' ' | b'\t') => Space,
            (ExtQuoted, b'"') => ExtQuotedEnd,
            (ExtQuoted, b'\\') => ExtEscape,
            (ExtQuoted | ExtEscape, _) if is_field_byte(b) => ExtQuoted,
            (SizeLf, b'\n') => {
                self.line = 0;
                if self.size == 0 {
                    TrailerStart
                } else {
                    Data
                }
            }
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => {
                self.size = 0;
                self.line = 0;
                Start
            }
            (TrailerStart, b'\r') => FinalLf,
            (TrailerStart | TrailerName, _) if is_tchar(b) => TrailerName,
            (TrailerName, b':') => TrailerValue,
            (TrailerValue, b'\r') => TrailerLf,
            (TrailerValue, _) if is_field_byte(b) => TrailerValue,
            (TrailerLf, b'\n') => TrailerStart,
            (FinalLf, b'\n') => Done,
            _ => return Err(Malformed),
        };
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scanner_keeping_trailers_has_the_section_whole_across_reads() {
        let mut s = ChunkScan::keeping_trailers();
        let mut data = Vec::new();
        s.feed_with(b"3\r\nabc\r\n0\r\ngrpc-sta", |d| data.extend_from_slice(d))
            .unwrap();
        assert!(!s.done());
        let fed = s.feed(b"tus: 0\r\nx: y\r\n\r\nNEXT").unwrap();
        assert_eq!(fed.end, Some(16));
        assert!(s.done());
        assert_eq!(data, b"abc");
        assert_eq!(s.trailers(), b"grpc-status: 0\r\nx: y\r\n\r\n");
        let mut plain = ChunkScan::keeping_trailers();
        plain.feed(b"0\r\n\r\n").unwrap();
        assert_eq!(plain.trailers(), b"\r\n");
        let mut off = ChunkScan::default();
        off.feed(b"0\r\nx: y\r\n\r\n").unwrap();
        assert!(off.trailers().is_empty());
    }

    /// Feeds `parts` in order: what the client got and where the body ended (in the
    /// concatenation of `parts`).
    fn scan(parts: &[&[u8]]) -> Result<(Vec<u8>, Option<usize>), Malformed> {
        let mut s = ChunkScan::default();
        let mut out = Vec::new();
        let mut seen = 0;
        for p in parts {
            let fed = s.feed(p)?;
            out.extend_from_slice(&p[..fed.pass]);
            if let Some(end) = fed.end {
                out.extend_from_slice(s.held());
                return Ok((out, Some(seen + end)));
            }
            seen += p.len();
        }
        Ok((out, None))
    }

    #[test]
    fn the_end_of_a_chunked_body_is_found_across_reads_and_passed_whole() {
        let body: &[u8] =
            b"5\r\nhello\r\n3;ext=1 ; q=\"a \\\" b\";flag\r\nabc\r\n0\r\nx-t: 1\r\nY:\r\n\r\nNEXT";
        let end = body.len() - 4;
        assert_eq!(scan(&[body]), Ok((body[..end].to_vec(), Some(end))));
        for cut in 1..body.len() {
            assert_eq!(
                scan(&[&body[..cut], &body[cut..]]),
                Ok((body[..end].to_vec(), Some(end))),
                "cut at {cut}"
            );
        }
        assert_eq!(scan(&[b"0\r\n\r\n"]), Ok((b"0\r\n\r\n".to_vec(), Some(5))));
        assert_eq!(scan(&[b"4\r\nab"]), Ok((b"4\r\nab".to_vec(), None)));
        let zeros: &[u8] = b"000A\r\n0123456789\r\n0;x = y\r\n\r\n";
        assert_eq!(scan(&[zeros]), Ok((zeros.to_vec(), Some(zeros.len()))));
    }

    /// Trailer bytes wait until the section is complete: a client never gets part of it.
    #[test]
    fn an_incomplete_trailer_section_is_held_back() {
        let mut s = ChunkScan::default();
        let fed = s.feed(b"2\r\nok\r\n0\r\nx-a: 1").unwrap();
        assert_eq!(
            fed,
            Fed {
                pass: 10,
                end: None
            }
        );
        assert_eq!(s.held(), b"x-a: 1");
        assert!(s.feed(b"\r\nHTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn what_is_not_chunked_framing_is_refused() {
        for bad in [
            &b"\r\n"[..],
            b"5\r\nhello\r\n\r\nHTTP/1.1 200 OK\r\n",
            b"zz\r\n",
            b"5 zz\r\nhello\r\n",
            b"5zz\r\n",
            b"-5\r\n",
            b"+5\r\n",
            b"0x5\r\n",
            b"5\nhello\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5;\r\n",
            b"5;=x\r\n",
            b"5;a=\r\n",
            b"5;a b\r\n",
            b"5;a=\"x\r\n",
            b"5;a=\"\x01\"\r\n",
            b"5;a=b c\r\n",
            b"5\r\r\n",
            b"fffffffffffffffff\r\n",
            b"0\r\nHTTP/1.1 200 OK\r\n\r\n",
            b"0\r\nx-a 1\r\n\r\n",
            b"0\r\nx-a: 1\r\n folded\r\n\r\n",
            b"0\r\n: v\r\n\r\n",
            b"0\r\nx-a: \x00\r\n\r\n",
            b"0\r\nx-a: 1\n\r\n",
            b"0\r\n\n",
            b"0\r\n\rX",
        ] {
            let got = scan(&[bad]);
            assert!(got.is_err(), "{:?}: {got:?}", String::from_utf8_lossy(bad));
        }
    }

    /// Any byte anywhere in a body, read in two parts cut anywhere: no panic, and what the
    /// client gets of a body found whole is exactly the bytes up to its end.
    #[test]
    fn every_byte_anywhere_is_either_framed_exactly_or_refused() {
        let base: &[u8] = b"3;a=\"b\"\r\nabc\r\n0\r\nx: 1\r\n\r\n";
        for at in 0..base.len() {
            for b in 0..=255u8 {
                let mut body = base.to_vec();
                body[at] = b;
                for cut in [0, at, body.len()] {
                    let (head, tail) = body.split_at(cut);
                    if let Ok((out, Some(end))) = scan(&[head, tail]) {
                        assert_eq!(out, &body[..end], "{:?}", String::from_utf8_lossy(&body));
                    }
                }
            }
        }
    }

    #[test]
    fn size_lines_and_trailer_sections_are_bounded() {
        let long_ext = format!("1;a={}\r\n", "x".repeat(MAX_CHUNK_LINE));
        assert!(scan(&[long_ext.as_bytes()]).is_err());
        let zeros = format!("{}1\r\n", "0".repeat(MAX_CHUNK_LINE));
        assert!(scan(&[zeros.as_bytes()]).is_err());
        let long_trailer = format!("0\r\nx: {}\r\n\r\n", "v".repeat(MAX_TRAILERS));
        assert!(scan(&[long_trailer.as_bytes()]).is_err());
        let fits = format!("0\r\nx: {}\r\n\r\n", "v".repeat(1000));
        assert!(scan(&[fits.as_bytes()]).unwrap().1.is_some());
    }

    /// The data runs, without the framing, and their count, across any cut.
    #[test]
    fn the_data_comes_out_without_its_framing() {
        let body: &[u8] = b"5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nt: 1\r\n\r\n";
        for cut in 0..=body.len() {
            let mut s = ChunkScan::default();
            let mut out = Vec::new();
            let first = s.feed_with(&body[..cut], |d| out.extend_from_slice(d));
            let fed = s.feed_with(&body[cut..], |d| out.extend_from_slice(d));
            assert!(first.is_ok() && fed.is_ok(), "cut at {cut}");
            assert_eq!(out, b"hello world", "cut at {cut}");
            assert_eq!(s.data_bytes(), 11);
            assert!(s.done());
        }
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        /// A well-formed chunked body: chunks (with optional extensions), trailers.
        fn body() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
            let chunk = (
                proptest::collection::vec(any::<u8>(), 1..300),
                prop_oneof![Just(""), Just(";a=b"), Just(" ;q=\"x y\""), Just(";flag")],
                any::<bool>(),
            );
            let trailer = prop_oneof![Just("x-sum: 1\r\n"), Just("T:\r\n"), Just("a-b: c d\r\n")];
            (
                proptest::collection::vec(chunk, 0..6),
                proptest::collection::vec(trailer, 0..3),
            )
                .prop_map(|(chunks, trailers)| {
                    let (mut wire, mut data) = (Vec::new(), Vec::new());
                    for (bytes, ext, upper) in chunks {
                        let size = if upper {
                            format!("{:X}", bytes.len())
                        } else {
                            format!("{:x}", bytes.len())
                        };
                        wire.extend_from_slice(format!("{size}{ext}\r\n").as_bytes());
                        wire.extend_from_slice(&bytes);
                        wire.extend_from_slice(b"\r\n");
                        data.extend_from_slice(&bytes);
                    }
                    wire.extend_from_slice(b"0\r\n");
                    for t in trailers {
                        wire.extend_from_slice(t.as_bytes());
                    }
                    wire.extend_from_slice(b"\r\n");
                    (wire, data)
                })
        }

        /// What passed (with the held trailers at the end), the data, where the body
        /// ended, the data counted.
        type Ran = (Vec<u8>, Vec<u8>, Option<usize>, u64);

        /// Feeds `wire` cut at `cuts`.
        fn run(wire: &[u8], cuts: &[usize]) -> Result<Ran, Malformed> {
            let mut s = ChunkScan::default();
            let (mut out, mut data) = (Vec::new(), Vec::new());
            let mut at = 0;
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            points.sort_unstable();
            points.push(wire.len());
            for p in points {
                let part = &wire[at..p.max(at)];
                let fed = s.feed_with(part, |d| data.extend_from_slice(d))?;
                assert!(fed.pass <= part.len());
                out.extend_from_slice(&part[..fed.pass]);
                if let Some(end) = fed.end {
                    assert!(fed.pass <= end && end <= part.len());
                    out.extend_from_slice(s.held());
                    return Ok((out, data, Some(at + end), s.data_bytes()));
                }
                at = p.max(at);
            }
            Ok((out, data, None, s.data_bytes()))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            /// A well-formed body, with the next request after it, cut anywhere: its end
            /// is found exactly, it passes whole and unchanged, its data is counted.
            #[test]
            fn a_wellformed_body_is_framed_exactly_however_it_is_cut(
                (wire, data) in body(),
                cuts in proptest::collection::vec(any::<usize>(), 0..5),
            ) {
                let mut stream = wire.clone();
                stream.extend_from_slice(b"POST / HTTP/1.1\r\n");
                let (out, got, end, counted) = run(&stream, &cuts).expect("well-formed");
                prop_assert_eq!(end, Some(wire.len()));
                prop_assert_eq!(out, wire);
                prop_assert_eq!(counted, data.len() as u64);
                prop_assert_eq!(got, data);
            }

            /// Any byte changed, any cut: no panic, and a body found whole is exactly the
            /// bytes before its end, with no more data than bytes.
            #[test]
            fn a_mangled_body_is_framed_exactly_or_refused(
                (wire, _) in body(),
                at in any::<usize>(),
                byte in any::<u8>(),
                cuts in proptest::collection::vec(any::<usize>(), 0..5),
            ) {
                let mut wire = wire;
                let i = at % wire.len();
                wire[i] = byte;
                if let Ok((out, _, end, counted)) = run(&wire, &cuts) {
                    if let Some(end) = end {
                        prop_assert_eq!(&out[..], &wire[..end]);
                    }
                    prop_assert!(counted <= wire.len() as u64);
                }
            }
        }
    }

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(content_length(b"0"), Some(0));
        assert_eq!(content_length(b"  42\t"), Some(42));
        assert_eq!(
            content_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        for bad in [
            &b""[..],
            b" ",
            b"+5",
            b"-5",
            b"5 5",
            b"5,5",
            b"5, 5",
            b"0x5",
            b"5a",
            b"10000000000000000000",
            b"\xd9\xa5",
        ] {
            assert_eq!(
                content_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn chunked_must_be_the_last_coding_and_come_once() {
        let codings = |lines: &[&str]| {
            let mut c = Codings::default();
            lines
                .iter()
                .try_for_each(|l| c.add(l.as_bytes()))
                .map(|()| c.chunked)
        };
        assert_eq!(codings(&["chunked"]), Ok(true));
        assert_eq!(codings(&["gzip, Chunked"]), Ok(true));
        assert_eq!(codings(&["gzip", "chunked"]), Ok(true));
        assert_eq!(codings(&["gzip"]), Ok(false));
        for bad in [
            &["chunked, gzip"][..],
            &["chunked", "gzip"],
            &["chunked, chunked"],
            &["chunked", "chunked"],
            &[""],
            &["gzip,"],
            &["chun ked"],
            &["chunked;q=1"],
        ] {
            assert!(codings(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn connection_may_not_nominate_framing_headers() {
        assert!(nominates_framing(b"Content-Length"));
        assert!(nominates_framing(b"x-a, transfer-encoding"));
        assert!(!nominates_framing(b"close, x-content-length"));
    }
}
