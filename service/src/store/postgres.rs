//! The PostgreSQL backend: connecting (with the cause of a refused connection kept
//! for startup to show), the pool the replicas share, and what SQLSTATEs mean.

use std::str::FromStr;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use super::error::{Backend, classify, redact_sqlx_message};
use super::{CONNECT_TIMEOUT, DATABASE_URL_KEY, Pool, StoreError, ThreadStore};

impl ThreadStore {
    pub(super) async fn connect_postgres(url: &str) -> Result<ThreadStore, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(|e| StoreError::InvalidUrl {
            reason: format!(
                "it is not a valid PostgreSQL URL ({}); use postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                redact_sqlx_message(&e.to_string(), url)
            ),
        })?;
        let target: std::sync::Arc<str> = format!(
            "postgres://{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("")
        )
        .into();
        // One direct connection first: the pool would retry a refused connection
        // until its acquire timeout and then report only "timed out", hiding the
        // cause that startup should show.
        let first = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
            .await
            .map_err(|_| StoreError::Unavailable {
                target: target.to_string(),
                message: format!(
                    "no answer within {}s; the database may still be starting — if this persists, check the host and port in {DATABASE_URL_KEY}",
                    CONNECT_TIMEOUT.as_secs()
                ),
                transient: true,
            })?
            .map_err(|e| classify(&target, e, Backend::Postgres))?;
        let _ = first.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| classify(&target, e, Backend::Postgres))?;
        let mut store = ThreadStore {
            pool: Pool::Postgres(pool),
            target,
            schema_version: 0,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The PostgreSQL pool, which the replicas also coordinate through; `None` for
    /// SQLite, which only one process uses.
    pub fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.pool {
            Pool::Postgres(pool) => Some(pool),
            Pool::Sqlite(_) => None,
        }
    }
}

/// What a PostgreSQL SQLSTATE means: whether waiting helps, and what to say.
pub(super) fn database_error(code: &str, message: &str) -> (bool, String) {
    match code {
        // cannot_connect_now (starting up), too_many_connections, admin/crash
        // shutdown, serialization and deadlock failures.
        "57P03" | "53300" | "57P01" | "57P02" | "40001" | "40P01" | "08006" | "08001" | "08004" => {
            (true, format!("{message} (SQLSTATE {code}); retrying"))
        }
        "28P01" | "28000" => (
            false,
            format!(
                "{message} (SQLSTATE {code}); check the user and password in {DATABASE_URL_KEY}"
            ),
        ),
        "3D000" => (
            false,
            format!(
                "{message} (SQLSTATE {code}); create the database or fix its name in {DATABASE_URL_KEY}"
            ),
        ),
        _ => (false, format!("{message} (SQLSTATE {code})")),
    }
}
