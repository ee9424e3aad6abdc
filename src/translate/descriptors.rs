//! Proto sources → `DescriptorPool`, at config load time, in pure Rust (protox).
//!
//! Owns: the include-path resolution (the config's includes, then the bundled
//! `google/api/{annotations,http}.proto` and `google/rpc/{status,code,error_details}.proto`,
//! then protobuf's well-known types), compile errors as `file:line:col: message`, the
//! built-in `google.rpc` pool error details decode with, and decoding prebuilt
//! descriptor sets. Raw bytes go to `DescriptorPool::decode`, never through
//! `prost_types::FileDescriptorSet`, which would drop the `google.api.http` options.
//! Must not: run on the request path.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use prost_reflect::DescriptorPool;
use protox::file::{
    ChainFileResolver, File, FileResolver, GoogleFileResolver, IncludeFileResolver,
};

/// `google/api/*.proto` and `google/rpc/*.proto`, built into the binary so a config
/// needs no copy of them.
const BUNDLED: [(&str, &str); 5] = [
    (
        "google/api/annotations.proto",
        include_str!("../../conf/protos/google/api/annotations.proto"),
    ),
    (
        "google/api/http.proto",
        include_str!("../../conf/protos/google/api/http.proto"),
    ),
    (
        "google/rpc/status.proto",
        include_str!("../../conf/protos/google/rpc/status.proto"),
    ),
    (
        "google/rpc/code.proto",
        include_str!("../../conf/protos/google/rpc/code.proto"),
    ),
    (
        "google/rpc/error_details.proto",
        include_str!("../../conf/protos/google/rpc/error_details.proto"),
    ),
];

/// The bundled `google.rpc` files, for the standard error details.
const RPC_FILES: [&str; 3] = [
    "google/rpc/status.proto",
    "google/rpc/code.proto",
    "google/rpc/error_details.proto",
];

/// `google.rpc.Status`, `ErrorInfo`, `RetryInfo`, `BadRequest`, … compiled once: error
/// details of these types decode to JSON on every route, whatever its protos import.
pub static RPC: LazyLock<DescriptorPool> = LazyLock::new(|| {
    let mut chain = ChainFileResolver::new();
    chain.add(Bundled);
    chain.add(GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(chain);
    compiler.include_imports(true).include_source_info(false);
    for f in RPC_FILES {
        if let Err(e) = compiler.open_file(f) {
            // Built in and covered by a unit test: cannot happen in a released binary.
            tracing::error!("bundled {f} does not compile: {e}");
            return DescriptorPool::new();
        }
    }
    DescriptorPool::decode(compiler.encode_file_descriptor_set().as_slice()).unwrap_or_default()
});

struct Bundled;

impl FileResolver for Bundled {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match BUNDLED.iter().find(|(n, _)| *n == name) {
            Some((n, src)) => File::from_source(n, src),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

/// Compiles `protos`; each must lie under one of `includes` (when `includes` is empty,
/// each file's own directory is its include path).
pub fn compile(protos: &[PathBuf], includes: &[PathBuf]) -> Result<DescriptorPool, String> {
    let mut dirs: Vec<PathBuf> = includes.to_vec();
    if dirs.is_empty() {
        for p in protos {
            if let Some(parent) = p.parent() {
                if !dirs.iter().any(|d| d == parent) {
                    dirs.push(parent.to_path_buf());
                }
            }
        }
    }
    let mut chain = ChainFileResolver::new();
    for d in &dirs {
        chain.add(IncludeFileResolver::new(d.clone()));
    }
    chain.add(Bundled);
    chain.add(GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(chain);
    compiler.include_imports(true).include_source_info(false);
    for p in protos {
        compiler.open_file(p).map_err(|e| describe(&e, p, &dirs))?;
    }
    // Through the encoded bytes, so extension options (google.api.http) survive.
    DescriptorPool::decode(compiler.encode_file_descriptor_set().as_slice())
        .map_err(|e| format!("compiled descriptors do not load: {e}"))
}

/// A compile error as `path:line:col: message` when protox knows where (parse and check
/// errors), naming the file on disk rather than its name under the include path.
fn describe(e: &protox::Error, opened: &Path, dirs: &[PathBuf]) -> String {
    // protox's Debug form is `name:line:col: message` for located errors.
    let text = format!("{e:?}");
    let Some(name) = e.file() else {
        return format!("{}: {e}", opened.display());
    };
    let on_disk = || dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
    match text.strip_prefix(name) {
        Some(rest) if rest.starts_with(':') => match on_disk() {
            Some(path) => format!("{}{rest}", path.display()),
            None => text,
        },
        _ if text.contains(name) => text,
        _ => format!("{name}: {text}"),
    }
}

/// Loads a descriptor set written by `protoc --include_imports -o x.pb` or `buf build -o`.
pub fn decode_set(path: &Path) -> Result<DescriptorPool, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    DescriptorPool::decode(bytes.as_slice()).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn the_test_proto_compiles_with_bundled_annotations() {
        let pool = compile(&[root().join("tests/protos/bookstore.proto")], &[]).unwrap();
        let ext = pool.get_extension_by_name("google.api.http").unwrap();
        let svc = pool.get_service_by_name("bookstore.v1.Bookstore").unwrap();
        let get = svc.methods().find(|m| m.name() == "GetBook").unwrap();
        assert!(
            get.options().has_extension(&ext),
            "google.api.http survived"
        );
    }

    #[test]
    fn errors_name_the_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.proto");
        // A check error (unknown type) and a parse error (missing `;`).
        std::fs::write(&p, "syntax = \"proto3\";\nmessage X { strin a = 1; }\n").unwrap();
        let e = compile(std::slice::from_ref(&p), &[]).unwrap_err();
        assert!(e.starts_with(&format!("{}:2:13: ", p.display())), "{e}");
        std::fs::write(&p, "syntax = \"proto3\";\n\nmessage X { string a = 1 }\n").unwrap();
        let e = compile(std::slice::from_ref(&p), &[]).unwrap_err();
        assert!(e.starts_with(&format!("{}:3:", p.display())), "{e}");
        let e = compile(&[dir.path().join("missing.proto")], &[]).unwrap_err();
        assert!(e.contains("missing.proto"), "{e}");
    }

    #[test]
    fn the_standard_error_details_are_built_in() {
        for m in [
            "google.rpc.Status",
            "google.rpc.ErrorInfo",
            "google.rpc.BadRequest",
            "google.rpc.RetryInfo",
            "google.rpc.Help",
        ] {
            assert!(RPC.get_message_by_name(m).is_some(), "{m}");
        }
        assert!(RPC.get_enum_by_name("google.rpc.Code").is_some());
        // And a config's protos may import them.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("uses.proto");
        std::fs::write(&p, "syntax = \"proto3\";\nimport \"google/rpc/status.proto\";\nmessage X { google.rpc.Status s = 1; }\n").unwrap();
        compile(&[p], &[]).unwrap();
    }

    #[test]
    fn standard_details_decode_without_the_routes_protos() {
        use base64::Engine;
        // google.rpc.ErrorInfo { reason: "QUOTA", domain: "d", metadata: {"k": "v"} }.
        let mut info = vec![0x0a, 5];
        info.extend_from_slice(b"QUOTA");
        info.extend_from_slice(&[0x12, 1, b'd', 0x1a, 6, 0x0a, 1, b'k', 0x12, 1, b'v']);
        // google.protobuf.Any { type_url, value: info }.
        let url = b"type.googleapis.com/google.rpc.ErrorInfo";
        let mut any = vec![0x0a, url.len() as u8];
        any.extend_from_slice(url);
        any.extend_from_slice(&[0x12, info.len() as u8]);
        any.extend_from_slice(&info);
        // google.rpc.Status { code: 8, details: [any] }.
        let mut st = vec![0x08, 8, 0x1a, any.len() as u8];
        st.extend_from_slice(&any);
        let b64 = base64::engine::general_purpose::STANDARD.encode(st);
        let route = DescriptorPool::new();
        let d = super::super::status::details(Some(b64.as_bytes()), &[&route, &RPC]);
        assert_eq!(
            d,
            vec![serde_json::json!({
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "QUOTA",
                "domain": "d",
                "metadata": {"k": "v"}
            })]
        );
    }
}
