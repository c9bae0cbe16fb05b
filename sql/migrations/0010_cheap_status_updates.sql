-- The logger's status updates (one per status a child reports) paid about
-- 3 ms of PostgreSQL's CPU each, ten times the update itself: most of it
-- for work that only a change of the configuration needs.
--
-- 1. The two triggers that react to a configuration change compared
--    mqtt_connection_config(OLD) with mqtt_connection_config(NEW) in their
--    WHEN clause on every update. PostgreSQL does not inline a SQL function
--    there: it parses and plans the function's body again for every
--    statement, four times per status update. They now fire only for an
--    UPDATE whose SET names a configuration column or is_active (UPDATE OF),
--    and keep their WHEN for the real comparison. The column list is the
--    function's, plus is_active; tests/test_migrations.py checks that the
--    two agree, so a column added to the configuration without its trigger
--    fails there.
-- 2. Every UPDATE of a row evaluates every CHECK constraint (PostgreSQL has no
--    per-column checks). Two rules called SQL functions whose body is a
--    query, which PostgreSQL plans again for every statement too: the one
--    without a query is inlined, the other is PL/pgSQL, whose plan is kept
--    per connection. Same rules, same answers.

DROP TRIGGER mqtt_connection_reset_retry ON mqtt_connection;
CREATE TRIGGER mqtt_connection_reset_retry BEFORE UPDATE OF
        site_id, broker_host, broker_port, username, password, client_id, keepalive, use_tls, tls_ca_path,
        topics, qos, parser_name, stall_after, ping_timeout, mqtt_protocol, clean_session, is_active
    ON mqtt_connection
    FOR EACH ROW
    WHEN (mqtt_connection_config(OLD) IS DISTINCT FROM mqtt_connection_config(NEW)
          OR OLD.is_active IS DISTINCT FROM NEW.is_active)
    EXECUTE FUNCTION mqtt_connection_reset_retry();

DROP TRIGGER mqtt_connection_notify_update ON mqtt_connection;
CREATE TRIGGER mqtt_connection_notify_update AFTER UPDATE OF
        site_id, broker_host, broker_port, username, password, client_id, keepalive, use_tls, tls_ca_path,
        topics, qos, parser_name, stall_after, ping_timeout, mqtt_protocol, clean_session, is_active
    ON mqtt_connection
    FOR EACH ROW
    WHEN (mqtt_connection_config(OLD) IS DISTINCT FROM mqtt_connection_config(NEW)
          OR OLD.is_active IS DISTINCT FROM NEW.is_active)
    EXECUTE FUNCTION mqtt_connection_notify();

-- The sum of the filters' lengths in bytes: array_to_string skips NULLs as
-- sum() does.
CREATE OR REPLACE FUNCTION mqtt_topics_octets(topics text[]) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN octet_length(array_to_string(topics, ''));

CREATE OR REPLACE FUNCTION mqtt_topics_distinct(topics text[]) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    RETURN (SELECT count(DISTINCT f) = count(f) FROM unnest(topics) AS f);
END $$;
