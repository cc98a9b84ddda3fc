-- A stage push on its way to a spoke, by the time of the pass that decided it, until a pass
-- records its outcome: every hub on the database sees it, so a push is sent once across
-- replicas (one hub's memory of its own pushes did not stop another from sending the same).
ALTER TABLE rollout_clusters ADD COLUMN push_in_flight_since TIMESTAMPTZ;
