-- Trust: backpressure that says so.

-- Since when a connected child has stopped reading from its broker because
-- the logger is behind (its MAX_UNACKED limit); NULL while data flows.
ALTER TABLE mqtt_connection ADD COLUMN paused_since timestamptz;

-- paused_since, and when the site's gateways were last heard (what "connected"
-- must lead to): "connected but nothing arrives" shows in one row.
CREATE OR REPLACE VIEW connection_overview AS
SELECT s.id AS site_id, s.name AS site, c.id AS connection_id,
       c.broker_host || ':' || c.broker_port AS broker, c.is_active, c.status,
       c.last_connected_at, c.connection_errors, c.mqtt_retry_count,
       c.mqtt_next_retry, c.error_message, c.claimed_by, c.paused_since,
       (SELECT max(g.last_seen_at) FROM gateway g WHERE g.site_id = s.id) AS last_data_at
FROM mqtt_connection c JOIN site s ON s.id = c.site_id;
