//! The running configuration's text with its secrets taken out, for the console's config
//! page. Line for line the file's own text, so a reload error's `file:line:col` points at
//! the line the page shows.
//!
//! Owns: which values count as secret: the string value of a key whose name says token,
//! secret, password, private or sha256 (token and API-key hashes can be guessed offline),
//! except `*_env` keys, which name an environment variable, not its value; and the
//! user-info part of any URL (`redis://user:pass@host`).
//! Must not: parse or validate the configuration (`config/` does).

/// What a redacted value reads as.
pub const REDACTED: &str = "<redacted>";

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Whether a key's value is a secret.
fn sensitive(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    !k.ends_with("_env")
        && ["token", "secret", "password", "passwd", "private", "sha256"]
            .iter()
            .any(|s| k.contains(s))
}

/// `text` with every secret value replaced by [`REDACTED`].
pub fn redact(text: &str) -> String {
    redact_urls(&redact_keys(text))
}

/// Replaces the quoted value after `key =` for every sensitive key.
fn redact_keys(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        if !is_key_byte(b[i]) || (i > 0 && is_key_byte(b[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && is_key_byte(b[i]) {
            i += 1;
        }
        let key = &text[start..i];
        let mut j = i;
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        if j >= b.len() || b[j] != b'=' || !sensitive(key) {
            continue;
        }
        j += 1;
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        let Some(&quote) = b.get(j) else { break };
        if quote != b'"' && quote != b'\'' {
            continue;
        }
        // The end of the string on this line; a basic string may escape its quote.
        let mut k = j + 1;
        while k < b.len() && b[k] != quote && b[k] != b'\n' {
            if quote == b'"' && b[k] == b'\\' {
                k += 1;
            }
            k += 1;
        }
        let end = k.min(b.len());
        out.push_str(&text[copied..=j]);
        out.push_str(REDACTED);
        copied = end;
        i = end;
    }
    out.push_str(&text[copied..]);
    out
}

/// Replaces the user info of every `scheme://user:pass@host`.
fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(p) = rest.find("://") {
        let (head, tail) = rest.split_at(p + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| matches!(c, '/' | '"' | '\'' | ',' | ']' | '}') || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str(REDACTED);
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_go_and_lines_stay() {
        let text = "[[registry.token]]\ntoken_sha256 = \"abcdef\"  # the hash\ntoken_env = \"ORDERS_TOKEN\"\n\
            services = [\"orders\"]\n[[auth.api_key]]\nuser = \"alice\"\nsha256 = 'deadbeef'\n\
            [[auth.jwt]]\nname = \"idp\"\nsecret_env = \"JWT_SECRET\"\n\
            x = { token_sha256 = \"c0ffee\", services = [\"a\"] }\n\
            [cluster]\nredis = \"redis://user:pa55@127.0.0.1:6379/0\"\n";
        let r = redact(text);
        for gone in ["abcdef", "deadbeef", "c0ffee", "pa55", "user:"] {
            assert!(!r.contains(gone), "{gone} left in:\n{r}");
        }
        for kept in [
            "ORDERS_TOKEN",
            "JWT_SECRET",
            "alice",
            "# the hash",
            "services = [\"a\"]",
            "@127.0.0.1:6379/0",
        ] {
            assert!(r.contains(kept), "{kept} missing in:\n{r}");
        }
        assert_eq!(r.lines().count(), text.lines().count());
        assert!(
            r.contains("token_sha256 = \"<redacted>\"  # the hash"),
            "{r}"
        );
    }

    #[test]
    fn odd_text_never_panics() {
        for t in [
            "token =",
            "token = \"",
            "token = \"a\\",
            "secret=",
            "x://",
            "a://b@",
            "ü token = \"é\"",
            "",
        ] {
            let _ = redact(t);
        }
        assert_eq!(redact("secret = \"a\\\"b\""), "secret = \"<redacted>\"");
        assert_eq!(redact("token_env = \"T\""), "token_env = \"T\"");
    }
}
