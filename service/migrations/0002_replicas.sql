-- What the replicas of one service share through the database they already use:
-- which pods are alive, whose sockets are open where, which runs are going, and
-- each user's run allowance. Only the PostgreSQL store uses these tables (SQLite is
-- one process); they are created on both so one migration history serves both.
-- Times are microseconds since the Unix epoch on the database's clock, so pods
-- with skewed clocks still agree on who is alive.

-- One row per running service process, refreshed by its heartbeat.
CREATE TABLE replicas (
    replica_id   TEXT PRIMARY KEY,
    heartbeat_at BIGINT NOT NULL
);

-- One row per open WebSocket: the per-user connection limit counts these.
CREATE TABLE connections (
    connection_id TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    replica_id    TEXT NOT NULL,
    opened_at     BIGINT NOT NULL
);

CREATE INDEX connections_by_user ON connections (user_id);
CREATE INDEX connections_by_replica ON connections (replica_id);

-- One row per agent run in progress: where it runs (so `cancel` reaches it from any
-- pod, and a dead pod's runs are failed by the others) and which client message it
-- answers (so a retry on another pod sees it is still going).
CREATE TABLE runs (
    run_id            TEXT PRIMARY KEY,
    user_id           TEXT NOT NULL,
    thread_id         TEXT NOT NULL,
    client_message_id TEXT,
    replica_id        TEXT NOT NULL,
    started_at        BIGINT NOT NULL
);

CREATE UNIQUE INDEX runs_by_client_id ON runs (user_id, client_message_id);
CREATE INDEX runs_by_replica ON runs (replica_id);

-- The run rate limit's state per user (GCRA: the theoretical arrival time).
CREATE TABLE run_allowance (
    user_id TEXT PRIMARY KEY,
    tat     BIGINT NOT NULL
);
