-- Threads and their messages, per user. Written in the SQL subset that SQLite and
-- PostgreSQL share, so one migration serves both stores.
CREATE TABLE threads (
    thread_id     TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    title         TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    -- Incremented by every append; gives messages a gap-free order within a thread
    -- and serialises concurrent appends on the thread's row.
    message_count BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX threads_by_user ON threads (user_id, updated_at);

CREATE TABLE messages (
    message_id        TEXT PRIMARY KEY,
    thread_id         TEXT NOT NULL REFERENCES threads (thread_id),
    user_id           TEXT NOT NULL,
    seq               BIGINT NOT NULL,
    role              TEXT NOT NULL,
    content           TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    -- The client's id for a user message; unique per user so a retry is recognised.
    client_message_id TEXT,
    -- For an assistant reply: the user message it answers and the run that wrote it.
    reply_to          TEXT,
    run_id            TEXT,
    UNIQUE (thread_id, seq)
);

CREATE UNIQUE INDEX messages_by_client_id ON messages (user_id, client_message_id);
CREATE INDEX messages_by_reply_to ON messages (reply_to);
