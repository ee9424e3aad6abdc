//! Fuzz target: see `busbar_fuzz::translate`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| busbar_fuzz::translate(data));
