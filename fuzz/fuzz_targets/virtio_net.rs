#![no_main]
//! docs/fuzzing.md, `virtio_net`.
use husk_fuzz::devices::Kind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk_fuzz::targets::device(Kind::Net, data));
