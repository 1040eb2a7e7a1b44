"""End to end: the simulated line sorted by the real service over Modbus TCP on loopback.

Real time, on purpose: `sorter demo` runs the service and the simulator as their own processes, as a user
runs it, and what is judged is the product keeping pace on a shared machine (frames processed as the cameras
expose them, decisions reaching the PLC before the pieces reach the valves); a virtual clock would hide that."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import LineRun

pytestmark = pytest.mark.line

ROOT = Path(__file__).resolve().parents[1]


def test_demo_sorts_and_accounts_for_every_piece(tmp_path):
    # its own process, as a user runs it: nothing left over from other tests competes for the 2 cores
    r = subprocess.run(
        [sys.executable, "-m", "sorter", "demo", "--duration", "12", "--seed", "11", "--json", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    print(json.dumps(report, indent=1))  # shown by pytest when an assertion fails
    assert report["pieces_fed"] > 250
    run = LineRun(report, tmp_path)
    # every piece reached a bin and has its own record, but where segmentation or a counted fault explains it
    run.assert_every_piece_accounted()
    # a few records are fragments of one non-convex piece (a bracket, a screw) split in two: ~0.5 % over 60 s
    assert report["records_unmatched"] <= 0.015 * report["records"]
    # a CI machine is shared: allow a stall, never a backlog (the 60 s demo figures are in the README)
    assert report["frames_dropped"] <= 0.01 * report["frames_captured"]
    assert report["ejects_late"] <= 3 + 0.02 * report["ejects_sent"]  # a stall, never a broken clock (tens late)
    assert report["fractions"]["ndfeb"]["purity"] >= 0.98 and report["fractions"]["ferrite_smco"]["purity"] >= 0.98
    # recovery over the pieces whose command did not stall (a stall is counted, and bounded here), against
    # the floor that README's measured per-run losses allow for this run's number of pieces (see conftest)
    run.assert_recovery("ndfeb", "ferrite_smco")
    assert report["eject_error_mm"]["n"] > 50 and report["eject_error_mm"]["p99"] <= 2.0
    assert report["decision_latency_ms"]["p99"] is not None
    assert json.loads((tmp_path / "report.json").read_text())["pieces_fed"] == report["pieces_fed"]


def test_demo_report_survives_ctrl_c(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "sorter", "demo", "--duration", "60", "--json", "--out", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    db = tmp_path / "records.sqlite"
    deadline = time.monotonic() + 90

    def pieces_recorded() -> int:
        if not db.exists():
            return 0
        try:
            with sqlite3.connect(db, timeout=1) as con:
                return int(con.execute("SELECT COUNT(*) FROM pieces").fetchone()[0])
        except sqlite3.Error:  # not created yet
            return 0

    while pieces_recorded() < 30 and time.monotonic() < deadline:  # let some scrap through (a process: no loop)
        time.sleep(0.2)
    assert pieces_recorded() >= 30, "the demo recorded no scrap within 90 s"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    report = json.loads(out)
    assert report["interrupted"] is True and report["duration_s"] < 30
    assert report["pieces_fed"] >= 30
    LineRun(report, tmp_path).assert_every_piece_accounted()  # the belt was drained: nothing lost to the stop
    assert (tmp_path / "report.json").exists()
