//! Fuzz target: see `busbar_fuzz::head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| busbar_fuzz::head(data));
