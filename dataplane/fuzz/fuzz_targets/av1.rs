//! Fuzz target: see `ridge_sfu::packet::fuzz::fuzz_av1` for what it checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ridge_sfu::packet::fuzz::fuzz_av1(data));
