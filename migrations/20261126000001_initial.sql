-- The first schema of fleet-hub. Postgres is the source of truth: nothing that matters to a
-- rollout lives only in a hub's memory.

-- Every cluster (spoke) the hub knows, with the labels selectors match against, including the
-- lcm.openshift.io/ibgu-* labels the hub maintains.
CREATE TABLE clusters (
    name            TEXT PRIMARY KEY,
    labels          JSONB NOT NULL DEFAULT '{}'::jsonb,
    endpoint        TEXT NOT NULL,
    -- SHA-256 (hex) of the per-cluster credential issued at registration; the secret itself
    -- is never stored.
    credential_hash TEXT NOT NULL,
    -- Random per registration; with the hub's key it yields the credential.
    credential_nonce TEXT NOT NULL DEFAULT '',
    -- The agent state the report sequence belongs to; a new agent id restarts the sequence.
    agent_id        TEXT NOT NULL DEFAULT '',
    last_report     JSONB,
    last_report_seq BIGINT NOT NULL DEFAULT 0,
    registered_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen       TIMESTAMPTZ
);
-- Label selectors (matchLabels, In, Exists) become JSONB containment and key tests.
CREATE INDEX clusters_labels_idx ON clusters USING GIN (labels);

-- One row per ImageBasedGroupUpgrade.
CREATE TABLE rollouts (
    id           BIGSERIAL PRIMARY KEY,
    uid          UUID NOT NULL UNIQUE,
    namespace    TEXT NOT NULL,
    name         TEXT NOT NULL,
    generation   BIGINT NOT NULL DEFAULT 1,
    -- metadata.labels and metadata.annotations of the IBGU.
    labels       JSONB NOT NULL DEFAULT '{}'::jsonb,
    annotations  JSONB NOT NULL DEFAULT '{}'::jsonb,
    spec         JSONB NOT NULL,
    -- The last status the planner derived (what GET answers).
    status       JSONB NOT NULL DEFAULT '{}'::jsonb,
    -- Pending, Progressing, Completed: lets the engine find active rollouts cheaply.
    phase        TEXT NOT NULL DEFAULT 'Pending',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at   TIMESTAMPTZ,
    completed_at TIMESTAMPTZ,
    UNIQUE (namespace, name)
);
CREATE INDEX rollouts_active_idx ON rollouts (phase) WHERE phase <> 'Completed';

-- One row per started plan item: its frozen cluster selection and batch progress.
CREATE TABLE rollout_steps (
    rollout_id       BIGINT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    step             INTEGER NOT NULL,
    actions          TEXT[] NOT NULL,
    -- Selected clusters, in name order, frozen when the step starts.
    clusters         TEXT[] NOT NULL,
    max_concurrency  INTEGER NOT NULL,
    timeout_minutes  INTEGER NOT NULL,
    current_batch    INTEGER NOT NULL DEFAULT 0,
    batch_started_at TIMESTAMPTZ,
    started_at       TIMESTAMPTZ NOT NULL,
    completed_at     TIMESTAMPTZ,
    timed_out        BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (rollout_id, step)
);

-- Per-cluster progress through the actions of one step.
CREATE TABLE rollout_clusters (
    rollout_id        BIGINT NOT NULL,
    step              INTEGER NOT NULL,
    cluster           TEXT NOT NULL,
    batch             INTEGER NOT NULL,
    -- pending, running, completed, failed
    state             TEXT NOT NULL DEFAULT 'pending',
    -- Index into the step's actions of the action being worked on.
    action_index      INTEGER NOT NULL DEFAULT 0,
    completed_actions TEXT[] NOT NULL DEFAULT '{}',
    failed_action     TEXT,
    failure_message   TEXT,
    timed_out         BOOLEAN NOT NULL DEFAULT false,
    -- The stage last pushed to the spoke and when, so a pass knows whether to push again.
    pushed_stage      TEXT,
    pushed_at         TIMESTAMPTZ,
    push_attempts     INTEGER NOT NULL DEFAULT 0,
    -- The spoke refused the last push (422): the action fails with this message.
    refused           TEXT,
    started_at        TIMESTAMPTZ,
    action_started_at TIMESTAMPTZ,
    finished_at       TIMESTAMPTZ,
    PRIMARY KEY (rollout_id, step, cluster),
    FOREIGN KEY (rollout_id, step) REFERENCES rollout_steps (rollout_id, step) ON DELETE CASCADE
);
CREATE INDEX rollout_clusters_cluster_idx ON rollout_clusters (cluster);

-- The key per-cluster credentials are derived from (credential = SHA-256 of key, cluster,
-- nonce): the hub can present a cluster's credential on its pushes without storing it.
CREATE TABLE hub_secret (
    id  BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    key BYTEA NOT NULL
);

-- ConfigMaps that rollouts refer to (ibuSpec.oadpContent, ibuSpec.extraManifests).
CREATE TABLE configmaps (
    namespace  TEXT NOT NULL,
    name       TEXT NOT NULL,
    data       JSONB NOT NULL DEFAULT '{}'::jsonb,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name)
);

-- Every recorded transition, append-only. It outlives the rollout (no foreign key), so the
-- record of what happened to a fleet survives the deletion of the IBGU.
CREATE TABLE history (
    id                BIGSERIAL PRIMARY KEY,
    rollout_id        BIGINT NOT NULL,
    rollout_namespace TEXT NOT NULL,
    rollout_name      TEXT NOT NULL,
    time              TIMESTAMPTZ NOT NULL,
    cluster           TEXT,
    step              INTEGER,
    action            TEXT,
    event             TEXT NOT NULL,
    message           TEXT NOT NULL DEFAULT ''
);
-- GET /v1/rollouts/{ns}/{name}/history[?cluster=] answers oldest first.
CREATE INDEX history_rollout_idx ON history (rollout_id, id);
CREATE INDEX history_rollout_cluster_idx ON history (rollout_id, cluster, id);
-- The history of one cluster across rollouts.
CREATE INDEX history_cluster_idx ON history (cluster, id);

CREATE FUNCTION history_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'history is append-only: % is not allowed', TG_OP;
END;
$$;
CREATE TRIGGER history_append_only
    BEFORE UPDATE OR DELETE ON history
    FOR EACH ROW EXECUTE FUNCTION history_is_append_only();
CREATE TRIGGER history_no_truncate
    BEFORE TRUNCATE ON history
    FOR EACH STATEMENT EXECUTE FUNCTION history_is_append_only();
