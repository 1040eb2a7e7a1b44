"""The journal forwarder against a real PostgreSQL on loopback: migrations, partitions, batches,
idempotence, resume from the watermark after an outage and a restart, the lag and its alarm."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from sim.plantenv import Postgres, postgres_missing
from sorter.config import PlantDbConfig
from sorter.line.records import RecordStore
from sorter.north.plantdb.forwarder import RecordForwarder
from sorter.north.plantdb.migrate import migrate, migrations
from tests.conftest import wait_until_blocking

pytestmark = pytest.mark.wire


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    if (why := postgres_missing()) is not None:
        from tests.conftest import skip_or_fail_in_ci

        skip_or_fail_in_ci(why)
    db = Postgres(tmp_path_factory.mktemp("pg"))
    db.init()
    yield db
    db.cleanup()


def rows(pg: Postgres, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.url) as c:
        return c.execute(sql, args).fetchall()


def add(store: RecordStore, ids: range, *, outcome: str = "accepted", t: float | None = None) -> None:
    for i in ids:
        store.add_piece(
            {
                "id": i,
                "t_wall": time.time() if t is None else t,
                "t_capture": 1.0,
                "count": i * 10,
                "count32": i * 10,
                "fraction": "ndfeb",
                "outcome": outcome,
                "probs": {"ndfeb": 0.95, "steel": 0.05},
                "cls": "ndfeb",
                "confidence": 0.95,
                "field_mT": 12.5,
            }
        )
    store.flush()


def forwarder(pg: Postgres, journal: Path, line: str, run_id: str | None, **kw: Any) -> RecordForwarder:
    cfg = PlantDbConfig(url=pg.url, interval_s=0.05, reconnect_max_s=0.3, **kw)
    return RecordForwarder(cfg, line, journal, run_id=run_id, log=structlog.get_logger())


def test_migrations_apply_once_and_tables_are_partitioned_by_day(pg: Postgres) -> None:
    with psycopg.connect(pg.url, autocommit=True) as c:
        first = migrate(c)
        again = migrate(c)
    assert again == [] and set(first) <= {m.version for m in migrations()}
    assert rows(pg, "SELECT max(version) FROM plant.schema_migrations")[0][0] == len(migrations())
    kinds = dict(rows(pg, "SELECT relname, relkind::text FROM pg_class WHERE relname IN ('pieces', 'events')"))
    assert kinds == {"pieces": "p", "events": "p"}  # declaratively partitioned


def test_batches_resume_and_idempotence(pg: Postgres, tmp_path: Path) -> None:
    journal = tmp_path / "records.sqlite"
    store = RecordStore(journal, "run-a")
    day1 = time.mktime((2026, 3, 1, 23, 59, 0, 0, 0, -1))
    add(store, range(0, 5), t=day1)  # rows of two days land in two partitions
    add(store, range(5, 1205))
    store.event("start", model="m-1")
    store.flush()
    fwd = forwarder(pg, journal, "L-resume", run_id=None, batch_rows=100)
    asyncio.run(fwd.start())
    wait_until_blocking(lambda: fwd.lag_rows == 0 and fwd.forwarded == 1205, 20, "first pass")
    assert fwd.forwarded_events == 1
    fwd.close()
    assert rows(pg, "SELECT count(*), count(DISTINCT piece_id) FROM plant.pieces WHERE line='L-resume'")[0] == (
        1205,
        1205,
    )
    parts = {r[0] for r in rows(pg, "SELECT tableoid::regclass::text FROM plant.pieces WHERE line='L-resume'")}
    assert len(parts) == 2, parts
    row = rows(
        pg,
        "SELECT probs, field_mt, outcome, extract(epoch FROM t_wall) FROM plant.pieces "
        "WHERE line='L-resume' AND piece_id=0",
    )[0]
    assert row[0] == {"ndfeb": 0.95, "steel": 0.05} and row[1] == 12.5 and row[2] == "accepted"
    assert float(row[3]) == pytest.approx(day1, abs=1e-5)

    # a new forwarder (a restart) resumes at the stored watermark: only the new rows go
    add(store, range(1205, 1210))
    fwd2 = forwarder(pg, journal, "L-resume", run_id=None)
    asyncio.run(fwd2.start())
    wait_until_blocking(lambda: fwd2.forwarded == 5 and fwd2.lag_rows == 0, 10, "resume")
    fwd2.close()
    assert fwd2.watermark["pieces"] == 1210

    # the watermark lost (a restore of the database): everything is sent again, nothing doubles
    rows(pg, "DELETE FROM plant.forwarder_watermarks WHERE line='L-resume' RETURNING line")
    fwd3 = forwarder(pg, journal, "L-resume", run_id=None, batch_rows=1000)
    asyncio.run(fwd3.start())
    wait_until_blocking(lambda: fwd3.forwarded == 1210, 20, "full resend")
    fwd3.close()
    assert rows(pg, "SELECT count(*) FROM plant.pieces WHERE line='L-resume'")[0][0] == 1210
    assert rows(pg, "SELECT count(*) FROM plant.events WHERE line='L-resume'")[0][0] == 1
    store.close()


def test_pending_rows_wait_for_their_outcome(pg: Postgres, tmp_path: Path) -> None:
    journal = tmp_path / "records.sqlite"
    store = RecordStore(journal, "run-p")
    add(store, range(0, 3))
    add(store, range(3, 4), outcome="pending")
    add(store, range(4, 6))
    fwd = forwarder(pg, journal, "L-pending", run_id="run-p")
    asyncio.run(fwd.start())
    wait_until_blocking(lambda: fwd.forwarded == 3, 10, "rows before the pending one")
    time.sleep(0.3)
    assert fwd.forwarded == 3 and fwd.lag_rows == 3  # held back: piece 3 is about to change
    store.update_outcome(3, "accepted", 7, 1.0, 80.0)
    store.flush()
    wait_until_blocking(lambda: fwd.forwarded == 6, 10, "the rest once decided")
    fwd.close()
    got = dict(rows(pg, "SELECT piece_id, outcome FROM plant.pieces WHERE line='L-pending'"))
    assert got == {i: "accepted" for i in range(6)}
    store.close()


def test_outage_lag_alarm_and_catch_up(pg: Postgres, tmp_path: Path) -> None:
    journal = tmp_path / "records.sqlite"
    store = RecordStore(journal, "run-o")
    add(store, range(0, 10))
    fwd = forwarder(pg, journal, "L-outage", run_id="run-o", lag_alarm_s=0.5)
    asyncio.run(fwd.start())
    wait_until_blocking(lambda: fwd.forwarded == 10, 10, "before the outage")
    pg.stop()
    try:
        add(store, range(10, 50))
        wait_until_blocking(lambda: not fwd.online, 10, "the outage noticed")
        wait_until_blocking(lambda: fwd.condition() is not None, 10, "lag alarm")
        cond = fwd.condition()
        assert cond is not None and cond.name == "plant_db_lag" and "40 records" in cond.cause
    finally:
        pg.start()
    wait_until_blocking(lambda: fwd.forwarded == 50 and fwd.lag_rows == 0, 15, "caught up")
    assert fwd.condition() is None
    add(store, range(50, 52))
    store.close()
    fwd.close()  # the final drain ships what the journal got last
    assert rows(pg, "SELECT count(*), count(DISTINCT piece_id) FROM plant.pieces WHERE line='L-outage'")[0] == (
        52,
        52,
    )


def test_plant_report_equals_each_lines_own_report(pg: Postgres, tmp_path: Path) -> None:
    from sorter.config import load_config
    from sorter.reports.plant import make_plant_report
    from sorter.reports.shift import summarise_records

    cfg = load_config(Path(__file__).parent.parent / "config" / "sim.yaml")
    t0 = time.time() - 100
    journals = {}
    for k, line in enumerate(("R-1", "R-2")):
        journal = journals[line] = tmp_path / f"{line}.sqlite"
        store = RecordStore(journal, f"run-{line}")
        store.event("start", model="m-1")
        for i in range(40 + 10 * k):
            cls, frac, outcome = [
                ("ndfeb", "ndfeb", "accepted"),
                ("ferrite", "ferrite_smco", "expired"),  # no air: ends in residue
                ("steel", "residue", "no_eject"),
            ][i % 3]
            store.add_piece(
                {
                    "id": i,
                    "t_wall": t0 + i,
                    "t_capture": 0.0,
                    "count": i,
                    "count32": i,
                    "fraction": frac,
                    "outcome": outcome,
                    "cls": cls,
                    "confidence": 0.9,
                    "probs": {cls: 0.9},
                    "area_mm2": 100.0 + i,
                    "length_mm": 12.0,
                    "x0_mm": 0.0,
                    "x1_mm": 10.0,
                    "latency_ms": 50.0 + i,
                    "seq": i,
                }
            )
        store.event("stop", pieces=40 + 10 * k)
        store.close()
        fwd = forwarder(pg, journal, line, run_id=None)
        asyncio.run(fwd.start())
        fwd.close()
    out = tmp_path / "plant.html"
    s = make_plant_report(cfg, out, pg.url, lines=["R-1", "R-2"], summary_json=tmp_path / "plant.json")
    assert out.read_text().count("<h1>Line ") == 2
    for line, journal in journals.items():
        _, own = summarise_records(cfg, db=journal)
        mine = s["lines"][line]
        assert mine["fractions"] == own["fractions"]
        assert mine["mass_balance"] == own["mass_balance"] and mine["outcomes"] == own["outcomes"]
        assert mine["decision_latency_ms"] == own["decision_latency_ms"]
    plant = s["plant"]
    assert plant["pieces"] == 90 and plant["mass_balance"]["closes"] and plant["mass_balance"]["lines_close"]
    assert plant["mass_est_kg"] == pytest.approx(sum(s["lines"][x]["mass_est_kg"] for x in journals), abs=0.002)
    # i % 3: ndfeb ejected (14 + 17); ferrite expired and steel both end in residue (26 + 33)
    assert plant["fractions"]["residue"]["count"] == 59 and plant["fractions"]["ndfeb"]["count"] == 31
    # the command line: the same report through `sorter report --db URL --line ...`; a line with no rows is an error
    from typer.testing import CliRunner

    from sorter.cli import app

    base = ["report", "--config", str(Path(__file__).parent.parent / "config" / "sim.yaml"), "--db", pg.url]
    r = CliRunner().invoke(app, [*base, "--line", "R-1", "--out", str(tmp_path / "r1.html")])
    assert r.exit_code == 0 and "40 pieces from lines R-1" in r.output, r.output
    r = CliRunner().invoke(app, [*base, "--line", "R-9", "--out", str(tmp_path / "r9.html")])
    assert r.exit_code == 2 and "no piece records for R-9" in r.output, r.output


def test_database_away_from_the_start_is_alarmed_by_the_lag(tmp_path: Path) -> None:
    """No database at all when the line starts: the journal's backlog is still measured and alarmed."""
    from sim.plantenv import free_port

    journal = tmp_path / "records.sqlite"
    store = RecordStore(journal, "run-n")
    add(store, range(0, 3), t=time.time() - 5)
    cfg = PlantDbConfig(url=f"postgresql://plant@127.0.0.1:{free_port()}/plant", lag_alarm_s=1, final_drain_s=0.2)
    fwd = RecordForwarder(cfg, "L-none", journal, run_id="run-n", log=structlog.get_logger())
    asyncio.run(fwd.start())
    wait_until_blocking(lambda: fwd.condition() is not None, 5, "lag alarm without a database")
    cond = fwd.condition()
    assert cond is not None and "3 records" in cond.cause and "cannot connect" in cond.cause
    assert not fwd.online
    fwd.close()
    store.close()


def test_a_row_shipped_open_is_replaced_by_its_final_state(pg: Postgres, tmp_path: Path) -> None:
    """Held longer than the grace, an open (`seen`) row goes as it is; once the journal has it decided, with
    the decision's own t_wall, the central row is replaced (not doubled: t_wall is in the central key)."""
    import sqlite3

    journal = tmp_path / "records.sqlite"
    store = RecordStore(journal, "run-s")
    t_seen = time.time() - 2
    add(store, range(0, 1), outcome="seen", t=t_seen)
    add(store, range(1, 3))
    fwd = forwarder(pg, journal, "L-amend", run_id="run-s", pending_grace_s=0.3)
    asyncio.run(fwd.start())
    wait_until_blocking(lambda: fwd.forwarded == 3, 10, "all three, the open one after the grace")
    assert fwd.forwarded_pending == 1
    t_decided = time.time()
    con = sqlite3.connect(journal)  # what the service's next flush does when it decides the piece
    with con:
        con.execute("UPDATE pieces SET outcome = 'accepted', t_wall = ?, cls = 'ndfeb' WHERE id = 0", (t_decided,))
    con.close()
    wait_until_blocking(lambda: fwd.amended == 1, 10, "the final state sent")
    got = rows(
        pg,
        "SELECT outcome, extract(epoch FROM t_wall), cls FROM plant.pieces WHERE line='L-amend' AND piece_id=0",
    )
    assert len(got) == 1 and got[0][0] == "accepted" and float(got[0][1]) == pytest.approx(t_decided, abs=1e-5)
    assert rows(pg, "SELECT count(*) FROM plant.pieces WHERE line='L-amend'")[0][0] == 3
    fwd.close()
    store.close()
