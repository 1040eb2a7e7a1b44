"""A technician at the HMI's panel on the running simulated line: starts a clip, stops it, compares a new model
with the running one on that clip (`sorter replay --compare` in a child process at nice 19) and confirms the
swap. Real headless Chromium through Playwright, as tests/test_hmi.py's browser test."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from sim.bench_hmi import CHROMIUM_ARGS, panel_browser
from sim.config import load_sim_config
from sorter.app import Line
from sorter.line.recording import Recording
from tests.test_hmi import PASSWORD, _require_browser
from tests.test_model_swap import _retagged

pytestmark = pytest.mark.line

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "sorter-cnn.onnx"


def _technician(url: str, out: dict[str, Any]) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(panel_browser(out["dir"])), args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}, has_touch=True).new_page()
            page.goto(url)
            page.fill("#login-user", "technician")
            page.fill("#login-password", PASSWORD["technician"])
            page.click("#login-submit")
            expect(page.locator("#state")).to_have_text("Execute", timeout=30_000)
            expect(page.locator("#technician")).to_be_visible()
            # a clip: started, recording for a moment, stopped
            page.click("#clip-start")
            status = page.locator("#clip-status")
            # timeouts for a loaded 2-core machine: the line, the simulator and Chromium share it
            expect(status).to_have_attribute("data-active", "true", timeout=30_000)
            # frames counted by the service itself: live pushes built before the start (showing no clip, the
            # stop button disabled) have all arrived, so none can disable the button under the click below
            expect(status).to_contain_text(re.compile(r"recording clip-\S+: [1-9]\d* frames"), timeout=30_000)
            expect(page.locator("#clip-stop")).to_be_enabled()
            out["clip_recording"] = status.inner_text()
            page.click("#clip-stop", timeout=10_000)
            expect(status).to_have_attribute("data-active", "false", timeout=30_000)
            expect(status).to_contain_text("stopped by technician", timeout=30_000)
            out["clip_text"] = status.inner_text()
            # the new model: compared with the running one on that clip, then swapped in
            page.click(f'#models button[data-path="{out["new"]}"]')
            page.click("#model-compare")
            box = page.locator("#compare")
            expect(box).to_be_visible(timeout=5_000)
            expect(box).to_have_attribute("data-state", "done", timeout=90_000)
            out["compare_state"] = page.inner_text("#compare-state")
            out["compare_rows"] = page.locator("#compare-table tbody tr").count()
            out["compare_changed"] = page.inner_text("#compare-changed")
            link = page.locator("#compare-page")
            expect(link).to_be_visible()
            r = page.request.get(url.rstrip("/") + link.get_attribute("href"))
            out["page_status"], out["page_csp"] = r.status, r.headers.get("content-security-policy", "")
            out["page_has_table"] = "<table" in r.text()
            page.screenshot(path=str(out["dir"] / "technician.png"))
            page.click("#model-swap")
            expect(page.locator("#toast")).to_contain_text("running", timeout=30_000)
            out["toast"] = page.inner_text("#toast")
            expect(box).to_be_hidden()
        finally:
            browser.close()


@pytest.mark.timeout(120)
async def test_technician_records_a_clip_compares_a_model_on_it_and_swaps(tmp_path: Path) -> None:
    _require_browser()
    from sim.demo import run_demo

    models = tmp_path / "models"
    models.mkdir()
    running = models / "sorter-cnn.onnx"
    shutil.copy(MODEL, running)
    new = models / "retrained.onnx"
    _retagged(MODEL, new, "clip-test-2")
    out: dict[str, Any] = {"dir": tmp_path, "new": str(new)}
    after: dict[str, Any] = {}

    async def panel(line: Line, sim: Any) -> None:
        assert line.hmi is not None and line.hmi.listening
        t0 = time.monotonic()
        await asyncio.to_thread(_technician, line.hmi.url, out)
        after["wall_s"] = round(time.monotonic() - t0, 1)
        after["version"] = line.service.classifier.version

    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    cfg = cfg.model_copy(
        update={
            "opcua_server": None,
            "classifier": cfg.classifier.model_copy(update={"model": running}),
            "records": cfg.records.model_copy(update={"clip_max_mb": 1500.0}),
        }
    )
    await run_demo(cfg, duration=4, seed=3, run_dir=tmp_path / "run", during=panel)
    print("technician:", {k: v for k, v in out.items() if k != "dir"}, after)
    clips = sorted((tmp_path / "run" / "recordings").glob("clip-*"))
    assert len(clips) == 1
    rec = Recording(clips[0])
    assert rec.closed and rec.manifest["clip"]["started_by"] == "technician" and rec.frames()
    assert "stopped by technician" in out["clip_text"]
    assert out["compare_rows"] == len(cfg.fractions)
    # the same network under another version: no decision changes
    assert out["compare_changed"].startswith("0 decisions change"), out["compare_changed"]
    assert "clip-test-2" in out["compare_state"]
    assert out["page_status"] == 200 and out["page_has_table"] and "default-src 'none'" in out["page_csp"]
    assert "clip-test-2" in out["toast"] and after["version"] == "clip-test-2"
