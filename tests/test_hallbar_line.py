"""The Hall-sensor bar on the running line: fused decisions, and the fallback when its cable is pulled.

The cable pull runs in real time: the bar's serial line on the simulator's pty, the stall timeout that declares
it offline and the decisions that wait a bounded time for its reading all run on the wall clock, as on a plant.
The data set capture runs in lockstep (sim/lockstep.py): what it writes does not depend on keeping pace."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from sim.config import load_sim_config
from sim.demo import run_demo
from sim.lockstep import run_lockstep
from sorter.core.messages import FieldState
from sorter.line.records import load_pieces
from tests.conftest import LineRun, wait_until

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
        # some scrap decided on the camera alone before the cable goes back in
        offline = service.counters.field_states
        await wait_until(lambda: offline[FieldState.OFFLINE] > 30, 15, "30 pieces decided without the bar")
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
    LineRun(report, tmp_path).assert_every_piece_accounted()


async def test_capture_writes_a_dataset_of_the_running_line(tmp_path):
    from sorter.line.crop_capture import split_of
    from sorter.ml.dataset import scan_dataset

    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    out = tmp_path / "captured"
    # in lockstep: what is judged is what the capture writes, not keeping pace, so every piece can be expected
    report = await asyncio.to_thread(run_lockstep, cfg, 4, 4, tmp_path / "run", capture=out)
    rows = load_pieces(tmp_path / "run" / "records.sqlite")
    ds = scan_dataset(out, required=("train",), splits=("train",))  # a short run has too few pieces for val/test
    train = ds["train"]
    assert train.has_sensors and len(train) > 0
    # every piece decided with a complete field reading has its crop saved, in its file name's split, and no
    # other piece has one (a 4 s run is shorter than the saving queue: nothing may be dropped)
    saved = {p.stem.rsplit("-", 1)[1]: p for p in out.rglob("*.png")}
    complete = {f"{r['id']:07d}" for r in rows if r["field_state"] == "ok" and r["cls"] != "unknown"}
    assert set(saved) == complete and len(complete) > 0.6 * report["pieces_fed"]
    assert all(p.parents[1].name == split_of(p.name) for p in saved.values())
    # each saved crop sits under its piece's decided class, with the field the decision used
    by_name = {f"{r['id']:07d}": r for r in rows}
    assert train.areas is not None
    for path, y, field, area in zip(train.files, train.y, train.fields, train.areas, strict=True):
        r = by_name[path.stem.rsplit("-", 1)[1]]
        assert ds.labels[y] == r["cls"] == path.parent.name
        assert field == pytest.approx(r["field_mT"], abs=0.05)
        assert area == pytest.approx(r["area_mm2"], abs=0.051)  # the size the likelihood used (1 decimal)
