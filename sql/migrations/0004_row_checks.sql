-- Rules for what an operator writes into mqtt_connection: what MQTT, brokers
-- and sitelink can use. Each rule is a CHECK constraint whose name says what
-- is wrong, so that psql's error names the mistake. The numbers are the limits
-- listed in shared/connections.py (tests/test_bad_rows.py checks that the two
-- agree); what PostgreSQL cannot check (is the CA file a certificate, is the
-- parser known) ConnectionSettings.problems() checks before a row is started.
--
-- Rows written before this migration may break a rule. They are marked
-- (config_predates_checks) and exempt until their configuration next changes,
-- and sitelink shows them as status 'error' with the reason meanwhile. A
-- plain NOT VALID constraint would not do: PostgreSQL checks it on every
-- later UPDATE of the row, and the logger's own status updates would fail, so
-- such a row could never say what is wrong with it.

-- Text that MQTT brokers take in a string (client id, username, topic
-- filter): no control characters and no Unicode non-characters, which
-- Mosquitto answers by closing the connection. (text cannot hold a NUL.)
CREATE FUNCTION mqtt_text_ok(t text) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN t !~ '[\u0001-\u001f\u007f-\u009f\ufdd0-\ufdef\U0000fffe\U0000ffff\U0001fffe\U0001ffff\U0002fffe\U0002ffff\U0003fffe\U0003ffff\U0004fffe\U0004ffff\U0005fffe\U0005ffff\U0006fffe\U0006ffff\U0007fffe\U0007ffff\U0008fffe\U0008ffff\U0009fffe\U0009ffff\U000afffe\U000affff\U000bfffe\U000bffff\U000cfffe\U000cffff\U000dfffe\U000dffff\U000efffe\U000effff\U000ffffe\U000fffff\U0010fffe\U0010ffff]';

-- An MQTT topic filter: not empty (empty levels are fine), '+' a whole level,
-- '#' alone in the last level, at most 65535 bytes and 200 levels (Mosquitto
-- refuses more).
CREATE FUNCTION mqtt_topic_filter_ok(f text) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN f <> '' AND octet_length(f) <= 65535 AND mqtt_text_ok(f)
           AND cardinality(string_to_array(f, '/')) <= 200
           AND f ~ '^((\+|[^/+#]*)/)*(\+|[^/+#]*|#)$';

-- (A loop: five times faster than a query over unnest() here, and every
-- UPDATE of a row pays for its checks, the logger's status updates too.)
CREATE FUNCTION mqtt_topic_filters_ok(topics text[]) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY topics LOOP
        IF NOT mqtt_topic_filter_ok(f) THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN true;
END $$;

CREATE FUNCTION mqtt_topics_octets(topics text[]) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (SELECT coalesce(sum(octet_length(f)), 0) FROM unnest(topics) AS f);

CREATE FUNCTION mqtt_topics_distinct(topics text[]) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (SELECT count(DISTINCT f) = count(f) FROM unnest(topics) AS f);

-- A host name (ASCII: an international name in its xn-- form) or an IPv4 or
-- IPv6 literal without brackets or zone: what shared.connections.is_host takes.
CREATE FUNCTION mqtt_broker_host_ok(h text) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    ipv4 constant text := '(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}';
    label constant text := '[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?';
BEGIN
    IF length(h) NOT BETWEEN 1 AND 253 THEN
        RETURN false;
    END IF;
    IF strpos(h, ':') > 0 THEN
        IF h ~ '[^0-9A-Fa-f:.]'
           OR (strpos(h, '.') > 0 AND substring(h FROM '[^:]*$') !~ ('^' || ipv4 || '$')) THEN
            RETURN false;
        END IF;
        BEGIN
            RETURN family(h::inet) = 6;
        EXCEPTION WHEN invalid_text_representation THEN
            RETURN false;
        END;
    END IF;
    IF h ~ '(^|\.)[0-9]+\.?$' THEN  -- a name cannot end in a number: an IPv4 literal
        RETURN h ~ ('^' || ipv4 || '$');
    END IF;
    RETURN h ~ ('^(' || label || '\.)*' || label || '\.?$');
END $$;

ALTER TABLE mqtt_connection
    -- True for a row that broke a rule below when this migration ran: the
    -- rules let it be until its configuration changes (it shows as 'error').
    ADD COLUMN config_predates_checks boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT mqtt_connection_broker_host_is_a_host_name_or_ip
        CHECK (config_predates_checks OR mqtt_broker_host_ok(broker_host)) NOT VALID,
    ADD CONSTRAINT mqtt_connection_username_at_most_65535_bytes
        CHECK (config_predates_checks OR octet_length(username) <= 65535) NOT VALID,
    ADD CONSTRAINT mqtt_connection_username_is_mqtt_text
        CHECK (config_predates_checks OR mqtt_text_ok(username)) NOT VALID,
    ADD CONSTRAINT mqtt_connection_password_at_most_65535_bytes
        CHECK (config_predates_checks OR octet_length(password) <= 65535) NOT VALID,
    ADD CONSTRAINT mqtt_connection_password_needs_username
        CHECK (config_predates_checks OR password IS NULL OR username IS NOT NULL) NOT VALID,
    ADD CONSTRAINT mqtt_connection_client_id_is_mqtt_text
        CHECK (config_predates_checks OR mqtt_text_ok(client_id)) NOT VALID,
    ADD CONSTRAINT mqtt_connection_topics_1_to_256_filters
        CHECK (config_predates_checks OR (array_ndims(topics) = 1 AND cardinality(topics) BETWEEN 1 AND 256))
        NOT VALID,
    ADD CONSTRAINT mqtt_connection_topics_at_most_65536_bytes
        CHECK (config_predates_checks OR mqtt_topics_octets(topics) <= 65536) NOT VALID,
    ADD CONSTRAINT mqtt_connection_topic_filters_valid
        CHECK (config_predates_checks OR mqtt_topic_filters_ok(topics)) NOT VALID,
    ADD CONSTRAINT mqtt_connection_topics_without_duplicates
        CHECK (config_predates_checks OR mqtt_topics_distinct(topics)) NOT VALID,
    ADD CONSTRAINT mqtt_connection_tls_ca_path_absolute
        CHECK (config_predates_checks OR tls_ca_path LIKE '/%') NOT VALID,
    ADD CONSTRAINT mqtt_connection_tls_ca_path_at_most_4096_bytes
        CHECK (config_predates_checks OR octet_length(tls_ca_path) <= 4096) NOT VALID,
    ADD CONSTRAINT mqtt_connection_tls_ca_path_needs_use_tls
        CHECK (config_predates_checks OR tls_ca_path IS NULL OR use_tls) NOT VALID,
    ADD CONSTRAINT mqtt_connection_parser_name_at_most_64_chars
        CHECK (config_predates_checks OR length(parser_name) <= 64) NOT VALID;

-- Mark the old rows that break a rule (each constraint's own expression, so
-- the rules are written once), then validate every rule: no row breaks one.
DO $$
DECLARE
    rule record;
BEGIN
    FOR rule IN
        SELECT conname, pg_get_expr(conbin, conrelid) AS expr FROM pg_constraint
        WHERE conrelid = 'mqtt_connection'::regclass AND contype = 'c' AND NOT convalidated
    LOOP
        EXECUTE format('UPDATE mqtt_connection SET config_predates_checks = true WHERE NOT coalesce(%s, true)',
                       rule.expr);
    END LOOP;
    FOR rule IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'mqtt_connection'::regclass AND contype = 'c' AND NOT convalidated
    LOOP
        EXECUTE format('ALTER TABLE mqtt_connection VALIDATE CONSTRAINT %I', rule.conname);
    END LOOP;
END $$;

-- Only this migration marks a row, and a change of its configuration ends
-- the exemption: the changed row must follow every rule.
CREATE FUNCTION mqtt_connection_checks_exemption() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.config_predates_checks := false;
    ELSE
        NEW.config_predates_checks := OLD.config_predates_checks
            AND mqtt_connection_config(OLD) IS NOT DISTINCT FROM mqtt_connection_config(NEW);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER mqtt_connection_checks_exemption_insert BEFORE INSERT ON mqtt_connection
    FOR EACH ROW WHEN (NEW.config_predates_checks)
    EXECUTE FUNCTION mqtt_connection_checks_exemption();

CREATE TRIGGER mqtt_connection_checks_exemption_update BEFORE UPDATE ON mqtt_connection
    FOR EACH ROW WHEN (OLD.config_predates_checks OR NEW.config_predates_checks)
    EXECUTE FUNCTION mqtt_connection_checks_exemption();
