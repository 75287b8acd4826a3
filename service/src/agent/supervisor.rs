//! The agent supervisor: admits runs (shutdown, capacity, rate limit, duplicates in
//! flight), answers the requests that need no run, and tracks, cancels and drains
//! the runs it started.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::run::Run;
use crate::config::RunLimits;
use crate::llm::LlmClient;
use crate::protocol::{ClientRequest, ErrorCode, ServerEvent};
use crate::replicas::{Replicas, RunConflict};
use crate::store::{DEFAULT_PAGE_ITEMS, PageLimit, StoreError, ThreadStore};

/// How long a run waits for room in a full outbound queue before it decides the
/// client is too slow and stops.
const DEFAULT_SLOW_CLIENT_GRACE: Duration = Duration::from_secs(2);

const SHARDS: usize = 32;

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
    pub(super) inner: Arc<Inner>,
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

pub(super) struct Inner {
    pub(super) store: ThreadStore,
    pub(super) llm: LlmClient,
    limiter: Option<RateLimit>,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Parent of every run's token: cancelling it stops all runs.
    root: CancellationToken,
    shutting_down: AtomicBool,
    pub(super) active: AtomicUsize,
    pub(super) idle: Notify,
    pub(super) slow_client_grace: Duration,
    page_bytes: usize,
    pub(super) limits: RunLimits,
    /// The other pods of this service (or just this process, with SQLite).
    pub(super) replicas: Replicas,
}

/// Bytes of JSON a page holds unless [`AgentSupervisor::with_page_bytes`] says
/// otherwise: the default `CHATGATE_MAX_MESSAGE_BYTES`.
const DEFAULT_PAGE_BYTES: usize = 64 * 1024;

/// GCRA parameters: one run per `interval`, up to a minute's worth in a burst.
///
/// Not `governor`'s keyed limiter: a message that never ran (missing thread, replay,
/// store failure) gives its slot back, which `governor` cannot do, and the limit is
/// checked under the same per-user lock as duplicates in flight, so two copies of
/// one message cannot both pass; the per-user state is pruned with the run registry.
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
    pub(crate) fn with_replicas(mut self, replicas: Replicas) -> AgentSupervisor {
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
    pub(super) fn runs_per_minute(&self) -> u32 {
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

    pub(super) fn unregister(&self, user_id: &str, run_id: &str, refund: bool) {
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
pub(super) struct Registration {
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
    pub(super) async fn end(&self) {
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

pub(super) fn storage_error(
    e: &StoreError,
    run_id: Option<String>,
    thread_id: Option<String>,
) -> ServerEvent {
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
