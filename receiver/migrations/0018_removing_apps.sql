-- An app is marked before its removal begins: a push that races the
-- removal is refused when it records its deployment, instead of starting a
-- sandbox (and making a preview database) the removal no longer sees. A
-- removal that stops half way leaves the mark; running it again finishes.

ALTER TABLE apps ADD COLUMN removing_since TIMESTAMPTZ;
