#![no_main]
//! docs/fuzzing.md, `agent_frames`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk_fuzz::targets::agent_frames(data));
