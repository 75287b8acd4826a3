//! One agent run: its steps from `agent_thinking` to `agent_completed` (the built-in
//! tool, the LLM's streamed reply, storing it), and how it ends early (cancel,
//! shutdown, a slow or vanished client, a timeout, a failed provider or store).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::supervisor::{AgentSupervisor, Registration, storage_error};
use crate::llm::{LlmRequest, PromptMessage, PromptRole, ToolResult};
use crate::protocol::{ErrorCode, ServerEvent};
use crate::store::{Role, StoreError, StoredMessage};

/// The built-in tool every run calls.
pub const TOOL_NAME: &str = "word_count";

/// How long a finished run keeps trying to store its reply while the database is
/// unreachable (a restart, a failover) before it reports `storage_unavailable`.
const REPLY_STORE_PATIENCE: Duration = Duration::from_secs(10);

/// The waits between attempts to store a reply: jittered, so the runs that lost the
/// database together do not all come back at the same instant.
const REPLY_STORE_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(100))
    .with_max_delay(Duration::from_secs(1))
    .without_max_times()
    .with_jitter();

/// Messages of the thread (including the new one) sent to the LLM as context.
const HISTORY_MESSAGES: u32 = 20;

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

pub(super) struct Run {
    /// The socket that started the run: it gets the events through `out`, every
    /// other socket of the user through the replicas.
    pub(super) origin: Option<Arc<str>>,
    pub(super) supervisor: AgentSupervisor,
    pub(super) registration: Registration,
    pub(super) token: CancellationToken,
    pub(super) out: mpsc::Sender<ServerEvent>,
    pub(super) user_id: String,
    pub(super) run_id: String,
    pub(super) thread_id: String,
    /// The user message this run answers.
    pub(super) message_id: String,
    pub(super) content: String,
}

impl Run {
    pub(super) async fn execute(self) {
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
        (|| {
            store.append_reply(
                &self.user_id,
                &self.thread_id,
                reply,
                &self.message_id,
                &self.run_id,
            )
        })
        .retry(REPLY_STORE_BACKOFF)
        .when(StoreError::is_transient)
        .adjust(move |_, delay| delay.filter(|delay| Instant::now() + *delay < deadline))
        .notify(|e, _| tracing::warn!(error = %e, "storing the reply failed; retrying"))
        .await
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
fn word_count(text: &str) -> String {
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
