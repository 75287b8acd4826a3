//! The thread store: threads and messages per user, in SQLite or PostgreSQL.
