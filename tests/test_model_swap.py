"""A model swap on the running line: no stop, no lost frames, a bad model refused.

Real time: the promise is that the line does not stop or drop frames while a model loads, with the cameras
exposing on the running belt's encoder all along; only a line that runs on the wall clock can break it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sim.config import load_sim_config
from sim.demo import run_demo
from sorter.core.messages import SwapModel
from sorter.line.records import load_pieces
from sorter.vision.classify import ModelError
from tests.conftest import LineRun, wait_until

pytestmark = pytest.mark.line

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "sorter-cnn.onnx"


def _retagged(src: Path, dst: Path, version: str) -> None:
    """The same network under another version: what a retrained model looks like to the service."""
    import onnx

    proto = onnx.load(str(src))
    for prop in proto.metadata_props:
        if prop.key == "version":
            prop.value = version
    onnx.save(proto, str(dst))


async def test_model_swaps_on_the_running_line(tmp_path):
    new_model = tmp_path / "new.onnx"
    _retagged(MODEL, new_model, "swap-test-2")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(MODEL.read_bytes()[:5000])
    outcome: dict[str, object] = {}

    async def act(line, sim) -> None:
        service = line.service
        await wait_until(lambda: service.counters.pieces >= 40, 20, "pieces decided by the first model")
        with pytest.raises(ModelError):
            await service.handle(SwapModel(broken, "test"))
        outcome["after_refusal"] = service.classifier.version
        outcome["swapped_to"] = await service.handle(SwapModel(new_model, "test"))

    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    report = await run_demo(cfg, duration=7, seed=5, run_dir=tmp_path / "run", during=act)
    assert outcome["after_refusal"] != "swap-test-2"  # the refused file changed nothing
    assert outcome["swapped_to"] == "swap-test-2" == report["model_version"]
    # the line never stopped: pieces decided by both models, every frame processed
    versions = {r["model"] for r in load_pieces(tmp_path / "run" / "records.sqlite") if r["model"]}
    assert versions == {outcome["after_refusal"], "swap-test-2"}
    assert report["frames_dropped"] <= 0.01 * report["frames_captured"]
    LineRun(report, tmp_path / "run").assert_every_piece_accounted()
    db = sqlite3.connect(tmp_path / "run" / "records.sqlite")
    kinds = [k for (k,) in db.execute("SELECT kind FROM events ORDER BY t_wall")]
    assert kinds.index("model_refused") < kinds.index("model_swap")
