//! Agent runs: the supervisor that turns a user message into streamed agent events.
//!
//! # API
//!
//! ```text
//! parse_client_frame(text: &str) -> Result<ClientFrame, ProtocolError>     // ClientFrame = ClientRequest
//! ProtocolError::into_event(self) -> ServerEvent
//! ServerEvent::{pong_now, connected, error}                                  // constructors
//! AgentSupervisor::new(store: ThreadStore, llm: LlmClient, runs_per_minute: u32) -> AgentSupervisor
//! AgentSupervisor::with_slow_client_grace(self, grace: Duration) -> AgentSupervisor
//! AgentSupervisor::handle(&self, user_id: &str, request: ClientRequest,
//!                         out: mpsc::Sender<ServerEvent>) -> Result<(), DeliveryError>   // async
//! AgentSupervisor::cancel_run(&self, user_id: &str, run_id: &str) -> bool
//! AgentSupervisor::shutdown(&self)            // alias: cancel_all
//! AgentSupervisor::wait_idle(&self)           // async: until every run task has ended
//! AgentSupervisor::active_runs(&self) -> usize
//! AgentSupervisor::is_shutting_down(&self) -> bool
//! AgentSupervisor::store(&self) -> &ThreadStore
//! AgentSupervisor::llm(&self) -> &LlmClient
//! ```
//!
//! # Behaviour
//!
//! * `handle` answers `ping`, `list_threads`, `get_thread` and `cancel` itself and
//!   returns. For `user_message` it stores the message, sends `agent_started`, and
//!   spawns the run; it never waits for the LLM. Responses it sends directly use
//!   `try_send`: a full queue is reported as [`DeliveryError::QueueFull`] so the
//!   connection decides whether to disconnect.
//! * A run sends, in order: `agent_started` (after the user's message is stored),
//!   `agent_thinking`, `tool_executing` and `tool_completed` for the built-in
//!   [`TOOL_NAME`] tool, one or more `agent_response` deltas, then `agent_completed`
//!   (after the reply is stored) — or, instead of the rest, one `error` with the
//!   `run_id`: `llm_unavailable` (the provider failed; the user's message stays
//!   stored), `cancelled` (the owner sent `cancel`), `shutting_down` (drain),
//!   `storage_unavailable`.
//! * A run waits up to the slow-client grace (default [`DEFAULT_SLOW_CLIENT_GRACE`])
//!   for room in `out`; when the queue stays full, or is closed, the run stops
//!   without storing a reply and sends nothing more.
//! * Rate limit: at most `runs_per_minute` runs per user in any minute, with that
//!   many allowed in a burst (GCRA; `0` disables it). Over it: `error rate_limited`.
//!   Only `user_message` counts; pings and reads never do.
//! * `cancel {run_id}` stops one of the user's own runs; an unknown run, a finished
//!   one, or another user's answers `error not_found` with the `run_id`.
//! * `client_message_id` is echoed in `agent_started` and makes a retry safe:
//!   - if the reply to the first message is stored, the retry is answered from the
//!     store with `agent_started` + `agent_completed` of the original run (both with
//!     `"replay": true`); nothing runs and nothing is stored;
//!   - if the first message's run is still going, the retry gets `error duplicate`
//!     with that `run_id`;
//!   - if the first run ended without a reply (LLM failure, cancel, restart, the
//!     client went away), the stored message is run again; it is not stored twice.
//!     The retry's `content` and `thread_id` are ignored in favour of the stored ones.
//!
//!   "Still going" is known to this process only: with several replicas, a retry
//!   that lands on another pod during the first run's lifetime runs again.
//! * [`AgentSupervisor::shutdown`] refuses new runs (`error shutting_down`) and
//!   cancels every running one; [`AgentSupervisor::wait_idle`] waits for them.
//!
//! Per-user state (rate limiter, active runs) lives in sharded maps, so runs of
//! different users rarely touch the same lock and nothing is locked on `ping`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::RunLimits;
use crate::llm::{LlmClient, LlmRequest, PromptMessage, PromptRole, ToolResult};
use crate::replicas::{Replicas, RunConflict};
use crate::store::{
    DEFAULT_PAGE_ITEMS, MAX_PAGE_ITEMS, PageLimit, Role, StoreError, StoredMessage, ThreadStore,
    ThreadSummary,
};

/// The built-in tool every run calls.
pub const TOOL_NAME: &str = "word_count";

/// How long a run waits for room in a full outbound queue before it decides the
/// client is too slow and stops.
pub const DEFAULT_SLOW_CLIENT_GRACE: Duration = Duration::from_secs(2);

/// How long a finished run keeps trying to store its reply while the database is
/// unreachable (a restart, a failover) before it reports `storage_unavailable`.
const REPLY_STORE_PATIENCE: Duration = Duration::from_secs(10);

/// Messages of the thread (including the new one) sent to the LLM as context.
const HISTORY_MESSAGES: u32 = 20;

/// Longest id (thread, run, client message) accepted from a client; ids are
/// stored and echoed, so an unbounded one would be a cheap way to waste space.
pub const MAX_ID_LEN: usize = 128;

const SHARDS: usize = 32;

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

/// What [`parse_client_frame`] yields.
pub type ClientFrame = ClientRequest;

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
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, ProtocolError> {
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

/// Why `handle` could not deliver a response it sends directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The connection's queue is full: the client is not reading.
    #[error("the connection's outbound queue is full")]
    QueueFull,
    /// The connection is gone.
    #[error("the connection's outbound queue is closed")]
    Closed,
}

fn deliver(out: &mpsc::Sender<ServerEvent>, event: ServerEvent) -> Result<(), DeliveryError> {
    out.try_send(event).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => DeliveryError::QueueFull,
        mpsc::error::TrySendError::Closed(_) => DeliveryError::Closed,
    })
}

/// Starts, tracks, limits and cancels agent runs. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct AgentSupervisor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AgentSupervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSupervisor")
            .field("llm", &self.inner.llm.provider())
            .field("store", &self.inner.store.backend())
            .field("active_runs", &self.active_runs())
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: ThreadStore,
    llm: LlmClient,
    limiter: Option<RateLimit>,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Parent of every run's token: cancelling it stops all runs.
    root: CancellationToken,
    shutting_down: AtomicBool,
    active: AtomicUsize,
    idle: Notify,
    slow_client_grace: Duration,
    page_bytes: usize,
    limits: RunLimits,
    /// The other pods of this service (or just this process, with SQLite).
    replicas: Replicas,
}

/// Bytes of JSON a page holds unless [`AgentSupervisor::with_page_bytes`] says
/// otherwise: the default `CHATGATE_MAX_MESSAGE_BYTES`.
pub const DEFAULT_PAGE_BYTES: usize = 64 * 1024;

/// GCRA parameters: one run per `interval`, up to a minute's worth in a burst.
#[derive(Clone, Copy)]
struct RateLimit {
    runs_per_minute: u32,
    interval: Duration,
}

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Shard {
    users: HashMap<Box<str>, UserRuns>,
    /// Size at which idle users are next swept out, so memory follows the number
    /// of recently active users, not of all users ever seen.
    prune_at: usize,
}

#[derive(Default)]
struct UserRuns {
    /// GCRA "theoretical arrival time" of the next run; `None` = no recent run.
    tat: Option<Instant>,
    runs: Vec<ActiveRun>,
}

struct ActiveRun {
    run_id: Arc<str>,
    client_message_id: Option<String>,
    token: CancellationToken,
}

impl UserRuns {
    fn is_idle(&self, now: Instant) -> bool {
        self.runs.is_empty() && self.tat.is_none_or(|t| t <= now)
    }
}

/// What happened when a run tried to register.
enum Admission {
    Admitted(CancellationToken),
    InFlight { run_id: Arc<str> },
    Limited { retry_after: Duration },
}

impl AgentSupervisor {
    /// A supervisor running agents with `llm`, storing in `store`, allowing each user
    /// `runs_per_minute` runs per minute (`0`: no limit).
    pub fn new(store: ThreadStore, llm: LlmClient, runs_per_minute: u32) -> AgentSupervisor {
        let limiter = (runs_per_minute > 0).then(|| RateLimit {
            runs_per_minute,
            interval: WINDOW / runs_per_minute,
        });
        AgentSupervisor {
            inner: Arc::new(Inner {
                store,
                llm,
                limiter,
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                hasher: RandomState::new(),
                root: CancellationToken::new(),
                shutting_down: AtomicBool::new(false),
                active: AtomicUsize::new(0),
                idle: Notify::new(),
                slow_client_grace: DEFAULT_SLOW_CLIENT_GRACE,
                page_bytes: DEFAULT_PAGE_BYTES,
                limits: RunLimits::default(),
                replicas: Replicas::single(),
            }),
        }
    }

    /// Sets how long a run waits for room in a full outbound queue before it stops.
    /// Call before cloning the supervisor.
    pub fn with_slow_client_grace(mut self, grace: Duration) -> AgentSupervisor {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.slow_client_grace = grace;
        }
        self
    }

    /// The thread store runs write to.
    /// Runs with the other pods sharing the database: run events go to the user's
    /// sockets on every pod, `cancel` reaches runs on other pods, and the run rate
    /// limit counts the user's runs on all of them.
    pub fn with_replicas(mut self, replicas: Replicas) -> AgentSupervisor {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.replicas = replicas.clone();
        }
        let supervisor = Arc::downgrade(&self.inner);
        replicas.on_cancel(move |user_id, run_id| {
            supervisor
                .upgrade()
                .is_some_and(|inner| AgentSupervisor { inner }.cancel_run(user_id, run_id))
        });
        self
    }

    /// Sets how many bytes of JSON one `threads` or `thread` page may hold (the
    /// socket's message limit, so a page always fits one frame).
    pub fn with_page_bytes(mut self, bytes: usize) -> AgentSupervisor {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.page_bytes = bytes;
        }
        self
    }

    /// Sets the bounds on runs (concurrent runs, run time, reply size). Call before
    /// cloning the supervisor.
    pub fn with_run_limits(mut self, limits: RunLimits) -> AgentSupervisor {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.limits = limits;
        }
        self
    }

    /// The run rate limit (`0`: none).
    fn runs_per_minute(&self) -> u32 {
        self.inner.limiter.map_or(0, |l| l.runs_per_minute)
    }

    /// The limiter this process applies itself: none when the replicas share the
    /// user's allowance in the database instead.
    fn local_limiter(&self) -> Option<RateLimit> {
        self.inner
            .limiter
            .filter(|_| !self.inner.replicas.is_shared())
    }

    fn page_limit(&self, items: Option<u32>) -> PageLimit {
        PageLimit {
            items: items.unwrap_or(DEFAULT_PAGE_ITEMS),
            bytes: self.inner.page_bytes,
        }
    }

    pub fn store(&self) -> &ThreadStore {
        &self.inner.store
    }

    /// The LLM client runs use.
    pub fn llm(&self) -> &LlmClient {
        &self.inner.llm
    }

    /// Runs currently executing (spawned and not yet finished).
    pub fn active_runs(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// True once [`shutdown`](Self::shutdown) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
    }

    /// Refuses new runs from now on and cancels every running one; each sends
    /// `error shutting_down` to its connection if it still can.
    pub fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        self.inner.root.cancel();
    }

    /// Same as [`shutdown`](Self::shutdown).
    pub fn cancel_all(&self) {
        self.shutdown();
    }

    /// Waits until no run is executing.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            tokio::pin!(notified);
            // Registering before checking the count closes the window in which the
            // last run could finish between the check and the wait.
            notified.as_mut().enable();
            if self.inner.active.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Cancels `user_id`'s run `run_id`. False when no such run of this user is going.
    pub fn cancel_run(&self, user_id: &str, run_id: &str) -> bool {
        let guard = self
            .shard(user_id)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match guard
            .users
            .get(user_id)
            .and_then(|u| u.runs.iter().find(|r| &*r.run_id == run_id))
        {
            Some(run) => {
                run.token.cancel();
                true
            }
            None => false,
        }
    }

    /// Handles one client request of `user_id`, sending its answers to `out`.
    /// Returns once the request is answered or, for `user_message`, once the run is
    /// started; the run itself continues in its own task.
    pub async fn handle(
        &self,
        user_id: &str,
        request: ClientRequest,
        out: mpsc::Sender<ServerEvent>,
    ) -> Result<(), DeliveryError> {
        self.handle_from(user_id, None, request, out).await
    }

    /// [`handle`](Self::handle) for a request from the socket `origin`: the runs it
    /// starts send their events to `out`, and to every other socket of the user
    /// (here and on the other pods) through the replicas.
    pub async fn handle_from(
        &self,
        user_id: &str,
        origin: Option<&str>,
        request: ClientRequest,
        out: mpsc::Sender<ServerEvent>,
    ) -> Result<(), DeliveryError> {
        match request {
            ClientRequest::Ping => deliver(&out, ServerEvent::pong_now()),
            ClientRequest::ListThreads { limit, cursor } => {
                let page = self
                    .inner
                    .store
                    .threads_page(user_id, self.page_limit(limit), cursor.as_deref())
                    .await;
                let event = match page {
                    Ok(page) => ServerEvent::Threads {
                        threads: page.items,
                        next_cursor: page.next_cursor,
                    },
                    Err(e @ StoreError::BadCursor) => {
                        ServerEvent::error(ErrorCode::InvalidField, e.to_string())
                    }
                    Err(e) => storage_error(&e, None, None),
                };
                deliver(&out, event)
            }
            ClientRequest::GetThread {
                thread_id,
                limit,
                cursor,
            } => {
                let page = self
                    .inner
                    .store
                    .thread_page(
                        user_id,
                        &thread_id,
                        self.page_limit(limit),
                        cursor.as_deref(),
                    )
                    .await;
                let event = match page {
                    Ok(page) => ServerEvent::Thread {
                        thread_id,
                        messages: page.items,
                        next_cursor: page.next_cursor,
                    },
                    Err(StoreError::NotFound { .. }) => thread_not_found(thread_id),
                    Err(e @ StoreError::BadCursor) => ServerEvent::Error {
                        code: ErrorCode::InvalidField,
                        message: e.to_string(),
                        run_id: None,
                        thread_id: Some(thread_id),
                    },
                    Err(e) => storage_error(&e, None, Some(thread_id)),
                };
                deliver(&out, event)
            }
            ClientRequest::Cancel { run_id } => {
                if self.cancel_run(user_id, &run_id)
                    || self.inner.replicas.cancel_elsewhere(user_id, &run_id).await
                {
                    // The run itself answers with `error cancelled`.
                    Ok(())
                } else {
                    let message = format!(
                        "run {run_id} is not running; it may have finished already (list_threads and get_thread show stored replies)"
                    );
                    deliver(
                        &out,
                        ServerEvent::Error {
                            code: ErrorCode::NotFound,
                            message,
                            run_id: Some(run_id),
                            thread_id: None,
                        },
                    )
                }
            }
            ClientRequest::UserMessage {
                content,
                thread_id,
                client_message_id,
            } => {
                self.start_run(user_id, content, thread_id, client_message_id, out, origin)
                    .await
            }
        }
    }

    async fn start_run(
        &self,
        user_id: &str,
        content: String,
        thread_id: Option<String>,
        client_message_id: Option<String>,
        out: mpsc::Sender<ServerEvent>,
        origin: Option<&str>,
    ) -> Result<(), DeliveryError> {
        if self.is_shutting_down() {
            return deliver(
                &out,
                ServerEvent::error(
                    ErrorCode::ShuttingDown,
                    "the service is shutting down and starts no new runs; reconnect and send the message again",
                ),
            );
        }
        if content.trim().is_empty() {
            return deliver(
                &out,
                ServerEvent::error(
                    ErrorCode::InvalidField,
                    "the field `content` of user_message must be a non-empty string",
                ),
            );
        }
        // Checked before the message is stored, so a refused message leaves nothing
        // half done: the client sends it again. (A soft cap: runs admitted at the
        // same instant may pass it together.)
        let max_concurrent = self.inner.limits.max_concurrent;
        if self.active_runs() >= max_concurrent {
            return deliver(
                &out,
                ServerEvent::Error {
                    code: ErrorCode::Overloaded,
                    message: format!(
                        "this instance is running its maximum of {max_concurrent} agent runs; your message was not stored — send it again in a few seconds"
                    ),
                    run_id: None,
                    thread_id,
                },
            );
        }
        let run_id: Arc<str> = uuid::Uuid::new_v4().to_string().into();
        let token = match self.admit(user_id, &run_id, client_message_id.as_deref()) {
            Admission::Admitted(token) => token,
            Admission::InFlight { run_id } => {
                return deliver(&out, in_flight(run_id.to_string()));
            }
            Admission::Limited { retry_after } => {
                let limit = self.inner.limiter.map_or(0, |l| l.runs_per_minute);
                return deliver(
                    &out,
                    ServerEvent::Error {
                        code: ErrorCode::RateLimited,
                        message: format!(
                            "at most {limit} agent runs per minute are allowed; send again in {}s",
                            retry_after.as_secs().max(1)
                        ),
                        run_id: None,
                        thread_id,
                    },
                );
            }
        };
        // From here on the run is registered; `registration` unregisters it on
        // every path that does not hand it to a run task.
        let mut registration = Registration {
            supervisor: self.clone(),
            user_id: user_id.into(),
            run_id: run_id.clone(),
            refund: false,
            shared_allowance: false,
            recorded: false,
            ended: AtomicBool::new(false),
        };
        let runs_per_minute = self.runs_per_minute();
        if self.inner.replicas.is_shared() && runs_per_minute > 0 {
            match self.inner.replicas.take_run(user_id, runs_per_minute).await {
                Ok(None) => registration.shared_allowance = true,
                Ok(Some(retry_after)) => {
                    registration.abandon(false);
                    return deliver(
                        &out,
                        ServerEvent::Error {
                            code: ErrorCode::RateLimited,
                            message: format!(
                                "at most {runs_per_minute} agent runs per minute are allowed; send again in {}s",
                                retry_after.as_secs().max(1)
                            ),
                            run_id: None,
                            thread_id,
                        },
                    );
                }
                Err(e) => {
                    // The message cannot be stored either; the store reports it below.
                    tracing::debug!(error = %e, "the shared run allowance is not reachable");
                }
            }
        }

        let posted = self
            .inner
            .store
            .post_user_message(
                user_id,
                thread_id.as_deref(),
                &content,
                client_message_id.as_deref(),
            )
            .await;
        let (thread_id, message_id, content) = match posted {
            Ok(posted) => (posted.thread_id, posted.message.message_id, content),
            Err(StoreError::Duplicate { existing, .. }) => match existing.reply {
                Some(reply) => {
                    // Answered before: replay from the store, run nothing.
                    registration.abandon(true);
                    deliver(
                        &out,
                        ServerEvent::AgentStarted {
                            run_id: reply.run_id.clone(),
                            thread_id: existing.thread_id.clone(),
                            client_message_id,
                            replay: true,
                        },
                    )?;
                    return deliver(
                        &out,
                        ServerEvent::AgentCompleted {
                            run_id: reply.run_id,
                            thread_id: existing.thread_id,
                            message_id: reply.message_id,
                            replay: true,
                        },
                    );
                }
                // Stored but never answered: run the stored message again.
                None => (existing.thread_id, existing.message_id, existing.content),
            },
            Err(StoreError::NotFound { thread_id }) => {
                registration.abandon(true);
                return deliver(&out, thread_not_found(thread_id));
            }
            Err(e) => {
                registration.abandon(true);
                return deliver(&out, storage_error(&e, None, thread_id));
            }
        };

        match self
            .inner
            .replicas
            .register_run(&run_id, user_id, &thread_id, client_message_id.as_deref())
            .await
        {
            Ok(()) => registration.recorded = self.inner.replicas.is_shared(),
            Err(RunConflict::InFlight { run_id }) => {
                registration.abandon(true);
                return deliver(&out, in_flight(run_id));
            }
        }
        let started = ServerEvent::AgentStarted {
            run_id: run_id.to_string(),
            thread_id: thread_id.clone(),
            client_message_id,
            replay: false,
        };
        if let Err(e) = deliver(&out, started.clone()) {
            // The message is stored; a retry with its client_message_id runs it.
            registration.abandon(false);
            return Err(e);
        }
        self.inner.replicas.publish(user_id, &started, origin).await;

        let run = Run {
            origin: origin.map(Into::into),
            supervisor: self.clone(),
            registration,
            token,
            out,
            user_id: user_id.to_owned(),
            run_id: run_id.to_string(),
            thread_id,
            message_id,
            content,
        };
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        let span =
            tracing::info_span!("agent_run", run_id = %run.run_id, thread_id = %run.thread_id);
        tokio::spawn(run.execute().instrument(span));
        Ok(())
    }

    fn shard(&self, user_id: &str) -> &Mutex<Shard> {
        let index = (self.inner.hasher.hash_one(user_id) as usize) % SHARDS;
        &self.inner.shards[index]
    }

    /// Checks duplicates in flight and the rate limit, and registers the run, under
    /// one lock so two copies of a message cannot both get in.
    fn admit(
        &self,
        user_id: &str,
        run_id: &Arc<str>,
        client_message_id: Option<&str>,
    ) -> Admission {
        let now = Instant::now();
        let mut shard = self
            .shard(user_id)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if shard.users.len() >= shard.prune_at {
            shard.users.retain(|_, u| !u.is_idle(now));
            shard.prune_at = (shard.users.len() * 2).max(256);
        }
        let user = shard.users.entry(user_id.into()).or_default();
        if let Some(cmid) = client_message_id
            && let Some(run) = user
                .runs
                .iter()
                .find(|r| r.client_message_id.as_deref() == Some(cmid))
        {
            return Admission::InFlight {
                run_id: run.run_id.clone(),
            };
        }
        if let Some(limit) = self.local_limiter() {
            let tat = user.tat.map_or(now, |t| t.max(now));
            let next = tat + limit.interval;
            if next.duration_since(now) > WINDOW {
                return Admission::Limited {
                    retry_after: next.duration_since(now) - WINDOW,
                };
            }
            user.tat = Some(next);
        }
        let token = self.inner.root.child_token();
        user.runs.push(ActiveRun {
            run_id: run_id.clone(),
            client_message_id: client_message_id.map(str::to_owned),
            token: token.clone(),
        });
        Admission::Admitted(token)
    }

    fn unregister(&self, user_id: &str, run_id: &str, refund: bool) {
        let now = Instant::now();
        let mut shard = self
            .shard(user_id)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(user) = shard.users.get_mut(user_id) else {
            return;
        };
        user.runs.retain(|r| &*r.run_id != run_id);
        if refund && let (Some(limit), Some(tat)) = (self.local_limiter(), user.tat) {
            // A message that never ran (missing thread, replay, store failure) does
            // not use up the user's allowance.
            user.tat = tat.checked_sub(limit.interval).filter(|t| *t > now);
        }
        if user.is_idle(now) {
            shard.users.remove(user_id);
        }
    }
}

/// A registered run; removes itself from the registry when dropped.
struct Registration {
    supervisor: AgentSupervisor,
    user_id: Box<str>,
    run_id: Arc<str>,
    /// Give the rate-limit slot back when unregistering.
    refund: bool,
    /// The run took one from the user's allowance shared by all pods.
    shared_allowance: bool,
    /// The run is in the shared registry of runs in progress.
    recorded: bool,
    /// [`Registration::end`] has run.
    ended: AtomicBool,
}

impl Registration {
    /// Takes the run out of this pod's registry and the shared one, before its last
    /// event goes out: a client that has seen the run end and sends `cancel` then
    /// gets `not_found`, instead of reaching a run that is gone and never answers
    /// (the registries used to be cleared only after the last event).
    async fn end(&self) {
        if self.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        self.supervisor
            .unregister(&self.user_id, &self.run_id, false);
        if self.recorded {
            self.supervisor
                .inner
                .replicas
                .finish_run(&self.run_id)
                .await;
        }
    }

    /// Unregisters a run that will not execute; `refund` gives the rate-limit slot back.
    fn abandon(mut self, refund: bool) {
        self.refund = refund;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let ended = *self.ended.get_mut();
        if !ended {
            self.supervisor
                .unregister(&self.user_id, &self.run_id, self.refund);
        }
        let refund = self.refund && self.shared_allowance;
        let recorded = self.recorded && !ended;
        if (refund || recorded)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let replicas = self.supervisor.inner.replicas.clone();
            let runs_per_minute = self.supervisor.runs_per_minute();
            let (user_id, run_id) = (self.user_id.clone(), self.run_id.clone());
            runtime.spawn(async move {
                if recorded {
                    replicas.finish_run(&run_id).await;
                }
                if refund {
                    replicas.refund_run(&user_id, runs_per_minute).await;
                }
            });
        }
    }
}

/// Counts a run as active until dropped (also on panic), and wakes `wait_idle`.
struct ActiveGuard(AgentSupervisor);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.0.inner.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.inner.idle.notify_waiters();
        }
    }
}

/// Why a run stopped early.
enum Stop {
    /// Cancelled by its owner or by shutdown.
    Cancelled,
    /// The client's queue stayed full or closed: nothing more can be sent.
    ClientGone,
}

struct Run {
    /// The socket that started the run: it gets the events through `out`, every
    /// other socket of the user through the replicas.
    origin: Option<Arc<str>>,
    supervisor: AgentSupervisor,
    registration: Registration,
    token: CancellationToken,
    out: mpsc::Sender<ServerEvent>,
    user_id: String,
    run_id: String,
    thread_id: String,
    /// The user message this run answers.
    message_id: String,
    content: String,
}

impl Run {
    async fn execute(self) {
        let _active = ActiveGuard(self.supervisor.clone());
        let outcome = self.steps().await;
        match outcome {
            Ok(()) => {}
            Err(Stop::ClientGone) => {
                tracing::debug!("run stopped: the client's queue is full or closed");
                // The user's other sockets saw the run start; they hear that it ended.
                let event = self.error(
                    ErrorCode::RunInterrupted,
                    "the run stopped because the connection that started it went away; the message is stored — send it again with the same client_message_id".to_owned(),
                );
                self.end_before(&event).await;
                self.fan_out(&event).await;
            }
            Err(Stop::Cancelled) => {
                let (code, message) = if self.supervisor.is_shutting_down() {
                    (
                        ErrorCode::ShuttingDown,
                        "the run was stopped because the service is shutting down; your message is stored — reconnect and send it again with the same client_message_id",
                    )
                } else {
                    (
                        ErrorCode::Cancelled,
                        "the run was cancelled; your message is stored, no reply was saved",
                    )
                };
                let event = self.error(code, message.to_owned());
                self.end_before(&event).await;
                // Best effort: the connection may be going away too.
                let _ = self.out.try_send(event.clone());
                self.fan_out(&event).await;
            }
        }
        drop(self.registration);
    }

    fn error(&self, code: ErrorCode, message: String) -> ServerEvent {
        ServerEvent::Error {
            code,
            message,
            run_id: Some(self.run_id.clone()),
            thread_id: Some(self.thread_id.clone()),
        }
    }

    /// Sends one event, waiting a bounded time for room in the queue.
    async fn emit(&self, event: ServerEvent) -> Result<(), Stop> {
        self.end_before(&event).await;
        let grace = self.supervisor.inner.slow_client_grace;
        tokio::select! {
            biased;
            _ = self.token.cancelled() => Err(Stop::Cancelled),
            permit = tokio::time::timeout(grace, self.out.reserve()) => match permit {
                Ok(Ok(permit)) => {
                    permit.send(event.clone());
                    self.fan_out(&event).await;
                    Ok(())
                }
                Ok(Err(_)) | Err(_) => Err(Stop::ClientGone),
            },
        }
    }

    /// Ends the run's registration before `event` goes out when `event` is its last:
    /// its completion or an error (a run's errors all end it).
    async fn end_before(&self, event: &ServerEvent) {
        if matches!(
            event,
            ServerEvent::AgentCompleted { .. } | ServerEvent::Error { .. }
        ) {
            self.registration.end().await;
        }
    }

    /// Sends an event of this run to the user's other sockets, on every pod.
    async fn fan_out(&self, event: &ServerEvent) {
        self.supervisor
            .inner
            .replicas
            .publish(&self.user_id, event, self.origin.as_deref())
            .await;
    }

    /// Like [`emit`](Self::emit), for the last event of a run whose outcome is settled.
    async fn emit_uncancellable(&self, event: ServerEvent) -> Result<(), Stop> {
        self.end_before(&event).await;
        let grace = self.supervisor.inner.slow_client_grace;
        match tokio::time::timeout(grace, self.out.reserve()).await {
            Ok(Ok(permit)) => {
                permit.send(event.clone());
                self.fan_out(&event).await;
                Ok(())
            }
            Ok(Err(_)) | Err(_) => Err(Stop::ClientGone),
        }
    }

    async fn steps(&self) -> Result<(), Stop> {
        let run_id = &self.run_id;
        let inner = &self.supervisor.inner;
        // One deadline for the whole run, up to its last reply chunk (storing the
        // reply after it has its own bounded retries).
        let deadline = tokio::time::sleep(inner.limits.timeout);
        tokio::pin!(deadline);
        self.emit(ServerEvent::AgentThinking {
            run_id: run_id.clone(),
        })
        .await?;

        self.emit(ServerEvent::ToolExecuting {
            run_id: run_id.clone(),
            tool: TOOL_NAME.to_owned(),
        })
        .await?;
        let result = word_count(&self.content);
        self.emit(ServerEvent::ToolCompleted {
            run_id: run_id.clone(),
            tool: TOOL_NAME.to_owned(),
            result: result.clone(),
        })
        .await?;

        let history = match inner
            .store
            .recent_messages(&self.user_id, &self.thread_id, HISTORY_MESSAGES)
            .await
        {
            Ok(history) => history,
            Err(e) => {
                return self
                    .emit(storage_error(
                        &e,
                        Some(run_id.clone()),
                        Some(self.thread_id.clone()),
                    ))
                    .await;
            }
        };
        let request = LlmRequest {
            history: history
                .into_iter()
                .map(|m| PromptMessage {
                    role: match m.role {
                        Role::User => PromptRole::User,
                        Role::Assistant => PromptRole::Assistant,
                    },
                    content: m.content,
                })
                .collect(),
            tool_results: vec![ToolResult {
                tool: TOOL_NAME.to_owned(),
                result,
            }],
        };

        let stream = tokio::select! {
            biased;
            _ = self.token.cancelled() => return Err(Stop::Cancelled),
            // A client that went away while the provider thinks frees its run now,
            // not at the next event.
            _ = self.out.closed() => return Err(Stop::ClientGone),
            _ = &mut deadline => return self.timed_out().await,
            stream = inner.llm.stream_reply(&request) => stream,
        };
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => return self.llm_failed(&e).await,
        };
        let mut reply = String::new();
        loop {
            let item = tokio::select! {
                biased;
                _ = self.token.cancelled() => return Err(Stop::Cancelled),
                _ = self.out.closed() => return Err(Stop::ClientGone),
                _ = &mut deadline => return self.timed_out().await,
                item = stream.next() => item,
            };
            match item {
                None => break,
                Some(Ok(delta)) => {
                    let max = inner.limits.max_reply_bytes;
                    if reply.len() + delta.len() > max {
                        tracing::warn!(
                            max_reply_bytes = max,
                            "agent run stopped: the reply grew too large"
                        );
                        return self
                            .emit(self.error(
                                ErrorCode::ReplyTooLarge,
                                format!("the reply grew past {max} bytes and was stopped; it is not stored — ask for a shorter answer"),
                            ))
                            .await;
                    }
                    reply.push_str(&delta);
                    self.emit(ServerEvent::AgentResponse {
                        run_id: run_id.clone(),
                        delta,
                    })
                    .await?;
                }
                Some(Err(e)) => return self.llm_failed(&e).await,
            }
        }
        drop(stream);
        if reply.is_empty() {
            return self
                .llm_failed(&crate::llm::LlmError::Unavailable {
                    message: "the provider returned an empty reply".to_owned(),
                })
                .await;
        }
        if self.token.is_cancelled() {
            return Err(Stop::Cancelled);
        }
        match self.store_reply(&reply).await {
            Ok(stored) => {
                // The reply is stored: a cancel arriving now is too late, and the
                // client must hear that the run completed, not that it was cancelled.
                self.emit_uncancellable(ServerEvent::AgentCompleted {
                    run_id: run_id.clone(),
                    thread_id: self.thread_id.clone(),
                    message_id: stored.message_id,
                    replay: false,
                })
                .await
            }
            Err(e) => {
                self.emit(storage_error(
                    &e,
                    Some(run_id.clone()),
                    Some(self.thread_id.clone()),
                ))
                .await
            }
        }
    }

    /// Stores the reply, waiting out a database that is restarting (bounded): the
    /// reply was streamed to the user, so it should not be lost to a short outage.
    async fn store_reply(&self, reply: &str) -> Result<StoredMessage, StoreError> {
        let store = &self.supervisor.inner.store;
        let deadline = Instant::now() + REPLY_STORE_PATIENCE;
        let mut delay = Duration::from_millis(100);
        loop {
            match store
                .append_reply(
                    &self.user_id,
                    &self.thread_id,
                    reply,
                    &self.message_id,
                    &self.run_id,
                )
                .await
            {
                Err(e) if e.is_transient() && Instant::now() + delay < deadline => {
                    tracing::warn!(error = %e, "storing the reply failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                result => return result,
            }
        }
    }

    async fn timed_out(&self) -> Result<(), Stop> {
        let limit = self.supervisor.inner.limits.timeout.as_secs();
        tracing::warn!(
            run_timeout_seconds = limit,
            "agent run stopped: it took too long"
        );
        self.emit(self.error(
            ErrorCode::RunTimeout,
            format!("the run took longer than {limit}s and was stopped; your message is stored — send it again with the same client_message_id"),
        ))
        .await
    }

    async fn llm_failed(&self, e: &crate::llm::LlmError) -> Result<(), Stop> {
        // The detail (provider URL, HTTP error chain, provider's body) is for operators
        // only: it goes to the log, the client gets the code and what to do.
        tracing::warn!(error = %e, "agent run failed: LLM provider unavailable");
        self.emit(self.error(
            ErrorCode::LlmUnavailable,
            "the assistant is unavailable right now; your message is stored — send it again later with the same client_message_id".to_owned(),
        ))
        .await
    }
}

/// The built-in tool: counts words and characters of the user's message.
pub fn word_count(text: &str) -> String {
    let words = text.split_whitespace().count();
    let chars = text.chars().count();
    let plural = |n: usize, one: &str, many: &str| {
        if n == 1 {
            format!("1 {one}")
        } else {
            format!("{n} {many}")
        }
    };
    format!(
        "{}, {}",
        plural(words, "word", "words"),
        plural(chars, "character", "characters")
    )
}

/// The answer to a retry whose first run is still going (on this pod or another).
fn in_flight(run_id: String) -> ServerEvent {
    ServerEvent::Error {
        code: ErrorCode::Duplicate,
        message: format!(
            "the message with this client_message_id is being answered by run {run_id}; its events reach every open connection of this user"
        ),
        run_id: Some(run_id),
        thread_id: None,
    }
}

fn thread_not_found(thread_id: String) -> ServerEvent {
    ServerEvent::Error {
        code: ErrorCode::NotFound,
        message: format!(
            "thread {thread_id} not found; list_threads shows your threads, and a user_message without thread_id starts a new one"
        ),
        run_id: None,
        thread_id: Some(thread_id),
    }
}

fn storage_error(e: &StoreError, run_id: Option<String>, thread_id: Option<String>) -> ServerEvent {
    // The details (database host, SQL state) go to the log, not to the client.
    tracing::error!(error = %e, "thread store failed");
    ServerEvent::Error {
        code: ErrorCode::StorageUnavailable,
        message: "the chat history could not be read or written right now; try again shortly"
            .to_owned(),
        run_id,
        thread_id,
    }
}
