#![no_main]
//! docs/fuzzing.md, `layer_unpack`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk_fuzz::targets::layer_unpack(data));
