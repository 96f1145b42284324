-- What enforces each limit of a deployment, as reported when it last started.
ALTER TABLE deployments ADD COLUMN limits JSONB NOT NULL DEFAULT '[]';
