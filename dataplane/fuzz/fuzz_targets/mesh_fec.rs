//! Fuzz target: see `ridge_sfu::fuzzing::mesh_fec` for the path it drives.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ridge_sfu::fuzzing::mesh_fec(data));
