"""End to end: a short fault run (`sorter demo --faults`), the service a process of its own, SIGKILLed and
restarted, the virtual PLC power-cycled, the records disk full for 3 s; every piece accounted for (issue 15)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail_in_ci

pytestmark = pytest.mark.line

ROOT = Path(__file__).resolve().parents[1]


def test_a_plc_restart_a_killed_service_and_a_full_disk_lose_no_piece_silently(tmp_path):
    if os.geteuid() != 0:  # records-disk-full mounts a tmpfs (docs/faults.md)
        skip_or_fail_in_ci("records-disk-full needs root to mount its tmpfs")
    spec = "plc-restart@3,service-kill@10,records-disk-full:3s@25"
    r = subprocess.run(
        [sys.executable, "-m", "sorter", "demo", "--duration", "32", "--seed", "5", "--faults", spec, "--json",
         "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert r.stdout, r.stderr[-3000:]
    report = json.loads(r.stdout)
    print(json.dumps({k: v for k, v in report.items() if k != "fractions"}, indent=1))
    faults = {f["name"]: f for f in report["faults"]}
    assert set(faults) == {"plc-restart", "service-kill", "records-disk-full:3s"}
    for f in faults.values():  # each noticed after it happened, and the line back in Execute after that
        assert f["at_s"] <= f["detected_s"] <= f["recovered_s"], f
    # the restart was noticed from the PLC's registers (seq back at 0), not only as a lost link
    log = (tmp_path / "service.log").read_text()
    assert "ALARM plc restarted" in log
    # the PLC's watchdog stopped the air 500 ms after the last heartbeat (the simulated PLC scans every 2 ms on
    # a shared machine: its trip may come late when the machine is busy), and nothing fired after the trip
    kill = faults["service-kill"]
    assert 0 <= report["fail_safe_ms"] <= kill["watchdog_trip_ms"] <= 800
    # every fed piece has a record or passed while no service or camera looked, in a named window; on a machine
    # too busy for the simulation, pieces the starved simulator placed late may be missing too (as test_demo
    # allows for counted faults): then that fault is asserted, not allowed for
    lost = report["pieces_fed"] - report["pieces_accounted"] - report["pieces_unseen"]
    assert lost == report["pieces_lost"]
    if lost:
        assert report["lost_fed_late"] > 0, f"pieces lost with no fault counted: {report['lost_piece_ids']}"
    assert report["identity_holds"] is (lost == 0)
    assert any(w["what"] == "service-kill: no service" and w["pieces_unseen"] > 0 for w in report["unseen_windows"])
    assert report["service_starts"] == 2 and len(report["records_by_run"]) == 2
    # what the killed run had seen and not closed is lost_in_restart, as many as the restarted service said
    db = sqlite3.connect(tmp_path / "records.sqlite")
    lost = db.execute("SELECT COUNT(*) FROM pieces WHERE outcome='lost_in_restart'").fetchone()[0]
    open_rows = db.execute("SELECT COUNT(*) FROM pieces WHERE outcome IN ('seen','planned','pending')").fetchone()[0]
    said = [json.loads(d) for (d,) in db.execute("SELECT detail FROM events WHERE kind='lost_in_restart'")]
    db.close()
    assert open_rows == 0
    assert lost == sum(d["pieces"] for d in said)
    # the full disk: noticed, its rows held in memory and written once it had room again (none refused)
    assert "records_disk" in log or "records_disk_low" in log
    assert faults["records-disk-full:3s"]["pieces_affected"] > 0 and "records_dropped" not in log
    assert not (tmp_path / "records").is_mount()
    assert report["ndfeb_purity"] >= 0.98
    assert report["line_at_end"]["healthy_at_feed_end"]
    assert r.returncode == 0, r.stderr[-3000:]
