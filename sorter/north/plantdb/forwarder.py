"""Ships the line's journal (its SQLite records, sorter/line/records.py) to the plant's PostgreSQL.

The SQLite file stays the line's journal: the line sorts and records with no network at all. A thread
`plantdb` reads the journal's rows in rowid order after a watermark and writes them to the central
database in batches, one transaction per batch holding both the rows and the new watermark, so:

- at-least-once: the watermark moves only with the rows it covers; after an outage or a restart the
  forwarder resumes from the watermark stored in the central database;
- idempotent: rows are upserted on (line, run, piece id) - a batch sent twice (a lost commit answer, a
  watermark reset) changes nothing;
- a piece row is written when the piece is seen (outcome `seen`), completed when it is decided and
  updated once its eject command's fate is known (`planned`, `pending` until then: a second at most);
  a run that died leaves rows open, which the next start closes (`lost_in_restart`). The forwarder
  stops before the first open row and waits for it at most `pending_grace_s` from when it met it, so a
  row leaves the line in its final state; after the grace it is forwarded as it is and keeps that
  outcome centrally (the journal keeps no change log to send the update later): counted in
  `forwarded_pending` and logged. At the final drain (the service stopped and closed its rows) nothing
  waits.

The lag (age of the oldest row not yet shipped, rows waiting) is a Prometheus metric and the alarm
`plant_db_lag` past `lag_alarm_s`.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg.types.json import Jsonb

from sorter.config import PlantDbConfig
from sorter.core.alarms import Condition
from sorter.core.messages import OPEN_OUTCOMES
from sorter.core.timebase import REAL_TIME
from sorter.line.records import PIECE_COLUMNS
from sorter.north.plantdb.migrate import PlantDbError, migrate

# a row in one of these states will still change (decided, answered, or closed by the next start)
OPEN = frozenset(str(o) for o in OPEN_OUTCOMES)
_JSON = ("probs", "image_probs")
_PG_COLUMNS = ["line", "run_id", "piece_id", *(("field_mt" if c == "field_mT" else c) for c in PIECE_COLUMNS[1:])]
# everything but the key: a row re-sent (seen, then decided; a resend after a lost watermark) is the newer
_UPDATED = tuple(c for c in _PG_COLUMNS if c not in ("line", "run_id", "piece_id", "t_wall"))
AMEND_MAX = 10_000  # rows forwarded open whose final state is still to be sent (in memory)
_DELETE_OLD = "DELETE FROM plant.pieces WHERE line = %s AND run_id = %s AND piece_id = %s AND t_wall = %s"
_UPSERT_PIECES = (
    f"INSERT INTO plant.pieces ({', '.join(_PG_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_PG_COLUMNS))}) "
    "ON CONFLICT (line, run_id, piece_id, t_wall) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _UPDATED)
    + ", forwarded_at = now()"
)
_UPSERT_EVENTS = (
    "INSERT INTO plant.events (line, run_id, event_no, t_wall, kind, detail) VALUES (%s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (line, run_id, event_no, t_wall) DO NOTHING"
)
_WATERMARK = (
    "INSERT INTO plant.forwarder_watermarks (line, source, last_rowid, last_key) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (line, source) DO UPDATE SET last_rowid = EXCLUDED.last_rowid, last_key = EXCLUDED.last_key, "
    "updated_at = now()"
)


@dataclass
class Batch:
    rows: list[dict[str, Any]]  # with `rowid`
    blocked: bool  # stopped before an open row


@dataclass
class Hold:
    """The open row the forwarder is waiting on, and since when (the forwarder's wall clock)."""

    key: str
    since: float


def cut_at_open(
    rows: list[dict[str, Any]], hold: Hold | None, *, now: float, grace_s: float, final: bool
) -> tuple[Batch, Hold | None]:
    """The rows to ship now: up to the first open row (seen, planned, pending), which is waited on for at
    most `grace_s` from when the forwarder first met it; `final` (the service has stopped): no wait."""
    for i, r in enumerate(rows):
        if r["outcome"] not in OPEN or final:
            continue
        key = piece_key(r)
        if hold is None or hold.key != key:
            return Batch(rows[:i], True), Hold(key, now)
        if now - hold.since < grace_s:
            return Batch(rows[:i], True), hold
        # waited long enough: this one goes as it is, the rest of the batch with it
    return Batch(rows, False), None


def _ts(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def piece_key(row: dict[str, Any]) -> str:
    return f"{row['run_id']}/{row['id']}"


def event_key(row: dict[str, Any]) -> str:
    return f"{row['run_id']}/{row['t_wall']!r}/{row['kind']}"


class Journal:
    """Read-only access to the line's SQLite journal (its own connection, on the forwarder's thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=2.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA query_only = 1")

    def close(self) -> None:
        self._db.close()

    def pieces_after(self, rowid: int, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` piece rows after `rowid`, in rowid order."""
        return [
            dict(r)
            for r in self._db.execute(
                "SELECT rowid AS rowid, * FROM pieces WHERE rowid > ? ORDER BY rowid LIMIT ?", (rowid, limit)
            )
        ]

    def rows_at(self, rowids: list[int]) -> list[dict[str, Any]]:
        """The piece rows with these rowids (those that exist)."""
        if not rowids:
            return []
        marks = ",".join("?" * len(rowids))
        return [
            dict(r) for r in self._db.execute(f"SELECT rowid AS rowid, * FROM pieces WHERE rowid IN ({marks})", rowids)
        ]

    def events_after(self, rowid: int, limit: int) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self._db.execute(
                "SELECT rowid AS rowid, * FROM events WHERE rowid > ? ORDER BY rowid LIMIT ?", (rowid, limit)
            )
        ]

    def key_at(self, table: str, rowid: int) -> str | None:
        """The identity of the row at `rowid` (None: no such row), to check a stored watermark."""
        cols = "run_id, id" if table == "pieces" else "run_id, t_wall, kind"
        r = self._db.execute(f"SELECT {cols} FROM {table} WHERE rowid = ?", (rowid,)).fetchone()
        if r is None:
            return None
        return piece_key(dict(r)) if table == "pieces" else event_key(dict(r))

    def backlog(self, rowid: int) -> tuple[int, float | None]:
        """(piece rows after `rowid`, t_wall of the first of them)."""
        n, t = self._db.execute("SELECT count(*), min(t_wall) FROM pieces WHERE rowid > ?", (rowid,)).fetchone()
        return int(n), t

    def count_pieces(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM pieces").fetchone()[0])


def piece_values(line: str, r: dict[str, Any]) -> tuple[Any, ...]:
    vals: list[Any] = [line, r["run_id"], r["id"]]
    for c in PIECE_COLUMNS[1:]:
        v = r[c]
        if c == "t_wall":
            v = _ts(v)
        elif c in _JSON and v is not None:
            v = Jsonb(json.loads(v))
        vals.append(v)
    return tuple(vals)


class RecordForwarder:
    """A companion of the line (start, condition) and a closer (`close`: the final drain, then the end)."""

    name = "plant_db"

    def __init__(
        self,
        cfg: PlantDbConfig,
        line: str,
        journal: Path,
        *,
        run_id: str | None,
        log: Any,
        connect: Callable[..., Any] = psycopg.connect,
        wall: Callable[[], float] = REAL_TIME.wall,
    ) -> None:
        """`wall`: the clock the journal's t_wall comes from (the line's Timebase), for the lag and the grace."""
        self.cfg = cfg
        self.line = line
        self.journal_path = journal
        self.run_id = run_id  # the running service's; None once it has stopped (close): no row changes any more
        self.log = log
        self._connect_fn = connect
        self._wall = wall
        self._conn: Any = None
        self._journal: Journal | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._days: set[str] = set()
        self.watermark = {"pieces": 0, "events": 0}
        self.forwarded = 0  # piece rows written (each batch's, re-sends included)
        self.forwarded_events = 0
        self.forwarded_pending = 0  # rows shipped while still open (after the grace)
        self.amended = 0  # of those, sent again once final
        self.amend_dropped = 0  # of those, forgotten (more than AMEND_MAX waiting)
        self.lag_rows = 0
        self.lag_s = 0.0
        self.error: str | None = None
        self.online = False
        self._events_left = True
        self._hold: Hold | None = None
        # rows shipped while still open: journal rowid -> the t_wall they were shipped with. Their final state
        # is sent when the journal has it (the old row deleted first: a decided row has a new t_wall, which is
        # in the central key). Kept in memory: after a restart the next start has closed them in the journal.
        self._amend: dict[int, float] = {}
        self._gen = 0  # bumped by close(): a round that starts after it sees the service gone
        self._done_gen = -1  # the last generation whose round found nothing left to ship
        self._drained = threading.Condition()

    # --- companion ---
    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="plantdb", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Nothing yet: the service writes its last rows after its companions stop; `close` ships them."""

    def close(self) -> None:
        """After the journal's last write (a closer of the service): ship what is left, at most final_drain_s."""
        with self._drained:
            self.run_id = None  # the service is gone: no row will change any more
            self._gen += 1
            gen = self._gen
        self._wake.set()
        if self._thread is not None and self._thread.is_alive():
            with self._drained:
                done = self._drained.wait_for(lambda: self._done_gen >= gen, self.cfg.final_drain_s)
            if not done:
                self.log.warning(
                    "plant database: rows left in the journal, forwarded at the next start",
                    rows=self.lag_rows,
                    error=self.error,
                )
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10.0)

    def condition(self) -> Condition | None:
        if self.lag_s > self.cfg.lag_alarm_s:
            return Condition(
                "plant_db_lag",
                f"{self.lag_rows} records not yet in the plant database, the oldest {self.lag_s:.0f} s old"
                + (f" ({self.error})" if self.error else ""),
                "check the plant database and the network to it; the records are kept in the line's journal",
            )
        return None

    # --- the thread ---
    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            gen = self._gen
            try:
                if self._journal is None:  # first, so that the lag is known (and alarmed) without the database
                    self._journal = Journal(self.journal_path)
                if self._conn is None:
                    self._open()
                    backoff = 0.5
                more = self.sync_once()
            except (psycopg.Error, PlantDbError, OSError) as exc:
                self._lost(exc)
                self._update_lag()
                self._wake.wait(backoff)
                self._wake.clear()
                backoff = min(backoff * 2, self.cfg.reconnect_max_s)
                continue
            except sqlite3.Error as exc:  # the journal locked or gone for a moment: the next round retries
                self.error = f"journal {self.journal_path}: {exc}"
                self.log.warning("plant database: cannot read the journal", error=str(exc))
                more = False
            if not more:
                if self.lag_rows == 0 and not self._events_left and not self._amend:
                    with self._drained:
                        self._done_gen = gen
                        self._drained.notify_all()
                self._wake.wait(self.cfg.interval_s)
                self._wake.clear()
        self._close_conn()
        if self._journal is not None:
            self._journal.close()

    def _open(self) -> None:
        try:
            conn = self._connect_fn(
                self.cfg.url,
                connect_timeout=self.cfg.connect_timeout_s,
                autocommit=True,
                application_name=f"sorter-forwarder-{self.line}"[:63],
                # a server or network that goes silent (no reset) must fail the batch in seconds, not hours
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
                tcp_user_timeout=15000,
            )
        except psycopg.Error as exc:
            raise PlantDbError(f"cannot connect to the plant database: {_one_line(exc)}") from None
        try:
            applied = migrate(conn)
            if applied:
                self.log.info("plant database schema migrated", versions=applied)
            self._load_watermarks(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        if not self.online:
            self.log.info("plant database connected", watermark=self.watermark)
        self.online = True
        self.error = None

    def _load_watermarks(self, conn: Any) -> None:
        assert self._journal is not None
        for source in ("pieces", "events"):
            row = conn.execute(
                "SELECT last_rowid, last_key FROM plant.forwarder_watermarks WHERE line = %s AND source = %s",
                (self.line, source),
            ).fetchone()
            rowid, key = (int(row[0]), row[1]) if row else (0, "")
            if rowid and self._journal.key_at(source, rowid) != key:
                # another journal than the one the watermark was made with (a new disk, a restored file):
                # ship it all again; the upserts make the rows already there cost nothing
                self.log.warning(
                    "plant database: the journal changed under the watermark; sending it whole", source=source
                )
                rowid = 0
            self.watermark[source] = rowid

    def _lost(self, exc: BaseException) -> None:
        msg = _one_line(exc)
        if self.online or self.error != msg:
            self.log.warning("plant database unreachable: the journal keeps the records", error=msg)
        self.error = msg
        self.online = False
        self._close_conn()

    def _close_conn(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def sync_once(self) -> bool:
        """Ship one batch of pieces and one of events; True if there may be more right away."""
        assert self._journal is not None and self._conn is not None
        batch, self._hold = cut_at_open(
            self._journal.pieces_after(self.watermark["pieces"], self.cfg.batch_rows),
            self._hold,
            now=time.monotonic(),
            grace_s=self.cfg.pending_grace_s,
            final=self.run_id is None,
        )
        events = self._journal.events_after(self.watermark["events"], self.cfg.batch_rows)
        self._events_left = len(events) == self.cfg.batch_rows
        amends = self._amendable()
        if batch.rows or events or amends:
            times = [r["t_wall"] for r in (*batch.rows, *events, *(r for r, _ in amends))]
            self._ensure_partitions(times)
            with self._conn.transaction(), self._conn.cursor() as cur:
                for r, old_t in amends:
                    cur.execute(_DELETE_OLD, (self.line, r["run_id"], r["id"], _ts(old_t)))
                    cur.execute(_UPSERT_PIECES, piece_values(self.line, r))
                if batch.rows:
                    cur.executemany(_UPSERT_PIECES, [piece_values(self.line, r) for r in batch.rows])
                    last = batch.rows[-1]
                    cur.execute(_WATERMARK, (self.line, "pieces", last["rowid"], piece_key(last)))
                if events:
                    cur.executemany(
                        _UPSERT_EVENTS,
                        [
                            (self.line, e["run_id"], e["rowid"], _ts(e["t_wall"]), e["kind"], e["detail"])
                            for e in events
                        ],
                    )
                    cur.execute(_WATERMARK, (self.line, "events", events[-1]["rowid"], event_key(events[-1])))
            # committed: only now does the watermark move
            if batch.rows:
                self.watermark["pieces"] = batch.rows[-1]["rowid"]
                self.forwarded += len(batch.rows)
                still_open = [r for r in batch.rows if r["outcome"] in OPEN]
                if still_open:
                    self.forwarded_pending += len(still_open)
                    self.log.warning(
                        "plant database: pieces forwarded with their outcome still open; their final state follows",
                        n=len(still_open),
                    )
                    for r in still_open:
                        if len(self._amend) >= AMEND_MAX:
                            self._amend.pop(next(iter(self._amend)))
                            self.amend_dropped += 1
                        self._amend[r["rowid"]] = r["t_wall"]
            if events:
                self.watermark["events"] = events[-1]["rowid"]
                self.forwarded_events += len(events)
            for r, _ in amends:
                del self._amend[r["rowid"]]
                self.amended += 1
        self._update_lag()
        return len(batch.rows) == self.cfg.batch_rows or len(events) == self.cfg.batch_rows

    def _amendable(self) -> list[tuple[dict[str, Any], float]]:
        """Rows shipped open whose journal row has closed since (or is final because the service stopped)."""
        if not self._amend or self._journal is None:
            return []
        out = []
        for r in self._journal.rows_at(list(self._amend)[:500]):
            if r["outcome"] not in OPEN or self.run_id is None:
                out.append((r, self._amend[r["rowid"]]))
        return out

    def _ensure_partitions(self, times: list[float]) -> None:
        days = {_ts(t).strftime("%Y-%m-%d"): t for t in times}
        new = [t for d, t in days.items() if d not in self._days]
        if new:
            self._conn.execute("SELECT plant.ensure_day_partitions(%s, %s)", (_ts(min(new)), _ts(max(new))))
            self._days.update(days)

    def _update_lag(self) -> None:
        if self._journal is None:
            return
        try:
            n, t_first = self._journal.backlog(self.watermark["pieces"])
        except sqlite3.Error:
            return
        self.lag_rows = n
        self.lag_s = max(0.0, self._wall() - t_first) if t_first is not None else 0.0

    # --- Prometheus ---
    def collector(self) -> Collector:
        return _ForwarderCollector(self)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _ForwarderCollector(Collector):
    def __init__(self, fwd: RecordForwarder) -> None:
        self.fwd = fwd

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        f = self.fwd
        yield GaugeMetricFamily(
            "sorter_plantdb_lag_seconds", "age of the oldest piece record not yet in the plant database", f.lag_s
        )
        yield GaugeMetricFamily("sorter_plantdb_lag_rows", "piece records not yet in the plant database", f.lag_rows)
        yield GaugeMetricFamily("sorter_plantdb_online", "1 while connected to the plant database", f.online)
        yield CounterMetricFamily(
            "sorter_plantdb_forwarded_rows", "piece records written to the plant database", f.forwarded
        )
