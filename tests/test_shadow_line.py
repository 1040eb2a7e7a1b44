"""Shadow mode on the simulated line, in lockstep (docs/shadow.md): one virtual clock, so the figures are exact.

- a shadow that is the live model under another version agrees on every piece, every decided piece is compared
  or counted skipped, and the live line's figures are the golden ones (a shadow is never acted on);
- a shadow whose ndfeb and ferrite outputs are swapped differs on exactly the pieces the live model called
  ndfeb or ferrite, its crops are kept, and `sorter report --shadow` shows them.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sorter.line.records import load_pieces, load_shadow
from tests.shadow_models import permuted, retagged
from tests.test_lockstep import DURATION, GOLDEN, SEED, WALL_FIELDS

pytestmark = pytest.mark.line

ROOT = Path(__file__).resolve().parents[1]


def demo(out: Path, shadow: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "sorter", "demo", "--lockstep", "--duration", str(DURATION), "--seed", str(SEED)]
    return subprocess.Popen(
        [*cmd, "--json", "--out", str(out), "--shadow-model", str(shadow)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], Path]]:
    models = tmp_path_factory.mktemp("models")
    shadows = {
        "same": retagged(models / "same.onnx", "shadow-same"),
        "swapped": permuted(models / "swapped.onnx", "shadow-swapped"),
    }
    dirs = {k: tmp_path_factory.mktemp(f"shadow-{k}") for k in shadows}
    # side by side, one per core: a lockstep run's figures do not depend on how busy the machine is
    procs = {k: demo(dirs[k], shadows[k]) for k in shadows}
    out = {}
    for k, p in procs.items():
        try:
            stdout, err = p.communicate(timeout=300)
        finally:
            p.kill()
        assert p.returncode == 0, err[-3000:]
        out[k] = (json.loads(stdout), dirs[k])
    return out


def decided(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in load_pieces(run_dir / "records.sqlite") if r["cls"] is not None]


def test_a_shadow_of_the_same_network_agrees_everywhere_and_changes_nothing_live(
    runs: dict[str, tuple[dict[str, Any], Path]],
) -> None:
    report, run_dir = runs["same"]
    s = report["shadow"]
    pieces = decided(run_dir)
    assert len(pieces) > 250
    assert s["model"] == "shadow-same" and s["agreement"] == 1.0 and s["differing"] == 0 and s["crops_kept"] == 0
    assert s["compared"] + s["skipped"] == len(pieces) and s["failed_batches"] == 0
    assert s["compared"] == s["compared_service"]  # every result the service counted is in the records
    assert s["truth"]["live_accuracy"] == s["truth"]["shadow_accuracy"] and s["truth"]["pieces"] > 0.9 * len(pieces)
    shadow_ids = {r["piece_id"] for r in load_shadow(run_dir / "records.sqlite")}
    assert shadow_ids <= {p["id"] for p in pieces}
    # never acted on: the live line's figures are the golden ones of the same seed without a shadow
    want = json.loads(GOLDEN.read_text())
    got = {k: v for k, v in report.items() if k not in (*WALL_FIELDS, "shadow")}
    changed = {k: (want.get(k), got.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}
    assert not changed, changed


def test_a_shadow_with_swapped_outputs_differs_where_expected_and_keeps_those_crops(
    runs: dict[str, tuple[dict[str, Any], Path]], tmp_path: Path
) -> None:
    report, run_dir = runs["swapped"]
    s = report["shadow"]
    db = run_dir / "records.sqlite"
    rows = load_shadow(db)
    assert s["compared"] == len(rows) > 250 and s["skipped"] == 0
    swap = {"ndfeb": "ferrite", "ferrite": "ndfeb"}
    # the swapped model has no field model: its class is the live model's image-only class, swapped
    image = {p["id"]: p["image_probs"] for p in decided(run_dir)}
    for r in rows:
        probs = image[r["piece_id"]]
        img_cls = max(probs, key=probs.get) if probs else "unknown"
        assert r["cls"] == swap.get(img_cls, img_cls), r
    differing = [r for r in rows if r["cls"] != r["live_cls"]]
    assert sum(r["live_cls"] in swap for r in differing) > 20
    assert s["differing"] == len(differing) and s["agreement"] < 1.0
    assert s["crops_kept"] == min(len(differing), 500) == sum(r["has_crop"] for r in rows)
    assert s["by_class"]["ndfeb"]["agreement"] < 0.5 and s["by_class"]["ferrite"]["agreement"] < 0.5
    assert s["truth"]["shadow_accuracy"] < s["truth"]["live_accuracy"]
    page = tmp_path / "shadow.html"
    args = ["report", "-c", str(ROOT / "config" / "sim.yaml"), "--shadow", "--db", str(db), "--html", str(page)]
    res = subprocess.run(
        [sys.executable, "-m", "sorter", *args, "--json", str(tmp_path / "s.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "agreement" in res.stdout and "live \\ shadow" in res.stdout
    out = json.loads((tmp_path / "s.json").read_text())
    assert out["compared"] == len(rows) and len(out["differing"]) == len(differing)
    assert page.read_text().count("data:image/png;base64,") == s["crops_kept"]
    con = sqlite3.connect(db)
    try:
        kinds = [k for (k,) in con.execute("SELECT kind FROM events WHERE kind LIKE 'shadow%'")]
    finally:
        con.close()
    assert kinds == ["shadow_stop"]  # started from the config, stopped with the line
