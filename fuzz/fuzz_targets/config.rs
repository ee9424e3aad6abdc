//! Fuzz target: see `busbar_fuzz::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| busbar_fuzz::config(data));
