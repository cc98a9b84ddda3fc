-- Each cluster's labels carry a version that moves whenever they change, whoever changes
-- them (the planner's label changes, a registration's merge, the API, the Kubernetes sync):
-- a pass keeps the labels it read and reads a watched cluster's row again only when its
-- labels version or its report moved on. Versions come from one sequence, so a cluster
-- removed and registered again never shows a version it had before.
CREATE SEQUENCE clusters_labels_version;
ALTER TABLE clusters
    ADD COLUMN labels_version BIGINT NOT NULL DEFAULT nextval('clusters_labels_version');
ALTER SEQUENCE clusters_labels_version OWNED BY clusters.labels_version;

CREATE FUNCTION clusters_labels_version_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.labels_version := nextval('clusters_labels_version');
    RETURN NEW;
END
$$;

-- Only statements that set `labels` fire it (a report's write does not), and only when the
-- labels really differ.
CREATE TRIGGER clusters_labels_version_move
    BEFORE UPDATE OF labels ON clusters
    FOR EACH ROW WHEN (OLD.labels IS DISTINCT FROM NEW.labels)
    EXECUTE FUNCTION clusters_labels_version_move();
