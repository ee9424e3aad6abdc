//! Compiles the test protos with protox (pure Rust, no protoc) and generates the tonic
//! server and client; also writes the descriptor set (options included) for `.pb` tests.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let protos = root.join("tests/protos");
    let vendored = root.join("conf/protos");
    let file = protos.join("bookstore.proto");
    let fidelity = protos.join("fidelity.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    println!("cargo:rerun-if-changed={}", fidelity.display());
    let mut compiler = protox::Compiler::new([&protos, &vendored])?;
    compiler.include_imports(true).include_source_info(false);
    compiler.open_file(&file)?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("bookstore.pb"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    // Compiled on its own, so `bookstore.pb` stays the bookstore's alone.
    let mut compiler = protox::Compiler::new([&protos, &vendored])?;
    compiler.include_imports(true).include_source_info(false);
    compiler.open_file(&fidelity)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
