//! Fuzz target: see `busbar_fuzz::registration`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| busbar_fuzz::registration(data));
