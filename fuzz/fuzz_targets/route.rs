//! Fuzz target: see `busbar_fuzz::route`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| busbar_fuzz::route(data));
