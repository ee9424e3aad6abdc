//! Replays the checked-in fuzz corpora (`fuzz/corpus/<target>/`) and the regression
//! inputs of fixed crashes (`fuzz/regressions/<target>/`) through the same harness
//! functions the cargo-fuzz targets call, so CI catches a regression without cargo-fuzz.
//! A harness panics on a finding; this test names the file that made it panic.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.is_file());
    files.sort();
    files
}

fn replay(target: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = inputs(&root.join("corpus").join(target));
    assert!(
        corpus.len() >= 3,
        "fuzz/corpus/{target}/ should hold a seed corpus, found {} files",
        corpus.len()
    );
    let regressions = inputs(&root.join("regressions").join(target));
    let mut failed = Vec::new();
    for file in corpus.iter().chain(&regressions) {
        let data = std::fs::read(file).expect("a corpus file");
        let outcome = std::panic::catch_unwind(|| harness::run(target, &data));
        if outcome.is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: these inputs panic: {failed:?}"
    );
}

#[test]
fn every_target_has_a_replay_test() {
    assert_eq!(
        harness::TARGETS,
        &[
            "config",
            "route",
            "registration",
            "translate",
            "grpc_web",
            "head",
            "chunked",
            "h2_request"
        ]
    );
}

#[test]
fn config_corpus() {
    replay("config");
}

#[test]
fn route_corpus() {
    replay("route");
}

#[test]
fn registration_corpus() {
    replay("registration");
}

#[test]
fn translate_corpus() {
    replay("translate");
}

#[test]
fn grpc_web_corpus() {
    replay("grpc_web");
}

#[test]
fn head_corpus() {
    replay("head");
}

#[test]
fn chunked_corpus() {
    replay("chunked");
}

#[test]
fn h2_request_corpus() {
    replay("h2_request");
}
