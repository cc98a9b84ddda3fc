-- Label selectors are matched by the hub (the planner and the cluster list), never by a query:
-- the GIN index on clusters.labels served nothing, yet every label change the engine makes had
-- to add entries to it, and a changed indexed column rules out updating the row in place (HOT),
-- so the primary key got a new entry as well. Without it, label changes and reports update
-- cluster rows in place.
DROP INDEX IF EXISTS clusters_labels_idx;
