"""Shadow mode on a built line (StartShadow / StopShadow, docs/shadow.md) and the HMI's shadow endpoints.

In process, as tests/test_clips.py: a line built, not run; its service handles the requests on the test's loop, a
decision batch goes through its real `_decide`, its HMI's FastAPI app is driven through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from sim.config import load_sim_config
from sorter.app import build_line
from sorter.config import ClassifierConfig
from sorter.core.messages import Piece, ShadowDecision, StartShadow, StopShadow, SwapModel
from sorter.line.records import load_shadow
from sorter.vision.classify import ModelError
from tests.hmi_asgi import Endpoint, HmiClient
from tests.shadow_models import MODEL, permuted, relabelled, retagged
from tests.test_clips import built, clip_config

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]


def kinds(db: Path) -> list[tuple[str, dict[str, Any]]]:
    con = sqlite3.connect(db)
    try:
        return [(k, json.loads(d)) for k, d in con.execute("SELECT kind, detail FROM events ORDER BY rowid")]
    finally:
        con.close()


def crops_of(colour: tuple[int, int, int]) -> list[np.ndarray]:
    return [np.full((64, 64, 3), colour, np.uint8)]


async def test_a_shadow_model_starts_decides_beside_the_live_one_and_stops(tmp_path: Path) -> None:
    same = retagged(tmp_path / "same.onnx", "shadow-same")
    swapped = permuted(tmp_path / "swapped.onnx", "shadow-swapped")
    wrong = relabelled(tmp_path / "wrong.onnx", "shadow-wrong")
    async with built(tmp_path) as line:
        svc = line.service
        assert await svc.handle(StopShadow("technician")) is None  # none runs
        with pytest.raises(ModelError, match="same order") as err:
            await svc.handle(StartShadow(wrong, "technician"))
        assert "shadow-wrong" in str(err.value) and svc.classifier.version in str(err.value)
        assert svc.shadow is None and svc.stats.shadow is None
        assert await svc.handle(StartShadow(same, "technician")) == "shadow-same"
        assert svc.stats.shadow is not None and svc.stats.shadow["model"] == "shadow-same"
        # a second start replaces the first (drained and closed)
        assert await svc.handle(StartShadow(swapped, "technician")) == "shadow-swapped"
        # one decision batch through the service's own path: the shadow sees it, the planner never hears of it
        pieces = [
            Piece(i, 1000.0 * i, 1000.0 * i - 50, 1000.0 * i + 50, 100.0, 95.0, 105.0, 80.0, ("cam0",), 1, crops_of(c))
            for i, c in enumerate([(40, 40, 40), (200, 200, 200), (90, 60, 30)], start=1)
        ]
        await svc._decide(pieces, asyncio.get_running_loop())
        assert svc.shadow is not None
        await svc.shadow.drain()
        s = svc.shadow.summary
        assert s.compared == 3 and s.skipped == 0
        svc._publish()  # the metrics render the running comparison from the published stats
        text = line.metrics.render()[0].decode()
        differ = s.compared - s.agree
        assert f'sorter_shadow_pieces{{model="shadow-swapped",result="differ"}} {float(differ)}' in text
        assert 'sorter_shadow_pieces{model="shadow-swapped",result="skipped"} 0.0' in text
        summary = await svc.handle(StopShadow("technician"))
        assert summary["compared"] == 3 and svc.shadow is None
        svc.records.flush()
        rows = load_shadow(svc.records.path, svc.run_id)
        assert [r["piece_id"] for r in rows] == [1, 2, 3]
        assert all(r["model"] == "shadow-swapped" for r in rows)
        # the swapped model differs exactly where the live model said ndfeb or ferrite, and keeps those crops
        live = {r["piece_id"]: r["live_cls"] for r in rows}
        assert live == {1: "ferrite", 2: "ndfeb", 3: "other"}  # dark grey, silver, brown: one of each case
        for r in rows:
            swapped_cls = {"ndfeb": "ferrite", "ferrite": "ndfeb"}.get(r["live_cls"], r["live_cls"])
            if r["live_cls"] != "unknown":
                assert r["cls"] == swapped_cls, (r, live)
            assert bool(r["has_crop"]) == (r["cls"] != r["live_cls"])
        ev = [(k, d.get("version") or d.get("model")) for k, d in kinds(svc.records.path) if k.startswith("shadow")]
        assert ev == [
            ("shadow_refused", None),
            ("shadow_start", "shadow-same"),
            ("shadow_start", "shadow-swapped"),
            ("shadow_stop", "shadow-swapped"),
        ]


def test_the_config_refuses_a_shadow_model_with_other_classes(tmp_path: Path) -> None:
    cfg = clip_config(tmp_path)
    wrong = relabelled(tmp_path / "wrong.onnx", "shadow-wrong")
    cfg = cfg.model_copy(update={"classifier": cfg.classifier.model_copy(update={"shadow_model": wrong})})
    with pytest.raises(ModelError, match="same order") as err:
        build_line(cfg, auto_start=False, north=False)
    assert "shadow-wrong" in str(err.value) and str(MODEL) in str(err.value)


def test_shadow_model_is_a_strict_config_key_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    assert cfg.classifier.shadow_model is None
    with pytest.raises(ValidationError, match="shadow_modle"):
        ClassifierConfig.model_validate({"model": "m.onnx", "shadow_modle": "c.onnx"})
    c = ClassifierConfig.model_validate({"model": "m.onnx", "shadow_model": "cand/c.onnx"})
    cfg = cfg.model_copy(update={"classifier": c})
    resolved = cfg.model_copy(update=cfg.paths_resolved(tmp_path)).classifier
    assert resolved.shadow_model == tmp_path / "cand" / "c.onnx" and resolved.model == tmp_path / "m.onnx"


async def test_shadow_endpoints_are_for_technicians_with_their_csrf_token(tmp_path: Path) -> None:
    same = retagged(tmp_path / "same.onnx", "shadow-same")
    async with built(tmp_path) as line:
        hmi = line.hmi
        assert hmi is not None
        api = HmiClient(hmi)
        client, login = api.client, api.login
        endpoints: list[Endpoint] = [
            ("POST", "/api/shadow/start", {"path": str(same)}),
            ("POST", "/api/shadow/stop", None),
            ("GET", "/api/shadow", None),
            ("GET", "/api/shadow/crop/1", None),
        ]
        await api.refused_but_to_technicians(endpoints)
        svc = line.service
        assert svc.shadow is None
        async with client() as c:
            h = await login(c, "technician")
            # no CSRF token, or another site's page: refused, nothing started
            assert (await c.post("/api/shadow/start", json={"path": str(same)})).status_code == 403
            r = await c.post(
                "/api/shadow/start", json={"path": str(same)}, headers={**h, "Origin": "https://x.example"}
            )
            assert r.status_code == 403 and svc.shadow is None
            # bad bodies: not a model file, unknown keys, no path, not JSON
            for body in ({"path": str(ROOT / "README.md")}, {"path": str(same), "x": 1}, {}, [1]):
                r = await c.post("/api/shadow/start", json=body, headers=h)
                assert r.status_code == 422, (body, r.status_code)
            r = await c.post("/api/shadow/start", content=b"{", headers={**h, "Content-Type": "application/json"})
            assert r.status_code == 400
            assert (await c.get("/api/shadow/crop/abc")).status_code == 422
            wrong = relabelled(tmp_path / "wrong.onnx", "shadow-wrong")
            r = await c.post("/api/shadow/start", json={"path": str(wrong)}, headers=h)
            assert r.status_code == 422 and "same order" in r.json()["detail"]
            assert svc.shadow is None
            r = await c.get("/api/shadow")
            assert r.status_code == 200 and r.json() == {"shadow": None, "differing": []}
            r = await c.post("/api/shadow/start", json={"path": str(same)}, headers=h)
            assert r.status_code == 200 and r.json()["version"] == "shadow-same"
            svc._publish()
            # a differing piece reaches the HMI through its shadow tap; its crop is served as PNG
            png = cv2.imencode(".png", np.full((8, 8, 3), 7, np.uint8))[1].tobytes()
            for tap in svc.parts.shadow_taps:
                if tap == hmi.shadow.add:
                    tap([ShadowDecision(5, "ndfeb", "ndfeb", 0.9, "ferrite", "ferrite", 0.8, "shadow-same", "x", png)])
            r = await c.get("/api/shadow")
            assert r.status_code == 200
            body = r.json()
            assert body["shadow"]["model"] == "shadow-same" and body["shadow"]["path"] == str(same)
            assert [d["piece_id"] for d in body["differing"]] == [5]
            r = await c.get("/api/shadow/crop/5")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == png
            assert (await c.get("/api/shadow/crop/6")).status_code == 404
            r = await c.post("/api/shadow/stop", headers=h)
            assert r.status_code == 200 and r.json()["shadow"]["model"] == "shadow-same"
            assert svc.shadow is None


async def test_a_live_swap_to_a_model_with_other_classes_stops_the_shadow(tmp_path: Path) -> None:
    same = retagged(tmp_path / "same.onnx", "shadow-same")
    other = relabelled(tmp_path / "other.onnx", "live-other")
    async with built(tmp_path) as line:
        svc = line.service
        await svc.handle(StartShadow(same, "technician"))
        await svc.handle(SwapModel(same, "technician"))  # same classes: the shadow goes on
        assert svc.shadow is not None
        await svc.handle(SwapModel(other, "technician"))
        assert svc.shadow is None and svc.classifier.version == "live-other"
        svc.records.flush()
        stops = [d for k, d in kinds(svc.records.path) if k == "shadow_stop"]
        assert len(stops) == 1 and stops[0]["reason"] == "live model has other classes"


def test_run_and_demo_take_a_shadow_model() -> None:
    from typer.testing import CliRunner

    from sorter.cli import app

    for cmd in ("run", "demo"):
        res = CliRunner().invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0 and "--shadow-model" in res.output, cmd
