"""Record a short lockstep run of the simulated line, replay it, compare (sorter replay, docs/recording.md).

A lockstep recording holds every frame, poll and bar line (written in place), and the replay runs the same
pipeline on the same clock: it must decide every piece the live run decided, the same way. A comparison
with a stricter threshold must change exactly the pieces the threshold concerns.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.line

ROOT = Path(__file__).resolve().parents[1]


def sorter(*args: str) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-m", "sorter", *args, "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("replay")
    rec = base / "rec"
    sorter("demo", "--lockstep", "--duration", "2", "--seed", "5", "--out", str(base / "run"), "--record", str(rec))
    return rec


def test_a_replay_decides_every_piece_as_the_live_run_did(recording: Path, tmp_path: Path) -> None:
    manifest = json.loads((recording / "manifest.json").read_text())
    assert manifest["state"] == "closed" and manifest["counts"]["frames_dropped_queue"] == 0
    assert manifest["counts"]["frames"] == manifest["counts"]["frames_processed"] > 0
    report = sorter("replay", str(recording), "--out", str(tmp_path / "a"))
    live = report["live"]
    assert live["live_decided"] == manifest["counts"]["decisions"] > 20
    assert live["same_decision"] == live["live_decided"] == live["replay_decided"], live["differ"]
    assert live["live_unmatched"] == [] and live["replay_unmatched"] == 0
    assert report["frames_replayed"] == manifest["counts"]["frames"]
    # the simulator's truth came with the recording: the decisions are judged against it (a record without
    # a true piece, a fragment from segmentation, stays unmatched on both sides)
    assert report["truth"]["pieces_matched"] == report["truth_live"]["pieces_matched"] >= report["pieces"] - 2
    assert report["truth"]["fractions"] == report["truth_live"]["fractions"]


def test_compare_lists_what_a_stricter_threshold_changes(recording: Path, tmp_path: Path) -> None:
    cfg = yaml.safe_load((recording / "config.yaml").read_text())
    strict = 0.999
    cfg["routing"]["min_confidence"] = strict
    stricter = tmp_path / "strict.yaml"
    stricter.write_text(yaml.safe_dump(cfg))
    result = sorter(
        "replay",
        str(recording),
        "--compare",
        str(recording / "config.yaml"),
        str(stricter),
        "--out",
        str(tmp_path / "c"),
    )
    default = cfg["routing"]["default_fraction"]
    a = json.loads((tmp_path / "c" / "a" / "report.json").read_text())
    # exactly the pieces sent to a product on less confidence than the stricter threshold change, to the default
    expect = sum(
        1
        for r in _records(Path(a["records"]))
        if r["fraction"] != default and r["confidence"] < strict and r["field_state"] == "ok"
    )
    assert len(result["changed"]) == expect > 0
    assert all(c["b"]["fraction"] == default and c["a"]["confidence"] < strict for c in result["changed"])
    f = result["fractions"][default]
    assert f["count_b"] - f["count_a"] == expect
    page = Path(result["html"]).read_text()
    assert page.count("data:image/png;base64,") == expect  # each changed piece with its crop


def _records(db: Path) -> list[dict[str, Any]]:
    import sqlite3

    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT fraction, confidence, field_state FROM pieces")]
    finally:
        con.close()
