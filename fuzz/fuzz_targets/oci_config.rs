#![no_main]
//! docs/fuzzing.md, `oci_config`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk_fuzz::targets::oci_config(data));
