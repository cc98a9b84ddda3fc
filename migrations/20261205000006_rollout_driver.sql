-- The hub replica that drives each active rollout (plans its passes and sends its pushes),
-- and its term: the driver moves the term on while it lives; a replica that sees the term
-- stand still for the lease takes the rollout over. NULL: nobody drives it (new, or let go
-- by a replica that stopped cleanly).
ALTER TABLE rollouts ADD COLUMN driver TEXT, ADD COLUMN driver_term BIGINT NOT NULL DEFAULT 0;
