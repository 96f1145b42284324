-- Scale to zero: a deployment idle for its app's sleep_after is stopped as
-- `sleeping`; its URL stays routed and its first request starts it again.
-- It keeps its port while it sleeps, so it wakes where the router expects it.

ALTER TABLE deployments DROP CONSTRAINT deployments_state_check;
ALTER TABLE deployments ADD CONSTRAINT deployments_state_check
    CHECK (state IN ('pending', 'starting', 'healthy', 'failed', 'stopped', 'sleeping'));

DROP INDEX deployments_live_port;
CREATE UNIQUE INDEX deployments_live_port ON deployments (port)
    WHERE state IN ('pending', 'starting', 'healthy', 'sleeping');
