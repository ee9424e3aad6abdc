//! The layering of `src/`: every module sits in a declared order (top → bottom) and may
//! import only modules below it. The test reads every `crate::…` path in `src/` (in `use`
//! lines and inline) and every `super::…` that climbs out of a module, and fails with
//! `src/x.rs:LINE imports crate::y (…)` for each import that points up. A module that is
//! in no layer fails too, so every new module gets placed.
//!
//! Why a test: the module headers say what each module must not touch; this keeps the
//! cycle the crate once was (one import cycle over ~41 files) from growing back
//! (rust-analyzer's `tidy` and linkerd2-proxy's crate graph do the same job).
//! `ARCHITECTURE.md` explains the layers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The layers, top → bottom. Inside a layer the list is an order too (a module may use
/// the ones after it), so no two modules can import each other. An entry is a module path;
/// a file or an import belongs to the longest entry that is a prefix of its module path
/// (`registry::api` is placed apart from the rest of `registry`).
const LAYERS: &[(&str, &[&str])] = &[
    // What starts the process and wires everything together, once.
    ("wiring", &["main", "app", "ctl", "demo", "upgrade"]),
    // The operator's and the services' HTTP APIs on their own listeners.
    (
        "control",
        &[
            "admin",
            "console",
            "release::admin",
            "cluster::etcd",
            "registry::api",
            // The services listing the admin API and the console both serve.
            "listing",
        ],
    ),
    // What serves client traffic: the front door (`edge`) hands a connection to a driver
    // (busbar's HTTP/1 engine, the pingora adapter, JSON→gRPC calls) or to the CONNECT
    // tunnel.
    // The tunnel's copy serves both an upgrade (`drivers::h1`) and a CONNECT.
    (
        "drivers",
        &["edge", "drivers", "fallback::connect", "drivers::tunnel"],
    ),
    // The request phases every driver calls; span export hooks into them and reads the
    // request context; busbar's own answers and the trace context under both.
    (
        "phases",
        &[
            "phases",
            "otel",
            "phases::ctx",
            "phases::forwarding",
            "phases::pace",
            "accesslog",
            "proxy",
            "translate",
        ],
    ),
    // Shared state, reload, and the background tasks that walk the current snapshot.
    (
        "runtime",
        &[
            "health::checker",
            "registry::dns",
            "registry::sync",
            "release::sync",
            "snapshot",
            "live",
            "registry::listener",
            "listeners",
            "tls",
            "proxy_header",
            "supervisor",
            "ready",
            "logging",
        ],
    ),
    // What to do with a request: routing, admission, releases, fallback, the registry store.
    (
        "policy",
        &[
            "admission",
            "release",
            "fallback",
            "routing",
            "health",
            "registry",
            "registry::gate",
            "registry::persist",
            "registry::store",
            "cluster::redis",
            "cluster::redis_shards",
            "cluster::redis_conn",
            "cluster::etcd_conn",
            "cluster",
        ],
    ),
    // Protocol codecs, pure functions of their input.
    (
        "codecs",
        &[
            "translate::json_grpc",
            "translate::grpc_web",
            "translate::descriptors",
            "translate::status",
            "translate::template",
        ],
    ),
    // Instances, instance sets and services with their health, sidecar and version state.
    ("model", &["model"]),
    // The validated configuration: data only.
    ("config", &["config"]),
    ("metrics", &["metrics"]),
    // Small leaf helpers with no busbar dependency.
    (
        "base",
        &[
            "base",
            "text",
            "via",
            "version",
            "durable",
            "statedir",
            "client_addr",
            "bearer",
        ],
    ),
];

/// Imports that still point up: (file, the module it may import with everything under
/// it, why it remains). Keep this short; each entry is work left to do.
const ALLOWED: &[(&str, &str, &str)] = &[(
    "src/config/translate.rs",
    "translate",
    "config compiles protos into the route's `Translation` so a bad proto fails \
         `busbar check` with file:line:col; moving the compile into the runtime build needs \
         the request path to read translators from the snapshot, which the phases branch \
         is rewriting",
)];

/// One upward (or unplaced) import.
#[derive(Debug, PartialEq)]
struct Violation(String);

/// Where a module path sits: (layer index, position in the total order, entry).
fn place(path: &[String]) -> Option<(usize, usize, &'static str)> {
    let mut best: Option<(usize, usize, &'static str, usize)> = None;
    let mut rank = 0;
    for (li, (_, entries)) in LAYERS.iter().enumerate() {
        for e in entries.iter() {
            let segs: Vec<&str> = e.split("::").collect();
            let matches = segs.len() <= path.len() && segs.iter().zip(path).all(|(a, b)| a == b);
            if matches && best.is_none_or(|b| segs.len() > b.3) {
                best = Some((li, rank, e, segs.len()));
            }
            rank += 1;
        }
    }
    best.map(|(l, r, e, _)| (l, r, e))
}

/// The module path of a file under `src/` (`src/a/b.rs` → `a::b`, `src/a/mod.rs` → `a`).
fn module_of(rel: &Path) -> Vec<String> {
    let mut segs: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if segs.last().is_some_and(|s| s == "mod") {
        segs.pop();
    }
    if segs.len() == 1 && segs[0] == "lib" {
        segs.clear();
    }
    segs
}

/// The source with comments, string and char literals blanked (newlines kept, so line
/// numbers stay true).
fn code_only(src: &str) -> String {
    blanked(src, true)
}

/// The source with comments blanked, and string and char literals too if `strings`.
fn blanked(src: &str, strings: bool) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |out: &mut String, s: &[u8]| {
        for &c in s {
            out.push(if c == b'\n' { '\n' } else { ' ' });
        }
    };
    while i < b.len() {
        let rest = &b[i..];
        let end = if rest.starts_with(b"//") {
            rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len())
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            let mut j = 0;
            while j < rest.len() {
                if rest[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            j
        } else if (rest.starts_with(b"r\"") || rest.starts_with(b"r#") || rest.starts_with(b"br"))
            && !(i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            let start = if rest[0] == b'b' { 2 } else { 1 };
            let hashes = rest[start..].iter().take_while(|&&c| c == b'#').count();
            if rest.get(start + hashes) != Some(&b'"') {
                out.push(rest[0] as char);
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let body = start + hashes + 1;
            rest[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(rest.len(), |p| body + p + close.len())
        } else if rest[0] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            (j + 1).min(rest.len())
        } else if rest[0] == b'\'' {
            // A char literal ('x', '\n', '\''), else a lifetime.
            if rest.get(1) == Some(&b'\\') {
                rest[2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map_or(1, |p| p + 3)
            } else if rest.get(2) == Some(&b'\'') {
                3
            } else {
                let ch = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                if rest.get(1 + ch) == Some(&b'\'') {
                    ch + 2
                } else {
                    out.push('\'');
                    i += 1;
                    continue;
                }
            }
        } else {
            let ch = src[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&src[i..i + ch]);
            i += ch;
            continue;
        };
        let comment = rest.starts_with(b"//") || rest.starts_with(b"/*");
        if comment || strings {
            blank(&mut out, &rest[..end]);
        } else {
            out.push_str(&src[i..i + end]);
        }
        i += end;
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Path, // ::
    Open,
    Close,
    Comma,
    Dollar,
    Other,
}

fn tokens(code: &str) -> Vec<(Tok, usize)> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push((Tok::Ident(code[s..i].to_string()), line));
        } else if b[i..].starts_with(b"::") {
            out.push((Tok::Path, line));
            i += 2;
        } else {
            out.push((
                match c {
                    b'{' => Tok::Open,
                    b'}' => Tok::Close,
                    b',' => Tok::Comma,
                    b'$' => Tok::Dollar,
                    _ => Tok::Other,
                },
                line,
            ));
            i += 1;
        }
    }
    out
}

/// Every absolute module path `code` names through `crate::` or `super::`, with its line.
/// `module` is the file's module path.
fn imports(module: &[String], code: &str) -> Vec<(Vec<String>, usize)> {
    let toks = tokens(code);
    let mut out = Vec::new();
    // Inline modules (`mod tests {`): their names and the brace depth they opened at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let ident = |k: usize| match toks.get(k) {
        Some((Tok::Ident(s), _)) => Some(s.as_str()),
        _ => None,
    };
    let mut k = 0;
    while k < toks.len() {
        match &toks[k].0 {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(w) if w == "mod" => {
                if let (Some(name), Some((Tok::Open, _))) = (ident(k + 1), toks.get(k + 2)) {
                    inline.push((name.to_string(), depth));
                }
            }
            Tok::Ident(w)
                if (w == "crate" || w == "super")
                    && toks.get(k + 1).map(|t| &t.0) == Some(&Tok::Path) =>
            {
                if k > 0 && toks[k - 1].0 == Tok::Dollar {
                    k += 1;
                    continue;
                }
                // Or `…::crate` (not a path start).
                if k > 0 && toks[k - 1].0 == Tok::Path {
                    k += 1;
                    continue;
                }
                let line = toks[k].1;
                let mut base: Vec<String> = Vec::new();
                if w == "super" {
                    base.extend(module.iter().cloned());
                    base.extend(inline.iter().map(|(n, _)| n.clone()));
                    while ident(k) == Some("super")
                        && toks.get(k + 1).map(|t| &t.0) == Some(&Tok::Path)
                    {
                        base.pop();
                        k += 2;
                    }
                } else {
                    k += 2;
                }
                k = tree(&toks, k, base, line, &mut out);
                continue;
            }
            _ => {}
        }
        k += 1;
    }
    out
}

/// Reads a use-tree at `k` (`a::b`, `a::{b, c::d}`, `self`) under `prefix`; returns the
/// index after it.
fn tree(
    toks: &[(Tok, usize)],
    mut k: usize,
    mut prefix: Vec<String>,
    line: usize,
    out: &mut Vec<(Vec<String>, usize)>,
) -> usize {
    loop {
        match toks.get(k).map(|t| &t.0) {
            Some(Tok::Ident(s)) => {
                if s != "self" {
                    prefix.push(s.clone());
                }
                k += 1;
                if toks.get(k).map(|t| &t.0) == Some(&Tok::Path) {
                    k += 1;
                    continue;
                }
                out.push((prefix, line));
                return k;
            }
            Some(Tok::Open) => {
                k += 1;
                loop {
                    match toks.get(k).map(|t| &t.0) {
                        Some(Tok::Close) => return k + 1,
                        Some(Tok::Comma) => k += 1,
                        None => return k,
                        _ => {
                            let before = k;
                            k = tree(toks, k, prefix.clone(), toks[k].1, out);
                            if k == before {
                                k += 1;
                            }
                        }
                    }
                }
            }
            _ => {
                out.push((prefix, line));
                return k;
            }
        }
    }
}

/// Files included with `#[path = "x_tests.rs"] mod tests;`: their module path is the
/// declaring module's `tests`, not what their file name says.
fn path_attributes(rel: &Path, src: &str, out: &mut HashMap<PathBuf, Vec<String>>) {
    let mut rest = src;
    while let Some(at) = rest.find("#[path = \"") {
        rest = &rest[at + 10..];
        let Some(end) = rest.find('"') else { return };
        let file = &rest[..end];
        let after = rest[end..].split_once("mod ").map(|(_, m)| m);
        let name: String = after
            .unwrap_or("")
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let mut module = module_of(rel);
        module.push(name);
        let dir = rel.parent().unwrap_or(Path::new(""));
        out.insert(dir.join(file), module);
    }
}

/// Checks one file (path relative to `src/`, its text); pushes what is wrong.
fn check_file(rel: &Path, src: &str, out: &mut Vec<Violation>) {
    check_module(rel, module_of(rel), src, out)
}

fn check_module(rel: &Path, module: Vec<String>, src: &str, out: &mut Vec<Violation>) {
    let shown = Path::new("src").join(rel);
    if module.is_empty() {
        return; // lib.rs: only `mod` lines.
    }
    let Some((from_layer, from_rank, from_entry)) = place(&module) else {
        out.push(Violation(format!(
            "{}: module {} is in no layer: add it to LAYERS in tests/architecture.rs",
            shown.display(),
            module.join("::")
        )));
        return;
    };
    for (path, line) in imports(&module, &code_only(src)) {
        let Some((to_layer, to_rank, to_entry)) = place(&path) else {
            out.push(Violation(format!(
                "{}:{line} imports crate::{}, which is in no layer",
                shown.display(),
                path.join("::")
            )));
            continue;
        };
        if to_entry == from_entry || to_rank > from_rank {
            continue;
        }
        let file = shown.to_string_lossy();
        if ALLOWED.iter().any(|(f, t, _)| {
            *f == file && (to_entry == *t || to_entry.starts_with(&format!("{t}::")))
        }) {
            continue;
        }
        let why = if to_layer == from_layer {
            format!(
                "{to_entry} is listed above {from_entry} in layer {}",
                LAYERS[to_layer].0
            )
        } else {
            format!(
                "layer {} is above {}",
                LAYERS[to_layer].0, LAYERS[from_layer].0
            )
        };
        out.push(Violation(format!(
            "{}:{line} imports crate::{} ({why})",
            shown.display(),
            path.join("::")
        )));
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn imports_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() > 50,
        "read {} files under {}",
        files.len(),
        src.display()
    );
    let texts: Vec<(PathBuf, String)> = files
        .iter()
        .map(|f| {
            let rel = f.strip_prefix(&src).unwrap().to_path_buf();
            (rel, std::fs::read_to_string(f).unwrap())
        })
        .collect();
    let mut included = HashMap::new();
    for (rel, text) in &texts {
        path_attributes(rel, text, &mut included);
    }
    let mut bad = Vec::new();
    for (rel, text) in &texts {
        let module = included.get(rel).cloned().unwrap_or_else(|| module_of(rel));
        check_module(rel, module, text, &mut bad);
    }
    let list: Vec<&str> = bad.iter().map(|v| v.0.as_str()).collect();
    assert!(
        list.is_empty(),
        "{} import(s) point up the layers (see ARCHITECTURE.md; move the code down, or pass \
         what the lower module needs in):\n{}",
        list.len(),
        list.join("\n")
    );
}

/// Files that may write an `"error":` key themselves, each with its reason.
const OWN_JSON_ERRORS: &[(&str, &str)] = &[
    ("src/base/reply.rs", "the one builder"),
    (
        "src/accesslog.rs",
        "the access log's `error` field, not an answer",
    ),
    (
        "src/drivers/json_grpc.rs",
        "a gRPC error mapped for a JSON caller keeps grpc-gateway's shape (issue 25 gives \
         every error of a translated route that shape); its `bad_gateway` goes with it",
    ),
];

/// Busbar's own answers have one shape because one builder writes them
/// (`base::reply::Refusal`): a JSON `"error"` key written anywhere else is a second shape
/// in the making.
#[test]
fn busbar_answers_are_built_in_one_place() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut bad = Vec::new();
    for f in &files {
        let shown = Path::new("src").join(f.strip_prefix(&src).unwrap());
        if OWN_JSON_ERRORS.iter().any(|(p, _)| Path::new(p) == shown) {
            continue;
        }
        let code = blanked(&std::fs::read_to_string(f).unwrap(), false);
        for (n, line) in code.lines().enumerate() {
            let squeezed: String = line.chars().filter(|c| !c.is_whitespace()).collect();
            if squeezed.contains("\"error\":") || squeezed.contains("\\\"error\\\":") {
                bad.push(format!("{}:{}: {}", shown.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "busbar's own JSON answers are built with base::reply::Refusal, not by hand:\n{}",
        bad.join("\n")
    );
}

#[test]
fn every_allowed_back_arrow_is_still_needed_and_placed() {
    let mut by_entry: HashMap<&str, usize> = HashMap::new();
    for (_, entries) in LAYERS {
        for e in entries.iter() {
            assert!(by_entry.insert(e, 0).is_none(), "{e} is listed twice");
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (from, to, why) in ALLOWED {
        assert!(
            root.join(from).is_file(),
            "ALLOWED names {from}, which is gone"
        );
        assert!(by_entry.contains_key(to), "ALLOWED names {to}, in no layer");
        assert!(!why.is_empty(), "ALLOWED {from} → {to} needs its reason");
    }
}

#[test]
fn a_planted_upward_import_is_caught() {
    let mut bad = Vec::new();
    let planted = "//! x\nuse crate::metrics::METRICS;\n\nfn f() {\n    crate::app::run();\n}\n";
    check_file(Path::new("config/planted.rs"), planted, &mut bad);
    assert_eq!(
        bad,
        vec![Violation(
            "src/config/planted.rs:5 imports crate::app::run (layer wiring is above config)".into()
        )]
    );
    // Groups, `super::` that leaves the module, and strings that only look like paths.
    let mut bad = Vec::new();
    let planted = "use crate::{text, model::{Instance, self}};\nmod tests {\n    use super::super::super::snapshot::State;\n    const S: &str = \"crate::app\";\n}\n";
    check_file(Path::new("model/planted.rs"), planted, &mut bad);
    assert_eq!(
        bad,
        vec![Violation(
            "src/model/planted.rs:3 imports crate::snapshot::State (layer runtime is above model)"
                .into()
        )]
    );
    // A module nobody placed.
    let mut bad = Vec::new();
    check_file(Path::new("newthing.rs"), "", &mut bad);
    assert_eq!(bad.len(), 1, "{bad:?}");
}
