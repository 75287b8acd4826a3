//! Agent runs: the supervisor that turns a user message into streamed agent events.
//!
//! # API
//!
//! ```text
//! AgentSupervisor::new(store: ThreadStore, llm: LlmClient, runs_per_minute: u32) -> AgentSupervisor
//! AgentSupervisor::with_slow_client_grace(self, grace: Duration) -> AgentSupervisor
//! AgentSupervisor::handle(&self, user_id: &str, request: ClientRequest,
//!                         out: mpsc::Sender<ServerEvent>) -> Result<(), DeliveryError>   // async
//! AgentSupervisor::cancel_run(&self, user_id: &str, run_id: &str) -> bool
//! AgentSupervisor::shutdown(&self)
//! AgentSupervisor::wait_idle(&self)           // async: until every run task has ended
//! AgentSupervisor::active_runs(&self) -> usize
//! AgentSupervisor::is_shutting_down(&self) -> bool
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
//! * A run waits up to the slow-client grace (default 2 s)
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
//!
//! The requests and events are the wire types of [`crate::protocol`]; `supervisor`
//! admits, tracks and cancels runs, and `run` is one run's steps.

mod run;
mod supervisor;

pub use run::TOOL_NAME;
pub use supervisor::{AgentSupervisor, DeliveryError};
