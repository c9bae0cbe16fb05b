-- The quarantine: every payload that failed to parse (PARSE_ERROR,
-- VALIDATION_ERROR, UNKNOWN_ERROR), kept whole when its child could send it
-- whole (up to SITELINK_MAX_PAYLOAD and what one frame of the wire carries),
-- so that `python -m services.admin replay` can parse it again once the
-- parser (or the connection's parser_name) is fixed. The logger writes a row
-- in the same statement as the payload's mqtt_parsing_log row.
CREATE TABLE mqtt_quarantine (
    id              bigserial PRIMARY KEY,
    -- the payload's parsing-log row (NULL once the parsing log's retention removed it)
    parsing_log_id  bigint UNIQUE REFERENCES mqtt_parsing_log (id) ON DELETE SET NULL,
    site_id         bigint NOT NULL REFERENCES site (id) ON DELETE CASCADE,
    connection_id   bigint REFERENCES mqtt_connection (id) ON DELETE SET NULL,
    -- when the child received the message (the event's time, as in the parsing log)
    received_at     timestamptz NOT NULL,
    topic           text NOT NULL,
    parser_name     text NOT NULL,
    error_type      text NOT NULL CHECK (error_type IN ('VALIDATION_ERROR', 'PARSE_ERROR', 'UNKNOWN_ERROR')),
    error_message   text NOT NULL,
    -- the payload, or only its beginning when it was too large to keep whole
    payload         bytea NOT NULL,
    -- the size of the whole payload
    payload_bytes   bigint NOT NULL CHECK (payload_bytes >= octet_length(payload)),
    -- payload is the whole payload, received on a valid topic: replay may store it
    replayable      boolean NOT NULL,
    -- what replay did with it, the last time it tried
    replayed_at     timestamptz,
    replay_outcome  text CHECK (replay_outcome IN ('stored', 'failed')),
    replay_parser   text,
    replay_records  integer,
    replay_error_type text CHECK (replay_error_type IN ('VALIDATION_ERROR', 'PARSE_ERROR', 'UNKNOWN_ERROR')),
    replay_error    text,
    CONSTRAINT mqtt_quarantine_replayable_is_whole
        CHECK (NOT replayable OR payload_bytes = octet_length(payload)),
    CONSTRAINT mqtt_quarantine_replay_complete
        CHECK ((replayed_at IS NULL) = (replay_outcome IS NULL))
);

-- replay's filters (a site, a time range) and the retention's age
CREATE INDEX mqtt_quarantine_site_received_idx ON mqtt_quarantine (site_id, received_at);
CREATE INDEX mqtt_quarantine_received_idx ON mqtt_quarantine (received_at);

-- The quarantined payloads that match replay's filters (each NULL: no
-- filter): a site, received in [since, until), of these error types. One
-- definition for every query of replay; a plain SQL function, so the planner
-- inlines it.
CREATE FUNCTION mqtt_quarantine_matching(site bigint, since timestamptz, until timestamptz, error_types text[])
RETURNS SETOF mqtt_quarantine LANGUAGE sql STABLE AS $$
SELECT * FROM mqtt_quarantine q
WHERE (site IS NULL OR q.site_id = site)
  AND (since IS NULL OR q.received_at >= since)
  AND (until IS NULL OR q.received_at < until)
  AND (error_types IS NULL OR q.error_type = ANY (error_types))
$$;
