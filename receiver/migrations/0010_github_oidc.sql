-- What a GitHub Actions OIDC token proved about a push (repository, its id
-- and owner's id, ref, commit, workflow, event, actor), for the deployments
-- pushed with one instead of a key. The app's trust policy lives with its
-- repository link in apps.settings.
ALTER TABLE deployments ADD COLUMN github JSONB;
