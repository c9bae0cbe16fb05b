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
--    per-column checks): a status update, a claim renewed (a quarter of 1000
--    claims: 25 ms, 18 of them these rules) paid for checking a host name
--    and topic filters nobody had changed. The five rules that call a
--    function (a regular expression, a loop over the filters) are now checked
--    by one trigger, for an INSERT and for an UPDATE that names a column of
--    the configuration, and refuse a row as their CHECK did: SQLSTATE 23514,
--    the same constraint name and message (without the DETAIL quoting the
--    whole row, password included). The cheap rules stay CHECK constraints. A row
--    exempt since migration 0004 stays exempt until its configuration
--    changes (mqtt_connection_checks_exemption_update runs first: triggers
--    run in the order of their names).
-- 3. Two rules called SQL functions whose body is a query, which PostgreSQL
--    plans again for every statement: the one without a query is inlined,
--    the other is PL/pgSQL, whose plan is kept per connection. Same rules,
--    same answers.

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

ALTER TABLE mqtt_connection
    DROP CONSTRAINT mqtt_connection_broker_host_is_a_host_name_or_ip,
    DROP CONSTRAINT mqtt_connection_client_id_is_mqtt_text,
    DROP CONSTRAINT mqtt_connection_topic_filters_valid,
    DROP CONSTRAINT mqtt_connection_topics_without_duplicates,
    DROP CONSTRAINT mqtt_connection_username_is_mqtt_text;

-- The rules in the order of their names, as PostgreSQL checks constraints; a
-- NULL passes, as in a CHECK.
CREATE FUNCTION mqtt_connection_rules() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    broken text;
BEGIN
    IF NEW.config_predates_checks THEN
        RETURN NEW;
    END IF;
    broken := CASE
        WHEN NOT coalesce(mqtt_broker_host_ok(NEW.broker_host), true)
            THEN 'mqtt_connection_broker_host_is_a_host_name_or_ip'
        WHEN NOT coalesce(mqtt_text_ok(NEW.client_id), true) THEN 'mqtt_connection_client_id_is_mqtt_text'
        WHEN NOT coalesce(mqtt_topic_filters_ok(NEW.topics), true) THEN 'mqtt_connection_topic_filters_valid'
        WHEN NOT coalesce(mqtt_topics_distinct(NEW.topics), true) THEN 'mqtt_connection_topics_without_duplicates'
        WHEN NOT coalesce(mqtt_text_ok(NEW.username), true) THEN 'mqtt_connection_username_is_mqtt_text'
    END;
    IF broken IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = broken, TABLE = TG_TABLE_NAME,
            SCHEMA = TG_TABLE_SCHEMA,
            MESSAGE = format('new row for relation "%s" violates check constraint "%s"', TG_TABLE_NAME, broken);
    END IF;
    RETURN NEW;
END $$;

-- 4. Half of each page left free: a status update or a claim renewal (a
--    quarter of the claims every cycle) writes the row's new version on its
--    own page (a HOT update) instead of adding an entry to each of the
--    table's indexes, which then grow until vacuum. 1000 rows: 8 of 10
--    updates HOT instead of 2. Pages written from now on; the table is small.
ALTER TABLE mqtt_connection SET (fillfactor = 50);

-- 5. The configuration's hash, which the monitor compares every cycle with
--    the one it knows for each row, is kept in the row, written when the
--    configuration is: reading 1000 rows computed md5(mqtt_connection_config(c))
--    of each every cycle (5 of 13 ms). Any UPDATE naming config_hash itself
--    has it computed again: it cannot be set to anything else.
ALTER TABLE mqtt_connection ADD COLUMN config_hash text;
UPDATE mqtt_connection c SET config_hash = md5(mqtt_connection_config(c));
ALTER TABLE mqtt_connection ALTER COLUMN config_hash SET NOT NULL;

CREATE FUNCTION mqtt_connection_config_hash() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.config_hash := md5(mqtt_connection_config(NEW));
    RETURN NEW;
END $$;

-- The triggers that act on a change of the configuration, built from one list
-- of its columns: those mqtt_connection_config reads (tests/test_migrations.py
-- checks that the two agree).
DO $$
DECLARE
    config constant text := 'site_id, broker_host, broker_port, username, password, client_id, keepalive, '
                            || 'use_tls, tls_ca_path, topics, qos, parser_name, stall_after, ping_timeout, '
                            || 'mqtt_protocol, clean_session';
    changed constant text := 'mqtt_connection_config(OLD) IS DISTINCT FROM mqtt_connection_config(NEW) '
                             || 'OR OLD.is_active IS DISTINCT FROM NEW.is_active';
BEGIN
    DROP TRIGGER mqtt_connection_reset_retry ON mqtt_connection;
    EXECUTE format('CREATE TRIGGER mqtt_connection_reset_retry BEFORE UPDATE OF %s, is_active ON mqtt_connection '
                   'FOR EACH ROW WHEN (%s) EXECUTE FUNCTION mqtt_connection_reset_retry()', config, changed);
    DROP TRIGGER mqtt_connection_notify_update ON mqtt_connection;
    EXECUTE format('CREATE TRIGGER mqtt_connection_notify_update AFTER UPDATE OF %s, is_active ON mqtt_connection '
                   'FOR EACH ROW WHEN (%s) EXECUTE FUNCTION mqtt_connection_notify()', config, changed);
    -- For any change of the configuration, not only of the rules' own columns:
    -- a change ends an old row's exemption, and the row must then follow every rule.
    EXECUTE format('CREATE TRIGGER mqtt_connection_rules BEFORE INSERT OR UPDATE OF %s, config_predates_checks '
                   'ON mqtt_connection FOR EACH ROW EXECUTE FUNCTION mqtt_connection_rules()', config);
    EXECUTE format('CREATE TRIGGER mqtt_connection_config_hash BEFORE INSERT OR UPDATE OF %s, config_hash '
                   'ON mqtt_connection FOR EACH ROW EXECUTE FUNCTION mqtt_connection_config_hash()', config);
END $$;

-- The hash also for writes in replica mode (session_replication_role = replica,
-- as logical replication and some restores write), which skip ordinary
-- triggers: a row whose hash lagged its configuration would never be restarted.
ALTER TABLE mqtt_connection ENABLE ALWAYS TRIGGER mqtt_connection_config_hash;
