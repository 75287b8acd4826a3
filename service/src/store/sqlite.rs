//! The SQLite backend: opening a file (WAL) or a private in-memory database, and
//! what its error codes mean.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::error::{Backend, classify};
use super::{CONNECT_TIMEOUT, DATABASE_URL_KEY, Pool, StoreError, ThreadStore};

impl ThreadStore {
    pub(super) async fn connect_sqlite(url: &str) -> Result<ThreadStore, StoreError> {
        let options = SqliteConnectOptions::from_str(url).map_err(|e| StoreError::InvalidUrl {
            reason: format!(
                "it is not a valid SQLite URL ({e}); use sqlite://PATH or sqlite::memory:"
            ),
        })?;
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let target: std::sync::Arc<str> = if in_memory {
            "sqlite::memory:".into()
        } else {
            format!("sqlite://{}", options.get_filename().display()).into()
        };
        if !in_memory {
            // A missing directory is a wrong path or a volume that is not mounted; in a
            // container both are fixed by changing the deployment, not by waiting.
            let parent = options
                .get_filename()
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(StoreError::InvalidUrl {
                    reason: format!(
                        "the directory {} of the SQLite file does not exist; create it (or mount a volume there) or point {DATABASE_URL_KEY} at an existing directory",
                        parent.display()
                    ),
                });
            }
        }
        let options = options
            .create_if_missing(true)
            .foreign_keys(true)
            // Writers wait for each other instead of failing with "database is locked".
            .busy_timeout(Duration::from_secs(5));
        let options = if in_memory {
            options
        } else {
            // WAL lets readers (list_threads, get_thread) proceed during a write;
            // NORMAL sync is durable across process crashes in WAL mode.
            options
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
        };
        let pool_options = if in_memory {
            // An in-memory database lives as long as one connection to it: keep exactly
            // one, forever.
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            SqlitePoolOptions::new().max_connections(4)
        };
        let pool = pool_options
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| classify(&target, e, Backend::Sqlite))?;
        let mut store = ThreadStore {
            pool: Pool::Sqlite(pool),
            target,
            schema_version: 0,
        };
        store.migrate().await?;
        Ok(store)
    }
}

/// What an SQLite error code means: whether waiting helps, and what to say.
pub(super) fn database_error(code: &str, message: &str) -> (bool, String) {
    // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes in the upper
    // bits: another writer holds the lock.
    if code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6)) {
        (
            true,
            format!("the database is locked by another writer ({message})"),
        )
    } else {
        (
            false,
            format!(
                "{message} (SQLite code {code}); check the path and permissions in {DATABASE_URL_KEY}"
            ),
        )
    }
}
