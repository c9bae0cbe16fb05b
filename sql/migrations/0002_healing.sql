-- Connections that heal themselves: stall detection, ping timeout, MQTT 5,
-- persistent sessions, claims by monitors, and retry state cleared by any
-- change of the row.

ALTER TABLE mqtt_connection
    -- Seconds a connected connection may receive nothing before it is taken
    -- for stalled and reconnected: 0 = SITELINK_STALL_AFTER, NULL = never
    -- expect traffic.
    ADD COLUMN stall_after integer DEFAULT 0 CHECK (stall_after IS NULL OR stall_after >= 0),
    -- Seconds to wait for the broker's PINGRESP: NULL = half the keepalive,
    -- so a dead path is noticed in about keepalive x 1.5.
    ADD COLUMN ping_timeout integer CHECK (ping_timeout IS NULL OR ping_timeout BETWEEN 1 AND 3600),
    ADD COLUMN mqtt_protocol text NOT NULL DEFAULT '3.1.1' CHECK (mqtt_protocol IN ('3.1.1', '5')),
    -- false: a persistent session (stable client id), so a short reconnect
    -- loses no QoS 1 message.
    ADD COLUMN clean_session boolean NOT NULL DEFAULT false,
    -- Which monitor runs this connection, until when (a lease renewed each cycle).
    ADD COLUMN claimed_by text,
    ADD COLUMN claim_expires_at timestamptz;

-- A connection's configuration: everything whose change restarts its child.
-- The one list of those columns, for the triggers below and the monitor.
CREATE FUNCTION mqtt_connection_config(c mqtt_connection) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT row(c.site_id, c.broker_host, c.broker_port, c.username, c.password, c.client_id,
               c.keepalive, c.use_tls, c.tls_ca_path, c.topics, c.qos, c.parser_name,
               c.stall_after, c.ping_timeout, c.mqtt_protocol, c.clean_session)::text
$$;

-- Any change of the configuration (or is_active) clears the retry state, so
-- a fixed row connects at once instead of waiting out a cool-down.
CREATE FUNCTION mqtt_connection_reset_retry() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.mqtt_next_retry := NULL;
    NEW.mqtt_retry_count := 0;
    RETURN NEW;
END $$;

CREATE TRIGGER mqtt_connection_reset_retry BEFORE UPDATE ON mqtt_connection
    FOR EACH ROW
    WHEN (mqtt_connection_config(OLD) IS DISTINCT FROM mqtt_connection_config(NEW)
          OR OLD.is_active IS DISTINCT FROM NEW.is_active)
    EXECUTE FUNCTION mqtt_connection_reset_retry();

-- The NOTIFY on update now covers the new settings too.
DROP TRIGGER mqtt_connection_notify_update ON mqtt_connection;
CREATE TRIGGER mqtt_connection_notify_update AFTER UPDATE ON mqtt_connection
    FOR EACH ROW
    WHEN (mqtt_connection_config(OLD) IS DISTINCT FROM mqtt_connection_config(NEW)
          OR OLD.is_active IS DISTINCT FROM NEW.is_active)
    EXECUTE FUNCTION mqtt_connection_notify();

CREATE INDEX mqtt_connection_claimed_by_idx ON mqtt_connection (claimed_by) WHERE claimed_by IS NOT NULL;

CREATE OR REPLACE VIEW connection_overview AS
SELECT s.id AS site_id, s.name AS site, c.id AS connection_id,
       c.broker_host || ':' || c.broker_port AS broker, c.is_active, c.status,
       c.last_connected_at, c.connection_errors, c.mqtt_retry_count,
       c.mqtt_next_retry, c.error_message, c.claimed_by
FROM mqtt_connection c JOIN site s ON s.id = c.site_id;
