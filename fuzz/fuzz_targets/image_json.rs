#![no_main]
//! docs/fuzzing.md, `image_json`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk_fuzz::targets::image_json(data));
