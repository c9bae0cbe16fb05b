-- Every monitor cycle read every row it may act on (of 2000 live sites: 2000
-- rows, 43-53 ms of a loaded machine, the largest part of a slow cycle) to
-- find the few that changed. It now reads only those: the rows changed by a
-- transaction its previous read could not see, and those a clock made new
-- (a retry time or a claim that came due meanwhile); the others it knows.
--
-- monitor_change: the transaction (xid8) that last changed what the monitor
-- reads of the row, written by PostgreSQL itself (a trigger) for an INSERT
-- and for an UPDATE that changes one of those columns. A read whose snapshot
-- had xmin X saw every transaction below X: what it did not see changed the
-- row under a transaction of X or above, so the next read asks for
-- monitor_change >= X (services/fleet.py). NULL: not changed since this
-- migration (the monitor's first read after it starts reads every row).
--
-- What the monitor reads and what it does not:
-- - watched: is_active, status, the claim (owner, holder, epoch), the
--   configuration's hash (recomputed by mqtt_connection_config_hash, which
--   runs before this trigger, triggers running in the order of their names),
--   mqtt_next_retry, the id, and monitor_change itself (set by hand, it is
--   set again: it cannot be moved into the past);
-- - claim_expires_at, except when a live claim is renewed (moved later while
--   it has not run out): a renewal changes nothing a monitor acts on, and
--   renewals (a quarter of every claim every 5.6 s by default) would otherwise
--   have every cycle read every row again. Its running out is no write at
--   all: the read asks for the rows whose expiry passed since the previous
--   read, as for mqtt_next_retry;
-- - not watched: the logger's counters, timestamps, error text, flow.
-- The trigger fires only for an UPDATE naming one of these columns or one of
-- the configuration (which changes the hash): tests/test_migrations.py checks
-- that this list holds every column the monitor's read takes from the row.
--
-- Like the hash, it runs for writes in replica mode too (ENABLE ALWAYS): a
-- change written that way must still be seen.

ALTER TABLE mqtt_connection ADD COLUMN monitor_change xid8;

CREATE FUNCTION mqtt_connection_watch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.monitor_change := pg_current_xact_id();
    RETURN NEW;
END $$;

CREATE TRIGGER mqtt_connection_watch_insert BEFORE INSERT ON mqtt_connection
    FOR EACH ROW EXECUTE FUNCTION mqtt_connection_watch();

DO $$
DECLARE
    config constant text := 'site_id, broker_host, broker_port, username, password, client_id, keepalive, '
                            || 'use_tls, tls_ca_path, topics, qos, parser_name, stall_after, ping_timeout, '
                            || 'mqtt_protocol, clean_session';
    watched constant text := 'id, is_active, status, claim_owner, claimed_by, claim_epoch, config_hash, '
                             || 'mqtt_next_retry, monitor_change';
BEGIN
    EXECUTE format(
        'CREATE TRIGGER mqtt_connection_watch_update BEFORE UPDATE OF %s, %s, claim_expires_at '
        'ON mqtt_connection FOR EACH ROW WHEN ((%s) IS DISTINCT FROM (%s) '
        'OR (NEW.claim_expires_at IS DISTINCT FROM OLD.claim_expires_at AND NOT coalesce('
        'OLD.claim_expires_at > now() AND NEW.claim_expires_at >= OLD.claim_expires_at, false))) '
        'EXECUTE FUNCTION mqtt_connection_watch()',
        config, watched,
        regexp_replace(watched, '(\w+)', 'OLD.\1', 'g'), regexp_replace(watched, '(\w+)', 'NEW.\1', 'g'));
END $$;

ALTER TABLE mqtt_connection ENABLE ALWAYS TRIGGER mqtt_connection_watch_insert;
ALTER TABLE mqtt_connection ENABLE ALWAYS TRIGGER mqtt_connection_watch_update;
