//! The wire protocol (v1) of `/ws`: the client's requests, the server's events, the
//! stable error codes, and the parser that turns a text frame into a request.
//!
//! # API
//!
//! ```text
//! parse_client_frame(text: &str) -> Result<ClientRequest, ProtocolError>
//! ProtocolError::into_event(self) -> ServerEvent
//! ServerEvent::{pong_now, connected, error}                                  // constructors
//! ClientRequest::kind(&self), ServerEvent::kind(&self) -> &'static str      // the wire `type`
//! ErrorCode::as_str(self) -> &'static str                                   // the wire spelling
//! ```

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::{MAX_PAGE_ITEMS, StoredMessage, ThreadSummary};

/// Longest id (thread, run, client message) accepted from a client; ids are
/// stored and echoed, so an unbounded one would be a cheap way to waste space.
pub const MAX_ID_LEN: usize = 128;

/// Stable, snake_case error codes of `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    UnknownType,
    InvalidField,
    NotFound,
    RateLimited,
    UnsupportedFrame,
    LlmUnavailable,
    /// A retry of a message whose run is still going.
    Duplicate,
    /// The run was cancelled by its owner.
    Cancelled,
    /// The service is draining; reconnect and send again.
    ShuttingDown,
    /// The thread store failed; sending again later may work.
    StorageUnavailable,
    /// The pod running the run stopped before it finished; send the message again.
    RunInterrupted,
    /// The socket's token expired; the socket closes with 1008 next. Reconnect
    /// with a fresh token.
    TokenExpired,
    /// This process runs as many agent runs as it may; the message was not stored.
    Overloaded,
    /// The run took longer than `CHATGATE_RUN_TIMEOUT_SECONDS`; the message is stored.
    RunTimeout,
    /// The reply grew past `CHATGATE_MAX_REPLY_BYTES`; it is not stored.
    ReplyTooLarge,
}

impl ErrorCode {
    /// The wire spelling, e.g. `"rate_limited"` (also a good metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::NotFound => "not_found",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UnsupportedFrame => "unsupported_frame",
            ErrorCode::LlmUnavailable => "llm_unavailable",
            ErrorCode::Duplicate => "duplicate",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::RunInterrupted => "run_interrupted",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::RunTimeout => "run_timeout",
            ErrorCode::ReplyTooLarge => "reply_too_large",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A client → server frame (wire protocol v1). Serialises flat; parse frames with
/// [`parse_client_frame`], which also accepts fields nested under `payload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientRequest {
    Ping,
    UserMessage {
        content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        thread_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_message_id: Option<String>,
    },
    /// One page of the user's threads, most recently updated first.
    ListThreads {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<String>,
    },
    /// One page of a thread: its newest messages, or those older than `cursor`.
    GetThread {
        thread_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<String>,
    },
    Cancel {
        run_id: String,
    },
}

impl ClientRequest {
    /// The wire `type`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientRequest::Ping => "ping",
            ClientRequest::UserMessage { .. } => "user_message",
            ClientRequest::ListThreads { .. } => "list_threads",
            ClientRequest::GetThread { .. } => "get_thread",
            ClientRequest::Cancel { .. } => "cancel",
        }
    }
}

/// A frame that could not be accepted; answered with an `error`, the connection stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    fn new(code: ErrorCode, message: impl Into<String>) -> ProtocolError {
        ProtocolError {
            code,
            message: message.into(),
        }
    }

    /// The `error` frame that answers this problem.
    pub fn into_event(self) -> ServerEvent {
        ServerEvent::error(self.code, self.message)
    }
}

/// A server → client frame (wire protocol v1). Serialises exactly to the frames of
/// the protocol table, `type` first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    Connected {
        user_id: String,
        connection_id: String,
        protocol: u32,
    },
    Pong {
        /// Unix time in milliseconds.
        timestamp: u64,
    },
    AgentStarted {
        run_id: String,
        thread_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_message_id: Option<String>,
        /// True when a retried message is answered from the store.
        #[serde(default, skip_serializing_if = "is_false")]
        replay: bool,
    },
    AgentThinking {
        run_id: String,
    },
    ToolExecuting {
        run_id: String,
        tool: String,
    },
    ToolCompleted {
        run_id: String,
        tool: String,
        result: String,
    },
    AgentResponse {
        run_id: String,
        delta: String,
    },
    AgentCompleted {
        run_id: String,
        thread_id: String,
        message_id: String,
        /// True when a retried message is answered from the store.
        #[serde(default, skip_serializing_if = "is_false")]
        replay: bool,
    },
    Threads {
        threads: Vec<ThreadSummary>,
        /// Present when more threads follow: send it as `cursor` for the next page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_cursor: Option<String>,
    },
    Thread {
        thread_id: String,
        messages: Vec<StoredMessage>,
        /// Present when older messages exist: send it as `cursor` for them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_cursor: Option<String>,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        thread_id: Option<String>,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ServerEvent {
    /// `pong` stamped with the current time.
    pub fn pong_now() -> ServerEvent {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or_default();
        ServerEvent::Pong { timestamp }
    }

    /// The first frame after the upgrade.
    pub fn connected(user_id: impl Into<String>, connection_id: impl Into<String>) -> ServerEvent {
        ServerEvent::Connected {
            user_id: user_id.into(),
            connection_id: connection_id.into(),
            protocol: chatgate_contract::paths::PROTOCOL_VERSION,
        }
    }

    /// An `error` without run or thread.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> ServerEvent {
        ServerEvent::Error {
            code,
            message: message.into(),
            run_id: None,
            thread_id: None,
        }
    }

    /// The wire `type`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerEvent::Connected { .. } => "connected",
            ServerEvent::Pong { .. } => "pong",
            ServerEvent::AgentStarted { .. } => "agent_started",
            ServerEvent::AgentThinking { .. } => "agent_thinking",
            ServerEvent::ToolExecuting { .. } => "tool_executing",
            ServerEvent::ToolCompleted { .. } => "tool_completed",
            ServerEvent::AgentResponse { .. } => "agent_response",
            ServerEvent::AgentCompleted { .. } => "agent_completed",
            ServerEvent::Threads { .. } => "threads",
            ServerEvent::Thread { .. } => "thread",
            ServerEvent::Error { .. } => "error",
        }
    }
}

const KNOWN_TYPES: &str = "ping, user_message, list_threads, get_thread or cancel";

/// Request fields, wherever they appear (top level or under `payload`). Values stay
/// untyped so a wrong type gets an `invalid_field` naming the field, not a serde message.
#[derive(Deserialize, Default)]
struct Fields {
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    thread_id: Option<Value>,
    #[serde(default)]
    client_message_id: Option<Value>,
    #[serde(default)]
    run_id: Option<Value>,
    #[serde(default)]
    limit: Option<Value>,
    #[serde(default)]
    cursor: Option<Value>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    payload: Option<Value>,
    // Spelled out rather than `#[serde(flatten)] Fields`: flatten buffers the whole
    // frame first, which every ping would pay for.
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    thread_id: Option<Value>,
    #[serde(default)]
    client_message_id: Option<Value>,
    #[serde(default)]
    run_id: Option<Value>,
    #[serde(default)]
    limit: Option<Value>,
    #[serde(default)]
    cursor: Option<Value>,
}

/// Parses one text frame of the wire protocol. Fields may be flat or nested under
/// `payload`; when both carry a field, the flat one wins. Never panics.
pub fn parse_client_frame(text: &str) -> Result<ClientRequest, ProtocolError> {
    if !text.trim_start().starts_with('{') {
        return Err(not_an_object(text));
    }
    let envelope: Envelope<'_> = serde_json::from_str(text).map_err(|e| explain(text, e))?;
    let Some(kind) = envelope.kind.as_deref() else {
        return Err(ProtocolError::new(
            ErrorCode::InvalidField,
            format!("the field `type` is required and must be one of {KNOWN_TYPES}"),
        ));
    };
    if kind == "ping" {
        return Ok(ClientRequest::Ping);
    }
    if !matches!(
        kind,
        "user_message" | "get_thread" | "cancel" | "list_threads"
    ) {
        let shown: String = kind.chars().take(40).collect();
        return Err(ProtocolError::new(
            ErrorCode::UnknownType,
            format!("unknown message type `{shown}`; send one of {KNOWN_TYPES}"),
        ));
    }
    let mut fields = Fields {
        content: envelope.content,
        thread_id: envelope.thread_id,
        client_message_id: envelope.client_message_id,
        run_id: envelope.run_id,
        limit: envelope.limit,
        cursor: envelope.cursor,
    };
    match envelope.payload {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            let nested: Fields = serde_json::from_value(Value::Object(map)).map_err(|e| {
                ProtocolError::new(
                    ErrorCode::InvalidField,
                    format!("the field `payload` could not be read: {e}"),
                )
            })?;
            fields.content = fields.content.or(nested.content);
            fields.thread_id = fields.thread_id.or(nested.thread_id);
            fields.client_message_id = fields.client_message_id.or(nested.client_message_id);
            fields.run_id = fields.run_id.or(nested.run_id);
            fields.limit = fields.limit.or(nested.limit);
            fields.cursor = fields.cursor.or(nested.cursor);
        }
        Some(_) => {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                "the field `payload` must be an object holding the message's fields",
            ));
        }
    }
    match kind {
        "user_message" => {
            let content = match fields.content {
                Some(Value::String(s)) if !s.trim().is_empty() => s,
                _ => {
                    return Err(ProtocolError::new(
                        ErrorCode::InvalidField,
                        "the field `content` of user_message must be a non-empty string",
                    ));
                }
            };
            Ok(ClientRequest::UserMessage {
                content,
                thread_id: optional_id("thread_id", fields.thread_id)?,
                client_message_id: optional_id("client_message_id", fields.client_message_id)?,
            })
        }
        "get_thread" => Ok(ClientRequest::GetThread {
            thread_id: required_id("get_thread", "thread_id", fields.thread_id)?,
            limit: page_limit(fields.limit)?,
            cursor: optional_cursor(fields.cursor)?,
        }),
        "list_threads" => Ok(ClientRequest::ListThreads {
            limit: page_limit(fields.limit)?,
            cursor: optional_cursor(fields.cursor)?,
        }),
        _ => Ok(ClientRequest::Cancel {
            run_id: required_id("cancel", "run_id", fields.run_id)?,
        }),
    }
}

fn not_an_object(text: &str) -> ProtocolError {
    match serde_json::from_str::<serde::de::IgnoredAny>(text) {
        Ok(_) => ProtocolError::new(
            ErrorCode::InvalidJson,
            r#"a frame must be a JSON object with a `type`, e.g. {"type":"ping"}"#,
        ),
        Err(e) => ProtocolError::new(
            ErrorCode::InvalidJson,
            format!("the frame is not valid JSON ({e}); send one JSON object per text frame"),
        ),
    }
}

/// Tells "not JSON" from "JSON of the wrong shape"; only runs on the error path.
fn explain(text: &str, e: serde_json::Error) -> ProtocolError {
    if e.is_syntax() || e.is_eof() {
        return ProtocolError::new(
            ErrorCode::InvalidJson,
            format!("the frame is not valid JSON ({e}); send one JSON object per text frame"),
        );
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) if map.get("type").is_some_and(|t| !t.is_string()) => {
            ProtocolError::new(
                ErrorCode::InvalidField,
                format!("the field `type` must be a string, one of {KNOWN_TYPES}"),
            )
        }
        _ => ProtocolError::new(
            ErrorCode::InvalidField,
            format!("the frame has a field of the wrong type ({e})"),
        ),
    }
}

fn optional_id(name: &str, value: Option<Value>) -> Result<Option<String>, ProtocolError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_LEN => Ok(Some(s)),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::InvalidField,
            format!("the field `{name}` must be a string of 1 to {MAX_ID_LEN} bytes"),
        )),
    }
}

/// `limit` of a listing: absent, or 1 to [`MAX_PAGE_ITEMS`].
fn page_limit(value: Option<Value>) -> Result<Option<u32>, ProtocolError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n))
            if n.as_u64()
                .is_some_and(|n| (1..=u64::from(MAX_PAGE_ITEMS)).contains(&n)) =>
        {
            Ok(n.as_u64().and_then(|n| u32::try_from(n).ok()))
        }
        Some(_) => Err(ProtocolError::new(
            ErrorCode::InvalidField,
            format!("the field `limit` must be an integer from 1 to {MAX_PAGE_ITEMS}"),
        )),
    }
}

/// `cursor` of a listing: the `next_cursor` of a previous page (a thread cursor
/// holds a thread id, so it may be a little longer than an id).
fn optional_cursor(value: Option<Value>) -> Result<Option<String>, ProtocolError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 2 * MAX_ID_LEN => Ok(Some(s)),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::InvalidField,
            "the field `cursor` must be the `next_cursor` string of a previous page",
        )),
    }
}

fn required_id(kind: &str, name: &str, value: Option<Value>) -> Result<String, ProtocolError> {
    optional_id(name, value)?.ok_or_else(|| {
        ProtocolError::new(
            ErrorCode::InvalidField,
            format!("{kind} needs the field `{name}` (a string of 1 to {MAX_ID_LEN} bytes)"),
        )
    })
}
