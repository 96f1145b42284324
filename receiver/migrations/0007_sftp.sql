-- SFTP: the SSH keys that may upload to an app, and what each upload became.

CREATE TABLE ssh_keys (
    id           TEXT PRIMARY KEY,
    app_id       BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    -- SHA256 fingerprint, as `ssh-keygen -l` prints it.
    fingerprint  TEXT NOT NULL,
    -- The public key in OpenSSH format, without its comment.
    public_key   TEXT NOT NULL,
    algorithm    TEXT NOT NULL,
    comment      TEXT NOT NULL DEFAULT '',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at TIMESTAMPTZ,
    UNIQUE (app_id, fingerprint)
);
CREATE INDEX ssh_keys_fingerprint ON ssh_keys (fingerprint);

CREATE TABLE sftp_uploads (
    id            BIGSERIAL PRIMARY KEY,
    app_id        BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    size          BIGINT NOT NULL,
    deployment_id TEXT,
    -- What the uploader reads in NAME.deploy.txt.
    outcome       TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX sftp_uploads_app ON sftp_uploads (app_id, name, created_at DESC);
