-- Workflow execution journal: one row per step execution attempt, one per host call.

-- seq numbers the step executions of an instance (a loop runs a step several times).
ALTER TABLE workflows ADD COLUMN next_seq INTEGER NOT NULL DEFAULT 1;
-- Step events that arrived while the instance was paused; republished on resume.
ALTER TABLE workflows ADD COLUMN parked TEXT NOT NULL DEFAULT '[]';
ALTER TABLE workflows ADD COLUMN definition_sha256 TEXT;

CREATE TABLE workflow_steps (
    workflow_id    TEXT    NOT NULL REFERENCES workflows(id) ON DELETE CASCADE,
    seq            INTEGER NOT NULL,
    attempt        INTEGER NOT NULL,
    step           TEXT    NOT NULL,
    group_seq      INTEGER,                 -- the parallel group this execution belongs to
    status         TEXT    NOT NULL
                   CHECK (status IN ('running', 'completed', 'failed', 'retrying', 'skipped', 'discarded')),
    input_sha256   TEXT,
    output         TEXT,                    -- JSON {state_patch, result, next}, inline when small
    output_ref     TEXT,                    -- JSON FileRef when large
    plugin         TEXT,                    -- name@version
    plugin_sha256  TEXT,
    error          TEXT,
    cost_usd       REAL    NOT NULL DEFAULT 0,
    tokens_in      INTEGER NOT NULL DEFAULT 0,
    tokens_out     INTEGER NOT NULL DEFAULT 0,
    claude_calls   INTEGER NOT NULL DEFAULT 0,
    started_at     INTEGER NOT NULL,
    finished_at    INTEGER,
    PRIMARY KEY (workflow_id, seq, attempt)
);
CREATE INDEX idx_workflow_steps_group ON workflow_steps(workflow_id, group_seq) WHERE group_seq IS NOT NULL;

-- Host calls made by a step (Claude calls above all), so a re-run after a crash replays them.
CREATE TABLE step_calls (
    workflow_id    TEXT    NOT NULL,
    seq            INTEGER NOT NULL,
    attempt        INTEGER NOT NULL,
    call_seq       INTEGER NOT NULL,
    kind           TEXT    NOT NULL,        -- claude.complete, config.get, templates.render
    request_sha256 TEXT    NOT NULL,
    status         TEXT    NOT NULL CHECK (status IN ('started', 'completed', 'failed')),
    process_id     TEXT,                    -- the Claude process started for it
    request        TEXT,                    -- JSON of the request (prompt, agent, model), for transcripts
    response       TEXT,                    -- JSON, inline
    cost_usd       REAL    NOT NULL DEFAULT 0,
    created_at     INTEGER NOT NULL,
    completed_at   INTEGER,
    PRIMARY KEY (workflow_id, seq, attempt, call_seq)
);

-- Schedules: start a workflow on a cron expression.
CREATE TABLE schedules (
    id             TEXT    PRIMARY KEY,
    cron           TEXT    NOT NULL,
    workflow_type  TEXT    NOT NULL,
    params         TEXT    NOT NULL DEFAULT '{}',
    enabled        INTEGER NOT NULL DEFAULT 1,
    last_fired_at  INTEGER,                 -- the tick (ms) last started: never fired twice
    next_fire_at   INTEGER,
    created_at     INTEGER NOT NULL
);
