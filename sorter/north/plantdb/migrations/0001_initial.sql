-- 0001: every line's piece records and events, partitioned by day (UTC), and the forwarders' watermarks.
-- Applied by sorter/north/plantdb/migrate.py inside one transaction, under an advisory lock.

-- One row per piece, as in the line's SQLite journal (sorter/line/records.py). The key is the line, the
-- run of its service and the piece id (unique within a run); t_wall belongs to it only because a key of a
-- partitioned table must hold the partition column: a piece's t_wall is written once and never changes.
CREATE TABLE plant.pieces (
    line         text             NOT NULL,
    run_id       text             NOT NULL,
    piece_id     bigint           NOT NULL,
    t_wall       timestamptz      NOT NULL,  -- the decision
    t_capture    double precision,           -- the line PC's monotonic seconds: only for differences
    count        bigint,
    count32      bigint,
    x_mm         double precision,
    x0_mm        double precision,
    x1_mm        double precision,
    length_mm    double precision,
    area_mm2     double precision,
    cameras      text,
    n_views      integer,
    probs        jsonb,
    cls          text,
    confidence   double precision,
    fraction     text             NOT NULL,
    bank         text,
    seq          bigint,
    valve_mask   bigint,
    open_at      bigint,
    open_for     bigint,
    outcome      text             NOT NULL,
    t_accepted   double precision,
    latency_ms   double precision,
    model        text,
    image_probs  jsonb,
    field_mt     double precision,
    field_state  text,
    threshold    double precision,
    forwarded_at timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (line, run_id, piece_id, t_wall)
) PARTITION BY RANGE (t_wall);

CREATE INDEX pieces_line_time ON plant.pieces (line, t_wall);

-- The journal's events (start, stop, state, alarm, model_swap ...): the report's timelines. event_no is the
-- row's number in the line's journal.
CREATE TABLE plant.events (
    line         text        NOT NULL,
    run_id       text        NOT NULL,
    event_no     bigint      NOT NULL,
    t_wall       timestamptz NOT NULL,
    kind         text        NOT NULL,
    detail       jsonb,
    forwarded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (line, run_id, event_no, t_wall)
) PARTITION BY RANGE (t_wall);

CREATE INDEX events_line_time ON plant.events (line, t_wall);

-- How far each line's forwarder got in its journal, written in the same transaction as the rows.
CREATE TABLE plant.forwarder_watermarks (
    line       text        NOT NULL,
    source     text        NOT NULL,  -- pieces | events
    last_rowid bigint      NOT NULL,  -- the journal's rowid of the last row shipped
    last_key   text        NOT NULL,  -- that row's identity, to notice a journal that was replaced
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (line, source)
);

-- The day partitions of both tables covering [lo, hi], created when missing. Serialised by an advisory
-- lock: two forwarders creating the same partition at once would otherwise collide in the catalogue.
CREATE FUNCTION plant.ensure_day_partitions(lo timestamptz, hi timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    d      date;
    parent text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('plant.ensure_day_partitions'));
    FOR d IN SELECT generate_series((lo AT TIME ZONE 'UTC')::date, (hi AT TIME ZONE 'UTC')::date, interval '1 day')::date
    LOOP
        FOREACH parent IN ARRAY ARRAY['pieces', 'events']
        LOOP
            EXECUTE format(
                'CREATE TABLE IF NOT EXISTS plant.%I PARTITION OF plant.%I FOR VALUES FROM (%L) TO (%L)',
                parent || '_' || to_char(d, 'YYYYMMDD'), parent,
                d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC');
        END LOOP;
    END LOOP;
END
$$;
