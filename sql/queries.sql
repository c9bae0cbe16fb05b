-- Named queries, loaded once by shared/db.py and run by name.
-- Each starts with a "-- name: <name>" line.

-- ---------------------------------------------------------------- migrations

-- name: migration_lock
SELECT pg_advisory_xact_lock(%(key)s);

-- name: migration_table
CREATE TABLE IF NOT EXISTS sitelink_migration (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: migration_table_exists
SELECT to_regclass('sitelink_migration') IS NOT NULL AS present;

-- name: migration_versions
SELECT version FROM sitelink_migration ORDER BY version;

-- name: migration_record
INSERT INTO sitelink_migration (version, name) VALUES (%(version)s, %(name)s);

-- ------------------------------------------------------------------ monitor

-- name: monitor_read
-- One cycle's read, in one statement (its heartbeat just before, in the same
-- transaction): the live monitors' capacities, the set of rows it may act on
-- (ids), and those of them that changed since the previous read (changed),
-- each as an array of the columns ROW_COLUMNS in services/fleet.py names.
--
-- The set: active, with a status to settle, or claimed by this monitor
-- process (its incarnation) or held by it (held). An inactive, disconnected
-- row nobody of ours holds needs nothing: of 10,000 rows mostly inactive, the
-- cycle reads only those it may act on. The held ids as a subquery:
-- PostgreSQL hashes it once, where "= ANY(array)" compared every inactive row
-- with every held id (9,000 x 1000: 28 of 34 ms).
--
-- Changed (migration 0012): by a transaction at or above the previous read's
-- horizon (since; NULL: every row is changed), or by the clock since that
-- read's as_of (a retry time or a claim's expiry passed). horizon: this
-- statement's snapshot's xmin, every transaction below it seen.
--
-- claim: 'mine' (this monitor process holds a valid claim), 'taken' (another
-- does), 'free' (nobody does: never claimed, released or expired). No broker
-- setting: a row whose config_hash is new to the monitor has them read by
-- connection_settings (in steady state none, and no join).
-- expiry_in: the soonest an active row's claim held by another monitor runs
-- out (s); due_in: the soonest an active, unclaimed row's retry time comes
-- (s), each NULL if none: when to look again.
SELECT now() AS as_of, pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS horizon,
       (SELECT coalesce(json_agg(m.capacity ORDER BY m.instance_id), '[]') FROM sitelink_monitor m
        WHERE m.heartbeat_at + make_interval(secs => m.lease_seconds) > now()) AS capacities,
       coalesce(array_agg(w.id ORDER BY w.id), '{}') AS ids,
       extract(epoch FROM min(w.claim_expires_at) FILTER (WHERE w.is_active AND w.claim = 'taken')
                          - now())::float8 AS expiry_in,
       extract(epoch FROM min(w.mqtt_next_retry) FILTER (
           WHERE w.is_active AND w.claim = 'free' AND w.mqtt_next_retry > now()) - now())::float8 AS due_in,
       coalesce(json_agg(json_build_array(w.id, w.is_active, w.status, w.claimed_by, w.claim_epoch,
                                          w.config_hash, w.is_due, w.claim) ORDER BY w.id)
                FILTER (WHERE w.changed), '[]') AS changed
FROM (
    SELECT c.id, c.is_active, c.status, c.claimed_by, c.claim_epoch, c.config_hash,
           c.claim_expires_at, c.mqtt_next_retry,
           (c.mqtt_next_retry IS NULL OR c.mqtt_next_retry <= now()) AS is_due,
           CASE WHEN c.claim_expires_at IS NULL OR c.claim_expires_at <= now() THEN 'free'
                WHEN c.claim_owner = %(incarnation)s THEN 'mine'
                ELSE 'taken' END AS claim,
           (%(since)s::bigint IS NULL
            OR c.monitor_change >= %(since)s::text::xid8
            OR (c.mqtt_next_retry > %(as_of)s AND c.mqtt_next_retry <= now())
            OR (c.claim_expires_at > %(as_of)s AND c.claim_expires_at <= now())) AS changed
    FROM mqtt_connection c
    WHERE c.is_active OR c.status <> 'disconnected' OR c.claim_owner = %(incarnation)s
       OR c.id IN (SELECT unnest(%(held)b::bigint[]))
) w;

-- name: connection_settings
-- The broker settings of connections by id, with the hash they go with: for
-- the rows whose configuration the monitor does not know yet (the row may
-- have changed since monitor_read read it: this hash is the one of
-- these settings), and for a child run by itself (one id).
SELECT c.id, c.site_id, c.broker_host, c.broker_port, c.username, c.password, c.client_id,
       c.keepalive, c.use_tls, c.tls_ca_path, c.topics, c.qos, c.parser_name,
       c.stall_after, c.ping_timeout, c.mqtt_protocol, c.clean_session,
       s.name AS site_name,  -- for the child's process title only: not configuration
       c.config_hash
FROM mqtt_connection c JOIN site s ON s.id = c.site_id
WHERE c.id IN (SELECT unnest(%(ids)b::bigint[]));

-- Membership: a row per monitor (instance id), its heartbeat written at
-- each cycle. Live = heartbeat within its lease by PostgreSQL's clock.

-- name: monitor_member
SELECT incarnation, host, pid, lock_key,
       heartbeat_at + make_interval(secs => lease_seconds) <= now() AS expired,
       extract(epoch FROM now() - heartbeat_at)::float8 AS silent_for
FROM sitelink_monitor WHERE instance_id = %(me)s
FOR UPDATE;

-- name: monitor_join
INSERT INTO sitelink_monitor (instance_id, incarnation, host, pid, lock_key, lease_seconds, capacity)
VALUES (%(me)s, %(incarnation)s, %(host)s, %(pid)s, %(lock_key)s, %(lease)s, %(capacity)s)
ON CONFLICT (instance_id) DO UPDATE
    SET incarnation = EXCLUDED.incarnation, host = EXCLUDED.host, pid = EXCLUDED.pid,
        lock_key = EXCLUDED.lock_key, lease_seconds = EXCLUDED.lease_seconds,
        capacity = EXCLUDED.capacity, holds = 0, started_at = now(), heartbeat_at = now()
    -- Only over a predecessor the caller has found dead (monitor_member,
    -- same transaction, row locked).
    WHERE sitelink_monitor.incarnation = %(predecessor)s
RETURNING instance_id;

-- name: commit_without_waiting
-- For the heartbeat's transaction: a heartbeat lost in a crash of PostgreSQL
-- is written again at the next cycle, so the cycle need not wait for its fsync.
SELECT set_config('synchronous_commit', 'off', true);

-- name: monitor_heartbeat
UPDATE sitelink_monitor SET heartbeat_at = now(), holds = %(holds)s, capacity = %(capacity)s
WHERE instance_id = %(me)s AND incarnation = %(incarnation)s
RETURNING instance_id;

-- name: monitor_leave
DELETE FROM sitelink_monitor WHERE instance_id = %(me)s AND incarnation = %(incarnation)s;

-- name: fleet_notify
-- Wakes every monitor at once (delivered at commit): claims were released,
-- or a monitor joined or left.
SELECT pg_notify('sitelink_mqtt_connection', %(payload)s);

-- Claims: a monitor process runs a connection only while it holds the
-- claim, a lease it renews; another takes it only once released or
-- expired. Each WHERE is re-checked on the locked row, so of two monitors
-- racing for one connection exactly one wins.

-- name: claim_connections
-- Up to limit of ids, this monitor's own first. Each claim starts a
-- new epoch: what a child of it (or the monitor about it) reports ranks
-- above everything of the epochs before.
WITH picked AS (
    SELECT id FROM mqtt_connection
    WHERE id = ANY(%(ids)b::bigint[])
      AND (claim_owner = %(incarnation)s OR claim_expires_at IS NULL OR claim_expires_at <= now())
    ORDER BY claim_owner IS NOT DISTINCT FROM %(incarnation)s DESC, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE mqtt_connection c
SET claim_owner = %(incarnation)s, claimed_by = %(me)s, claim_epoch = c.claim_epoch + 1,
    claim_expires_at = now() + make_interval(secs => %(lease)s)
FROM picked
WHERE c.id = picked.id
RETURNING c.id, c.claim_epoch;

-- name: renew_claims
-- An expired claim is not renewed: it is gone, whoever holds it now.
UPDATE mqtt_connection SET claim_expires_at = now() + make_interval(secs => %(lease)s)
WHERE claim_owner = %(incarnation)s AND claim_expires_at > now() AND id = ANY(%(ids)b::bigint[])
RETURNING id;

-- name: release_claims_except
-- The kept ids as a subquery, hashed once (not a scan of the array per claim).
UPDATE mqtt_connection SET claimed_by = NULL, claim_owner = NULL, claim_expires_at = NULL
WHERE claim_owner = %(incarnation)s AND id NOT IN (SELECT unnest(%(keep)b::bigint[]));

-- name: release_claims
UPDATE mqtt_connection SET claimed_by = NULL, claim_owner = NULL, claim_expires_at = NULL
WHERE claim_owner = %(incarnation)s AND id = ANY(%(ids)b::bigint[]);

-- name: release_owner
-- The claims of a monitor process known to be gone, free at once.
UPDATE mqtt_connection SET claimed_by = NULL, claim_owner = NULL, claim_expires_at = NULL
WHERE claim_owner = %(owner)s;

-- name: mark_offline_gateways
UPDATE gateway SET is_online = false
WHERE is_online AND last_seen_at < now() - make_interval(secs => %(after)s)
RETURNING id, site_id, name, extract(epoch FROM last_seen_at)::float8 AS last_seen;

-- name: mark_offline_dataloggers
UPDATE datalogger d SET is_online = false
FROM gateway g
WHERE g.id = d.gateway_id AND d.is_online
  AND d.last_seen_at < now() - make_interval(secs => %(after)s)
RETURNING d.id, g.site_id, d.name, extract(epoch FROM d.last_seen_at)::float8 AS last_seen;

-- name: mark_offline_sensors
UPDATE sensor s SET is_online = false
FROM gateway g
WHERE g.id = s.gateway_id AND s.is_online
  AND s.last_seen_at < now() - make_interval(secs => %(after)s)
RETURNING s.id, g.site_id, s.name, extract(epoch FROM s.last_seen_at)::float8 AS last_seen;

-- ------------------------------------------------------------------- logger
-- Status bookkeeping, with the seed's semantics. It returns what the status
-- feed needs, read in the same transaction. A status applies only if it
-- ranks above the row's: (claim epoch, sequence number), an order that
-- PostgreSQL's claims assign, never the senders' clocks (status_changed_at
-- is the time shown to people). It takes the statuses of many connections
-- at once, at most one per connection (the logger sends a burst's statuses
-- in waves: each connection's first, then its second...), as arrays in the
-- same order: one statement where a thousand children starting together
-- cost a thousand. What each status sets besides itself:
--   connecting:   nothing more
--   connected:    last_connected_at; clears the error, the retry state, the error count
--   error:        its message, one more error, the sender's retry attempt and delay
--   disconnected: its message
-- and each ends a pause. (A column set to its own value changes nothing; none
-- of these is one the configuration triggers watch.)

-- name: status_set
UPDATE mqtt_connection c
SET status = v.status, status_changed_at = v.at, status_epoch = v.epoch, status_seq = v.seq,
    paused_since = NULL,
    last_connected_at = CASE WHEN v.status = 'connected' THEN v.at ELSE c.last_connected_at END,
    error_message = CASE v.status WHEN 'connected' THEN '' WHEN 'connecting' THEN c.error_message
                                  ELSE v.message END,
    connection_errors = CASE v.status WHEN 'connected' THEN 0 WHEN 'error' THEN c.connection_errors + 1
                                      ELSE c.connection_errors END,
    mqtt_retry_count = CASE v.status WHEN 'connected' THEN 0
                                     WHEN 'error' THEN coalesce(v.retry_attempt, c.mqtt_retry_count)
                                     ELSE c.mqtt_retry_count END,
    -- The sender's delay, counted from now by PostgreSQL's clock: the monitor
    -- that next starts it may run on another host, with another clock.
    mqtt_next_retry = CASE v.status WHEN 'connected' THEN NULL
                                    WHEN 'error' THEN now() + make_interval(secs => v.retry_in)
                                    ELSE c.mqtt_next_retry END
FROM unnest(%(ids)s::bigint[], %(statuses)s::text[], %(ats)s::timestamptz[], %(epochs)s::bigint[],
            %(seqs)s::bigint[], %(messages)s::text[], %(retry_attempts)s::integer[], %(retry_ins)s::float8[])
     AS v(id, status, at, epoch, seq, message, retry_attempt, retry_in)
WHERE c.id = v.id AND (c.status_epoch, c.status_seq) < (v.epoch, v.seq)
RETURNING c.id, c.site_id, c.is_active, c.status, c.paused_since, c.last_connected_at, c.connection_errors,
          ARRAY[c.status_epoch, c.status_seq] AS status_order;

-- A child paused by backpressure (or flowing again). A status change clears
-- it too: a child that reconnects starts unpaused.
-- name: set_flow
UPDATE mqtt_connection
SET paused_since = CASE WHEN %(paused)s THEN coalesce(paused_since, %(at)s) END
WHERE id = %(connection_id)s AND status = 'connected' AND status_epoch = %(epoch)s
RETURNING id, site_id, is_active, status, paused_since, last_connected_at, connection_errors,
          ARRAY[status_epoch, status_seq] AS status_order;

-- The connections (and sites) a batch names: which exist, and what the feed
-- says of them.
-- name: batch_context
SELECT c.id AS connection_id, c.site_id, s.name AS site
FROM mqtt_connection c JOIN site s ON s.id = c.site_id
WHERE c.id = ANY(%(connection_ids)s)
UNION ALL
SELECT NULL, s.id, s.name FROM site s WHERE s.id = ANY(%(site_ids)s);

-- A snapshot for the feed's late joiners: every connection, every device,
-- when each site last sent data.
-- name: feed_connections
SELECT c.id, c.site_id, s.name AS site, c.status, c.is_active, c.paused_since, c.error_message,
       c.last_connected_at, c.connection_errors, c.mqtt_retry_count, c.mqtt_next_retry, c.status_changed_at,
       ARRAY[c.status_epoch, c.status_seq] AS status_order
FROM mqtt_connection c JOIN site s ON s.id = c.site_id
ORDER BY c.id;

-- name: feed_devices
SELECT 'gateway' AS kind, g.id, g.site_id, s.name AS site, g.name, g.is_online, g.last_seen_at
FROM gateway g JOIN site s ON s.id = g.site_id
UNION ALL
SELECT 'datalogger', d.id, g.site_id, s.name, d.name, d.is_online, d.last_seen_at
FROM datalogger d JOIN gateway g ON g.id = d.gateway_id JOIN site s ON s.id = g.site_id
UNION ALL
SELECT 'sensor', x.id, g.site_id, s.name, x.name, x.is_online, x.last_seen_at
FROM sensor x JOIN gateway g ON g.id = x.gateway_id JOIN site s ON s.id = g.site_id;

-- name: feed_site_data
SELECT g.site_id, s.name AS site, max(g.last_seen_at) AS last_data_at
FROM gateway g JOIN site s ON s.id = g.site_id
GROUP BY g.site_id, s.name;

-- name: connection_log_insert
INSERT INTO mqtt_connection_log
    (connection_id, timestamp, level, message, exception_type, exception_traceback,
     broker_host, retry_attempt)
SELECT c.id, %(at)s, %(level)s, %(message)s, %(exception_type)s, %(traceback)s,
       coalesce(nullif(%(broker_host)s, ''), c.broker_host), %(retry_attempt)s
FROM mqtt_connection c
WHERE c.id = %(connection_id)s;

-- name: parsing_log_insert
-- A parsing-log row and, when it comes with a payload that failed to parse,
-- that payload in the quarantine (for replay), linked to the row.
WITH log AS (
    INSERT INTO mqtt_parsing_log
        (site_id, connection_id, timestamp, topic, parser_name, error_type, error_message,
         exception_type, exception_traceback, payload_sample)
    SELECT c.site_id, c.id, %(at)s, %(topic)s, %(parser_name)s, %(error_type)s, %(error_message)s,
           %(exception_type)s, %(traceback)s, %(payload_sample)s
    FROM mqtt_connection c
    WHERE c.id = %(connection_id)s
    RETURNING id, site_id, connection_id, timestamp, topic, parser_name, error_type, error_message
)
INSERT INTO mqtt_quarantine
    (parsing_log_id, site_id, connection_id, received_at, topic, parser_name, error_type, error_message,
     payload, payload_bytes, replayable)
SELECT id, site_id, connection_id, timestamp, topic, parser_name, error_type, error_message,
       %(payload)s, %(payload_bytes)s, %(replayable)s
FROM log
WHERE %(payload)s::bytea IS NOT NULL;

-- Devices: registered on first sight, last_seen_at moved forward, marked
-- online again by a report at least as recent as the last one (a replay of
-- old payloads brings no device back online). The "before" CTE sees the rows
-- as they were before this statement, so came_online tells an offline device
-- that reported again.

-- name: upsert_gateways
WITH input AS (
    SELECT c.id AS connection_id, c.site_id, u.name, u.seen
    FROM unnest(%(connection_ids)s::bigint[], %(names)s::text[], %(seen)s::timestamptz[])
         AS u(connection_id, name, seen)
    JOIN mqtt_connection c ON c.id = u.connection_id
), before AS (
    SELECT g.id, g.is_online FROM gateway g JOIN input i USING (site_id, name)
), up AS (
    INSERT INTO gateway AS g (site_id, name, first_seen_at, last_seen_at)
    SELECT site_id, name, seen, seen FROM input
    ON CONFLICT (site_id, name) DO UPDATE
        SET last_seen_at = greatest(g.last_seen_at, EXCLUDED.last_seen_at),
            is_online = g.is_online OR EXCLUDED.last_seen_at >= g.last_seen_at
    RETURNING g.is_online, g.last_seen_at, g.id, g.site_id, g.name
)
SELECT up.id, up.site_id, up.name, up.last_seen_at, i.connection_id,
       b.id IS NULL AS is_new, coalesce(NOT b.is_online AND up.is_online, false) AS came_online
FROM up JOIN input i USING (site_id, name) LEFT JOIN before b ON b.id = up.id;

-- name: upsert_dataloggers
WITH input AS (
    SELECT * FROM unnest(%(gateway_ids)s::bigint[], %(names)s::text[], %(seen)s::timestamptz[])
         AS u(gateway_id, name, seen)
), before AS (
    SELECT d.id, d.is_online FROM datalogger d JOIN input i USING (gateway_id, name)
), up AS (
    INSERT INTO datalogger AS d (gateway_id, name, first_seen_at, last_seen_at)
    SELECT gateway_id, name, seen, seen FROM input
    ON CONFLICT (gateway_id, name) DO UPDATE
        SET last_seen_at = greatest(d.last_seen_at, EXCLUDED.last_seen_at),
            is_online = d.is_online OR EXCLUDED.last_seen_at >= d.last_seen_at
    RETURNING d.is_online, d.last_seen_at, d.id, d.gateway_id, d.name
)
SELECT up.id, up.gateway_id, up.name, up.last_seen_at, g.site_id,
       b.id IS NULL AS is_new, coalesce(NOT b.is_online AND up.is_online, false) AS came_online
FROM up JOIN gateway g ON g.id = up.gateway_id LEFT JOIN before b ON b.id = up.id;

-- name: upsert_sensors
WITH input AS (
    SELECT * FROM unnest(%(gateway_ids)s::bigint[], %(datalogger_ids)s::bigint[],
                         %(names)s::text[], %(seen)s::timestamptz[])
         AS u(gateway_id, datalogger_id, name, seen)
), before AS (
    SELECT s.id, s.is_online FROM sensor s JOIN input i
      ON s.gateway_id = i.gateway_id AND s.datalogger_id IS NOT DISTINCT FROM i.datalogger_id
     AND s.name = i.name
), up AS (
    INSERT INTO sensor AS s (gateway_id, datalogger_id, name, first_seen_at, last_seen_at)
    SELECT gateway_id, datalogger_id, name, seen, seen FROM input
    ON CONFLICT ON CONSTRAINT sensor_parent_name_key DO UPDATE
        SET last_seen_at = greatest(s.last_seen_at, EXCLUDED.last_seen_at),
            is_online = s.is_online OR EXCLUDED.last_seen_at >= s.last_seen_at
    RETURNING s.is_online, s.last_seen_at, s.id, s.gateway_id, s.datalogger_id, s.name
)
SELECT up.id, up.gateway_id, up.datalogger_id, up.name, up.last_seen_at, g.site_id,
       b.id IS NULL AS is_new, coalesce(NOT b.is_online AND up.is_online, false) AS came_online
FROM up JOIN gateway g ON g.id = up.gateway_id LEFT JOIN before b ON b.id = up.id;

-- name: insert_readings
-- The hot path: ids and timestamps (epoch seconds) as arrays passed in
-- binary, the values as one JSON array, element i for row i (ROWS FROM walks
-- the three in step). One JSON text costs the logger a third of what a text
-- per row did to encode and pass, and PostgreSQL no more to store.
INSERT INTO reading (sensor_id, ts, "values")
SELECT sensor_id, to_timestamp(ts), v::jsonb
FROM ROWS FROM (unnest(%(sensor_ids)b::bigint[]), unnest(%(ts)b::float8[]),
                json_array_elements(%(values)s::json)) AS u(sensor_id, ts, v)
ON CONFLICT (sensor_id, ts) DO NOTHING;

-- name: stream_floors
SELECT sender, incarnation, committed_upto
FROM sitelink_stream
WHERE (sender, incarnation) IN (SELECT * FROM unnest(%(senders)s::text[], %(incarnations)s::text[]));

-- name: stream_commit
INSERT INTO sitelink_stream AS s (sender, incarnation, committed_upto)
SELECT * FROM unnest(%(senders)s::text[], %(incarnations)s::text[], %(upto)s::bigint[])
ON CONFLICT (sender, incarnation) DO UPDATE
    SET committed_upto = greatest(s.committed_upto, EXCLUDED.committed_upto), updated_at = now();

-- name: stream_forget
DELETE FROM sitelink_stream WHERE updated_at < now() - make_interval(secs => %(after)s);

-- ---------------------------------------------------------------- retention
-- Run by the logger between its batches (services/retention.py), one step
-- per transaction: at most %(batch)s rows of a table, or one partition of
-- reading. Ages are counted by PostgreSQL's clock, in seconds.

-- name: retention_lock
-- One logger of a fleet prunes at a time (the others skip the step).
SELECT pg_try_advisory_xact_lock(%(key)s) AS locked;

-- name: retention_lock_timeout
SELECT set_config('lock_timeout', %(ms)s, true);

-- name: prune_connection_log
DELETE FROM mqtt_connection_log WHERE id IN (
    SELECT id FROM mqtt_connection_log
    WHERE timestamp < now() - make_interval(secs => %(keep)s)
    ORDER BY timestamp LIMIT %(batch)s);

-- name: prune_status_history
-- Each connection keeps its newest row at or before the cut: it says what
-- the state was then, and the reliability views start from it.
DELETE FROM mqtt_status_history WHERE id IN (
    SELECT h.id FROM mqtt_status_history h
    WHERE h.since <= now() - make_interval(secs => %(keep)s)
      AND EXISTS (SELECT 1 FROM mqtt_status_history n
                  WHERE n.connection_id = h.connection_id
                    AND n.since <= now() - make_interval(secs => %(keep)s)
                    AND (n.since, n.id) > (h.since, h.id))
    ORDER BY h.since LIMIT %(batch)s);

-- name: prune_parsing_log
DELETE FROM mqtt_parsing_log WHERE id IN (
    SELECT id FROM mqtt_parsing_log
    WHERE timestamp < now() - make_interval(secs => %(keep)s)
    ORDER BY timestamp LIMIT %(batch)s);

-- name: prune_quarantine
DELETE FROM mqtt_quarantine WHERE id IN (
    SELECT id FROM mqtt_quarantine
    WHERE received_at < now() - make_interval(secs => %(keep)s)
    ORDER BY received_at LIMIT %(batch)s);

-- name: prune_reading_default
-- Readings no partition holds (normally none), by age.
DELETE FROM reading_default d USING (
    SELECT sensor_id, ts FROM reading_default
    WHERE ts < now() - make_interval(secs => %(keep)s)
    LIMIT %(batch)s) old
WHERE d.sensor_id = old.sensor_id AND d.ts = old.ts;

-- name: reading_covered
-- How far ahead of now the partitions of reading reach, in seconds.
SELECT extract(epoch FROM max(to_ts) - now())::float8 AS ahead
FROM reading_partitions WHERE NOT is_default;

-- name: reading_partition_add
SELECT reading_partition_add(now() + make_interval(secs => %(ahead)s), %(patient)s) AS partition;

-- name: reading_partition_drop
SELECT reading_partition_drop(now() - make_interval(secs => %(keep)s)) AS partition;

-- ------------------------------------------------------------------- replay
-- The quarantine parsed again (services/replay.py). Filters: see
-- mqtt_quarantine_matching (migration 0008).

-- name: site_by_name_or_id
SELECT id, name, name = %(name)s AS by_name FROM site
WHERE name = %(name)s OR id = %(id)s
ORDER BY by_name DESC;

-- name: quarantine_replay_summary
SELECT q.site_id, s.name AS site,
       count(*) FILTER (WHERE q.replay_outcome = 'stored') AS already_stored,
       count(*) FILTER (WHERE NOT q.replayable) AS not_replayable,
       count(*) FILTER (WHERE q.replayable AND q.replay_outcome IS DISTINCT FROM 'stored') AS to_replay
FROM mqtt_quarantine_matching(%(site_id)s, %(since)s, %(until)s, %(error_types)s) q
JOIN site s ON s.id = q.site_id
GROUP BY q.site_id, s.name
ORDER BY q.site_id;

-- name: quarantine_not_replayable
SELECT q.id, s.name AS site, q.received_at, q.topic, q.error_type, q.error_message, q.payload_bytes,
       octet_length(q.payload) AS kept_bytes
FROM mqtt_quarantine_matching(%(site_id)s, %(since)s, %(until)s, %(error_types)s) q
JOIN site s ON s.id = q.site_id
WHERE NOT q.replayable
ORDER BY q.id
LIMIT %(limit)s;

-- name: quarantine_replay_next
-- The next payloads to parse again (ids and sizes only: the caller sizes its batch).
SELECT q.id, octet_length(q.payload) AS bytes
FROM mqtt_quarantine_matching(%(site_id)s, %(since)s, %(until)s, %(error_types)s) q
WHERE q.replayable AND q.replay_outcome IS DISTINCT FROM 'stored' AND q.id > %(after)s
ORDER BY q.id
LIMIT %(limit)s;

-- name: quarantine_replay_take
-- Those payloads, locked for this replay (a replay running at the same time
-- skips them), with the parser their site's connection has now.
SELECT q.id, q.site_id, s.name AS site, q.received_at, q.topic, q.payload, q.error_type, q.error_message,
       c.id AS connection_id, c.parser_name
FROM mqtt_quarantine q
JOIN site s ON s.id = q.site_id
LEFT JOIN mqtt_connection c ON c.site_id = q.site_id
WHERE q.id = ANY(%(ids)s) AND q.replayable AND q.replay_outcome IS DISTINCT FROM 'stored'
ORDER BY q.id
FOR UPDATE OF q SKIP LOCKED;

-- name: quarantine_mark_replayed
UPDATE mqtt_quarantine q
SET replayed_at = now(), replay_outcome = u.outcome, replay_parser = u.parser, replay_records = u.records,
    replay_error_type = u.error_type, replay_error = u.error
FROM unnest(%(ids)s::bigint[], %(outcomes)s::text[], %(parsers)s::text[], %(records)s::integer[],
            %(error_types)s::text[], %(errors)s::text[]) AS u(id, outcome, parser, records, error_type, error)
WHERE q.id = u.id;

-- -------------------------------------------------------------------- admin

-- name: status_table
SELECT site_id, site, connection_id, broker, is_active, status, last_connected_at,
       connection_errors, mqtt_retry_count, mqtt_next_retry, error_message, paused_since, last_data_at
FROM connection_overview
ORDER BY site_id;

-- name: site_insert
INSERT INTO site (name) VALUES (%(name)s)
ON CONFLICT (name) DO NOTHING
RETURNING id;

-- name: demo_connection_insert
INSERT INTO mqtt_connection (site_id, broker_host, broker_port, username, password, topics, qos,
                             parser_name, keepalive)
SELECT s.id, %(broker_host)s, %(broker_port)s, %(username)s, %(password)s, %(topics)s, 1, 'json', 30
FROM site s WHERE s.name = %(site)s
ON CONFLICT (site_id) DO NOTHING;

-- name: demo_connection_credentials
-- A demo row on the embedded broker made before it required a login (or
-- before its credentials were made anew) gets the current ones; a row an
-- operator pointed elsewhere or gave another username is left alone.
UPDATE mqtt_connection c SET username = %(username)s, password = %(password)s
FROM site s
WHERE c.site_id = s.id AND s.name = %(site)s
  AND c.broker_host = %(broker_host)s AND c.broker_port = %(broker_port)s
  AND (c.username IS NULL OR c.username = %(username)s)
  AND c.password IS DISTINCT FROM %(password)s;

-- -------------------------------------------------------------------- the status page (services/web)
-- Read-only: each transaction of the page starts with read_only_transaction.
-- Nothing here selects a broker setting (the password least of all); texts
-- are cut so that one answer stays small, whatever a row holds.

-- name: read_only_transaction
SET TRANSACTION READ ONLY;

-- name: web_site
SELECT s.id AS site_id, s.name AS site FROM site s WHERE s.id = %(site_id)s;

-- name: web_connection_errors
-- The latest warnings and errors of the site's connection (one per site).
SELECT l.id, l.timestamp, l.level, left(l.message, %(text_max)s) AS message, l.exception_type,
       left(l.exception_traceback, %(text_max)s) AS exception_traceback, l.broker_host, l.retry_attempt
FROM mqtt_connection c JOIN mqtt_connection_log l ON l.connection_id = c.id
WHERE c.site_id = %(site_id)s AND l.level IN ('WARNING', 'ERROR', 'CRITICAL')
ORDER BY l.timestamp DESC, l.id DESC
LIMIT %(limit)s;

-- name: web_parsing_errors
-- The latest payloads of the site that did not parse, with their samples.
SELECT p.id, p.timestamp, left(p.topic, %(text_max)s) AS topic, p.parser_name, p.error_type,
       left(p.error_message, %(text_max)s) AS error_message, p.exception_type,
       left(p.exception_traceback, %(text_max)s) AS exception_traceback,
       left(p.payload_sample::text, %(text_max)s) AS payload_sample
FROM mqtt_parsing_log p
WHERE p.site_id = %(site_id)s
ORDER BY p.timestamp DESC, p.id DESC
LIMIT %(limit)s;
