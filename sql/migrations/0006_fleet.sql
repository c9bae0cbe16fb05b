-- One fleet, many hosts: monitors that know each other, claims held by one
-- monitor process, and an order of statuses that PostgreSQL assigns.

-- Membership: one row per monitor (instance id), written at each of its
-- cycles. A monitor is live while heartbeat_at + lease_seconds is in the
-- future by PostgreSQL's clock (now()): no two machines' clocks are compared.
-- A second process with the same instance id takes the row over only once
-- the first is dead: its heartbeat expired, or it ran on this boot of this
-- host and the instance lock file named by lock_key is free (every process
-- of that monitor held it).
CREATE TABLE sitelink_monitor (
    instance_id    text PRIMARY KEY CHECK (length(instance_id) BETWEEN 1 AND 200),
    incarnation    text NOT NULL,
    host           text NOT NULL,
    pid            integer NOT NULL,
    lock_key       text NOT NULL,
    lease_seconds  double precision NOT NULL CHECK (lease_seconds > 0),
    capacity       integer CHECK (capacity IS NULL OR capacity >= 0),
    holds          integer NOT NULL DEFAULT 0 CHECK (holds >= 0),
    started_at     timestamptz NOT NULL DEFAULT now(),
    heartbeat_at   timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE mqtt_connection
    -- The monitor process (its incarnation) whose claim this is; claimed_by
    -- keeps its instance id, for people. Claims of earlier versions (no
    -- owner) are honoured until their claim_expires_at.
    ADD COLUMN claim_owner text,
    -- Grows by one each time a monitor claims the connection to start a
    -- child or to report on it: statuses order by (epoch, sequence number),
    -- never by the senders' clocks.
    ADD COLUMN claim_epoch bigint NOT NULL DEFAULT 0 CHECK (claim_epoch >= 0),
    -- The order of the status in the row (status_changed_at stays the time
    -- shown to people): a status event ranked lower is logged, not applied.
    ADD COLUMN status_epoch bigint NOT NULL DEFAULT 0,
    ADD COLUMN status_seq bigint NOT NULL DEFAULT 0;

DROP INDEX mqtt_connection_claimed_by_idx;
CREATE INDEX mqtt_connection_claim_owner_idx ON mqtt_connection (claim_owner) WHERE claim_owner IS NOT NULL;

-- Who runs what, for operators: each monitor, whether it is live, and how
-- many connections it holds.
CREATE VIEW fleet_overview AS
SELECT m.instance_id, m.host, m.pid, m.started_at, m.heartbeat_at,
       m.heartbeat_at + make_interval(secs => m.lease_seconds) > now() AS is_live,
       m.capacity,
       (SELECT count(*) FROM mqtt_connection c
        WHERE c.claim_owner = m.incarnation AND c.claim_expires_at > now()) AS connections
FROM sitelink_monitor m;
