"""End to end in real time: the simulated line sorted by the real service over Modbus TCP on loopback, run as
a user runs it (`sorter demo`: the service and the simulator as their own processes) and stopped with Ctrl-C.

What is judged here is what only the wall clock shows: the product keeping pace on a shared machine (frames
processed as the cameras expose them, decisions reaching the PLC before the pieces reach the valves, the
valves' timing error) and a report that survives the operator's Ctrl-C. The sorting figures themselves are
asserted exactly, in lockstep, against golden figures (tests/test_lockstep.py, the same seed)."""

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
RECORDED = 300  # pieces recorded before the Ctrl-C


def test_demo_keeps_pace_and_its_report_survives_ctrl_c(tmp_path):
    # its own process, as a user runs it: nothing left over from other tests competes for the 2 cores
    cmd = [sys.executable, "-m", "sorter", "demo", "--duration", "60", "--seed", "11", "--json", "--out", str(tmp_path)]
    proc = subprocess.Popen(
        cmd,
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

    # ~10 s of scrap (a process: polled, no loop to hook into), then the operator's Ctrl-C
    while pieces_recorded() < RECORDED and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pieces_recorded() >= RECORDED, f"the demo recorded fewer than {RECORDED} pieces within 90 s"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    report = json.loads(out)
    print(json.dumps(report, indent=1))  # shown by pytest when an assertion fails
    assert report["interrupted"] is True and report["duration_s"] < 30
    assert report["pieces_fed"] >= RECORDED
    assert json.loads((tmp_path / "report.json").read_text())["pieces_fed"] == report["pieces_fed"]
    run = LineRun(report, tmp_path)
    run.assert_every_piece_accounted()  # the belt was drained: nothing lost to the stop
    # a few records are fragments of one non-convex piece (a bracket, a screw) split in two: ~0.5 % over 60 s
    assert report["records_unmatched"] <= 0.015 * report["records"]
    # keeping pace: a CI machine is shared, so a stall is allowed for, never a backlog (1 % of frames) nor a
    # broken clock (tens of late ejections); the 60 s demo figures on a quiet machine are in docs/results.md
    assert report["frames_dropped"] <= 0.01 * report["frames_captured"]
    assert report["ejects_late"] <= 3 + 0.02 * report["ejects_sent"]
    # the valves' timing on the wall clock (lockstep gives 0.3 mm): 2 mm is the eject margin
    assert report["eject_error_mm"]["n"] > 50 and report["eject_error_mm"]["p99"] <= 2.0
    assert report["decision_latency_ms"]["p99"] is not None
    # and it still sorts: purity, and recovery over the pieces whose command did not stall, against the
    # floor that README's measured per-run losses allow for this run's number of pieces (see conftest)
    assert report["fractions"]["ndfeb"]["purity"] >= 0.98 and report["fractions"]["ferrite_smco"]["purity"] >= 0.98
    run.assert_recovery("ndfeb", "ferrite_smco")
