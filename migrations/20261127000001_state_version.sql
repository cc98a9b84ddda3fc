-- Counts the passes that changed a rollout's steps or cluster progress. A hub keeps the
-- steps of the rollouts it drives in memory between passes and reloads them only when this
-- moved on without it (another hub's pass).
ALTER TABLE rollouts ADD COLUMN state_version BIGINT NOT NULL DEFAULT 0;
