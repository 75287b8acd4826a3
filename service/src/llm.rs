//! LLM providers: the built-in deterministic one and an OpenAI-compatible streaming client.
//!
//! # API
//!
//! ```text
//! LlmClient::from_config(provider: &str, api_key: Option<String>, base_url: &str, model: &str)
//!     -> Result<LlmClient, LlmError>
//! LlmClient::builtin() -> LlmClient
//! LlmClient::with_stream_idle_timeout(self, timeout: Duration) -> LlmClient
//! LlmClient::provider(&self) -> &'static str                        // "builtin" | "openai"
//! LlmClient::stream_reply(&self, request: &LlmRequest) -> Result<DeltaStream, LlmError>   // async
//! LlmError::is_permanent(&self) -> bool
//! LlmError::code(&self) -> &'static str                             // "llm_unavailable"
//! builtin_reply(request: &LlmRequest) -> Vec<String>                // the builtin's chunks
//! ```
//!
//! A reply is a stream of text deltas; concatenated they are the whole reply. The
//! stream ends after the last delta, or yields one `Err` and ends.
//!
//! `builtin` needs no network and no key: its reply is a pure function of the last
//! user message and the tool results in the request, cut into several chunks, so the
//! whole event sequence of a run is visible (and testable) offline.
//!
//! `openai` speaks the chat-completions API (`POST {base_url}/chat/completions` with
//! `stream: true`, server-sent events). Any failure of the provider — unreachable,
//! a non-2xx status, an `error` object in the stream, a stream that stops or stalls
//! before `[DONE]` — is [`LlmError::Unavailable`], which runs report as the wire
//! error `llm_unavailable`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chatgate_contract::config::Key;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

/// Configuration key naming the provider.
pub const PROVIDER_KEY: &str = Key::LlmProvider.as_str();
/// Configuration key holding the provider's API key.
pub const API_KEY_KEY: &str = Key::LlmApiKey.as_str();
/// Configuration key holding the provider's base URL (`…/v1`).
pub const BASE_URL_KEY: &str = Key::LlmBaseUrl.as_str();
/// Configuration key holding the model name.
pub const MODEL_KEY: &str = Key::LlmModel.as_str();

/// Fails unless the system trust store (the image's `/etc/ssl/certs`, or
/// `SSL_CERT_FILE` / `SSL_CERT_DIR`) holds at least one CA certificate: without one
/// every request to an https provider would fail its TLS handshake, run after run.
fn trust_roots_present() -> Result<(), LlmError> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(LlmError::Config {
            key: BASE_URL_KEY,
            problem: format!(
                "is an https URL, but no CA certificate was found to verify it{why}; install a CA bundle at /etc/ssl/certs/ca-certificates.crt (the chatgate image ships one) or point SSL_CERT_FILE at one"
            ),
        });
    }
    Ok(())
}

/// How long a streaming reply may go without a byte before the run gives up.
/// Generous because models can think for a while before the first token.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Connection establishment to the provider; a provider that cannot even accept a
/// TCP connection in this time is down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many bytes of an error response are read for the error message.
const ERROR_BODY_LIMIT: usize = 2048;

/// The builtin cuts its reply into at most this many chunks.
const BUILTIN_MAX_CHUNKS: usize = 12;
/// The builtin quotes at most this many characters of the user's message.
const BUILTIN_EXCERPT_CHARS: usize = 160;

/// A streamed reply: text deltas in order.
pub type DeltaStream = Pin<Box<dyn Stream<Item = Result<String, LlmError>> + Send + 'static>>;

/// Who a prompt message is from, in the chat-completions vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptRole {
    System,
    User,
    Assistant,
}

/// One message of the conversation sent to the provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptMessage {
    pub role: PromptRole,
    pub content: String,
}

/// The outcome of a tool the agent ran before asking for the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolResult {
    pub tool: String,
    pub result: String,
}

/// What a run asks the provider: the conversation so far (oldest first, ending with
/// the user's message) and the results of the tools run for this turn.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LlmRequest {
    pub history: Vec<PromptMessage>,
    pub tool_results: Vec<ToolResult>,
}

/// Everything an LLM provider can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    /// The configuration cannot produce a client; waiting will not help.
    #[error("{key} {problem}")]
    Config { key: &'static str, problem: String },
    /// The provider could not produce a reply right now.
    #[error("the LLM provider did not answer: {message}")]
    Unavailable { message: String },
}

impl LlmError {
    /// True for configuration mistakes (startup should stop and name the key).
    pub fn is_permanent(&self) -> bool {
        matches!(self, LlmError::Config { .. })
    }

    /// The wire error code a run reports for this error.
    pub fn code(&self) -> &'static str {
        "llm_unavailable"
    }

    fn unavailable(message: impl Into<String>) -> LlmError {
        LlmError::Unavailable {
            message: message.into(),
        }
    }
}

/// A configured LLM provider. Cheap to clone (one reference count).
#[derive(Clone)]
pub struct LlmClient {
    provider: Arc<Provider>,
    stream_idle_timeout: Duration,
}

enum Provider {
    Builtin,
    OpenAi(OpenAi),
}

struct OpenAi {
    http: reqwest::Client,
    completions_url: String,
    api_key: String,
    model: String,
}

impl std::fmt::Debug for LlmClient {
    // Hand-written so the API key can never end up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("LlmClient");
        d.field("provider", &self.provider());
        if let Provider::OpenAi(openai) = &*self.provider {
            d.field("url", &openai.completions_url)
                .field("model", &openai.model);
        }
        d.finish_non_exhaustive()
    }
}

impl LlmClient {
    /// Builds the client for `provider` (`builtin` or `openai`). `openai` needs a
    /// non-empty `api_key`, an `http(s)://` `base_url` (…/v1) and a `model`; the
    /// other arguments are ignored by `builtin`. Every error names the key to fix.
    pub fn from_config(
        provider: &str,
        api_key: Option<String>,
        base_url: &str,
        model: &str,
    ) -> Result<LlmClient, LlmError> {
        match provider.trim() {
            "builtin" => Ok(LlmClient::builtin()),
            "openai" => {
                let api_key = api_key
                    .map(|k| k.trim().to_owned())
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| LlmError::Config {
                        key: API_KEY_KEY,
                        problem: format!(
                            "is required when {PROVIDER_KEY}=openai; put the provider's API key in the Secret it is read from"
                        ),
                    })?;
                let base_url = base_url.trim().trim_end_matches('/');
                let parsed = reqwest::Url::parse(base_url).map_err(|e| LlmError::Config {
                    key: BASE_URL_KEY,
                    problem: format!(
                        "is not a valid URL ({e}); set it to the API's base URL, e.g. https://api.openai.com/v1"
                    ),
                })?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(LlmError::Config {
                        key: BASE_URL_KEY,
                        problem: format!(
                            "uses the scheme `{}`; set it to an http:// or https:// URL such as https://api.openai.com/v1",
                            parsed.scheme()
                        ),
                    });
                }
                let model = model.trim();
                if model.is_empty() {
                    return Err(LlmError::Config {
                        key: MODEL_KEY,
                        problem: "is empty; set it to the model name the provider expects, e.g. gpt-4o-mini".to_owned(),
                    });
                }
                if parsed.scheme() == "https" {
                    trust_roots_present()?;
                }
                let http = reqwest::Client::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .build()
                    .map_err(|e| LlmError::Config {
                        key: BASE_URL_KEY,
                        problem: format!(
                            "cannot be used: the HTTP client failed to initialise ({e})"
                        ),
                    })?;
                Ok(LlmClient {
                    provider: Arc::new(Provider::OpenAi(OpenAi {
                        http,
                        completions_url: format!("{base_url}/chat/completions"),
                        api_key,
                        model: model.to_owned(),
                    })),
                    stream_idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
                })
            }
            other => Err(LlmError::Config {
                key: PROVIDER_KEY,
                problem: format!(
                    "is `{other}`, which is not a provider; set it to builtin or openai"
                ),
            }),
        }
    }

    /// The deterministic offline provider.
    pub fn builtin() -> LlmClient {
        LlmClient {
            provider: Arc::new(Provider::Builtin),
            stream_idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
        }
    }

    /// Sets how long a streaming reply may stall (no bytes, including before the
    /// response headers) before it fails with [`LlmError::Unavailable`].
    pub fn with_stream_idle_timeout(mut self, timeout: Duration) -> LlmClient {
        self.stream_idle_timeout = timeout;
        self
    }

    /// `"builtin"` or `"openai"`.
    pub fn provider(&self) -> &'static str {
        match &*self.provider {
            Provider::Builtin => "builtin",
            Provider::OpenAi(_) => "openai",
        }
    }

    /// Asks for the reply to `request`. Errors before the first delta (provider
    /// unreachable, non-2xx status) come back here; errors during the stream come
    /// as the stream's last item.
    pub async fn stream_reply(&self, request: &LlmRequest) -> Result<DeltaStream, LlmError> {
        match &*self.provider {
            Provider::Builtin => {
                let chunks = builtin_reply(request);
                Ok(Box::pin(futures::stream::iter(chunks.into_iter().map(Ok))))
            }
            Provider::OpenAi(openai) => {
                openai.stream_reply(request, self.stream_idle_timeout).await
            }
        }
    }
}

/// The builtin provider's reply to `request`, as the chunks it streams. Pure: the
/// same request always gives the same chunks.
pub fn builtin_reply(request: &LlmRequest) -> Vec<String> {
    let said = request
        .history
        .iter()
        .rev()
        .find(|m| m.role == PromptRole::User)
        .map(|m| m.content.as_str())
        .unwrap_or("");
    let words: Vec<&str> = said.split_whitespace().collect();
    let mut excerpt = String::new();
    for word in &words {
        if excerpt.chars().count() + word.chars().count() > BUILTIN_EXCERPT_CHARS {
            excerpt.push_str(" …");
            break;
        }
        if !excerpt.is_empty() {
            excerpt.push(' ');
        }
        excerpt.push_str(word);
    }
    let mut text = format!("You said: \u{201c}{excerpt}\u{201d}.");
    for tool in &request.tool_results {
        text.push_str(&format!(" The {} tool reports {}.", tool.tool, tool.result));
    }
    text.push_str(" This reply comes from the built-in offline agent; set CHATGATE_LLM_PROVIDER=openai for a real model.");
    chunk_words(&text, BUILTIN_MAX_CHUNKS)
}

/// Cuts `text` at word boundaries into at most `max_chunks` pieces whose
/// concatenation is exactly `text`.
fn chunk_words(text: &str, max_chunks: usize) -> Vec<String> {
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    let per_chunk = words.len().div_ceil(max_chunks.max(1)).max(3);
    words.chunks(per_chunk).map(|c| c.concat()).collect()
}

#[derive(Serialize)]
struct CompletionRequest<'a> {
    model: &'a str,
    messages: Vec<PromptMessage>,
    stream: bool,
}

#[derive(Deserialize)]
struct CompletionChunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<ChunkDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct ApiErrorBody {
    error: ApiError,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    message: Option<String>,
}

impl OpenAi {
    async fn stream_reply(
        &self,
        request: &LlmRequest,
        idle: Duration,
    ) -> Result<DeltaStream, LlmError> {
        let mut messages = Vec::with_capacity(request.history.len() + 2);
        messages.push(PromptMessage {
            role: PromptRole::System,
            content: "You are a helpful assistant.".to_owned(),
        });
        // Tool results go in as system context: the chat-completions `tool` role
        // requires a tool call issued by the model, which this agent does not use.
        for tool in &request.tool_results {
            messages.push(PromptMessage {
                role: PromptRole::System,
                content: format!("The {} tool returned: {}", tool.tool, tool.result),
            });
        }
        messages.extend(request.history.iter().cloned());
        let body = CompletionRequest {
            model: &self.model,
            messages,
            stream: true,
        };
        let send = self
            .http
            .post(&self.completions_url)
            .bearer_auth(&self.api_key)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(&body)
            .send();
        let response = match tokio::time::timeout(idle, send).await {
            Err(_) => {
                return Err(LlmError::unavailable(format!(
                    "{} sent no response within {}s",
                    self.completions_url,
                    idle.as_secs_f32()
                )));
            }
            Ok(Err(e)) => {
                return Err(LlmError::unavailable(format!(
                    "cannot reach {} ({}); check {BASE_URL_KEY} and the provider's status",
                    self.completions_url,
                    error_chain(&e)
                )));
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            let detail = read_error_body(response, idle).await;
            let hint = match status.as_u16() {
                401 | 403 => format!("; the provider rejected {API_KEY_KEY}"),
                404 => format!("; check {BASE_URL_KEY} and {MODEL_KEY}"),
                429 => "; the provider is rate limiting, try again later".to_owned(),
                _ => String::new(),
            };
            return Err(LlmError::unavailable(format!(
                "{} answered {status}{hint}{}",
                self.completions_url,
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                }
            )));
        }
        let state = SseState {
            body: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
            data: String::new(),
            pending: VecDeque::new(),
            finished: false,
            saw_finish_reason: false,
            idle,
        };
        Ok(Box::pin(futures::stream::unfold(state, SseState::next)))
    }
}

/// `axum::body::Bytes` is the `bytes::Bytes` that reqwest yields; naming it through
/// axum avoids a direct dependency on `bytes`.
type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>;

/// The longest line a reply stream may send before its newline, and the most `data:`
/// one event may gather: far above any real chunk, low enough that a provider (or
/// something posing as one) cannot make a run buffer without bound.
pub const MAX_SSE_LINE_BYTES: usize = 1 << 20;
pub const MAX_SSE_EVENT_BYTES: usize = 1 << 20;

/// Incremental parser of a server-sent-events body of chat-completion chunks.
///
/// Not `eventsource-stream`: it buffers a line and an event without bound (a
/// provider, or something posing as one, could make a run hold any amount of
/// memory) and ends the stream on invalid UTF-8; this parser caps both at
/// [`MAX_SSE_LINE_BYTES`] / [`MAX_SSE_EVENT_BYTES`] and reads lines lossily.
struct SseState {
    body: ByteStream,
    /// Bytes after the last complete line.
    buffer: Vec<u8>,
    /// `data:` lines of the event being read.
    data: String,
    /// Deltas parsed but not yet yielded.
    pending: VecDeque<Result<String, LlmError>>,
    finished: bool,
    saw_finish_reason: bool,
    idle: Duration,
}

impl SseState {
    async fn next(mut self) -> Option<(Result<String, LlmError>, SseState)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                if item.is_err() {
                    self.finished = true;
                    self.pending.clear();
                }
                return Some((item, self));
            }
            if self.finished {
                return None;
            }
            match tokio::time::timeout(self.idle, self.body.next()).await {
                Err(_) => {
                    let message =
                        format!("the reply stream stalled for {}s", self.idle.as_secs_f32());
                    return self.fail(message);
                }
                Ok(Some(Err(e))) => {
                    return self.fail(format!("the reply stream broke ({})", error_chain(&e)));
                }
                Ok(Some(Ok(bytes))) => {
                    self.buffer.extend_from_slice(&bytes);
                    self.parse_lines();
                }
                Ok(None) => {
                    self.end_of_body();
                    if self.pending.is_empty() {
                        return None;
                    }
                }
            }
        }
    }

    /// The body ended: a last line without a newline still counts, and a stream that
    /// ends without `[DONE]` or a finish reason is a broken reply.
    fn end_of_body(&mut self) {
        if !self.buffer.is_empty() {
            self.buffer.push(b'\n');
            self.parse_lines();
        }
        self.dispatch_event();
        if !self.finished {
            self.finished = true;
            // Some compatible servers omit `[DONE]` after a final chunk.
            if !self.saw_finish_reason {
                self.pending.push_back(Err(LlmError::unavailable(
                    "the reply stream ended before the reply was complete",
                )));
            }
        }
    }

    fn fail(mut self, message: String) -> Option<(Result<String, LlmError>, SseState)> {
        self.finished = true;
        self.pending.clear();
        Some((Err(LlmError::unavailable(message)), self))
    }

    fn parse_lines(&mut self) {
        while let Some(pos) = self.buffer.iter().position(|&b| b == b'\n') {
            if pos > MAX_SSE_LINE_BYTES && !self.finished {
                self.over_cap(format!("a line over {MAX_SSE_LINE_BYTES} bytes"));
                return;
            }
            let mut line: Vec<u8> = self.buffer.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if self.finished {
                continue;
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                self.dispatch_event();
            } else if let Some(value) = line.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value.strip_prefix(' ').unwrap_or(value));
                if self.data.len() > MAX_SSE_EVENT_BYTES {
                    self.over_cap(format!("an event over {MAX_SSE_EVENT_BYTES} bytes"));
                    return;
                }
            }
            // `event:`, `id:`, `retry:` and `:` comments carry nothing for us.
        }
        if !self.finished && self.buffer.len() > MAX_SSE_LINE_BYTES {
            self.over_cap(format!("a line over {MAX_SSE_LINE_BYTES} bytes"));
        }
    }

    /// The stream broke a size cap: the run ends with `llm_unavailable` (the detail
    /// goes to the log) and what was buffered is dropped.
    fn over_cap(&mut self, what: String) {
        self.finished = true;
        self.buffer = Vec::new();
        self.data = String::new();
        self.pending.push_back(Err(LlmError::unavailable(format!(
            "the reply stream sent {what}"
        ))));
    }

    fn dispatch_event(&mut self) {
        if self.data.is_empty() || self.finished {
            self.data.clear();
            return;
        }
        let data = std::mem::take(&mut self.data);
        if data.trim() == "[DONE]" {
            self.finished = true;
            return;
        }
        match serde_json::from_str::<CompletionChunk>(&data) {
            Ok(chunk) => {
                if let Some(error) = chunk.error {
                    self.finished = true;
                    self.pending.push_back(Err(LlmError::unavailable(format!(
                        "the provider reported an error: {}",
                        error.message.unwrap_or_else(|| "(no message)".to_owned())
                    ))));
                    return;
                }
                for choice in chunk.choices.into_iter().take(1) {
                    if choice.finish_reason.is_some() {
                        self.saw_finish_reason = true;
                    }
                    if let Some(content) = choice.delta.and_then(|d| d.content)
                        && !content.is_empty()
                    {
                        self.pending.push_back(Ok(content));
                    }
                }
            }
            Err(e) => {
                self.finished = true;
                self.pending.push_back(Err(LlmError::unavailable(format!(
                    "the reply stream carried an event that is not a chat-completion chunk ({e})"
                ))));
            }
        }
    }
}

/// Parses a whole server-sent-events body, arriving in `chunks`, into what a run would
/// see: the reply's deltas and at most one error, which ends it (as `SseState` yields
/// them, without the network). The fuzz target `sse` and its corpus replay call this.
pub fn parse_sse_body(chunks: &[&[u8]]) -> Vec<Result<String, LlmError>> {
    let mut state = SseState {
        body: Box::pin(futures::stream::empty()),
        buffer: Vec::new(),
        data: String::new(),
        pending: VecDeque::new(),
        finished: false,
        saw_finish_reason: false,
        idle: Duration::ZERO,
    };
    for chunk in chunks {
        state.buffer.extend_from_slice(chunk);
        state.parse_lines();
    }
    state.end_of_body();
    let mut out = Vec::new();
    for item in state.pending {
        let failed = item.is_err();
        out.push(item);
        if failed {
            break;
        }
    }
    out
}

async fn read_error_body(response: reqwest::Response, idle: Duration) -> String {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while body.len() < ERROR_BODY_LIMIT {
        match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(Ok(bytes))) => body.extend_from_slice(&bytes),
            _ => break,
        }
    }
    body.truncate(ERROR_BODY_LIMIT);
    if let Ok(parsed) = serde_json::from_slice::<ApiErrorBody>(&body)
        && let Some(message) = parsed.error.message
    {
        return message;
    }
    String::from_utf8_lossy(&body).trim().to_owned()
}

/// An error and its sources on one line ("error sending request: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: &str) -> String {
        format!(
            "data: {}\n\n",
            serde_json::json!({"choices": [{"delta": {"content": content}}]})
        )
    }

    fn failure(items: &[Result<String, LlmError>]) -> Option<String> {
        items
            .iter()
            .find_map(|i| i.as_ref().err().map(ToString::to_string))
    }

    #[test]
    fn a_reply_within_the_caps_streams_whole() {
        let body = format!("{}{}data: [DONE]\n\n", chunk("Hello"), chunk(", world"));
        let items = parse_sse_body(&[body.as_bytes()]);
        let deltas: Vec<&str> = items.iter().filter_map(|i| i.as_deref().ok()).collect();
        assert_eq!(deltas, ["Hello", ", world"]);
    }

    #[test]
    fn a_line_without_end_past_the_cap_ends_the_reply() {
        // Sent in pieces, never a newline: the buffer must not grow past the cap.
        let piece = vec![b'a'; 64 * 1024];
        let pieces: Vec<&[u8]> = std::iter::repeat_n(piece.as_slice(), 17).collect();
        let items = parse_sse_body(&pieces);
        let failed = failure(&items).expect("an error");
        assert!(failed.contains("a line over 1048576 bytes"), "{failed}");
    }

    #[test]
    fn an_event_of_many_data_lines_past_the_cap_ends_the_reply() {
        let line = format!("data: {}\n", "b".repeat(1000));
        let mut body = chunk("first");
        for _ in 0..1100 {
            body.push_str(&line);
        }
        let items = parse_sse_body(&[body.as_bytes()]);
        assert_eq!(items[0].as_deref().ok(), Some("first"));
        let failed = failure(&items).expect("an error");
        assert!(failed.contains("an event over 1048576 bytes"), "{failed}");
        assert_eq!(items.len(), 2, "nothing after the error");
    }
}
