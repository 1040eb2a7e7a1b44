"""Clips on the running line (StartClip / StopClip, docs/recording.md) and the HMI's clip and comparison endpoints.

In process: a line built, not run (its service handles the requests on the test's loop), its HMI's FastAPI app
driven through httpx's ASGI transport, frames and polls handed to the recording taps the wiring attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sim.config import load_sim_config
from sorter.app import Line, build_line
from sorter.config import HmiConfig, LineConfig
from sorter.core.messages import Frame, PlcStatus, StartClip, StopClip
from sorter.line.recording import ClipError, Recording
from sorter.north.hmi.compare import latest_clip
from tests.hmi_asgi import Endpoint, HmiClient

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "sorter-cnn.onnx"


def clip_config(tmp_path: Path, **records: Any) -> LineConfig:
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    return cfg.model_copy(
        update={
            "records": cfg.records.model_copy(update={"path": tmp_path / "records.sqlite", **records}),
            "opcua_server": None,
            "hmi": HmiConfig(host="127.0.0.1", port=0),
        }
    )


@contextlib.asynccontextmanager
async def built(tmp_path: Path, **records: Any) -> AsyncIterator[Line]:
    line = build_line(clip_config(tmp_path, **records), auto_start=False)
    svc = line.service
    try:
        svc._publish()
        yield line
    finally:
        await asyncio.gather(*svc._clip_tasks, return_exceptions=True)
        assert line.service.parts.clips is not None
        await asyncio.to_thread(line.service.parts.clips.close_all, None)
        await svc.control.shutdown()
        svc.close_workers()
        svc.records.close()


def feed(line: Line, n: int, shape: tuple[int, int] = (48, 64)) -> None:
    """n frames of cam0 and an encoder poll each, through the taps the wiring attached (as a running line would)."""
    clips = line.service.parts.clips
    assert clips is not None
    hub = clips.hub
    for k in range(n):
        img = np.full((*shape, 3), k % 255, np.uint8)
        hub.frame(Frame("cam0", k, img, t_capture=100.0 + k / 60, count=1000 + 10 * k, t_received=100.01 + k / 60))
        hub.poll(100.0 + k / 60, 100.002 + k / 60, 1000 + 10 * k, PlcStatus(online=True, belt_running=True))


def events(line: Line) -> list[tuple[str, dict[str, Any]]]:
    line.service.records.flush()
    db = sqlite3.connect(line.service.records.path)
    try:
        return [(k, json.loads(d)) for k, d in db.execute("SELECT kind, detail FROM events ORDER BY rowid")]
    finally:
        db.close()


async def test_a_clip_starts_records_the_taps_and_stops_into_a_complete_folder(tmp_path: Path) -> None:
    async with built(tmp_path) as line:
        svc = line.service
        with pytest.raises(ClipError, match="no clip"):
            await svc.handle(StopClip("technician"))
        feed(line, 3)  # before the clip: recorded by nobody
        st = await svc.handle(StartClip("technician", 64))
        assert st.active and st.started_by == "technician" and st.max_bytes == 64 * 1024**2
        folder = Path(st.folder)
        assert folder.parent == tmp_path / "recordings"  # records.recordings_dir's default: beside the records
        assert svc.stats.clip is not None and svc.stats.clip.active  # in the live stats at once
        with pytest.raises(ClipError, match="already"):
            await svc.handle(StartClip("technician", 64))
        feed(line, 5)
        done = await svc.handle(StopClip("technician"))
        assert not done.active and done.stopped_by == "technician" and done.stopped_early is None
        assert done.frames == 5 and svc.stats.clip == done
        feed(line, 2)  # after the clip: recorded by nobody
        rec = Recording(folder)
        assert rec.closed and rec.level == "frames"
        assert rec.manifest["clip"] == {"started_by": "technician"}
        assert [r["seq"] for r in rec.frames()] == [0, 1, 2, 3, 4]
        assert len(rec.polls()) == 5 and rec.plc_status()[0]["online"] is True
        assert rec.manifest["model_file"] == str(MODEL)
        assert latest_clip(tmp_path / "recordings") == folder
        kinds = [(k, d.get("user")) for k, d in events(line) if k.startswith("clip")]
        assert kinds == [("clip_start", "technician"), ("clip_stop", "technician")]
        # a second clip goes into a folder of its own
        st2 = await svc.handle(StartClip("technician", None))
        assert st2.folder != st.folder and st2.max_bytes == int(svc.cfg.records.clip_max_mb * 1024**2)
        await svc.handle(StopClip("technician"))


async def test_a_clip_stops_itself_at_its_size_bound_and_the_line_goes_on(tmp_path: Path) -> None:
    async with built(tmp_path, clip_max_mb=1.0) as line:
        svc = line.service
        st = await svc.handle(StartClip("technician"))
        feed(line, 4, shape=(480, 640))  # 0.9 MB a frame: the second passes the 1 MB bound
        clips = svc.parts.clips
        assert clips is not None
        for _ in range(200):
            if clips.stopped_itself():
                break
            await asyncio.sleep(0.01)
        svc._watch_clip()  # what the stats loop does every 0.2 s
        await asyncio.gather(*svc._clip_tasks)
        c = svc.stats.clip
        assert c is not None and not c.active and c.stopped_by == "bound"
        assert c.stopped_early is not None and "size bound" in c.stopped_early
        assert c.frames == 1 and c.folder == st.folder
        assert Recording(Path(st.folder)).closed
        stop = [d for k, d in events(line) if k == "clip_stop"]
        assert stop and stop[0]["user"] == "bound" and "size bound" in stop[0]["reason"]
        with pytest.raises(ClipError):  # nothing runs any more
            await svc.handle(StopClip("technician"))


async def test_clip_and_comparison_endpoints_are_for_technicians_with_their_csrf_token(tmp_path: Path) -> None:
    async with built(tmp_path) as line:
        hmi = line.hmi
        assert hmi is not None
        api = HmiClient(hmi)
        log, client, login = api.log, api.client, api.login
        endpoints: list[Endpoint] = [
            ("POST", "/api/clip/start", {}),
            ("POST", "/api/clip/stop", None),
            ("GET", "/api/clip", None),
            ("POST", "/api/model/compare", {"path": str(MODEL)}),
            ("GET", "/api/model/compare", None),
            ("POST", "/api/model/compare/cancel", None),
            ("GET", "/api/model/compare/page", None),
        ]
        await api.refused_but_to_technicians(endpoints)
        assert line.service.parts.clips is not None and line.service.parts.clips.current is None
        async with client() as c:
            h = await login(c, "technician")
            # no CSRF token, or another site's page: refused, nothing started
            assert (await c.post("/api/clip/start", json={})).status_code == 403
            r = await c.post("/api/clip/start", json={}, headers={**h, "Origin": "https://evil.example"})
            assert r.status_code == 403
            assert line.service.parts.clips.current is None
            assert (await c.post("/api/clip/start", json={"max_mb": 0}, headers=h)).status_code == 422
            # no clip yet: nothing to compare on; not a model file: refused
            r = await c.post("/api/model/compare", json={"path": str(MODEL)}, headers=h)
            assert r.status_code == 409 and "no clip" in r.json()["detail"]
            r = await c.post("/api/model/compare", json={"path": str(ROOT / "README.md")}, headers=h)
            assert r.status_code == 422
            assert (await c.get("/api/model/compare")).json() == {"state": "none"}
            assert (await c.get("/api/model/compare/page")).status_code == 404
            r = await c.post("/api/clip/start", json={"max_mb": 32}, headers=h)
            assert r.status_code == 200 and r.json()["active"] and r.json()["max_bytes"] == 32 * 1024**2
            assert (await c.post("/api/clip/start", json={}, headers=h)).status_code == 409
            feed(line, 2)
            line.service._publish()
            r = await c.get("/api/clip")
            assert r.status_code == 200 and r.json()["clip"]["active"] and r.json()["latest"] is None
            r = await c.post("/api/clip/stop", headers=h)
            assert r.status_code == 200 and r.json()["frames"] == 2 and r.json()["stopped_by"] == "technician"
            assert (await c.post("/api/clip/stop", headers=h)).status_code == 409
            r = await c.get("/api/clip")
            assert r.json()["latest"] == r.json()["clip"]["folder"]
            view = hmi._builder.build(line.service.stats)
            assert view["clip"]["active"] is False and view["clip"]["frames"] == 2
        assert log.find("hmi clip started", user="technician")
        assert log.find("hmi clip stopped", user="technician")
        assert len(log.find("hmi request refused", reason="role")) == 2 * len(endpoints)
