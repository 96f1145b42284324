-- Replicas: the ports of a deployment's replicas after the first (which
-- keeps `port`), in replica order. Kept while it runs, so a restarted
-- receiver finds (and adopts) each replica where it left it.
ALTER TABLE deployments ADD COLUMN replica_ports INTEGER[] NOT NULL DEFAULT '{}';
