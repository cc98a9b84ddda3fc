-- The rollout controls of ibgu-hub.md section 5.

-- Where each batch of a step ends in its cluster list, when canaries, growing batches or a
-- disruption budget shape them (empty: chunks of max_concurrency, in name order).
ALTER TABLE rollout_steps ADD COLUMN batch_ends INTEGER[] NOT NULL DEFAULT '{}';
-- FailureBudgetExceeded or CanaryFailed, once the item halted; final.
ALTER TABLE rollout_steps ADD COLUMN halt_reason TEXT;
ALTER TABLE rollout_steps ADD COLUMN halt_message TEXT;
-- spec.paused: since when, and the time paused so far (added to the deadlines).
ALTER TABLE rollout_steps ADD COLUMN paused_since TIMESTAMPTZ;
ALTER TABLE rollout_steps ADD COLUMN paused_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE rollout_steps ADD COLUMN batch_paused_ms BIGINT NOT NULL DEFAULT 0;
-- maxStartsPerMinute: the starts of the last minute.
ALTER TABLE rollout_steps ADD COLUMN recent_starts TIMESTAMPTZ[] NOT NULL DEFAULT '{}';

-- retries: Prep attempts made again, and whether the failed one is being aborted.
ALTER TABLE rollout_clusters ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rollout_clusters ADD COLUMN resetting BOOLEAN NOT NULL DEFAULT false;

-- What held the rollout's starts back after its last pass: paused, window or rate.
ALTER TABLE rollouts ADD COLUMN waiting TEXT;

-- Who caused each event: admin, a viewer or Kubernetes user, controller for the hub's own.
ALTER TABLE history ADD COLUMN actor TEXT NOT NULL DEFAULT 'controller';
