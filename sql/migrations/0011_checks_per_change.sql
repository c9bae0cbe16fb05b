-- The configuration's remaining CHECK constraints cost every UPDATE of a row,
-- whatever it sets: PostgreSQL prepares each CHECK expression of a table once
-- per statement (read back from the catalog and planned), then evaluates it
-- for each row. The logger's status updates and the monitor's claim renewals
-- never touch the configuration, yet paid for its 19 cheap rules (and the
-- four of the status): about 0.24 ms per statement and 8 us per row, a third
-- of PostgreSQL's share of a status-lane transaction
-- (tests/bench/lane_cost.py; a copy of the table with and without them).
--
-- Those 19 move into mqtt_connection_rules, as the five of migration 0010
-- did: it runs only for an INSERT or an UPDATE naming a configuration column
-- (the same list; tests/test_migrations.py checks it). Same rules, same
-- exemption (only the rules of migration 0004 honour config_predates_checks),
-- the same names, checked in the order of their names as PostgreSQL checks
-- constraints, and the same SQLSTATE and message (without the DETAIL that
-- quoted the whole row, password included). The four rules on what a status
-- update writes (status, connection_errors, mqtt_retry_count, claim_epoch)
-- stay CHECK constraints.
--
-- A CHECK constraint also holds for writes in replica mode
-- (session_replication_role = replica, as logical replication and some
-- restores write), which skip ordinary triggers: the rules' trigger now runs
-- in that mode too (ENABLE ALWAYS), so none of the rules is weaker than it was.

ALTER TABLE mqtt_connection
    DROP CONSTRAINT mqtt_connection_broker_host_check,
    DROP CONSTRAINT mqtt_connection_broker_port_check,
    DROP CONSTRAINT mqtt_connection_client_id_check,
    DROP CONSTRAINT mqtt_connection_keepalive_check,
    DROP CONSTRAINT mqtt_connection_mqtt_protocol_check,
    DROP CONSTRAINT mqtt_connection_parser_name_at_most_64_chars,
    DROP CONSTRAINT mqtt_connection_parser_name_check,
    DROP CONSTRAINT mqtt_connection_password_at_most_65535_bytes,
    DROP CONSTRAINT mqtt_connection_password_needs_username,
    DROP CONSTRAINT mqtt_connection_ping_timeout_check,
    DROP CONSTRAINT mqtt_connection_qos_check,
    DROP CONSTRAINT mqtt_connection_stall_after_check,
    DROP CONSTRAINT mqtt_connection_tls_ca_path_absolute,
    DROP CONSTRAINT mqtt_connection_tls_ca_path_at_most_4096_bytes,
    DROP CONSTRAINT mqtt_connection_tls_ca_path_needs_use_tls,
    DROP CONSTRAINT mqtt_connection_topics_1_to_256_filters,
    DROP CONSTRAINT mqtt_connection_topics_at_most_65536_bytes,
    DROP CONSTRAINT mqtt_connection_topics_check,
    DROP CONSTRAINT mqtt_connection_username_at_most_65535_bytes;

-- Each rule as its CHECK was (a NULL passes, as in a CHECK), in the order of
-- the names; "exempt" for the rules of migration 0004.
CREATE OR REPLACE FUNCTION mqtt_connection_rules() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    exempt constant boolean := NEW.config_predates_checks;
    broken text;
BEGIN
    broken := CASE
        WHEN NOT coalesce(length(NEW.broker_host) BETWEEN 1 AND 253, true)
            THEN 'mqtt_connection_broker_host_check'
        WHEN NOT coalesce(exempt OR mqtt_broker_host_ok(NEW.broker_host), true)
            THEN 'mqtt_connection_broker_host_is_a_host_name_or_ip'
        WHEN NOT coalesce(NEW.broker_port BETWEEN 1 AND 65535, true) THEN 'mqtt_connection_broker_port_check'
        WHEN NOT coalesce(NEW.client_id IS NULL OR length(NEW.client_id) BETWEEN 1 AND 128, true)
            THEN 'mqtt_connection_client_id_check'
        WHEN NOT coalesce(exempt OR mqtt_text_ok(NEW.client_id), true) THEN 'mqtt_connection_client_id_is_mqtt_text'
        WHEN NOT coalesce(NEW.keepalive BETWEEN 5 AND 3600, true) THEN 'mqtt_connection_keepalive_check'
        WHEN NOT coalesce(NEW.mqtt_protocol IN ('3.1.1', '5'), true) THEN 'mqtt_connection_mqtt_protocol_check'
        WHEN NOT coalesce(exempt OR length(NEW.parser_name) <= 64, true)
            THEN 'mqtt_connection_parser_name_at_most_64_chars'
        WHEN NOT coalesce(length(NEW.parser_name) >= 1, true) THEN 'mqtt_connection_parser_name_check'
        WHEN NOT coalesce(exempt OR octet_length(NEW.password) <= 65535, true)
            THEN 'mqtt_connection_password_at_most_65535_bytes'
        WHEN NOT coalesce(exempt OR NEW.password IS NULL OR NEW.username IS NOT NULL, true)
            THEN 'mqtt_connection_password_needs_username'
        WHEN NOT coalesce(NEW.ping_timeout IS NULL OR NEW.ping_timeout BETWEEN 1 AND 3600, true)
            THEN 'mqtt_connection_ping_timeout_check'
        WHEN NOT coalesce(NEW.qos BETWEEN 0 AND 2, true) THEN 'mqtt_connection_qos_check'
        WHEN NOT coalesce(NEW.stall_after IS NULL OR NEW.stall_after >= 0, true)
            THEN 'mqtt_connection_stall_after_check'
        WHEN NOT coalesce(exempt OR NEW.tls_ca_path LIKE '/%', true) THEN 'mqtt_connection_tls_ca_path_absolute'
        WHEN NOT coalesce(exempt OR octet_length(NEW.tls_ca_path) <= 4096, true)
            THEN 'mqtt_connection_tls_ca_path_at_most_4096_bytes'
        WHEN NOT coalesce(exempt OR NEW.tls_ca_path IS NULL OR NEW.use_tls, true)
            THEN 'mqtt_connection_tls_ca_path_needs_use_tls'
        WHEN NOT coalesce(exempt OR mqtt_topic_filters_ok(NEW.topics), true) THEN 'mqtt_connection_topic_filters_valid'
        WHEN NOT coalesce(exempt OR (array_ndims(NEW.topics) = 1 AND cardinality(NEW.topics) BETWEEN 1 AND 256), true)
            THEN 'mqtt_connection_topics_1_to_256_filters'
        WHEN NOT coalesce(exempt OR mqtt_topics_octets(NEW.topics) <= 65536, true)
            THEN 'mqtt_connection_topics_at_most_65536_bytes'
        WHEN NOT coalesce(cardinality(NEW.topics) >= 1 AND array_position(NEW.topics, NULL) IS NULL, true)
            THEN 'mqtt_connection_topics_check'
        WHEN NOT coalesce(exempt OR mqtt_topics_distinct(NEW.topics), true)
            THEN 'mqtt_connection_topics_without_duplicates'
        WHEN NOT coalesce(exempt OR octet_length(NEW.username) <= 65535, true)
            THEN 'mqtt_connection_username_at_most_65535_bytes'
        WHEN NOT coalesce(exempt OR mqtt_text_ok(NEW.username), true) THEN 'mqtt_connection_username_is_mqtt_text'
    END;
    IF broken IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = broken, TABLE = TG_TABLE_NAME,
            SCHEMA = TG_TABLE_SCHEMA,
            MESSAGE = format('new row for relation "%s" violates check constraint "%s"', TG_TABLE_NAME, broken);
    END IF;
    RETURN NEW;
END $$;

ALTER TABLE mqtt_connection ENABLE ALWAYS TRIGGER mqtt_connection_rules;
