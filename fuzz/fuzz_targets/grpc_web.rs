//! Fuzz target: see `busbar_fuzz::grpc_web`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| busbar_fuzz::grpc_web(data));
