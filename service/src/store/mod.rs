//! The thread store: threads and messages per user, in SQLite or PostgreSQL.
//!
//! Every read and write takes the user id, and every query filters on it, so one
//! user can never read or append to another user's thread: such a thread answers
//! exactly like a missing one ([`StoreError::NotFound`]).
//!
//! # API
//!
//! ```text
//! ThreadStore::connect(url: &str) -> Result<ThreadStore, StoreError>            // async
//! ThreadStore::ping(&self) -> Result<(), StoreError>                            // async
//! ThreadStore::close(&self)                                                     // async
//! ThreadStore::backend(&self) -> &'static str                                   // "sqlite" | "postgres"
//! ThreadStore::create_thread(&self, user: &str, title: &str) -> Result<ThreadSummary, StoreError>
//! ThreadStore::append_message(&self, user: &str, thread_id: &str, role: Role, content: &str,
//!                             client_message_id: Option<&str>) -> Result<StoredMessage, StoreError>
//! ThreadStore::post_user_message(&self, user: &str, thread_id: Option<&str>, content: &str,
//!                                client_message_id: Option<&str>) -> Result<PostedMessage, StoreError>
//! ThreadStore::append_reply(&self, user: &str, thread_id: &str, content: &str,
//!                           in_reply_to: &str, run_id: &str) -> Result<StoredMessage, StoreError>
//! ThreadStore::find_client_message(&self, user: &str, client_message_id: &str)
//!                                  -> Result<Option<ClientMessage>, StoreError>
//! ThreadStore::list_threads(&self, user: &str) -> Result<Vec<ThreadSummary>, StoreError>
//! ThreadStore::get_thread(&self, user: &str, thread_id: &str) -> Result<Vec<StoredMessage>, StoreError>
//! ThreadStore::recent_messages(&self, user: &str, thread_id: &str, limit: u32)
//!                              -> Result<Vec<StoredMessage>, StoreError>
//! StoreError::is_transient(&self) -> bool
//! ```
//!
//! All methods except `backend` and `is_transient` are `async`. All are cheap to call
//! from many tasks at once: `ThreadStore` is a handle on a connection pool and
//! `Clone` only bumps a reference count.
//!
//! URLs (`CHATGATE_DATABASE_URL`): `sqlite::memory:` (one private in-memory database
//! per `connect`), `sqlite://PATH` (the file is created if missing, WAL journal; the
//! directory must exist), `postgres://USER:PASSWORD@HOST:PORT/DB`. The embedded
//! migrations run at `connect`.
//!
//! Timestamps are stored as microseconds since the Unix epoch (fine enough that
//! "most recently updated" is well defined) and appear on the wire as RFC 3339
//! strings in UTC.
//!
//! The wire and result types are in `types`, the errors and their sorting into
//! "retry" and "fix the configuration" in `error`, each database's connection
//! (and its error codes) in `sqlite` and `postgres`; the queries, written once for
//! both, are here.

mod error;
mod postgres;
mod sqlite;
mod types;

use std::time::Duration;

use chatgate_contract::config::Key;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use sqlx::{Row, migrate::Migrator};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub use error::StoreError;
use error::{Backend, classify};
pub use types::{
    ClientMessage, DEFAULT_PAGE_ITEMS, MAX_PAGE_ITEMS, Page, PageLimit, PostedMessage, Role,
    StoredMessage, StoredReply, ThreadSummary,
};
use types::{ENTRY_OVERHEAD_BYTES, ThreadCursor, parse_message_cursor};

/// The configuration key a user sets to choose the database; named in every
/// configuration error so the person reading it knows what to change.
pub const DATABASE_URL_KEY: &str = Key::DatabaseUrl.as_str();

/// `list_threads` answers at most this many threads (the most recently updated), so
/// one `threads` frame stays well under any message size limit.
pub const LIST_THREADS_LIMIT: u32 = 500;

/// Longest title `create_thread` keeps, in characters; longer titles are cut.
pub const MAX_TITLE_CHARS: usize = 80;

/// How long connecting (and waiting for a pooled connection) may take before the
/// attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The embedded schema migrations. Each one only adds (tables, columns, indexes), so
/// a pod of the previous version keeps working on a database a newer pod migrated.
fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    // During a rolling update an old pod may restart after a new one migrated the
    // database further; it must start, not fail on a version it does not know.
    migrator.set_ignore_missing(true);
    migrator
}

/// The connection pool, one variant per supported database. An enum rather than
/// sqlx's `Any` driver keeps each backend's own options (WAL, busy timeout, pool
/// sizing) and its precise error codes.
#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A new, empty thread: `$1` id, `$2` user, `$3` title, `$4` now (created and updated).
const INSERT_THREAD: &str = "INSERT INTO threads (thread_id, user_id, title, created_at, updated_at, message_count) \
     VALUES ($1, $2, $3, $4, $4, 0)";

/// Runs the same query code against whichever pool is configured. Both backends
/// accept `$N` placeholders, so each statement is written once.
macro_rules! with_pool {
    ($self:expr, |$pool:ident| $body:expr) => {
        match &$self.pool {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
        }
    };
}

/// Appends inside the open transaction `$tx`; evaluates to
/// `Result<Option<StoredMessage>, sqlx::Error>`, `Ok(None)` when the thread is not
/// this user's. A macro rather than a function because the two backends' connection
/// types share no object-safe trait that sqlx's executors accept by reborrow.
///
/// The `UPDATE … RETURNING` both checks ownership and takes the thread's next
/// sequence number under the row's write lock, so concurrent appends to one thread
/// get distinct, ordered positions on both backends.
macro_rules! append_in {
    ($tx:expr, $user:expr, $thread_id:expr, $message:expr) => {
        async {
            let message: &NewMessage<'_> = $message;
            let now = now_micros();
            let Some(row) = sqlx::query(
                "UPDATE threads SET message_count = message_count + 1, updated_at = $1 \
                 WHERE thread_id = $2 AND user_id = $3 RETURNING message_count",
            )
            .bind(now)
            .bind($thread_id)
            .bind($user)
            .fetch_optional(&mut *$tx)
            .await?
            else {
                return Ok::<_, sqlx::Error>(None);
            };
            let seq: i64 = row.try_get(0)?;
            let message_id = new_id();
            sqlx::query(
                "INSERT INTO messages (message_id, thread_id, user_id, seq, role, content, created_at, \
                 client_message_id, reply_to, run_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(&message_id)
            .bind($thread_id)
            .bind($user)
            .bind(seq)
            .bind(message.role.as_str())
            .bind(message.content)
            .bind(now)
            .bind(message.client_message_id)
            .bind(message.reply_to)
            .bind(message.run_id)
            .execute(&mut *$tx)
            .await?;
            Ok(Some(StoredMessage {
                message_id,
                role: message.role,
                content: message.content.to_owned(),
                created_at: format_micros(now),
            }))
        }
        .await
    };
}

/// Threads and messages per user. Cheap to clone (a handle on a connection pool).
#[derive(Clone)]
pub struct ThreadStore {
    pool: Pool,
    /// Where the store points, without credentials, for error messages.
    target: std::sync::Arc<str>,
    /// The newest migration applied to the database (read after migrating).
    schema_version: i64,
}

impl std::fmt::Debug for ThreadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadStore")
            .field("backend", &self.backend())
            .field("target", &self.target)
            .finish()
    }
}

impl ThreadStore {
    /// Opens the database named by `url`, applies the embedded migrations and checks
    /// the connection. See the module documentation for the accepted URLs.
    pub async fn connect(url: &str) -> Result<ThreadStore, StoreError> {
        let url = url.trim();
        if url.starts_with("sqlite:") {
            Self::connect_sqlite(url).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Self::connect_postgres(url).await
        } else {
            let scheme = match url.split_once(':') {
                Some((scheme, _))
                    if !scheme.is_empty()
                        && scheme
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
                {
                    format!("uses the scheme `{scheme}`, which the thread store does not support")
                }
                _ if url.is_empty() => "is empty".to_owned(),
                _ => "is not a database URL".to_owned(),
            };
            Err(StoreError::InvalidUrl {
                reason: format!(
                    "the value {scheme}; set it to sqlite://PATH, sqlite::memory: or postgres://USER:PASSWORD@HOST:PORT/DATABASE"
                ),
            })
        }
    }

    /// Applies the embedded migrations. Pods starting together on an empty database
    /// take turns: sqlx holds an advisory lock (PostgreSQL) while it migrates.
    async fn migrate(&mut self) -> Result<(), StoreError> {
        let migrator = migrator();
        let result = with_pool!(self, |pool| migrator.run(pool).await);
        result.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(inner) => self.error(inner),
            other => StoreError::Migration {
                target: self.target.to_string(),
                message: other.to_string(),
            },
        })?;
        let version = with_pool!(self, |pool| sqlx::query_scalar::<_, Option<i64>>(
            "SELECT MAX(version) FROM _sqlx_migrations WHERE success"
        )
        .fetch_one(pool)
        .await);
        self.schema_version = version.map_err(|e| self.error(e))?.unwrap_or(0);
        Ok(())
    }

    /// The newest schema migration applied to the database (shown on
    /// `/health/startup`); newer than this binary's own when a newer pod migrated.
    pub fn schema_version(&self) -> i64 {
        self.schema_version
    }

    /// Where the store points, without credentials.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    /// Closes every connection; later calls fail. For an orderly shutdown (SQLite
    /// checkpoints its WAL when the last connection closes).
    pub async fn close(&self) {
        with_pool!(self, |pool| pool.close().await);
    }

    /// Checks that the database answers a trivial query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let result = with_pool!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(drop));
        result.map_err(|e| self.error(e))
    }

    /// Creates an empty thread owned by `user`. The title is cut to
    /// [`MAX_TITLE_CHARS`] characters.
    pub async fn create_thread(
        &self,
        user: &str,
        title: &str,
    ) -> Result<ThreadSummary, StoreError> {
        let thread_id = new_id();
        let title = clip_title(title);
        let now = now_micros();
        let result = with_pool!(self, |pool| {
            sqlx::query(INSERT_THREAD)
                .bind(&thread_id)
                .bind(user)
                .bind(&title)
                .bind(now)
                .execute(pool)
                .await
                .map(drop)
        });
        result.map_err(|e| self.error(e))?;
        Ok(ThreadSummary {
            thread_id,
            title,
            updated_at: format_micros(now),
        })
    }

    /// Appends `message` to `user`'s thread in a transaction of its own, committed only
    /// when the thread is theirs (`Ok(None)` otherwise).
    async fn append_alone(
        &self,
        user: &str,
        thread_id: &str,
        message: &NewMessage<'_>,
    ) -> Result<Option<StoredMessage>, sqlx::Error> {
        with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                let stored = append_in!(tx, user, thread_id, message)?;
                if stored.is_some() {
                    tx.commit().await?;
                }
                Ok::<_, sqlx::Error>(stored)
            }
            .await
        })
    }

    /// Appends a message to one of `user`'s threads. Another user's thread, or a
    /// missing one, is [`StoreError::NotFound`]. A `client_message_id` this user already
    /// used is [`StoreError::Duplicate`] carrying the stored message, and nothing is written.
    pub async fn append_message(
        &self,
        user: &str,
        thread_id: &str,
        role: Role,
        content: &str,
        client_message_id: Option<&str>,
    ) -> Result<StoredMessage, StoreError> {
        let message = NewMessage {
            role,
            content,
            client_message_id,
            reply_to: None,
            run_id: None,
        };
        let result = self.append_alone(user, thread_id, &message).await;
        self.finish_append(user, thread_id, client_message_id, result)
            .await
    }

    /// Stores a user's chat message: in `thread_id` when given (which must be this
    /// user's), otherwise in a new thread titled after the message. Thread creation
    /// and the message are one transaction, so a retried first message never leaves
    /// an empty thread behind. Errors as [`append_message`](Self::append_message).
    pub async fn post_user_message(
        &self,
        user: &str,
        thread_id: Option<&str>,
        content: &str,
        client_message_id: Option<&str>,
    ) -> Result<PostedMessage, StoreError> {
        let (thread_id, created_thread) = match thread_id {
            Some(id) => (id.to_owned(), false),
            None => (new_id(), true),
        };
        let title = clip_title(content);
        let message = NewMessage {
            role: Role::User,
            content,
            client_message_id,
            reply_to: None,
            run_id: None,
        };
        let result = with_pool!(self, |pool| {
            async {
                let mut tx = pool.begin().await?;
                if created_thread {
                    sqlx::query(INSERT_THREAD)
                        .bind(&thread_id)
                        .bind(user)
                        .bind(&title)
                        .bind(now_micros())
                        .execute(&mut *tx)
                        .await?;
                }
                let stored = append_in!(tx, user, &thread_id, &message)?;
                if stored.is_some() {
                    tx.commit().await?;
                }
                Ok::<_, sqlx::Error>(stored)
            }
            .await
        });
        let message = self
            .finish_append(user, &thread_id, client_message_id, result)
            .await?;
        Ok(PostedMessage {
            thread_id,
            created_thread,
            message,
        })
    }

    /// Stores the agent's reply to the user message `in_reply_to`, written by run
    /// `run_id`, so a retried user message can be answered from the store.
    pub async fn append_reply(
        &self,
        user: &str,
        thread_id: &str,
        content: &str,
        in_reply_to: &str,
        run_id: &str,
    ) -> Result<StoredMessage, StoreError> {
        let message = NewMessage {
            role: Role::Assistant,
            content,
            client_message_id: None,
            reply_to: Some(in_reply_to),
            run_id: Some(run_id),
        };
        let result = self.append_alone(user, thread_id, &message).await;
        self.finish_append(user, thread_id, None, result).await
    }

    async fn finish_append(
        &self,
        user: &str,
        thread_id: &str,
        client_message_id: Option<&str>,
        result: Result<Option<StoredMessage>, sqlx::Error>,
    ) -> Result<StoredMessage, StoreError> {
        match result {
            Ok(Some(message)) => Ok(message),
            Ok(None) => Err(StoreError::NotFound {
                thread_id: thread_id.to_owned(),
            }),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                let Some(client_message_id) = client_message_id else {
                    // Only the client id is unique per user; ids are random UUIDs.
                    return Err(self.error(sqlx::Error::Database(db)));
                };
                match self.find_client_message(user, client_message_id).await? {
                    Some(existing) => Err(StoreError::Duplicate {
                        client_message_id: client_message_id.to_owned(),
                        existing: Box::new(existing),
                    }),
                    None => Err(self.error(sqlx::Error::Database(db))),
                }
            }
            Err(e) => Err(self.error(e)),
        }
    }

    /// The user message this user sent with `client_message_id`, and its stored reply.
    pub async fn find_client_message(
        &self,
        user: &str,
        client_message_id: &str,
    ) -> Result<Option<ClientMessage>, StoreError> {
        let result = with_pool!(self, |pool| {
            async {
                let Some(row) = sqlx::query(
                    "SELECT message_id, thread_id, content FROM messages \
                     WHERE user_id = $1 AND client_message_id = $2",
                )
                .bind(user)
                .bind(client_message_id)
                .fetch_optional(pool)
                .await?
                else {
                    return Ok(None);
                };
                let message_id: String = row.try_get("message_id")?;
                let thread_id: String = row.try_get("thread_id")?;
                let content: String = row.try_get("content")?;
                let reply = sqlx::query(
                    "SELECT message_id, run_id FROM messages \
                     WHERE user_id = $1 AND reply_to = $2 ORDER BY seq LIMIT 1",
                )
                .bind(user)
                .bind(&message_id)
                .fetch_optional(pool)
                .await?
                .map(|row| {
                    Ok::<_, sqlx::Error>(StoredReply {
                        message_id: row.try_get("message_id")?,
                        run_id: row
                            .try_get::<Option<String>, _>("run_id")?
                            .unwrap_or_default(),
                    })
                })
                .transpose()?;
                Ok::<_, sqlx::Error>(Some(ClientMessage {
                    thread_id,
                    message_id,
                    content,
                    reply,
                }))
            }
            .await
        });
        result.map_err(|e| self.error(e))
    }

    /// This user's threads, most recently updated first (at most [`LIST_THREADS_LIMIT`]):
    /// the first page of [`threads_page`](Self::threads_page), unbounded in bytes.
    pub async fn list_threads(&self, user: &str) -> Result<Vec<ThreadSummary>, StoreError> {
        let first = PageLimit {
            items: LIST_THREADS_LIMIT,
            bytes: usize::MAX,
        };
        Ok(self.threads_page(user, first, None).await?.items)
    }

    /// One page of this user's threads, most recently updated first: at most
    /// `limit.items` threads and about `limit.bytes` of JSON, always at least one.
    /// `cursor` is a page's `next_cursor`; a malformed one is [`StoreError::BadCursor`].
    pub async fn threads_page(
        &self,
        user: &str,
        limit: PageLimit,
        cursor: Option<&str>,
    ) -> Result<Page<ThreadSummary>, StoreError> {
        let after = cursor.map(ThreadCursor::parse).transpose()?;
        // Keyset paging on (updated_at DESC, thread_id): stable while threads are
        // updated, unlike an offset.
        let (after_at, after_id) =
            after.map_or((i64::MAX, String::new()), |c| (c.updated_at, c.thread_id));
        let fetch = i64::from(limit.items) + 1;
        let result = with_pool!(self, |pool| {
            sqlx::query(
                "SELECT thread_id, title, updated_at FROM threads WHERE user_id = $1 \
                 AND (updated_at < $2 OR (updated_at = $2 AND thread_id > $3)) \
                 ORDER BY updated_at DESC, thread_id LIMIT $4",
            )
            .bind(user)
            .bind(after_at)
            .bind(&after_id)
            .bind(fetch)
            .fetch_all(pool)
            .await
            .and_then(|rows| {
                rows.iter()
                    .map(|row| {
                        Ok((
                            row.try_get::<String, _>("thread_id")?,
                            row.try_get::<String, _>("title")?,
                            row.try_get::<i64, _>("updated_at")?,
                        ))
                    })
                    .collect::<Result<Vec<_>, sqlx::Error>>()
            })
        });
        let rows = result.map_err(|e| self.error(e))?;
        let mut page = Page::default();
        let mut bytes: usize = 0;
        let mut last = None;
        for (thread_id, title, updated_at) in rows {
            let size = ENTRY_OVERHEAD_BYTES + thread_id.len() + title.len();
            if page.items.len() == limit.items as usize
                || (!page.items.is_empty() && bytes.saturating_add(size) > limit.bytes)
            {
                page.next_cursor = last.map(|c: ThreadCursor| c.to_string());
                break;
            }
            bytes += size;
            last = Some(ThreadCursor {
                updated_at,
                thread_id: thread_id.clone(),
            });
            page.items.push(ThreadSummary {
                thread_id,
                title,
                updated_at: format_micros(updated_at),
            });
        }
        Ok(page)
    }

    /// One page of one of this user's threads: the newest messages before `cursor`
    /// (the whole thread's newest without one), oldest first within the page; at
    /// most `limit.items` messages and about `limit.bytes` of JSON, always at least
    /// one. `next_cursor` continues with older messages. Another user's thread, or a
    /// missing one, is [`StoreError::NotFound`].
    pub async fn thread_page(
        &self,
        user: &str,
        thread_id: &str,
        limit: PageLimit,
        cursor: Option<&str>,
    ) -> Result<Page<StoredMessage>, StoreError> {
        let before = cursor
            .map(parse_message_cursor)
            .transpose()?
            .unwrap_or(i64::MAX);
        let fetch = i64::from(limit.items) + 1;
        let result = with_pool!(self, |pool| {
            async {
                let exists =
                    sqlx::query("SELECT 1 FROM threads WHERE thread_id = $1 AND user_id = $2")
                        .bind(thread_id)
                        .bind(user)
                        .fetch_optional(pool)
                        .await?
                        .is_some();
                if !exists {
                    return Ok(None);
                }
                let rows = sqlx::query(
                    "SELECT message_id, role, content, created_at, seq FROM messages \
                     WHERE thread_id = $1 AND user_id = $2 AND seq < $3 ORDER BY seq DESC LIMIT $4",
                )
                .bind(thread_id)
                .bind(user)
                .bind(before)
                .bind(fetch)
                .fetch_all(pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok((
                            row.try_get::<String, _>("message_id")?,
                            row.try_get::<String, _>("role")?,
                            row.try_get::<String, _>("content")?,
                            row.try_get::<i64, _>("created_at")?,
                            row.try_get::<i64, _>("seq")?,
                        ))
                    })
                    .collect::<Result<Vec<_>, sqlx::Error>>()
                    .map(Some)
            }
            .await
        });
        let Some(rows) = result.map_err(|e| self.error(e))? else {
            return Err(StoreError::NotFound {
                thread_id: thread_id.to_owned(),
            });
        };
        let mut page = Page::default();
        let mut bytes: usize = 0;
        let mut oldest = None;
        for (message_id, role, content, created_at, seq) in rows {
            // Content is escaped on the wire; counting it twice over-estimates
            // rather than risking a frame over the client's limit.
            let size = ENTRY_OVERHEAD_BYTES + message_id.len() + content.len() * 2;
            if page.items.len() == limit.items as usize
                || (!page.items.is_empty() && bytes.saturating_add(size) > limit.bytes)
            {
                page.next_cursor = oldest.map(|seq: i64| seq.to_string());
                break;
            }
            bytes += size;
            oldest = Some(seq);
            page.items.push(StoredMessage {
                message_id,
                role: Role::parse(&role)?,
                content,
                created_at: format_micros(created_at),
            });
        }
        page.items.reverse();
        Ok(page)
    }

    /// All messages of one of this user's threads, oldest first. Another user's
    /// thread, or a missing one, is [`StoreError::NotFound`].
    pub async fn get_thread(
        &self,
        user: &str,
        thread_id: &str,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.messages(user, thread_id, None).await
    }

    /// The last `limit` messages of one of this user's threads, oldest first (the
    /// context an agent run sends to the LLM). Errors as [`get_thread`](Self::get_thread).
    pub async fn recent_messages(
        &self,
        user: &str,
        thread_id: &str,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.messages(user, thread_id, Some(limit)).await
    }

    /// The newest `limit` messages (all without one), oldest first: one unbounded page.
    async fn messages(
        &self,
        user: &str,
        thread_id: &str,
        limit: Option<u32>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let whole = PageLimit {
            items: limit.unwrap_or(u32::MAX),
            bytes: usize::MAX,
        };
        Ok(self.thread_page(user, thread_id, whole, None).await?.items)
    }

    pub(super) fn error(&self, e: sqlx::Error) -> StoreError {
        let backend = match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        };
        classify(&self.target, e, backend)
    }
}

/// A message about to be appended.
struct NewMessage<'a> {
    role: Role,
    content: &'a str,
    client_message_id: Option<&'a str>,
    reply_to: Option<&'a str>,
    run_id: Option<&'a str>,
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn clip_title(text: &str) -> String {
    let first_line = text.trim().lines().next().unwrap_or("").trim();
    let mut title: String = first_line.chars().take(MAX_TITLE_CHARS).collect();
    if first_line.chars().nth(MAX_TITLE_CHARS).is_some() {
        title.push('…');
    }
    if title.is_empty() {
        title.push_str("New chat");
    }
    title
}

fn now_micros() -> i64 {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos / 1_000).unwrap_or(i64::MAX)
}

fn format_micros(micros: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}
