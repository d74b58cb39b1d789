#![no_main]
//! docs/fuzzing.md, `checkpoint`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk_fuzz::targets::checkpoint(data));
