-- Ridge scheduler schema, version 1. Portable SQL: runs unchanged on SQLite
-- and PostgreSQL (booleans are BIGINT 0/1, JSON is TEXT).
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE bootstrap_tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    region TEXT NOT NULL,
    labels TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    max_uses BIGINT NOT NULL,
    uses BIGINT NOT NULL DEFAULT 0,
    revoked_at BIGINT
);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    token_id TEXT NOT NULL,
    key_alg TEXT NOT NULL,
    public_key TEXT NOT NULL,
    region TEXT NOT NULL,
    labels TEXT NOT NULL,
    hostname TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    dataplane_secret TEXT NOT NULL,
    enrolled_at BIGINT NOT NULL,
    drain BIGINT NOT NULL DEFAULT 0,
    last_heartbeat_ms BIGINT,
    report TEXT,
    desired_version BIGINT NOT NULL DEFAULT 0,
    desired TEXT
);
CREATE INDEX nodes_desired_version ON nodes (desired_version);
CREATE TABLE route_plan (
    id BIGINT PRIMARY KEY,
    computed_at_ms BIGINT NOT NULL,
    leader TEXT NOT NULL,
    plan TEXT NOT NULL
);
