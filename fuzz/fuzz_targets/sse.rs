//! The LLM client's server-sent-events parser, on arbitrary bytes (see `chatgate_service::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatgate_service::fuzzing::sse(data));
