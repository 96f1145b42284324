-- Until 0008 a deploy key could mint deploy keys and SSH keys for its app, so
-- whoever held a leaked key may have minted more: revoking the leaked one
-- would not have cut them off. Keys minted by a deploy key (per the audit
-- log's actor, `key:<id>@<app>`) are revoked; only the admin mints keys now.
UPDATE keys SET revoked_at = now()
WHERE revoked_at IS NULL
  AND kind = 'deploy'
  AND id IN (
      SELECT detail->>'key' FROM events
      WHERE kind IN ('key.create', 'key.rotate') AND actor LIKE 'key:%'
  );

DELETE FROM ssh_keys s
USING events e, apps a
WHERE e.kind = 'ssh-key.add' AND e.actor LIKE 'key:%'
  AND a.name = e.app AND s.app_id = a.id AND s.fingerprint = e.detail->>'fingerprint';
