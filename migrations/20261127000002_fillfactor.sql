-- Reports rewrite a cluster's last IBU and passes rewrite cluster progress many times a
-- rollout, without touching an indexed column: room left in each page lets Postgres update
-- such rows in place (HOT), without new index entries (the labels GIN index above all).
ALTER TABLE clusters SET (fillfactor = 70);
ALTER TABLE rollout_clusters SET (fillfactor = 70);
