//! The client frame parser, on arbitrary bytes (see `chatgate_service::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatgate_service::fuzzing::client_frame(data));
