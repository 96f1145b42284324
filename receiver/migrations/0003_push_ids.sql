-- A push id makes a retried push return the deployment the first attempt made
-- instead of making a second one.
ALTER TABLE deployments ADD COLUMN push_id TEXT;
CREATE UNIQUE INDEX deployments_push_id ON deployments (app_id, push_id) WHERE push_id IS NOT NULL;
