-- KSI schema, version 4: the audit log of mutating API calls (owned by host/src/audit.rs).

CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,   -- when the request arrived, ms since the epoch
    client      TEXT    NOT NULL,   -- 'unix socket', 'token:<8 hex of its sha256>' or 'anonymous'
    peer        TEXT,               -- peer address of a TCP request
    method      TEXT    NOT NULL,
    path        TEXT    NOT NULL,   -- path and query
    status      INTEGER NOT NULL,   -- HTTP status of the answer
    resource    TEXT,               -- id of the resource made or touched, when the answer named one
    summary     TEXT,               -- short summary of the request body
    duration_ms INTEGER NOT NULL
);

CREATE INDEX idx_audit_log_at ON audit_log(at);
