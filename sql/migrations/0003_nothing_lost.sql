-- Nothing lost, nothing stored twice, across restarts of the logger.

-- Per sender process (sender + incarnation): every event up to
-- committed_upto is stored. Written in the same transaction as the events,
-- so a restarted logger drops what a sender re-sends after a lost ack.
CREATE TABLE sitelink_stream (
    sender          text NOT NULL,
    incarnation     text NOT NULL,
    committed_upto  bigint NOT NULL CHECK (committed_upto >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sender, incarnation)
);

CREATE INDEX sitelink_stream_updated_idx ON sitelink_stream (updated_at);

-- When the status in the row was observed: a status event older than that
-- (a late re-send after a restart) is logged but does not overwrite it.
ALTER TABLE mqtt_connection ADD COLUMN status_changed_at timestamptz;
