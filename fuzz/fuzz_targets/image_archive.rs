#![no_main]
//! docs/fuzzing.md, `image_archive`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk_fuzz::targets::image_archive(data));
