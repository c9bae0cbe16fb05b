-- sitelink schema, version 1.
-- Table names are the ones operators type in psql; keep them.
-- Requires PostgreSQL 15 or newer (UNIQUE NULLS NOT DISTINCT).

CREATE TABLE site (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE mqtt_connection (
    id                  bigserial PRIMARY KEY,
    site_id             bigint NOT NULL UNIQUE REFERENCES site (id) ON DELETE CASCADE,
    -- broker settings: a change to any of these restarts the connection's child
    broker_host         text NOT NULL CHECK (length(broker_host) BETWEEN 1 AND 253),
    broker_port         integer NOT NULL DEFAULT 1883 CHECK (broker_port BETWEEN 1 AND 65535),
    username            text,
    password            text,
    client_id           text CHECK (client_id IS NULL OR length(client_id) BETWEEN 1 AND 128),
    keepalive           integer NOT NULL DEFAULT 60 CHECK (keepalive BETWEEN 5 AND 3600),
    use_tls             boolean NOT NULL DEFAULT false,
    tls_ca_path         text,
    topics              text[] NOT NULL DEFAULT ARRAY['#']
                        CHECK (cardinality(topics) >= 1 AND array_position(topics, NULL) IS NULL),
    qos                 smallint NOT NULL DEFAULT 1 CHECK (qos BETWEEN 0 AND 2),
    parser_name         text NOT NULL DEFAULT 'json' CHECK (length(parser_name) >= 1),
    is_active           boolean NOT NULL DEFAULT true,
    -- state maintained by the logger
    status              text NOT NULL DEFAULT 'disconnected'
                        CHECK (status IN ('disconnected', 'connecting', 'connected', 'error')),
    last_connected_at   timestamptz,
    error_message       text NOT NULL DEFAULT '',
    mqtt_retry_count    integer NOT NULL DEFAULT 0 CHECK (mqtt_retry_count >= 0),
    mqtt_next_retry     timestamptz,
    connection_errors   integer NOT NULL DEFAULT 0 CHECK (connection_errors >= 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX mqtt_connection_active_idx ON mqtt_connection (id) WHERE is_active;

CREATE TABLE mqtt_connection_log (
    id                  bigserial PRIMARY KEY,
    connection_id       bigint NOT NULL REFERENCES mqtt_connection (id) ON DELETE CASCADE,
    timestamp           timestamptz NOT NULL DEFAULT now(),
    level               text NOT NULL
                        CHECK (level IN ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')),
    message             text NOT NULL,
    exception_type      text NOT NULL DEFAULT '',
    exception_traceback text NOT NULL DEFAULT '',
    broker_host         text NOT NULL DEFAULT '',
    retry_attempt       integer CHECK (retry_attempt IS NULL OR retry_attempt >= 0)
);

CREATE INDEX mqtt_connection_log_conn_ts_idx ON mqtt_connection_log (connection_id, timestamp DESC);

CREATE TABLE mqtt_parsing_log (
    id                  bigserial PRIMARY KEY,
    site_id             bigint NOT NULL REFERENCES site (id) ON DELETE CASCADE,
    connection_id       bigint REFERENCES mqtt_connection (id) ON DELETE SET NULL,
    timestamp           timestamptz NOT NULL DEFAULT now(),
    topic               text NOT NULL DEFAULT '',
    parser_name         text NOT NULL DEFAULT '',
    error_type          text NOT NULL
                        CHECK (error_type IN ('VALIDATION_ERROR', 'PARSE_ERROR', 'DB_ERROR', 'UNKNOWN_ERROR')),
    error_message       text NOT NULL,
    exception_type      text NOT NULL DEFAULT '',
    exception_traceback text NOT NULL DEFAULT '',
    payload_sample      jsonb
);

CREATE INDEX mqtt_parsing_log_site_ts_idx ON mqtt_parsing_log (site_id, timestamp DESC);

CREATE TABLE gateway (
    id              bigserial PRIMARY KEY,
    site_id         bigint NOT NULL REFERENCES site (id) ON DELETE CASCADE,
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz NOT NULL DEFAULT now(),
    is_online       boolean NOT NULL DEFAULT true,
    UNIQUE (site_id, name)
);

CREATE TABLE datalogger (
    id              bigserial PRIMARY KEY,
    gateway_id      bigint NOT NULL REFERENCES gateway (id) ON DELETE CASCADE,
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz NOT NULL DEFAULT now(),
    is_online       boolean NOT NULL DEFAULT true,
    UNIQUE (gateway_id, name)
);

-- A sensor hangs off a datalogger, or directly off the gateway when the
-- payload names no datalogger.
CREATE TABLE sensor (
    id              bigserial PRIMARY KEY,
    gateway_id      bigint NOT NULL REFERENCES gateway (id) ON DELETE CASCADE,
    datalogger_id   bigint REFERENCES datalogger (id) ON DELETE CASCADE,
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz NOT NULL DEFAULT now(),
    is_online       boolean NOT NULL DEFAULT true,
    CONSTRAINT sensor_parent_name_key UNIQUE NULLS NOT DISTINCT (gateway_id, datalogger_id, name)
);

CREATE INDEX gateway_offline_scan_idx ON gateway (last_seen_at) WHERE is_online;
CREATE INDEX datalogger_offline_scan_idx ON datalogger (last_seen_at) WHERE is_online;
CREATE INDEX sensor_offline_scan_idx ON sensor (last_seen_at) WHERE is_online;

-- One row per sensor and timestamp: a message delivered twice stores nothing new.
CREATE TABLE reading (
    sensor_id       bigint NOT NULL REFERENCES sensor (id) ON DELETE CASCADE,
    ts              timestamptz NOT NULL,
    "values"        jsonb NOT NULL CHECK (jsonb_typeof("values") = 'object'),
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sensor_id, ts)
);

-- Keep updated_at honest whoever writes the row.
CREATE FUNCTION mqtt_connection_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE TRIGGER mqtt_connection_touch BEFORE UPDATE ON mqtt_connection
    FOR EACH ROW EXECUTE FUNCTION mqtt_connection_touch();

-- Tell the monitor at once when a connection is added, removed or changed by
-- someone other than the logger's status bookkeeping. The payload is
-- '<op>:<id>' and never carries settings (nor the password).
CREATE FUNCTION mqtt_connection_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    row_id bigint;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row_id := OLD.id;
    ELSE
        row_id := NEW.id;
    END IF;
    PERFORM pg_notify('sitelink_mqtt_connection', lower(TG_OP) || ':' || row_id);
    RETURN NULL;
END $$;

CREATE TRIGGER mqtt_connection_notify_insert_delete AFTER INSERT OR DELETE ON mqtt_connection
    FOR EACH ROW EXECUTE FUNCTION mqtt_connection_notify();

-- Status bookkeeping by the logger (status, retry fields, counters) changes
-- nothing the monitor reacts to at once, so those updates stay quiet unless
-- the configuration or is_active changed too. (A cleared mqtt_next_retry is
-- picked up by the next periodic cycle.)
CREATE TRIGGER mqtt_connection_notify_update AFTER UPDATE ON mqtt_connection
    FOR EACH ROW
    WHEN (
        (OLD.site_id, OLD.broker_host, OLD.broker_port, OLD.username, OLD.password,
         OLD.client_id, OLD.keepalive, OLD.use_tls, OLD.tls_ca_path, OLD.topics,
         OLD.qos, OLD.parser_name, OLD.is_active)
        IS DISTINCT FROM
        (NEW.site_id, NEW.broker_host, NEW.broker_port, NEW.username, NEW.password,
         NEW.client_id, NEW.keepalive, NEW.use_tls, NEW.tls_ca_path, NEW.topics,
         NEW.qos, NEW.parser_name, NEW.is_active)
    )
    EXECUTE FUNCTION mqtt_connection_notify();

-- Views for the questions operators ask.
CREATE VIEW connection_overview AS
SELECT s.id AS site_id, s.name AS site, c.id AS connection_id,
       c.broker_host || ':' || c.broker_port AS broker, c.is_active, c.status,
       c.last_connected_at, c.connection_errors, c.mqtt_retry_count,
       c.mqtt_next_retry, c.error_message
FROM mqtt_connection c JOIN site s ON s.id = c.site_id;

CREATE VIEW sites_down AS
SELECT s.id AS site_id, s.name AS site, c.id AS connection_id, c.status,
       c.last_connected_at AS down_since_or_last_connected, c.error_message
FROM mqtt_connection c JOIN site s ON s.id = c.site_id
WHERE c.is_active AND c.status <> 'connected';

CREATE VIEW errors_today AS
SELECT s.id AS site_id, s.name AS site,
       (SELECT count(*) FROM mqtt_connection_log l
         WHERE l.connection_id = c.id AND l.level IN ('ERROR', 'CRITICAL')
           AND l.timestamp >= date_trunc('day', now())) AS connection_errors,
       (SELECT count(*) FROM mqtt_parsing_log p
         WHERE p.site_id = s.id AND p.timestamp >= date_trunc('day', now())) AS parsing_errors
FROM site s LEFT JOIN mqtt_connection c ON c.site_id = s.id;
