//! The `grpc-timeout` header (gRPC over HTTP/2, "Requests"): at most 8 ASCII digits and
//! a unit (`H`, `M`, `S`, `m`, `u`, `n`), read from a caller and written upstream.
//!
//! Owns: the header's syntax both ways; writing rounds up to the smallest unit that
//! holds the value in 8 digits (as grpc-go does), so the deadline an upstream works to
//! never ends before busbar's own.
//! Must not: decide which deadline bounds a call (`passthrough`, `drivers::json_grpc`).

use std::time::Duration;

use http::HeaderValue;

/// The header's name.
pub(crate) const NAME: &str = "grpc-timeout";

/// Largest value the header carries in one unit: 8 digits.
const MAX: u128 = 99_999_999;

/// The caller's timeout, or `None` when the value is not the header's syntax (gRPC says
/// to treat it as absent).
pub(crate) fn parse(v: &HeaderValue) -> Option<Duration> {
    let b = v.as_bytes();
    let (&unit, digits) = b.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `d` as the header's value, rounded up; at least `1n`.
pub(crate) fn encode(d: Duration) -> HeaderValue {
    let nanos = d.as_nanos().max(1);
    const UNITS: [(u128, u8); 6] = [
        (1, b'n'),
        (1_000, b'u'),
        (1_000_000, b'm'),
        (1_000_000_000, b'S'),
        (60_000_000_000, b'M'),
        (3_600_000_000_000, b'H'),
    ];
    let (mut n, mut unit) = (MAX, b'H');
    for (per, u) in UNITS {
        let v = nanos.div_ceil(per);
        if v <= MAX {
            (n, unit) = (v, u);
            break;
        }
    }
    // Digits and a unit: at most 9 ASCII bytes, written without a heap string.
    let mut buf = [0u8; 9];
    let mut i = buf.len() - 1;
    buf[i] = unit;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    HeaderValue::from_bytes(&buf[i..]).unwrap_or_else(|_| HeaderValue::from_static("1n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<Duration> {
        parse(&HeaderValue::from_str(s).unwrap())
    }

    #[test]
    fn every_unit_is_read_and_bad_values_are_none() {
        assert_eq!(p("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(p("3M"), Some(Duration::from_secs(180)));
        assert_eq!(p("10S"), Some(Duration::from_secs(10)));
        assert_eq!(p("250m"), Some(Duration::from_millis(250)));
        assert_eq!(p("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(p("5n"), Some(Duration::from_nanos(5)));
        for bad in [
            "",
            "m",
            "10",
            "10s",
            "123456789m",
            "-1S",
            "1.5S",
            " 1S",
            "1 S",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn written_in_the_smallest_unit_that_fits_rounded_up() {
        let e = |d: Duration| encode(d).to_str().unwrap().to_string();
        assert_eq!(e(Duration::from_nanos(1500)), "1500n");
        assert_eq!(e(Duration::from_millis(300)), "300000u");
        assert_eq!(e(Duration::from_nanos(300_000_001)), "300001u");
        assert_eq!(e(Duration::from_secs(10)), "10000000u");
        assert_eq!(e(Duration::from_secs(1000)), "1000000m");
        assert_eq!(e(Duration::from_secs(200_000)), "200000S");
        assert_eq!(e(Duration::ZERO), "1n");
        assert_eq!(e(Duration::MAX), "99999999H");
        // What is written reads back as at least the value.
        for ms in [1, 999, 1_000, 123_456, 100_000_000] {
            let d = Duration::from_millis(ms) + Duration::from_nanos(7);
            assert!(parse(&encode(d)).unwrap() >= d, "{d:?}");
        }
    }
}
