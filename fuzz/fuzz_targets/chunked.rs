//! Fuzz target: see `busbar_fuzz::chunked`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| busbar_fuzz::chunked(data));
