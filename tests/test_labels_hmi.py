"""The HMI's labelling endpoints (docs/hmi.md, Labelling): the label store the wiring attached to a built line,
fed through its decision taps, labelled over the HMI's FastAPI app in process (httpx's ASGI transport)."""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path

import httpx
import numpy as np
import pytest

from sorter.app import build_line
from sorter.core.messages import Decision, FieldReading, FieldState, Piece
from sorter.north.hmi.app import create_app
from tests.hmi_asgi import Endpoint, HmiClient
from tests.test_clips import built, clip_config
from tests.test_hmi import PASSWORD

pytestmark = pytest.mark.fast


def decisions(labels: tuple[str, ...], n: int) -> list[Decision]:
    out = []
    for pid in range(1, n + 1):
        crop = np.full((64, 64, 3), 40 + pid, np.uint8)
        piece = Piece(pid, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 150.0 + pid, ("cam0",), 1, crops=[crop])
        conf = 0.5 + pid / 100  # all uncertain: all queued, the least confident first
        probs = {c: (conf if c == labels[0] else (1 - conf) / (len(labels) - 1)) for c in labels}
        reading = FieldReading(100.0 + pid, FieldState.OK)
        out.append(Decision(piece, probs, labels[0], conf, "x", image_probs=probs, field=reading, model="m"))
    return out


async def test_labelling_endpoints_roles_csrf_and_labels(tmp_path: Path) -> None:
    async with built(tmp_path) as line:
        hmi, store = line.hmi, line.labels
        assert hmi is not None and store is not None and hmi.labels is store
        assert store.root == tmp_path / "labels"  # labelling.folder's default: beside the records
        try:
            labels = tuple(line.service.classifier.labels)
            for tap in line.service.parts.decision_taps:  # as the running line hands each batch over
                tap(decisions(labels, 4))
            await asyncio.to_thread(store.drain)
            api = HmiClient(hmi)
            log, client, login = api.log, api.client, api.login

            first = store.head(1)[0].name
            endpoints: list[Endpoint] = [
                ("GET", "/api/labels", None),
                ("GET", f"/api/labels/crop/{first}", None),
                ("POST", f"/api/labels/{first}", {"class": labels[0]}),
                ("POST", f"/api/labels/{first}/discard", None),
                ("POST", "/api/labels/undo", None),
            ]
            await api.refused_but_to_technicians(endpoints)
            assert store.stats()["pending"] == 4 and not (tmp_path / "labels" / "labels.csv").exists()
            async with client() as c:
                h = await login(c, "technician")
                assert (await c.post(f"/api/labels/{first}", json={"class": labels[0]})).status_code == 403  # no CSRF
                r = await c.post(
                    f"/api/labels/{first}", json={"class": labels[0]}, headers={**h, "Origin": "https://evil.example"}
                )
                assert r.status_code == 403
                assert (await c.post(f"/api/labels/{first}", json={"klass": "x"}, headers=h)).status_code == 422
                assert (await c.post(f"/api/labels/{first}", json={"class": "gold"}, headers=h)).status_code == 422
                r = await c.post("/api/labels/nope-0000001", json={"class": labels[0]}, headers=h)
                assert r.status_code == 404
                assert (await c.get("/api/labels/crop/nope-0000001")).status_code == 404
                assert (await c.post("/api/labels/undo", headers=h)).status_code == 409
                assert store.stats()["pending"] == 4

                q = (await c.get("/api/labels")).json()
                assert q["classes"] == list(labels) and q["pending"] == 4 and q["labelled"] == {}
                assert q["undo"] is False
                head = q["queue"][0]
                assert head["id"] == first and head["guess"] == labels[0] and head["reason"] == "uncertain"
                assert head["field_mT"] == 101.0 and head["area_mm2"] == 151.0 and head["confidence"] == 0.51
                r = await c.get(head["crop"])
                assert r.status_code == 200 and r.headers["content-type"] == "image/png"
                assert r.content[:8] == b"\x89PNG\r\n\x1a\n"

                r = await c.post(f"/api/labels/{first}", json={"class": labels[1]}, headers=h)  # corrected
                assert r.status_code == 200 and r.json()["labelled"] == {labels[1]: 1} and r.json()["pending"] == 3
                second = r.json()["queue"][0]["id"]
                r = await c.post(f"/api/labels/{second}/discard", headers=h)
                assert r.status_code == 200 and r.json()["pending"] == 2
                assert r.json()["undo"] is True
                r = await c.post("/api/labels/undo", headers=h)  # the discard taken back: first in line again
                assert r.status_code == 200 and r.json()["queue"][0]["id"] == second and r.json()["pending"] == 3
                assert (await c.post(f"/api/labels/{first}", json={"class": labels[0]}, headers=h)).status_code == 404
            with (tmp_path / "labels" / "labels.csv").open(newline="") as f:
                rows = [(r["user"], r["old"], r["new"]) for r in csv.DictReader(f)]
            assert rows == [
                ("technician", labels[0], labels[1]),
                ("technician", labels[0], "discard"),
                ("technician", labels[0], "undone"),
            ]
            assert len(log.find("hmi request refused", reason="role")) == 2 * len(endpoints)
        finally:
            store.close()


@pytest.mark.parametrize("why", ["disabled", "unusable_folder"])
async def test_labelling_off(tmp_path: Path, why: str) -> None:
    cfg = clip_config(tmp_path)
    if why == "disabled":
        lab = cfg.labelling.model_copy(update={"enabled": False})
    else:  # the line sorts without it
        (tmp_path / "a-file").write_text("not a folder")
        lab = cfg.labelling.model_copy(update={"folder": tmp_path / "a-file" / "labels"})
    line = build_line(cfg.model_copy(update={"labelling": lab}), auto_start=False)
    try:
        assert line.labels is None and line.hmi is not None and line.hmi.labels is None
        assert "labelling" not in line.service.parts.extra_stats  # nor a tap of the line
        hmi = line.hmi
        hmi._svc_loop = asyncio.get_running_loop()
        hmi._login_lock = asyncio.Lock()
        line.service._publish()
        transport = httpx.ASGITransport(app=create_app(hmi))
        async with httpx.AsyncClient(transport=transport, base_url="http://hmi.test") as c:
            r = await c.post("/api/login", json={"user": "technician", "password": PASSWORD["technician"]})
            r = await c.get("/api/labels")
            assert r.status_code == 404 and "labelling.enabled" in r.json()["detail"]
    finally:
        await line.service.control.shutdown()
        line.service.close_workers()
        line.service.records.close()
