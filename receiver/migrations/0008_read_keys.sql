-- Read-only keys (kind 'read') for dashboards and monitoring: like the admin
-- token they belong to no app; unlike it they change nothing (api/access.rs).
ALTER TABLE keys
    DROP CONSTRAINT keys_kind_check,
    DROP CONSTRAINT keys_check,
    ADD CONSTRAINT keys_kind_check CHECK (kind IN ('admin', 'deploy', 'read')),
    ADD CONSTRAINT keys_app_check CHECK ((kind = 'deploy') = (app_id IS NOT NULL));
