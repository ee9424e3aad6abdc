//! Fuzz target: see `busbar_fuzz::h2_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| busbar_fuzz::h2_request(data));
