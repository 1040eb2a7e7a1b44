"""The simulated line in lockstep (sim/lockstep.py): the same seed gives the same run, so its figures are
asserted exactly against a golden file instead of within bounds.

A change in any stage (rendering, segmentation, tracking, the model, fusion, decisions, planning, the
PLC protocol, the ejection physics) shows up here as a changed figure. When the change is meant, the
developer looks at the difference this test prints and writes the new figures on purpose:

    make golden        (= pytest tests/test_lockstep.py --update-golden)

The golden figures belong to this platform's numeric libraries (x86-64, the pinned onnxruntime, OpenCV
and NumPy): a different CPU family may round a pixel or a probability differently.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LineRun

pytestmark = pytest.mark.line

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "lockstep-seed11-10s.json"
SEED, DURATION = 11, 10
# wall-clock figures (how long the computer took), and where the run was written: not figures of the line
WALL_FIELDS = ("stage_ms", "lockstep", "run_dir", "service_rss_mb")


def lockstep(out: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "sorter", "demo", "--lockstep", "--duration", str(DURATION), "--seed", str(SEED)]
    return subprocess.Popen(
        [*cmd, "--json", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )


def report_of(proc: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    return dict(json.loads(out))


def figures(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in WALL_FIELDS}


def rows(db: Path, table: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        return list(con.execute(f"SELECT * FROM {table} ORDER BY rowid"))
    finally:
        con.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[dict[str, Any], Path]]:
    out = [tmp_path_factory.mktemp(f"lockstep{i}") for i in range(2)]
    # side by side, one per core: a lockstep run's figures do not depend on how busy the machine is
    procs = [lockstep(d) for d in out]
    return [(report_of(p), d) for p, d in zip(procs, out, strict=True)]


def test_the_same_seed_gives_the_same_run_row_for_row(runs: list[tuple[dict[str, Any], Path]]) -> None:
    (a, dir_a), (b, dir_b) = runs
    assert figures(a) == figures(b)
    for table in ("pieces", "events"):
        assert rows(dir_a / "records.sqlite", table) == rows(dir_b / "records.sqlite", table), table
    assert rows(dir_a / "truth.sqlite", "pieces") == rows(dir_b / "truth.sqlite", "pieces")


def test_every_piece_is_accounted_and_nothing_is_late(runs: list[tuple[dict[str, Any], Path]]) -> None:
    report, run_dir = runs[0]
    assert report["pieces_fed"] > 250
    LineRun(report, run_dir).assert_every_piece_accounted()
    # a computer that is never late: what is left is the line's own physics and rules (records without a
    # piece, from segmentation, are among the golden figures)
    assert report["frames_dropped"] == 0 and report["ejects_late"] == 0
    assert report["frames_failed"] == report["batches_failed"] == 0
    assert report["field_states"] == {"ok": report["records"]}


def test_figures_match_the_golden_file(runs: list[tuple[dict[str, Any], Path]], request: pytest.FixtureRequest) -> None:
    got = figures(runs[0][0])
    if request.config.getoption("--update-golden"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"golden figures written to {GOLDEN.relative_to(ROOT)}: review and commit them")
    assert GOLDEN.exists(), f"no golden figures yet: run `make golden` and commit {GOLDEN.relative_to(ROOT)}"
    want = json.loads(GOLDEN.read_text())
    changed = {
        k: {"golden": want.get(k), "now": got.get(k)} for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)
    }
    assert not changed, "figures changed (if meant: `make golden`):\n" + json.dumps(changed, indent=1)
