-- Every change made through the REST API or an IBGU CR: who made it, from where, with which
-- request id, and how it was answered. Append-only, as history is.
CREATE TABLE audit (
    id         BIGSERIAL PRIMARY KEY,
    time       TIMESTAMPTZ NOT NULL,
    -- admin, viewer, anonymous, join-token, cluster:<name>, kubernetes:<user>, controller
    actor      TEXT NOT NULL,
    groups     TEXT[] NOT NULL DEFAULT '{}',
    source     TEXT,
    request_id TEXT,
    verb       TEXT NOT NULL,
    resource   TEXT NOT NULL,
    namespace  TEXT,
    name       TEXT,
    -- The HTTP status of the answer; NULL for a change read from a CR.
    code       INT,
    message    TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_time ON audit (time, id);

CREATE FUNCTION audit_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit is append-only: % is not allowed', TG_OP;
END;
$$;
CREATE TRIGGER audit_append_only
    BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_is_append_only();
CREATE TRIGGER audit_no_truncate
    BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_is_append_only();
