//! Fuzz target: see `ridge_sfu::fuzzing::sdp_offer` for the path it drives.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ridge_sfu::fuzzing::sdp_offer(data));
