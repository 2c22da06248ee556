-- KSI schema, version 3: what the Claude executor needs beyond the processes/agents tables of 0001.

-- Start time of the CLI (clock ticks since boot, /proc/<pid>/stat field 22), so start-up
-- reconciliation can tell our orphaned process group from an unrelated process that reused the pid.
ALTER TABLE processes ADD COLUMN pid_start_ticks INTEGER;
-- sha256 of the prompt as sent (inbox messages included): the repeated-prompt (loop) detector.
ALTER TABLE processes ADD COLUMN prompt_sha256 TEXT;
-- Where the raw stdout of the current attempt streams while it runs (a data-dir relative path);
-- `recover` and reconciliation look for a result line there when the row was left RUNNING.
ALTER TABLE processes ADD COLUMN stream_file TEXT;
-- The request as given (model, system prompt, max turns, session): enough to run it again.
ALTER TABLE processes ADD COLUMN request TEXT;

CREATE INDEX idx_processes_prompt ON processes(prompt_sha256, created_at);
CREATE INDEX idx_processes_session ON processes(session_id);
