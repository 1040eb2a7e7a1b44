-- 0002: the decision latency in its parts, as the line's journal now records them (sorter/line/records.py,
-- sorter/core/messages.py LatencyParts): settle + field_wait + compute + plc = latency_ms.
ALTER TABLE plant.pieces ADD COLUMN settle_ms double precision;
ALTER TABLE plant.pieces ADD COLUMN field_wait_ms double precision;
ALTER TABLE plant.pieces ADD COLUMN compute_ms double precision;
ALTER TABLE plant.pieces ADD COLUMN plc_ms double precision;
