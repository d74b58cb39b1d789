#![no_main]
//! docs/fuzzing.md, `host_frames`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk_fuzz::targets::host_frames(data));
