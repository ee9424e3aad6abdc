//! Proto sources → `DescriptorPool`, at config load time, in pure Rust (protox).
//!
//! Owns: the include-path resolution (the config's includes, then the bundled
//! `google/api/{annotations,http}.proto`, then protobuf's well-known types) and decoding
//! prebuilt descriptor sets. Raw bytes go to `DescriptorPool::decode`, never through
//! `prost_types::FileDescriptorSet`, which would drop the `google.api.http` options.
//! Must not: run on the request path.

use std::path::{Path, PathBuf};

use prost_reflect::DescriptorPool;
use protox::file::{
    ChainFileResolver, File, FileResolver, GoogleFileResolver, IncludeFileResolver,
};

/// `google/api/*.proto`, built into the binary so a config needs no copy of them.
const BUNDLED: [(&str, &str); 2] = [
    (
        "google/api/annotations.proto",
        include_str!("../../conf/protos/google/api/annotations.proto"),
    ),
    (
        "google/api/http.proto",
        include_str!("../../conf/protos/google/api/http.proto"),
    ),
];

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
        compiler
            .open_file(p)
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    // Through the encoded bytes, so extension options (google.api.http) survive.
    DescriptorPool::decode(compiler.encode_file_descriptor_set().as_slice())
        .map_err(|e| format!("compiled descriptors do not load: {e}"))
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
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.proto");
        std::fs::write(&p, "syntax = \"proto3\";\nmessage X { strin a = 1; }\n").unwrap();
        let e = compile(&[p], &[]).unwrap_err();
        assert!(e.contains("bad.proto"), "{e}");
    }
}
