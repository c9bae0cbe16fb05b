-- Retention: what grows with time is pruned after configurable ages
-- (SITELINK_KEEP_*_DAYS, pruned by the logger: services/retention.py).
--
-- The connection log, the status history, the parsing log and the
-- quarantine are pruned by age in small batched DELETEs, through an index on
-- their time. `reading`, the big one, is partitioned by week of `ts`: its
-- retention drops whole partitions, never DELETEs millions of rows.

CREATE INDEX mqtt_connection_log_timestamp_idx ON mqtt_connection_log (timestamp);
CREATE INDEX mqtt_parsing_log_timestamp_idx ON mqtt_parsing_log (timestamp);

-- Partitions of reading are weeks, Monday 00:00 UTC to the next Monday.
CREATE FUNCTION sitelink_week_start(t timestamptz) RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN date_trunc('week', t AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';

-- The existing table becomes the first partition, reading_before_<date>:
-- every ts before the Monday after its newest reading (and after now). No row
-- is copied: its primary key and foreign key are taken over as they are,
-- and ATTACH reads it once to check the range. It is dropped whole once all
-- of that range is older than the readings' retention.
DO $$
DECLARE
    bound timestamptz := sitelink_week_start(greatest(now(), (SELECT max(ts) FROM reading))) + interval '7 days';
    legacy text := 'reading_before_' || to_char(bound AT TIME ZONE 'UTC', 'YYYYMMDD');
BEGIN
    EXECUTE format('ALTER TABLE reading RENAME TO %I', legacy);
    EXECUTE format('ALTER INDEX reading_pkey RENAME TO %I', legacy || '_pkey');
    -- One row per sensor and timestamp: a message delivered twice stores nothing new.
    CREATE TABLE reading (
        sensor_id       bigint NOT NULL,
        ts              timestamptz NOT NULL,
        "values"        jsonb NOT NULL CONSTRAINT reading_values_check CHECK (jsonb_typeof("values") = 'object'),
        received_at     timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT reading_pkey PRIMARY KEY (sensor_id, ts)
    ) PARTITION BY RANGE (ts);
    ALTER TABLE reading ADD CONSTRAINT reading_sensor_id_fkey
        FOREIGN KEY (sensor_id) REFERENCES sensor (id) ON DELETE CASCADE;
    EXECUTE format('ALTER TABLE reading ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)', legacy, bound);
END $$;

-- What no partition covers (a ts beyond the partitions made ahead; before
-- the oldest one once reading_before_<date> is dropped). Normally empty or
-- small: pruned by age in batches, like the small tables.
CREATE TABLE reading_default PARTITION OF reading DEFAULT;

-- Every partition of reading with its range (from_ts NULL: from the
-- beginning of time), its size and its estimated rows: `SELECT * FROM
-- reading_partitions`.
CREATE VIEW reading_partitions AS
SELECT c.relname::text AS partition, b.from_ts, b.to_ts, c.relname = 'reading_default' AS is_default,
       pg_total_relation_size(c.oid) AS bytes, greatest(c.reltuples, 0)::bigint AS rows_estimate
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (
    SELECT regexp_match(pg_get_expr(c.relpartbound, c.oid), '^FOR VALUES FROM \((.*)\) TO \((.*)\)$') AS m
) e
CROSS JOIN LATERAL (
    SELECT CASE WHEN e.m[1] = 'MINVALUE' THEN NULL ELSE btrim(e.m[1], '''')::timestamptz END AS from_ts,
           CASE WHEN e.m[2] = 'MAXVALUE' THEN NULL ELSE btrim(e.m[2], '''')::timestamptz END AS to_ts
) b
WHERE i.inhparent = 'reading'::regclass
ORDER BY b.to_ts NULLS LAST;

-- A new partition of reading for the week that starts at `week` (already
-- locked by the caller). Rows the default partition caught in that week move
-- into it first (there are none unless no logger ran for weeks).
CREATE FUNCTION reading_partition_create(week timestamptz) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    name text := 'reading_' || to_char(week AT TIME ZONE 'UTC', 'YYYYMMDD');
BEGIN
    IF week IS DISTINCT FROM sitelink_week_start(week) THEN
        RAISE EXCEPTION 'a partition of reading starts on a Monday 00:00 UTC, not at %', week
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE reading INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', name);
    EXECUTE format('WITH moved AS (DELETE FROM reading_default WHERE ts >= %L AND ts < %L RETURNING *) '
                   'INSERT INTO %I SELECT * FROM moved', week, week + interval '7 days', name);
    EXECUTE format('ALTER TABLE reading ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   name, week, week + interval '7 days');
    RETURN name;
END $$;

-- The next partition of reading, when the last one ends before `horizon`
-- (else NULL): what the logger calls, a partition per transaction. It takes
-- the locks ATTACH needs first, so that it never waits in a queue ahead of
-- the services: reading's and its default partition's within the caller's
-- lock_timeout (neither is used by the monitor); sensor's, which the monitor
-- updates every cycle, without waiting at all (NOWAIT) unless `patient`
-- (the horizon is getting short): then it holds that lock only for the few
-- milliseconds an empty table takes to attach.
CREATE FUNCTION reading_partition_add(horizon timestamptz, patient boolean) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    week timestamptz;
BEGIN
    SELECT coalesce(max(p.to_ts), sitelink_week_start(now())) INTO week
    FROM reading_partitions p WHERE NOT p.is_default;
    IF week >= horizon THEN
        RETURN NULL;
    END IF;
    LOCK TABLE reading IN SHARE UPDATE EXCLUSIVE MODE;
    LOCK TABLE reading_default IN ACCESS EXCLUSIVE MODE;
    IF patient THEN
        LOCK TABLE sensor IN SHARE ROW EXCLUSIVE MODE;
    ELSE
        LOCK TABLE sensor IN SHARE ROW EXCLUSIVE MODE NOWAIT;
    END IF;
    RETURN reading_partition_create(week);
END $$;

-- The oldest partition of reading whose whole range is before `cut`,
-- dropped (else NULL): a partition per transaction. DROP needs reading's
-- lock alone (not sensor's), within the caller's lock_timeout.
CREATE FUNCTION reading_partition_drop(cut timestamptz) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    name text;
BEGIN
    SELECT p.partition INTO name FROM reading_partitions p
    WHERE NOT p.is_default AND p.to_ts <= cut ORDER BY p.to_ts LIMIT 1;
    IF name IS NULL THEN
        RETURN NULL;
    END IF;
    LOCK TABLE reading IN ACCESS EXCLUSIVE MODE;
    EXECUTE format('DROP TABLE %I', name);
    RETURN name;
END $$;

-- Partitions for this week and the next four, so that data never waits for
-- a logger to make them.
DO $$
DECLARE
    week timestamptz;
BEGIN
    LOOP
        SELECT max(p.to_ts) INTO week FROM reading_partitions p WHERE NOT p.is_default;
        EXIT WHEN week >= now() + interval '28 days';
        PERFORM reading_partition_create(week);
    END LOOP;
END $$;
