//! What the thread store fails with, and how a database error is sorted into
//! "wait and retry" and "fix the configuration".

use super::{ClientMessage, DATABASE_URL_KEY};

/// Everything the thread store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL cannot work, however long one waits: fix the configuration.
    #[error("{DATABASE_URL_KEY} is not usable: {reason}")]
    InvalidUrl { reason: String },
    /// The database exists in principle but cannot be used right now (not reachable,
    /// starting up, locked, pool exhausted). `transient` says whether waiting can help.
    #[error("the thread store at {target} is not usable: {message}")]
    Unavailable {
        target: String,
        message: String,
        transient: bool,
    },
    /// The embedded schema migrations could not be applied.
    #[error(
        "the thread store at {target} could not apply its schema migrations: {message}; \
         check that the database user may create tables, or point {DATABASE_URL_KEY} at a database this version owns"
    )]
    Migration { target: String, message: String },
    /// No such thread for this user (another user's thread answers the same way).
    #[error("thread {thread_id} not found")]
    NotFound { thread_id: String },
    /// A message with this `client_message_id` was already stored for this user.
    #[error(
        "a message with client_message_id {client_message_id} was already received (thread {})",
        existing.thread_id
    )]
    Duplicate {
        client_message_id: String,
        existing: Box<ClientMessage>,
    },
    /// Stored data this version cannot read.
    #[error("the thread store holds data this version cannot read: {message}")]
    Corrupt { message: String },
    /// A paging cursor that no page of this listing returned.
    #[error(
        "the cursor is not one a previous page returned; send the `next_cursor` of the last page, or no cursor for the first"
    )]
    BadCursor,
}

impl StoreError {
    /// True when retrying later can succeed (the database is not reachable yet, is
    /// starting, or is busy); false for configuration mistakes that waiting cannot fix.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable {
                transient: true,
                ..
            }
        )
    }
}

/// Which database an error came from: their error codes differ.
#[derive(Clone, Copy)]
pub(super) enum Backend {
    Sqlite,
    Postgres,
}

/// Sorts a database error into "wait and retry" and "fix the configuration".
pub(super) fn classify(target: &str, e: sqlx::Error, backend: Backend) -> StoreError {
    let (transient, message) = match &e {
        // Connection refused, host unreachable, DNS not ready: the database (or the
        // network to it) may simply not be up yet.
        sqlx::Error::Io(io) => (
            true,
            format!(
                "cannot connect ({io}); the database may still be starting — if this persists, check the host and port in {DATABASE_URL_KEY}"
            ),
        ),
        sqlx::Error::PoolTimedOut => (
            true,
            "no database connection became free in time; the database is slow or overloaded"
                .to_owned(),
        ),
        sqlx::Error::PoolClosed => (false, "the connection pool was closed".to_owned()),
        sqlx::Error::Tls(tls) => (
            false,
            format!(
                "the TLS handshake failed ({tls}); check sslmode and certificates in {DATABASE_URL_KEY}"
            ),
        ),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match backend {
                Backend::Sqlite => super::sqlite::database_error(&code, db.message()),
                Backend::Postgres => super::postgres::database_error(&code, db.message()),
            }
        }
        sqlx::Error::Configuration(c) => {
            return StoreError::InvalidUrl {
                reason: format!("{c}; fix {DATABASE_URL_KEY}"),
            };
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::TypeNotFound { .. } => {
            return StoreError::Corrupt {
                message: e.to_string(),
            };
        }
        other => (false, other.to_string()),
    };
    StoreError::Unavailable {
        target: target.to_owned(),
        message,
        transient,
    }
}

/// sqlx echoes parts of the URL in some parse errors; the URL may hold a password.
/// The password alone is replaced too, as a parse error may quote just that component.
pub(super) fn redact_sqlx_message(message: &str, url: &str) -> String {
    if url.is_empty() {
        return message.to_owned();
    }
    let mut out = message.replace(url, "<CHATGATE_DATABASE_URL>");
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty());
    if let Some(password) = password {
        out = out.replace(password, "<password>");
    }
    out
}
