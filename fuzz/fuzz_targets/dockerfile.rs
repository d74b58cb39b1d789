#![no_main]
//! docs/fuzzing.md, `dockerfile`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk_fuzz::targets::dockerfile(data));
