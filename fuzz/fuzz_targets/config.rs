//! The configuration loader, on arbitrary file contents (see `chatgate_service::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatgate_service::fuzzing::config_file(data));
