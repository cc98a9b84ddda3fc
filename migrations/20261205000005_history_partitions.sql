-- History that can live for years: `history` becomes a table partitioned by month (of
-- `time`, in UTC), still append-only for rows, so that whole months can be dropped at once
-- (`fleet-hub serve --history-retention`). Rows of a month without its partition go to
-- `history_default`; the hub makes this month's and next month's partitions ahead.

ALTER TABLE history RENAME TO history_unpartitioned;
ALTER INDEX history_pkey RENAME TO history_unpartitioned_pkey;
ALTER INDEX history_rollout_idx RENAME TO history_unpartitioned_rollout_idx;
ALTER INDEX history_rollout_cluster_idx RENAME TO history_unpartitioned_rollout_cluster_idx;
ALTER INDEX history_cluster_idx RENAME TO history_unpartitioned_cluster_idx;

CREATE TABLE history (
    id                BIGINT NOT NULL DEFAULT nextval('history_id_seq'),
    rollout_id        BIGINT NOT NULL,
    rollout_namespace TEXT NOT NULL,
    rollout_name      TEXT NOT NULL,
    time              TIMESTAMPTZ NOT NULL,
    cluster           TEXT,
    step              INTEGER,
    action            TEXT,
    event             TEXT NOT NULL,
    message           TEXT NOT NULL DEFAULT '',
    actor             TEXT NOT NULL DEFAULT 'controller',
    -- The partition key is part of every unique key of a partitioned table.
    PRIMARY KEY (id, time)
) PARTITION BY RANGE (time);
ALTER SEQUENCE history_id_seq OWNED BY history.id;

-- Every query of the API and of the shipped dashboards has an index (created on each
-- partition): a rollout's history, one cluster's within it, one cluster's across rollouts,
-- a rollout by namespace and name (the dashboards), events of a kind (failures, controls).
CREATE INDEX history_rollout_idx ON history (rollout_id, id);
CREATE INDEX history_rollout_cluster_idx ON history (rollout_id, cluster, id);
CREATE INDEX history_cluster_idx ON history (cluster, id);
CREATE INDEX history_rollout_name_idx ON history (rollout_namespace, rollout_name, id);
CREATE INDEX history_event_idx ON history (event, id);

-- Rows stay as written: row triggers are cloned onto every partition; TRUNCATE is refused
-- on the table and on each partition. Dropping a whole month is the one way out.
CREATE TRIGGER history_append_only
    BEFORE UPDATE OR DELETE ON history
    FOR EACH ROW EXECUTE FUNCTION history_is_append_only();
CREATE TRIGGER history_no_truncate
    BEFORE TRUNCATE ON history
    FOR EACH STATEMENT EXECUTE FUNCTION history_is_append_only();

CREATE TABLE history_default PARTITION OF history DEFAULT;
CREATE TRIGGER history_no_truncate
    BEFORE TRUNCATE ON history_default
    FOR EACH STATEMENT EXECUTE FUNCTION history_is_append_only();

-- The partition of the month `at` falls in (UTC), made when missing: answers its name, or
-- NULL when it cannot be made because `history_default` already holds rows of that month
-- (they stay there). Hubs on one database take turns.
CREATE FUNCTION history_partition_for(at TIMESTAMPTZ) RETURNS TEXT LANGUAGE plpgsql AS $$
DECLARE
    first TIMESTAMPTZ := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    part  TEXT := 'history_' || to_char(first AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('history_partitions'));
    IF to_regclass(part) IS NOT NULL THEN
        RETURN part;
    END IF;
    BEGIN
        EXECUTE format('CREATE TABLE %I PARTITION OF history FOR VALUES FROM (%L) TO (%L)',
                       part, first, first + interval '1 month');
        EXECUTE format('CREATE TRIGGER history_no_truncate BEFORE TRUNCATE ON %I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION history_is_append_only()', part);
    EXCEPTION WHEN check_violation THEN
        RAISE WARNING 'history_default holds rows of %: they stay there', part;
        RETURN NULL;
    END;
    RETURN part;
END;
$$;

-- The months the history already covers, and this one and the next.
DO $$
DECLARE
    m TIMESTAMPTZ;
BEGIN
    FOR m IN
        SELECT generate_series(
            date_trunc('month', least(coalesce(min(time), now()), now()) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
            now() + interval '1 month',
            interval '1 month')
        FROM history_unpartitioned
    LOOP
        PERFORM history_partition_for(m);
    END LOOP;
END;
$$;

INSERT INTO history (id, rollout_id, rollout_namespace, rollout_name, time, cluster, step, action,
                     event, message, actor)
SELECT id, rollout_id, rollout_namespace, rollout_name, time, cluster, step, action, event, message,
       actor
FROM history_unpartitioned;

DROP TABLE history_unpartitioned;
