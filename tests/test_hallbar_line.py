"""The Hall-sensor bar on the running line: fused decisions, and the fallback when its cable is pulled."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from sim.config import load_sim_config
from sim.demo import run_demo
from sorter.core.messages import FieldState
from sorter.line.records import load_pieces
from tests.conftest import wait_until

pytestmark = pytest.mark.line

ROOT = Path(__file__).resolve().parents[1]


async def test_unplugged_bar_raises_an_alarm_and_falls_back_to_the_camera(tmp_path):
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    seen: dict[str, object] = {}

    async def pull_and_replug(line, sim) -> None:
        service = line.service
        await wait_until(lambda: service.counters.field_states[FieldState.OK] > 20, 15)
        await sim.send(cmd="hallbar", on=False)
        await wait_until(lambda: not service.hallbar.online, 5)
        seen["offline_at"] = service.counters.pieces
        await asyncio.sleep(2.0)
        await sim.send(cmd="hallbar", on=True)
        await wait_until(lambda: service.hallbar.online, 10)
        seen["online_at"] = service.counters.pieces

    report = await run_demo(cfg, duration=9, seed=3, run_dir=tmp_path, during=pull_and_replug)
    rows = load_pieces(tmp_path / "records.sqlite")
    fallback = cfg.routing.fallback_min_confidence
    offline = [r for r in rows if r["field_state"] == "offline"]
    assert len(offline) > 20, report["field_states"]
    # without the field only very confident pieces go into a product
    assert all(r["threshold"] == fallback for r in offline)
    assert all(r["confidence"] >= fallback for r in offline if r["fraction"] != "residue")
    # fused again once the bar is back
    assert sum(1 for r in rows if r["field_state"] == "ok") > 100
    assert report["magnetometer"]["reconnects"] >= 1
    db = sqlite3.connect(tmp_path / "records.sqlite")
    alarms = [json.loads(d) for k, d in db.execute("SELECT kind, detail FROM events") if k.startswith("alarm")]
    assert [a["alarm"] for a in alarms] == ["hallbar_offline", "hallbar_offline"]
    # and the line kept sorting cleanly throughout
    assert report["frames_dropped"] <= 0.01 * report["frames_captured"]
    assert report["fractions"]["ndfeb"]["purity"] >= 0.98
    assert report["pieces_accounted"] >= 0.95 * report["pieces_fed"]


async def test_capture_writes_a_dataset_of_the_running_line(tmp_path):
    from sorter.ml.dataset import scan_dataset

    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    out = tmp_path / "captured"
    report = await run_demo(cfg, duration=4, seed=4, run_dir=tmp_path / "run", capture=out)
    rows = load_pieces(tmp_path / "run" / "records.sqlite")
    ds = scan_dataset(out, required=("train",), splits=("train",))  # a short run has too few pieces for val/test
    train = ds["train"]
    assert train.has_sensors and len(train) > 0.6 * report["pieces_fed"]
    # each saved crop sits under its piece's decided class, with the field the decision used
    by_name = {f"{r['id']:07d}": r for r in rows}
    assert train.areas is not None
    for path, y, field, area in zip(train.files, train.y, train.fields, train.areas, strict=True):
        r = by_name[path.stem.rsplit("-", 1)[1]]
        assert ds.labels[y] == r["cls"] == path.parent.name
        assert field == pytest.approx(r["field_mT"], abs=0.05)
        assert area == pytest.approx(r["area_mm2"], abs=0.051)  # the size the likelihood used (1 decimal)
