//! `validate` on arbitrary manifests (see `chatgate_operator::validate_cmd::fuzz_validate`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatgate_operator::validate_cmd::fuzz_validate(data));
