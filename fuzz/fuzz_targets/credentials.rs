//! Credential extraction from upgrade headers and subprotocols, on arbitrary bytes (see `chatgate_service::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatgate_service::fuzzing::credentials(data));
