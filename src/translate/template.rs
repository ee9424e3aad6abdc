//! `google.api.http` path templates: parsing and matching.
//!
//! Owns: the template grammar (`/v1/{name=shelves/*}/books/{book.id}:verb`, `*`, `**`)
//! and binding a request path's segments to request-field paths.
//! Must not: know about descriptors or JSON; the caller converts captured text.

use std::borrow::Cow;

/// One segment of a flattened template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**`: the rest of the path (zero or more segments); only last.
    Rest,
}

/// A variable: the request field it fills and the template segments it spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// `book.id` → `["book", "id"]`.
    pub field_path: Vec<String>,
    start: usize,
    end: usize,
}

/// A compiled path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    segs: Vec<Seg>,
    pub vars: Vec<Variable>,
    verb: Option<String>,
}

/// A field bound from the path: its field path and the percent-decoded value.
pub type Binding = (Vec<String>, String);

impl PathTemplate {
    /// Parses a template; the error says what is wrong in words a config author reads.
    pub fn parse(t: &str) -> Result<PathTemplate, String> {
        let rest = t
            .strip_prefix('/')
            .ok_or_else(|| format!("path template \"{t}\" must start with '/'"))?;
        // A verb is a `:` after the last `}` / '/'.
        let last_slash_or_brace = rest.rfind(['/', '}']).map_or(0, |i| i + 1);
        let (body, verb) = match rest[last_slash_or_brace..].find(':') {
            Some(i) => {
                let at = last_slash_or_brace + i;
                (&rest[..at], Some(rest[at + 1..].to_string()))
            }
            None => (rest, None),
        };
        let mut segs = Vec::new();
        let mut vars = Vec::new();
        let mut s = body;
        while !s.is_empty() {
            if let Some(inner) = s.strip_prefix('{') {
                let close = inner
                    .find('}')
                    .ok_or_else(|| format!("path template \"{t}\": '{{' without '}}'"))?;
                let var = &inner[..close];
                let (field, pattern) = match var.split_once('=') {
                    Some((f, p)) => (f, p),
                    None => (var, "*"),
                };
                let field_path: Vec<String> = field.split('.').map(str::to_string).collect();
                if field_path.iter().any(|p| !is_ident(p)) {
                    return Err(format!(
                        "path template \"{t}\": \"{field}\" is not a field path"
                    ));
                }
                let start = segs.len();
                for p in pattern.split('/') {
                    segs.push(segment(p, t)?);
                }
                vars.push(Variable {
                    field_path,
                    start,
                    end: segs.len(),
                });
                s = &inner[close + 1..];
            } else {
                let end = s.find('/').unwrap_or(s.len());
                let p = &s[..end];
                if p.contains(['{', '}']) {
                    return Err(format!(
                        "path template \"{t}\": a variable must fill a whole segment"
                    ));
                }
                segs.push(segment(p, t)?);
                s = &s[end..];
            }
            if let Some(next) = s.strip_prefix('/') {
                if next.is_empty() {
                    return Err(format!("path template \"{t}\" ends with '/'"));
                }
                s = next;
            } else if !s.is_empty() {
                return Err(format!(
                    "path template \"{t}\": expected '/' after a variable"
                ));
            }
        }
        if let Some(i) = segs.iter().position(|s| *s == Seg::Rest) {
            if i + 1 != segs.len() {
                return Err(format!(
                    "path template \"{t}\": '**' must be the last segment"
                ));
            }
        }
        Ok(PathTemplate { segs, vars, verb })
    }

    /// Matches a request path (no query); returns the variables' values, percent-decoded
    /// (a multi-segment variable keeps `%2F` encoded, as the spec says).
    pub fn matches(&self, path: &str) -> Option<Vec<Binding>> {
        let path = path.strip_prefix('/')?;
        let (path, verb) = match &self.verb {
            Some(v) => {
                let p = path.strip_suffix(v.as_str())?.strip_suffix(':')?;
                (p, Some(v))
            }
            None => (path, None),
        };
        let _ = verb;
        let parts: Vec<&str> = if path.is_empty() {
            Vec::new()
        } else {
            path.split('/').collect()
        };
        let rest = self.segs.last() == Some(&Seg::Rest);
        let fixed = if rest {
            self.segs.len() - 1
        } else {
            self.segs.len()
        };
        if parts.len() < fixed || (!rest && parts.len() != fixed) {
            return None;
        }
        for (seg, part) in self.segs.iter().zip(&parts) {
            match seg {
                Seg::Literal(l) if l != part => return None,
                Seg::One if part.is_empty() => return None,
                _ => {}
            }
        }
        let mut out = Vec::with_capacity(self.vars.len());
        for v in &self.vars {
            let end = if rest && v.end == self.segs.len() {
                parts.len()
            } else {
                v.end
            };
            let taken = parts.get(v.start..end)?;
            let value = if taken.len() == 1 && !(rest && v.end == self.segs.len()) {
                decode(taken[0], true)
            } else {
                decode(&taken.join("/"), false)
            };
            out.push((v.field_path.clone(), value?));
        }
        Some(out)
    }

    /// Every field path bound by the template (query parameters may not set them).
    pub fn bound(&self) -> impl Iterator<Item = &[String]> {
        self.vars.iter().map(|v| v.field_path.as_slice())
    }
}

fn segment(p: &str, t: &str) -> Result<Seg, String> {
    match p {
        "*" => Ok(Seg::One),
        "**" => Ok(Seg::Rest),
        "" => Err(format!("path template \"{t}\" has an empty segment")),
        l if l.contains(['*', '{', '}', '=']) => {
            Err(format!("path template \"{t}\": bad segment \"{l}\""))
        }
        l => Ok(Seg::Literal(l.to_string())),
    }
}

fn is_ident(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Percent-decodes; `%2F` stays encoded unless `all`. Invalid UTF-8 is a mismatch.
fn decode(s: &str, all: bool) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    if all {
        return percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(Cow::into_owned);
    }
    let mut out = String::with_capacity(s.len());
    for (i, piece) in s.split("%2F").enumerate() {
        if i > 0 {
            out.push_str("%2F");
        }
        out.push_str(
            &percent_encoding::percent_decode_str(piece)
                .decode_utf8()
                .ok()?,
        );
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: &str, p: &str) -> Option<Vec<(String, String)>> {
        PathTemplate::parse(t)
            .unwrap()
            .matches(p)
            .map(|v| v.into_iter().map(|(f, s)| (f.join("."), s)).collect())
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.to_string(), b.to_string())
    }

    #[test]
    fn simple_variables_bind() {
        assert_eq!(
            m("/v1/shelves/{shelf}/books/{id}", "/v1/shelves/3/books/42"),
            Some(vec![pair("shelf", "3"), pair("id", "42")])
        );
        assert_eq!(
            m("/v1/shelves/{shelf}/books/{id}", "/v1/shelves/3/books"),
            None
        );
        assert_eq!(
            m("/v1/shelves/{shelf}/books/{id}", "/v1/shelves/3/books/4/5"),
            None
        );
        assert_eq!(m("/v1/shelves/{shelf}", "/v1/shelves/"), None);
        assert_eq!(m("/v1/echo", "/v1/echo"), Some(vec![]));
        assert_eq!(m("/v1/echo", "/v1/echo2"), None);
    }

    #[test]
    fn nested_field_paths_and_patterns() {
        assert_eq!(
            m("/v1/books/{book.id}", "/v1/books/7"),
            Some(vec![pair("book.id", "7")])
        );
        assert_eq!(
            m("/v1/{name=shelves/*/books/*}", "/v1/shelves/1/books/2"),
            Some(vec![pair("name", "shelves/1/books/2")])
        );
        assert_eq!(
            m("/v1/{name=shelves/*/books/*}", "/v1/shelves/1/notes/2"),
            None
        );
        assert_eq!(
            m("/files/{path=**}", "/files/a/b/c.txt"),
            Some(vec![pair("path", "a/b/c.txt")])
        );
        assert_eq!(m("/files/**", "/files"), Some(vec![]));
    }

    #[test]
    fn verbs_and_percent_decoding() {
        assert_eq!(
            m("/v1/{name}:cancel", "/v1/op%201:cancel"),
            Some(vec![pair("name", "op 1")])
        );
        assert_eq!(m("/v1/{name}:cancel", "/v1/op1"), None);
        assert_eq!(
            m("/v1/{name=**}", "/v1/a%2Fb/c%20d"),
            Some(vec![pair("name", "a%2Fb/c d")])
        );
        assert_eq!(m("/v1/{id}", "/v1/%FF"), None, "not UTF-8");
    }

    #[test]
    fn bad_templates_are_refused() {
        for t in [
            "v1/x",
            "/v1/{id",
            "/v1/{a-b}",
            "/v1/**/x",
            "/v1/x{id}",
            "/v1/",
            "/v1//x",
        ] {
            assert!(PathTemplate::parse(t).is_err(), "{t}");
        }
    }
}
