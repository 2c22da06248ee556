-- KSI schema, version 5: exact accounting of Claude calls.

-- The highest attempt whose cost and tokens are already in the row's totals. Every write that
-- adds an attempt's spend adds it only if the attempt is above this, so a result recorded again
-- (start-up recovery after a crash between SUCCESS and COMPLETED) is never counted twice.
ALTER TABLE processes ADD COLUMN counted_attempt INTEGER NOT NULL DEFAULT 0;
-- The model(s) that answered, as the CLI reports them (`model` keeps the alias asked for):
-- the main model (the init line's, else the costliest of modelUsage) and the per-model split
-- (JSON: {"claude-...": {"input":..,"output":..,"cache_read":..,"cache_creation":..,"cost_usd":..}}).
ALTER TABLE processes ADD COLUMN resolved_model TEXT;
ALTER TABLE processes ADD COLUMN model_usage TEXT;
-- Which executable answered (its path, and the version its init line reported), and whether its
-- money is simulated (fake-claude labels every line it prints): simulated cost never counts
-- against a budget and is reported apart.
ALTER TABLE processes ADD COLUMN executable TEXT;
ALTER TABLE processes ADD COLUMN cli_version TEXT;
ALTER TABLE processes ADD COLUMN simulated INTEGER NOT NULL DEFAULT 0;
-- A call parked by a subscription limit (usage/session limit) waits until this time (epoch ms),
-- then runs again by itself; `next_attempt_at` carries the same time for the retry scheduler.
ALTER TABLE processes ADD COLUMN quota_until INTEGER;

-- The part of a workflow's cost that is simulated (answered by fake-claude): shown as such,
-- never counted as spend.
ALTER TABLE workflows ADD COLUMN simulated_usd REAL NOT NULL DEFAULT 0;

-- When each Claude CLI was spawned (epoch ms), for the last hour: the spawn-rate limit
-- (`claude.spawn_rate_per_min`) starts from these after a restart, so a daemon restarted in a
-- loop cannot exceed it.
CREATE TABLE spawn_times (at INTEGER NOT NULL);
CREATE INDEX idx_spawn_times_at ON spawn_times(at);
