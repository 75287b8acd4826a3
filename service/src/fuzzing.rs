//! The entry points the fuzz targets in `fuzz/` drive with arbitrary bytes, shared
//! with the stable test that replays their committed corpus
//! (`service/tests/fuzz_corpus.rs`), so a crash found by fuzzing reproduces in
//! `make test` through exactly the same code. Each must return, never panic.

use crate::config::{ServiceConfig, parse_file};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use chatgate_contract::config::Origin;

/// The client frame parser, on whatever a WebSocket text frame may carry.
pub fn client_frame(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::protocol::parse_client_frame(text);
    }
}

/// Credential extraction from an upgrade request's headers: each `name: value` line
/// is one header (repeats allowed), as `Authorization` and `Sec-WebSocket-Protocol`
/// arrive; lines the HTTP layer would refuse are skipped, as it would never pass them.
pub fn credentials(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    let _ = crate::auth::credentials(&headers);
}

/// The configuration loader: a configuration file's text, then the checks startup
/// runs on it.
pub fn config_file(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(set) = parse_file(text, "<input>")
    {
        let _ = set.validate(Origin::Process);
        let _ = set.redacted();
        let _ = ServiceConfig::from_set(&set);
    }
}

/// The server-sent-events parser of the LLM client; a `0xFF` byte (never valid
/// UTF-8) splits the input into the chunks the body arrives in.
pub fn sse(data: &[u8]) {
    let chunks: Vec<&[u8]> = data.split(|b| *b == 0xFF).collect();
    let _ = crate::llm::parse_sse_body(&chunks);
}
