-- KSI schema, version 1.
-- Times are INTEGER milliseconds since the Unix epoch (UTC). JSON columns hold small documents;
-- anything large lives in a file under the data dir and is referenced by (path, line, sha256, bytes).

-- The durable event bus: one row per published event.
CREATE TABLE messages (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so "resume after id N" is safe after pruning
    topic          TEXT    NOT NULL,                   -- dotted: claude.spawn.request, workflow.debate.step.opening
    event_type     TEXT    NOT NULL,                   -- SPAWN_REQUEST, ... (defaults to the topic in upper snake case)
    data           TEXT    NOT NULL,                   -- JSON payload: small, carries file references, not data
    correlation_id TEXT,
    causation_id   INTEGER,
    created_at     INTEGER NOT NULL
);
-- No secondary index on purpose: every index is written on every publish. Listings walk ids
-- (monotonic with created_at, both assigned by the single writer), and retention prunes from
-- the oldest id forward.

-- Subscriptions: a named, durable consumer group with a topic pattern (`*` one segment, `>` the rest).
-- Bus subscribers have agent_id NULL; an agent's inbox subscriptions carry its id.
CREATE TABLE subscriptions (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    name           TEXT    NOT NULL UNIQUE,
    agent_id       TEXT,
    topic_pattern  TEXT    NOT NULL,
    max_attempts   INTEGER NOT NULL DEFAULT 5,
    lease_ms       INTEGER NOT NULL DEFAULT 30000,
    backoff_base_ms INTEGER NOT NULL DEFAULT 200,
    backoff_max_ms INTEGER NOT NULL DEFAULT 60000,
    active         INTEGER NOT NULL DEFAULT 1,
    created_at     INTEGER NOT NULL
);
CREATE INDEX idx_subscriptions_agent ON subscriptions(agent_id);

-- Delivery state of one event to one subscription (fan-out = one row per matching subscription).
-- status: pending -> processing (claimed, leased) -> completed | pending again (nack/expiry, with backoff) | dead.
CREATE TABLE deliveries (
    subscription_id INTEGER NOT NULL REFERENCES subscriptions(id) ON DELETE CASCADE,
    message_id      INTEGER NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'processing', 'completed', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,            -- not claimable before this time (backoff)
    lease_until     INTEGER,                     -- set while processing
    claim_token     TEXT,                        -- ack/nack must present it
    claimed_by      TEXT,
    last_error      TEXT,
    backoff_ms      INTEGER,                     -- the delay chosen at the last nack/expiry (recorded for audit)
    updated_at      INTEGER NOT NULL,
    completed_at    INTEGER,
    PRIMARY KEY (subscription_id, message_id)
) WITHOUT ROWID;
CREATE INDEX idx_deliveries_ready ON deliveries(subscription_id, status, next_attempt_at, message_id);
-- Partial: only claimed rows are in it, so publishing never writes to it.
CREATE INDEX idx_deliveries_lease ON deliveries(subscription_id, lease_until) WHERE status = 'processing';
-- Lookups by message go through the primary key with the (few) subscription ids.

-- Workflow instances.
CREATE TABLE workflows (
    id               TEXT    PRIMARY KEY,
    type             TEXT    NOT NULL,
    definition_version TEXT,
    current_step     TEXT,
    current_step_index INTEGER NOT NULL DEFAULT 0,
    total_steps      INTEGER,
    params           TEXT    NOT NULL DEFAULT '{}',
    state            TEXT,                        -- inline JSON when small
    checkpoint_file  TEXT,                        -- JSON FileRef when the state is over 10 KB
    status           TEXT    NOT NULL DEFAULT 'running'
                     CHECK (status IN ('pending', 'running', 'paused', 'completed', 'failed', 'cancelled')),
    error            TEXT,
    cost_usd         REAL    NOT NULL DEFAULT 0,
    tokens_in        INTEGER NOT NULL DEFAULT 0,
    tokens_out       INTEGER NOT NULL DEFAULT 0,
    claude_calls     INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    completed_at     INTEGER
);
CREATE INDEX idx_workflows_status ON workflows(status, updated_at);

-- Claude CLI processes (one row per request; attempts counted on the row).
CREATE TABLE processes (
    id               TEXT    PRIMARY KEY,
    workflow_id      TEXT,
    agent_id         TEXT,
    status           TEXT    NOT NULL DEFAULT 'PENDING'
                     CHECK (status IN ('PENDING', 'RUNNING', 'SUCCESS', 'COMPLETED', 'FAILED', 'RETRY', 'DEAD')),
    model            TEXT,
    session_id       TEXT,
    pid              INTEGER,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL DEFAULT 3,
    prompt_file      TEXT,                        -- JSON FileRef
    response_file    TEXT,
    response_line    INTEGER,
    response_sha256  TEXT,
    error            TEXT,
    error_class      TEXT,
    next_attempt_at  INTEGER,
    cost_usd         REAL,
    tokens_in        INTEGER,
    tokens_out       INTEGER,
    tokens_cache_read INTEGER,
    tokens_cache_write INTEGER,
    num_turns        INTEGER,
    duration_ms      INTEGER,
    duration_api_ms  INTEGER,
    metrics          TEXT,                        -- JSON: anything else worth keeping
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    completed_at     INTEGER,
    updated_at       INTEGER NOT NULL
);
CREATE INDEX idx_processes_status ON processes(status);
CREATE INDEX idx_processes_workflow ON processes(workflow_id);
CREATE INDEX idx_processes_agent ON processes(agent_id);

-- Dynamic configuration, changeable at run time (a change publishes system.config_change).
CREATE TABLE config (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL,                    -- JSON
    description TEXT,
    updated_at  INTEGER NOT NULL
);

-- Agents: profile, status, and the Claude session they continue.
CREATE TABLE agents (
    id                 TEXT PRIMARY KEY,
    profile            TEXT NOT NULL,
    display_name       TEXT,
    status             TEXT NOT NULL DEFAULT 'inactive' CHECK (status IN ('inactive', 'active', 'busy')),
    current_session_id TEXT,
    current_process_id TEXT,
    workdir            TEXT,
    capabilities       TEXT NOT NULL DEFAULT '[]',  -- JSON array
    metrics            TEXT NOT NULL DEFAULT '{}',  -- JSON: total tokens, cost, calls
    created_at         INTEGER NOT NULL,
    last_active_at     INTEGER
);

-- Metrics samples.
CREATE TABLE metrics (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    metric_name  TEXT    NOT NULL,
    metric_value REAL    NOT NULL,
    tags         TEXT,                              -- JSON
    timestamp    INTEGER NOT NULL
);
CREATE INDEX idx_metrics_name_time ON metrics(metric_name, timestamp);
