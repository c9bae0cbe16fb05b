-- Reliability in psql: a status history PostgreSQL keeps itself, and views
-- over it per site for the last 24 hours and 7 days, plus silent sites.

-- One row per change of a connection's status or is_active: from `since`
-- until the next row of the same connection, the connection was in `status`
-- and `is_active` was as given. Written by a trigger on mqtt_connection, so
-- the history follows whoever writes the row. About 170 bytes a row with its
-- indexes; a drop and its reconnect write three rows, a connection that
-- keeps failing two per attempt (see the README for what a busy installation
-- can expect).
--
-- Pruning (with the connection log, by age of `since`, in batches through
-- mqtt_status_history_since_idx; not written yet) should keep each
-- connection's newest row at or before the cutoff: it says what the state
-- was at the cutoff. The views count nothing before a connection's oldest
-- row, so pruning that row too only shortens what they can see.
CREATE TABLE mqtt_status_history (
    id              bigserial PRIMARY KEY,
    connection_id   bigint NOT NULL REFERENCES mqtt_connection (id) ON DELETE CASCADE,
    since           timestamptz NOT NULL,
    status          text NOT NULL
                    CHECK (status IN ('disconnected', 'connecting', 'connected', 'error')),
    is_active       boolean NOT NULL
);

-- The views read, per connection, the row in force at the window's start and
-- the rows inside the window; id breaks ties between rows of the same instant.
CREATE INDEX mqtt_status_history_conn_since_idx ON mqtt_status_history (connection_id, since, id);
-- For pruning by age.
CREATE INDEX mqtt_status_history_since_idx ON mqtt_status_history (since);

-- The connections that exist when this migration runs start their history
-- with their current state, since their last status change (or creation).
INSERT INTO mqtt_status_history (connection_id, since, status, is_active)
SELECT id, least(coalesce(status_changed_at, created_at), now()), status, is_active
FROM mqtt_connection;

-- A status change is stamped with status_changed_at when the writer set it
-- (the logger sets it to the time the child saw the change), else with now();
-- a change of is_active alone with now(). A stamp never goes back before the
-- connection's previous row: the rows of one connection follow the order in
-- which PostgreSQL applied the updates (row locks serialise them), never a
-- comparison of two machines' clocks.
CREATE FUNCTION mqtt_status_history_record() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    stamp timestamptz := now();
BEGIN
    IF NEW.status_changed_at IS NOT NULL
       AND (TG_OP = 'INSERT'
            OR (NEW.status IS DISTINCT FROM OLD.status
                AND NEW.status_changed_at IS DISTINCT FROM OLD.status_changed_at)) THEN
        stamp := NEW.status_changed_at;
    END IF;
    INSERT INTO mqtt_status_history (connection_id, since, status, is_active)
    VALUES (NEW.id,
            greatest(stamp, (SELECT max(h.since) FROM mqtt_status_history h WHERE h.connection_id = NEW.id)),
            NEW.status, NEW.is_active);
    RETURN NULL;
END $$;

CREATE TRIGGER mqtt_connection_status_history_insert AFTER INSERT ON mqtt_connection
    FOR EACH ROW EXECUTE FUNCTION mqtt_status_history_record();

CREATE TRIGGER mqtt_connection_status_history_update AFTER UPDATE ON mqtt_connection
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.is_active IS DISTINCT FROM NEW.is_active)
    EXECUTE FUNCTION mqtt_status_history_record();

-- "Now" for the views below: now(), unless the session pins another time
-- (SET sitelink.as_of = '2026-11-28 00:00+00'), to see the windows as they
-- were then, or to test them on constructed histories.
CREATE FUNCTION sitelink_as_of() RETURNS timestamptz LANGUAGE sql STABLE PARALLEL SAFE
    RETURN coalesce(nullif(current_setting('sitelink.as_of', true), '')::timestamptz, now());

-- The argument itself, or a clear error when it is not a positive interval.
CREATE FUNCTION sitelink_positive_interval(value interval, what text) RETURNS interval
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF value IS NULL OR value <= interval '0' THEN
        RAISE EXCEPTION '% must be a positive interval, not %', what, coalesce(value::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN value;
END $$;

-- How the views show a duration: whole seconds, 24 hours as a day
-- ('7 days', '1 day 02:00:00', not '168:00:00').
CREATE FUNCTION sitelink_whole_seconds(value interval) RETURNS interval
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN justify_hours(date_trunc('second', value));

-- Reliability of one connection between two times. Only time while
-- is_active counts: an outage is a stretch of active time not connected;
-- time while inactive is neither up nor down. Every figure is clipped to the
-- window, and nothing before the connection's oldest history row counts.
-- Works on that connection's rows alone (two ranges of the history's index).
CREATE FUNCTION connection_reliability(connection bigint, window_start timestamptz, window_end timestamptz)
RETURNS TABLE (
    active_time interval, connected_time interval, uptime_pct numeric,
    drops bigint, recoveries bigint, mttr interval, longest_outage interval)
LANGUAGE sql STABLE AS $$
WITH history AS (
    -- the row in force at the window's start, and the rows inside it
    (SELECT x.id, x.since, x.status, x.is_active FROM mqtt_status_history x
      WHERE x.connection_id = connection AND x.since <= window_start
      ORDER BY x.since DESC, x.id DESC LIMIT 1)
    UNION ALL
    (SELECT x.id, x.since, x.status, x.is_active FROM mqtt_status_history x
      WHERE x.connection_id = connection AND x.since > window_start AND x.since <= window_end)
), spells AS (
    -- each row lasts until the next one (the last until the window's end)
    SELECT h.status, h.is_active,
           coalesce(lead(h.since) OVER w, window_end) - greatest(h.since, window_start) AS length,
           h.is_active AND h.status <> 'connected' AS down,
           coalesce(h.is_active AND h.status <> 'connected'
                    AND lag(h.status) OVER w = 'connected' AND lag(h.is_active) OVER w, false) AS is_drop,
           coalesce(lead(h.status) OVER w = 'connected' AND lead(h.is_active) OVER w, false) AS recovers,
           -- consecutive down spells share this number: one outage
           count(*) FILTER (WHERE NOT (h.is_active AND h.status <> 'connected')) OVER w AS outage_no
    FROM history h
    WINDOW w AS (ORDER BY h.since, h.id)
), outages AS (
    SELECT sum(s.length) AS length, bool_or(s.recovers) AS recovered
    FROM spells s WHERE s.down GROUP BY s.outage_no
), totals AS (
    SELECT coalesce(sum(s.length) FILTER (WHERE s.is_active), interval '0') AS active_time,
           coalesce(sum(s.length) FILTER (WHERE s.is_active AND s.status = 'connected'), interval '0')
               AS connected_time,
           count(*) FILTER (WHERE s.is_drop) AS drops
    FROM spells s
)
SELECT sitelink_whole_seconds(t.active_time), sitelink_whole_seconds(t.connected_time),
       round(100 * extract(epoch FROM t.connected_time) / nullif(extract(epoch FROM t.active_time), 0), 2),
       t.drops,
       (SELECT count(*) FROM outages o WHERE o.recovered),
       (SELECT sitelink_whole_seconds(avg(o.length)) FROM outages o WHERE o.recovered),
       (SELECT sitelink_whole_seconds(coalesce(max(o.length), interval '0')) FROM outages o)
FROM totals t
WHERE sitelink_positive_interval(window_end - window_start, 'window_end - window_start') IS NOT NULL
$$;

-- Reliability of every site over the `span` before sitelink_as_of(): its
-- connection's figures, when it has one, and what its gateways sent. A plain
-- SQL function, so the planner inlines it: EXPLAIN shows the real plan and a
-- WHERE on a site computes that site alone.
CREATE FUNCTION site_reliability(span interval)
RETURNS TABLE (
    site_id bigint, site text, connection_id bigint, is_active boolean, status text,
    window_start timestamptz, window_end timestamptz,
    active_time interval, connected_time interval, uptime_pct numeric,
    drops bigint, recoveries bigint, mttr interval, longest_outage interval,
    last_data_at timestamptz, since_last_data interval,
    readings bigint, readings_per_minute numeric)
LANGUAGE sql STABLE AS $$
WITH b AS MATERIALIZED (  -- once, not per row
    SELECT sitelink_as_of() - sitelink_positive_interval(span, 'the window') AS ws, sitelink_as_of() AS we
)
SELECT s.id, s.name, c.id, c.is_active, c.status, b.ws, b.we,
       f.active_time, f.connected_time, f.uptime_pct, f.drops, f.recoveries, f.mttr, f.longest_outage,
       heard.last_data_at, sitelink_whole_seconds(b.we - heard.last_data_at),
       data.readings, round(data.readings / (extract(epoch FROM b.we - b.ws) / 60), 2)
FROM site s CROSS JOIN b
LEFT JOIN mqtt_connection c ON c.site_id = s.id
LEFT JOIN LATERAL connection_reliability(c.id, b.ws, b.we) f ON c.id IS NOT NULL
LEFT JOIN LATERAL (
    SELECT max(g.last_seen_at) AS last_data_at FROM gateway g WHERE g.site_id = s.id
) heard ON true
LEFT JOIN LATERAL (
    -- each sensor's readings in the window, through reading's primary key
    SELECT coalesce(sum(n.readings), 0)::bigint AS readings
    FROM gateway g JOIN sensor se ON se.gateway_id = g.id
    CROSS JOIN LATERAL (
        SELECT count(*) AS readings FROM reading r
        WHERE r.sensor_id = se.id AND r.ts > b.ws AND r.ts <= b.we
    ) n
    WHERE g.site_id = s.id
) data ON true
ORDER BY s.id
$$;

CREATE VIEW site_reliability_24h AS SELECT * FROM site_reliability(interval '24 hours');
CREATE VIEW site_reliability_7d AS SELECT * FROM site_reliability(interval '7 days');

-- Sites that are connected and active but whose gateways have sent nothing
-- for longer than `threshold`, counted from the later of their last message
-- and the connection's last connect (a site that just reconnected gets the
-- threshold to speak). Connections with stall_after NULL ("never expect
-- traffic") are left out: silence is what their operator said to expect.
CREATE FUNCTION silent_sites(threshold interval)
RETURNS TABLE (
    site_id bigint, site text, connection_id bigint, connected_since timestamptz,
    last_data_at timestamptz, silent_for interval, paused_since timestamptz)
LANGUAGE sql STABLE AS $$
SELECT s.id, s.name, c.id, c.last_connected_at, hd.last_data_at,
       sitelink_whole_seconds(sitelink_as_of() - quiet.since), c.paused_since
FROM mqtt_connection c
JOIN site s ON s.id = c.site_id
CROSS JOIN LATERAL (SELECT max(g.last_seen_at) AS last_data_at FROM gateway g WHERE g.site_id = c.site_id) hd
CROSS JOIN LATERAL (
    SELECT greatest(hd.last_data_at, coalesce(c.last_connected_at, c.status_changed_at, c.created_at)) AS since
) quiet
WHERE c.is_active AND c.status = 'connected' AND c.stall_after IS NOT NULL
  AND quiet.since < sitelink_as_of() - sitelink_positive_interval(threshold, 'the threshold')
ORDER BY quiet.since, s.id
$$;

CREATE VIEW silent_sites AS SELECT * FROM silent_sites(interval '1 hour');
