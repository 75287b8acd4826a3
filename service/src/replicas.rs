//! The replicas of one service acting as one: a run's events reach every open socket
//! of its user on every pod, `cancel` reaches the run wherever it runs, the per-user
//! connection limit and the run rate limit hold across pods, and the runs of a pod
//! that died are failed by the pods still alive.
//!
//! Everything goes through the PostgreSQL database the replicas already share — no
//! second system to run, secure and keep in parity:
//!
//! * events and cancels travel as `NOTIFY` on one channel; each pod `LISTEN`s on one
//!   connection and hands what arrives to its own sockets. PostgreSQL delivers
//!   notifications in commit order, so a run's events keep their order; a pod skips
//!   what it sent itself (its own sockets already have it), so each socket gets each
//!   event once;
//! * limits and liveness are rows (`0002_replicas.sql`): a heartbeat per pod, a row
//!   per open socket and per run in progress, a GCRA allowance per user. Times come
//!   from the database's clock, so pods with skewed clocks agree.
//!
//! With SQLite (development: one process) the same API works within the process.
//!
//! What is not promised: while a pod's `LISTEN` connection is down (the database
//! restarting), events of runs on other pods do not reach that pod's sockets; those
//! runs' replies are still stored, and `get_thread` shows them.

use crate::protocol::{ErrorCode, ServerEvent};
use backon::{ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgListener, PgPool};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Waits between the five attempts to relay a batch of run events: jittered, so
/// the pods that lost the database together do not all retry at the same instant.
const RELAY_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(50))
    .with_max_times(4)
    .with_jitter();

/// The one notification channel every replica listens on.
const CHANNEL: &str = "chatgate";
/// How often a pod proves it is alive and looks for pods that are not.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// A pod whose heartbeat is older than this is dead: its runs fail, its sockets stop
/// counting. Several heartbeats long, so a slow query is not a death.
pub const DEAD_AFTER: Duration = Duration::from_secs(10);
/// PostgreSQL refuses a `NOTIFY` payload of 8000 bytes or more; deltas are cut well
/// below that (escaping can double their size).
const MAX_DELTA_BYTES: usize = 3000;
const MAX_PAYLOAD_BYTES: usize = 7900;
/// Notifications waiting for the publisher; a run waits when it is full.
const OUTBOX: usize = 4096;
/// Notifications sent in one statement.
const BATCH: usize = 128;
/// The database's clock, in microseconds since the Unix epoch. `now()` is fixed for
/// the statement, so every use within one agrees.
const NOW_US: &str = "(extract(epoch from now()) * 1000000)::bigint";

const SHARDS: usize = 32;

/// The replicas' shared state and this pod's sockets. Cheap to clone.
#[derive(Clone)]
pub struct Replicas {
    inner: Arc<Inner>,
}

struct Inner {
    /// Random per process; also the prefix of this pod's connection ids in logs.
    replica_id: Arc<str>,
    hub: Hub,
    shared: Option<Shared>,
    /// Stops the background tasks.
    stop: CancellationToken,
    /// What a `cancel` arriving from another pod calls (set by the supervisor).
    on_cancel: OnceLock<CancelHandler>,
}

/// `(user, run_id) -> found`: stops a run of this pod when another pod asks.
type CancelHandler = Box<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// The PostgreSQL side, present when the thread store is PostgreSQL.
struct Shared {
    pool: PgPool,
    outbox: mpsc::Sender<String>,
    /// Connection rows whose delete failed (database unreachable), retried by the
    /// heartbeat so a socket never keeps counting against its user.
    unreleased: Mutex<Vec<String>>,
}

/// What travels on the channel.
#[derive(Debug, Serialize, Deserialize)]
struct Notification {
    /// The replica that sent it (which skips it when it comes back).
    from: String,
    #[serde(flatten)]
    body: Body,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Body {
    /// An event for every socket of `user`.
    Event { user: String, event: ServerEvent },
    /// Stop `run_id` of `user` if it runs on `replica`.
    Cancel {
        replica: String,
        user: String,
        run_id: String,
    },
}

/// Why a run could not be registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunConflict {
    /// A run answering the same `client_message_id` is going (on some pod).
    InFlight { run_id: String },
}

impl Replicas {
    /// One process on its own (SQLite): sockets and runs are all local.
    pub fn single() -> Replicas {
        Replicas::build(None)
    }

    /// Joins the replicas sharing `pool`: registers this pod, and starts its
    /// heartbeat, its listener and its publisher. Fails if the database cannot be
    /// reached now (startup retries like any storage failure).
    pub async fn join(pool: PgPool) -> Result<Replicas, sqlx::Error> {
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        let (outbox, pending) = mpsc::channel(OUTBOX);
        let replicas = Replicas::build(Some(Shared {
            pool,
            outbox,
            unreleased: Mutex::new(Vec::new()),
        }));
        replicas.heartbeat().await?;
        let inner = Arc::downgrade(&replicas.inner);
        let stop = replicas.inner.stop.clone();
        tokio::spawn(listen(listener, inner.clone(), stop.clone()));
        tokio::spawn(publish_loop(pending, inner.clone(), stop.clone()));
        tokio::spawn(heartbeat_loop(inner, stop));
        info!(replica = %replicas.replica_id(), "joined the replicas sharing the thread store");
        Ok(replicas)
    }

    fn build(shared: Option<Shared>) -> Replicas {
        Replicas {
            inner: Arc::new(Inner {
                replica_id: uuid::Uuid::new_v4().simple().to_string()[..12].into(),
                hub: Hub::new(),
                shared,
                stop: CancellationToken::new(),
                on_cancel: OnceLock::new(),
            }),
        }
    }

    /// This pod's id among the replicas.
    pub fn replica_id(&self) -> &str {
        &self.inner.replica_id
    }

    /// True when other pods may share this one's users (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.inner.shared.is_some()
    }

    /// Sets what a `cancel` from another pod calls: `(user, run_id) -> found`.
    pub fn on_cancel(&self, handler: impl Fn(&str, &str) -> bool + Send + Sync + 'static) {
        let _ = self.inner.on_cancel.set(Box::new(handler));
    }

    /// Registers a socket of `user`, which from now on receives the events of that
    /// user's runs (those it did not start itself: it gets those directly).
    pub fn subscribe(&self, user: &str, connection_id: &str, capacity: usize) -> Subscription {
        let mailbox = Arc::new(Mailbox {
            connection_id: connection_id.into(),
            queue: Mutex::new(VecDeque::new()),
            queued: AtomicUsize::new(0),
            capacity: capacity.max(1),
            ready: Notify::new(),
            overflowed: AtomicBool::new(false),
        });
        self.inner.hub.add(user, mailbox.clone());
        Subscription {
            replicas: self.clone(),
            user: user.into(),
            mailbox,
        }
    }

    /// Sends a run event to every socket of `user` on every pod, except the socket
    /// `origin` (the one that started the run, which the run writes to itself).
    /// Waits only when the outbox to the other pods is full.
    pub async fn publish(&self, user: &str, event: &ServerEvent, origin: Option<&str>) {
        self.inner.hub.deliver(user, event, origin);
        let Some(shared) = &self.inner.shared else {
            return;
        };
        for event in split_for_notify(event) {
            let notification = Notification {
                from: self.inner.replica_id.to_string(),
                body: Body::Event {
                    user: user.to_owned(),
                    event,
                },
            };
            let payload = serde_json::to_string(&notification).unwrap_or_default();
            if payload.len() > MAX_PAYLOAD_BYTES {
                // Only a pathological error text could get here; say so rather than
                // let PostgreSQL refuse the whole batch.
                warn!(
                    bytes = payload.len(),
                    "an event is too large to relay to other pods; only this pod's sockets got it"
                );
                continue;
            }
            if shared.outbox.send(payload).await.is_err() {
                return;
            }
        }
    }

    /// Takes one of `user`'s connection slots across all pods. `Ok(false)`: the user
    /// is at `limit`. Without a shared database there is nothing to check here (the
    /// bridge counts this process's sockets).
    pub async fn admit_connection(
        &self,
        user: &str,
        connection_id: &str,
        limit: u32,
    ) -> Result<Option<ConnectionSlot>, sqlx::Error> {
        let Some(shared) = &self.inner.shared else {
            return Ok(Some(ConnectionSlot { release: None }));
        };
        let mut tx = shared.pool.begin().await?;
        // Serialises admissions of one user: the count below then sees every
        // committed slot, so two pods cannot both take the last one.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("chatgate/connections/{user}"))
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO connections (connection_id, user_id, replica_id, opened_at) \
             SELECT $1, $2, $3, {NOW_US} \
             WHERE (SELECT count(*) FROM connections WHERE user_id = $2) < $4"
        ))
        .bind(connection_id)
        .bind(user)
        .bind(&*self.inner.replica_id)
        .bind(i64::from(limit))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok((inserted == 1).then(|| ConnectionSlot {
            release: Some((Arc::downgrade(&self.inner), connection_id.to_owned())),
        }))
    }

    /// Takes one run from `user`'s allowance (`runs_per_minute`, GCRA with a
    /// minute's burst) shared by all pods. `Ok(None)`: allowed; `Ok(Some(wait))`:
    /// over the limit, allowed again after `wait`. `Ok(None)` without a shared
    /// database (the supervisor limits locally then).
    pub async fn take_run(
        &self,
        user: &str,
        runs_per_minute: u32,
    ) -> Result<Option<Duration>, sqlx::Error> {
        let Some(shared) = &self.inner.shared else {
            return Ok(None);
        };
        let (interval, window) = gcra(runs_per_minute);
        let allowed = sqlx::query(&format!(
            "INSERT INTO run_allowance (user_id, tat) VALUES ($1, {NOW_US} + $2) \
             ON CONFLICT (user_id) DO UPDATE \
             SET tat = GREATEST(run_allowance.tat, {NOW_US}) + $2 \
             WHERE GREATEST(run_allowance.tat, {NOW_US}) + $2 - {NOW_US} <= $3"
        ))
        .bind(user)
        .bind(interval)
        .bind(window)
        .execute(&shared.pool)
        .await?
        .rows_affected()
            == 1;
        if allowed {
            return Ok(None);
        }
        let ahead: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT tat + $2 - {NOW_US} - $3 FROM run_allowance WHERE user_id = $1"
        ))
        .bind(user)
        .bind(interval)
        .bind(window)
        .fetch_optional(&shared.pool)
        .await?;
        let micros = u64::try_from(ahead.unwrap_or(0).max(1)).unwrap_or(1);
        Ok(Some(Duration::from_micros(micros)))
    }

    /// Gives back a run taken with [`take_run`](Self::take_run) that never ran.
    pub async fn refund_run(&self, user: &str, runs_per_minute: u32) {
        let Some(shared) = &self.inner.shared else {
            return;
        };
        let (interval, _) = gcra(runs_per_minute);
        if let Err(e) = sqlx::query("UPDATE run_allowance SET tat = tat - $2 WHERE user_id = $1")
            .bind(user)
            .bind(interval)
            .execute(&shared.pool)
            .await
        {
            debug!(error = %e, "could not refund a run to the shared allowance");
        }
    }

    /// Records a run in progress on this pod, so `cancel` finds it from any pod and
    /// the other pods fail it if this one dies. A run already going for the same
    /// `client_message_id` (on any pod) is a conflict. Without a shared database, or
    /// when the database does not answer, the run goes unrecorded (it still runs).
    pub async fn register_run(
        &self,
        run_id: &str,
        user: &str,
        thread_id: &str,
        client_message_id: Option<&str>,
    ) -> Result<(), RunConflict> {
        let Some(shared) = &self.inner.shared else {
            return Ok(());
        };
        let inserted = sqlx::query(&format!(
            "INSERT INTO runs (run_id, user_id, thread_id, client_message_id, replica_id, started_at) \
             VALUES ($1, $2, $3, $4, $5, {NOW_US}) ON CONFLICT DO NOTHING"
        ))
        .bind(run_id)
        .bind(user)
        .bind(thread_id)
        .bind(client_message_id)
        .bind(&*self.inner.replica_id)
        .execute(&shared.pool)
        .await;
        match (inserted, client_message_id) {
            (Ok(done), Some(cmid)) if done.rows_affected() == 0 => {
                let existing: Option<String> = sqlx::query_scalar(
                    "SELECT run_id FROM runs WHERE user_id = $1 AND client_message_id = $2",
                )
                .bind(user)
                .bind(cmid)
                .fetch_optional(&shared.pool)
                .await
                .ok()
                .flatten();
                match existing {
                    Some(run_id) => Err(RunConflict::InFlight { run_id }),
                    // It ended between the two statements: nothing is going now, so
                    // this run may go; it is only missing from the registry.
                    None => Ok(()),
                }
            }
            (Ok(_), _) => Ok(()),
            (Err(e), _) => {
                warn!(error = %e, run_id, "could not record the run in the shared database; it runs unrecorded");
                Ok(())
            }
        }
    }

    /// Forgets a run that ended (whatever way).
    pub async fn finish_run(&self, run_id: &str) {
        let Some(shared) = &self.inner.shared else {
            return;
        };
        if let Err(e) = sqlx::query("DELETE FROM runs WHERE run_id = $1")
            .bind(run_id)
            .execute(&shared.pool)
            .await
        {
            debug!(error = %e, run_id, "could not remove an ended run; the heartbeat of a restarted pod clears it");
        }
    }

    /// Asks the pod running `run_id` of `user` to cancel it. False when no pod runs
    /// it (finished, never existed, another user's).
    pub async fn cancel_elsewhere(&self, user: &str, run_id: &str) -> bool {
        let Some(shared) = &self.inner.shared else {
            return false;
        };
        let replica: Option<String> = match sqlx::query_scalar(
            "SELECT replica_id FROM runs WHERE run_id = $1 AND user_id = $2",
        )
        .bind(run_id)
        .bind(user)
        .fetch_optional(&shared.pool)
        .await
        {
            Ok(replica) => replica,
            Err(e) => {
                warn!(error = %e, run_id, "cannot look up where a run is going");
                None
            }
        };
        let Some(replica) = replica else {
            return false;
        };
        let notification = Notification {
            from: self.inner.replica_id.to_string(),
            body: Body::Cancel {
                replica,
                user: user.to_owned(),
                run_id: run_id.to_owned(),
            },
        };
        shared
            .outbox
            .send(serde_json::to_string(&notification).unwrap_or_default())
            .await
            .is_ok()
    }

    /// Leaves the replicas on shutdown: this pod's sockets and runs stop counting
    /// at once instead of after [`DEAD_AFTER`].
    pub async fn leave(&self) {
        self.inner.stop.cancel();
        let Some(shared) = &self.inner.shared else {
            return;
        };
        let id = &*self.inner.replica_id;
        for statement in [
            "DELETE FROM connections WHERE replica_id = $1",
            "DELETE FROM runs WHERE replica_id = $1",
            "DELETE FROM replicas WHERE replica_id = $1",
        ] {
            if let Err(e) = sqlx::query(statement).bind(id).execute(&shared.pool).await {
                warn!(error = %e, "could not leave the replicas cleanly; the others will notice in {}s", DEAD_AFTER.as_secs());
                return;
            }
        }
    }

    /// Refreshes this pod's heartbeat, retries failed releases, and fails the runs of
    /// pods whose heartbeat stopped.
    async fn heartbeat(&self) -> Result<(), sqlx::Error> {
        let Some(shared) = &self.inner.shared else {
            return Ok(());
        };
        sqlx::query(&format!(
            "INSERT INTO replicas (replica_id, heartbeat_at) VALUES ($1, {NOW_US}) \
             ON CONFLICT (replica_id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at"
        ))
        .bind(&*self.inner.replica_id)
        .execute(&shared.pool)
        .await?;
        let unreleased = std::mem::take(&mut *lock(&shared.unreleased));
        if !unreleased.is_empty() {
            let result = sqlx::query("DELETE FROM connections WHERE connection_id = ANY($1)")
                .bind(&unreleased)
                .execute(&shared.pool)
                .await;
            if let Err(e) = result {
                lock(&shared.unreleased).extend(unreleased);
                return Err(e);
            }
        }
        self.reap(shared).await
    }

    async fn reap(&self, shared: &Shared) -> Result<(), sqlx::Error> {
        let dead: Vec<String> = sqlx::query_scalar(&format!(
            "DELETE FROM replicas WHERE heartbeat_at < {NOW_US} - $1 RETURNING replica_id"
        ))
        .bind(i64::try_from(DEAD_AFTER.as_micros()).unwrap_or(i64::MAX))
        .fetch_all(&shared.pool)
        .await?;
        if dead.is_empty() {
            return Ok(());
        }
        sqlx::query("DELETE FROM connections WHERE replica_id = ANY($1)")
            .bind(&dead)
            .execute(&shared.pool)
            .await?;
        // Only one pod's DELETE gets each row, so each run is reported once.
        let runs: Vec<(String, String, String)> = sqlx::query_as(
            "DELETE FROM runs WHERE replica_id = ANY($1) RETURNING run_id, user_id, thread_id",
        )
        .bind(&dead)
        .fetch_all(&shared.pool)
        .await?;
        warn!(replicas = ?dead, interrupted_runs = runs.len(), "replicas stopped without leaving; failing their runs");
        for (run_id, user, thread_id) in runs {
            let event = ServerEvent::Error {
                code: ErrorCode::RunInterrupted,
                message: "the pod running this run stopped; your message is stored — send it again with the same client_message_id".to_owned(),
                run_id: Some(run_id),
                thread_id: Some(thread_id),
            };
            self.publish(&user, &event, None).await;
        }
        Ok(())
    }

    fn receive(&self, payload: &str) {
        let notification: Notification = match serde_json::from_str(payload) {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "ignoring a notification this version cannot read");
                return;
            }
        };
        if notification.from == *self.inner.replica_id {
            return;
        }
        match notification.body {
            Body::Event { user, event } => self.inner.hub.deliver(&user, &event, None),
            Body::Cancel {
                replica,
                user,
                run_id,
            } if replica == *self.inner.replica_id => {
                let found = self
                    .inner
                    .on_cancel
                    .get()
                    .is_some_and(|cancel| cancel(&user, &run_id));
                debug!(run_id, found, "cancel from another pod");
            }
            Body::Cancel { .. } => {}
        }
    }
}

/// GCRA parameters in microseconds: one run per `interval`, a minute's worth at once.
fn gcra(runs_per_minute: u32) -> (i64, i64) {
    let window = 60_000_000_i64;
    (window / i64::from(runs_per_minute.max(1)), window)
}

/// An event as one or more events that each fit a notification: a long
/// `agent_response` becomes several consecutive deltas, which mean the same.
fn split_for_notify(event: &ServerEvent) -> Vec<ServerEvent> {
    match event {
        ServerEvent::AgentResponse { run_id, delta } if delta.len() > MAX_DELTA_BYTES => {
            let mut parts = Vec::new();
            let mut rest = delta.as_str();
            while !rest.is_empty() {
                let mut end = rest.len().min(MAX_DELTA_BYTES);
                while !rest.is_char_boundary(end) {
                    end -= 1;
                }
                let (part, tail) = rest.split_at(end);
                parts.push(ServerEvent::AgentResponse {
                    run_id: run_id.clone(),
                    delta: part.to_owned(),
                });
                rest = tail;
            }
            parts
        }
        other => vec![other.clone()],
    }
}

/// A user's slot taken by [`Replicas::admit_connection`]; dropping it frees the slot.
pub struct ConnectionSlot {
    release: Option<(Weak<Inner>, String)>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let Some((inner, connection_id)) = self.release.take() else {
            return;
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let Some(shared) = &inner.shared else {
                return;
            };
            let result = sqlx::query("DELETE FROM connections WHERE connection_id = $1")
                .bind(&connection_id)
                .execute(&shared.pool)
                .await;
            if result.is_err() {
                lock(&shared.unreleased).push(connection_id);
            }
        });
    }
}

/// One socket's queue of events from runs it did not start.
struct Mailbox {
    connection_id: Arc<str>,
    queue: Mutex<VecDeque<ServerEvent>>,
    /// Events in `queue`, readable without the lock: every wake-up of a socket's
    /// loop (each ping) looks here, and almost always finds nothing.
    queued: AtomicUsize,
    capacity: usize,
    ready: Notify,
    /// The socket stopped reading and its queue filled: it is closed, never fed
    /// partially.
    overflowed: AtomicBool,
}

impl Mailbox {
    fn push(&self, event: &ServerEvent) {
        {
            let mut queue = lock(&self.queue);
            if queue.len() >= self.capacity {
                self.overflowed.store(true, Ordering::Release);
            } else {
                queue.push_back(event.clone());
                self.queued.store(queue.len(), Ordering::Release);
            }
        }
        self.ready.notify_one();
    }
}

/// What a socket's subscription yields.
pub enum Delivery {
    Event(ServerEvent),
    /// The socket fell behind by a whole queue: close it (the client reconnects and
    /// reloads the thread) rather than skip events.
    Overflow,
}

/// A socket's registration for its user's run events; unregisters when dropped.
pub struct Subscription {
    replicas: Replicas,
    user: Box<str>,
    mailbox: Arc<Mailbox>,
}

impl Subscription {
    /// The next event for this socket. Cancel-safe: an event is taken from the queue
    /// only when this returns it.
    pub async fn next(&self) -> Delivery {
        loop {
            let ready = self.mailbox.ready.notified();
            if self.mailbox.overflowed.load(Ordering::Acquire) {
                return Delivery::Overflow;
            }
            if self.mailbox.queued.load(Ordering::Acquire) > 0 {
                let mut queue = lock(&self.mailbox.queue);
                let event = queue.pop_front();
                self.mailbox.queued.store(queue.len(), Ordering::Release);
                if let Some(event) = event {
                    return Delivery::Event(event);
                }
            }
            ready.await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.replicas.inner.hub.remove(&self.user, &self.mailbox);
    }
}

/// One shard's sockets: each user's mailboxes.
type Sockets = HashMap<Box<str>, Vec<Arc<Mailbox>>>;

/// This pod's sockets by user, sharded so users rarely share a lock.
struct Hub {
    shards: Box<[Mutex<Sockets>]>,
    hasher: RandomState,
}

impl Hub {
    fn new() -> Hub {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, user: &str) -> &Mutex<Sockets> {
        &self.shards[(self.hasher.hash_one(user) as usize) % SHARDS]
    }

    fn add(&self, user: &str, mailbox: Arc<Mailbox>) {
        lock(self.shard(user))
            .entry(user.into())
            .or_default()
            .push(mailbox);
    }

    fn remove(&self, user: &str, mailbox: &Arc<Mailbox>) {
        let mut shard = lock(self.shard(user));
        if let Some(boxes) = shard.get_mut(user) {
            boxes.retain(|b| !Arc::ptr_eq(b, mailbox));
            if boxes.is_empty() {
                shard.remove(user);
            }
        }
    }

    fn deliver(&self, user: &str, event: &ServerEvent, except: Option<&str>) {
        let shard = lock(self.shard(user));
        for mailbox in shard.get(user).into_iter().flatten() {
            if except != Some(&*mailbox.connection_id) {
                mailbox.push(event);
            }
        }
    }
}

/// A poisoned lock only means a panic elsewhere mid-update; the data is still whole.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hands what arrives on the channel to this pod's sockets (and cancels to its runs).
async fn listen(mut listener: PgListener, inner: Weak<Inner>, stop: CancellationToken) {
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            received = listener.try_recv() => received,
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let replicas = Replicas { inner };
        match received {
            Ok(Some(notification)) => replicas.receive(notification.payload()),
            // The connection dropped; the next call reconnects and listens again.
            Ok(None) => warn!(
                "the database connection for other pods' events was lost; reconnecting (events sent meanwhile do not reach this pod's sockets)"
            ),
            Err(e) => {
                warn!(error = %e, "cannot listen for other pods' events; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(HEARTBEAT_EVERY) => {}
                }
            }
        }
    }
}

/// Sends queued notifications in order, many per statement.
async fn publish_loop(
    mut pending: mpsc::Receiver<String>,
    inner: Weak<Inner>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            first = pending.recv() => first,
        };
        let Some(first) = first else { return };
        batch.clear();
        batch.push(first);
        while batch.len() < BATCH {
            match pending.try_recv() {
                Ok(payload) => batch.push(payload),
                Err(_) => break,
            }
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let Some(shared) = &strong.shared else {
            return;
        };
        // A function scan returns the array in order, and notifications of one
        // transaction are delivered in the order they were sent.
        let relayed = (|| {
            sqlx::query("SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload")
                .bind(CHANNEL)
                .bind(&batch)
                .execute(&shared.pool)
        })
        .retry(RELAY_BACKOFF)
        .await;
        if let Err(e) = relayed {
            warn!(error = %e, events = batch.len(), "cannot relay events to other pods; their sockets miss them (the replies are stored)");
        }
    }
}

async fn heartbeat_loop(inner: Weak<Inner>, stop: CancellationToken) {
    let mut every = tokio::time::interval(HEARTBEAT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Err(e) = (Replicas { inner }).heartbeat().await {
            warn!(error = %e, "replica heartbeat failed; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_deltas_are_cut_into_notifications_that_fit() {
        let delta: String = "é".repeat(5_000);
        let parts = split_for_notify(&ServerEvent::AgentResponse {
            run_id: "r".into(),
            delta: delta.clone(),
        });
        assert!(parts.len() > 1);
        let mut joined = String::new();
        for part in parts {
            let ServerEvent::AgentResponse { delta, .. } = part else {
                panic!()
            };
            assert!(delta.len() <= MAX_DELTA_BYTES);
            joined.push_str(&delta);
        }
        assert_eq!(joined, delta);
    }

    #[tokio::test]
    async fn a_socket_gets_its_users_events_except_the_runs_it_started() {
        let replicas = Replicas::single();
        let first = replicas.subscribe("alice", "c1", 8);
        let second = replicas.subscribe("alice", "c2", 8);
        let other = replicas.subscribe("bob", "c3", 8);
        let event = ServerEvent::AgentThinking { run_id: "r".into() };
        replicas.publish("alice", &event, Some("c1")).await;
        let Delivery::Event(got) = second.next().await else {
            panic!("overflow")
        };
        assert_eq!(got, event);
        let nothing = tokio::time::timeout(Duration::from_millis(50), first.next()).await;
        assert!(
            nothing.is_err(),
            "the origin socket gets its run's events directly"
        );
        let nothing = tokio::time::timeout(Duration::from_millis(50), other.next()).await;
        assert!(nothing.is_err(), "another user's socket gets nothing");
    }

    #[tokio::test]
    async fn a_socket_that_stops_reading_overflows_instead_of_losing_events() {
        let replicas = Replicas::single();
        let slow = replicas.subscribe("alice", "c1", 2);
        for i in 0..3 {
            let event = ServerEvent::AgentThinking {
                run_id: format!("r{i}"),
            };
            replicas.publish("alice", &event, None).await;
        }
        assert!(matches!(slow.next().await, Delivery::Overflow));
        drop(slow);
        let fresh = replicas.subscribe("alice", "c2", 2);
        let nothing = tokio::time::timeout(Duration::from_millis(50), fresh.next()).await;
        assert!(nothing.is_err());
    }
}
