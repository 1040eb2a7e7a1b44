"""A technician at the HMI's panel on the running simulated line runs a candidate model as shadow, sees its
agreement by class and the crops of the pieces it decides otherwise, then swaps it in (docs/shadow.md). Real
headless Chromium through Playwright, as tests/test_clips_browser.py; real time, because the panel polls the
running line."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from sim.bench_hmi import CHROMIUM_ARGS, panel_browser
from sim.config import load_sim_config
from sorter.app import Line
from tests.shadow_models import MODEL, permuted
from tests.test_hmi import PASSWORD, _require_browser

pytestmark = pytest.mark.line

ROOT = Path(__file__).resolve().parents[1]


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
            # timeouts for a loaded 2-core machine: the line, the simulator and Chromium share it
            expect(page.locator("#state")).to_have_text("Execute", timeout=30_000)
            page.click(f'#models button[data-path="{out["candidate"]}"]')
            page.click("#shadow-start")
            box = page.locator("#shadow")
            expect(box).to_be_visible(timeout=60_000)
            expect(page.locator("#shadow-state")).to_contain_text(
                re.compile(r"[1-9]\d* pieces compared"), timeout=30_000
            )
            # under load the shadow compares a subset (whole batches skipped): the feed goes on until crops show
            expect(page.locator("#shadow-crops img").first).to_be_visible(timeout=120_000)
            out["state"] = page.inner_text("#shadow-state")
            out["classes"] = page.locator("#shadow-table tbody tr").evaluate_all("rs => rs.map(r => r.dataset.class)")
            out["captions"] = page.locator("#shadow-crops figcaption").all_inner_texts()
            out["crop_loaded"] = page.locator("#shadow-crops img").first.evaluate("i => i.complete && i.naturalWidth")
            page.screenshot(path=str(out["dir"] / "shadow.png"))
            page.click("#model-swap")
            expect(page.locator("#toast")).to_contain_text("running", timeout=30_000)
        finally:
            browser.close()


@pytest.mark.timeout(300)
async def test_technician_runs_a_shadow_sees_its_differences_and_swaps(tmp_path: Path) -> None:
    _require_browser()
    from sim.demo import run_demo

    models = tmp_path / "models"
    models.mkdir()
    running = models / "sorter-cnn.onnx"
    shutil.copy(MODEL, running)
    candidate = permuted(models / "candidate.onnx", "shadow-browser")
    out: dict[str, Any] = {"dir": tmp_path, "candidate": str(candidate)}
    after: dict[str, Any] = {}

    async def panel(line: Line, sim: Any) -> None:
        assert line.hmi is not None and line.hmi.listening
        await asyncio.to_thread(_technician, line.hmi.url, out)
        after["version"] = line.service.classifier.version

    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    cfg = cfg.model_copy(
        update={"opcua_server": None, "classifier": cfg.classifier.model_copy(update={"model": running})}
    )
    await run_demo(cfg, duration=6, seed=3, run_dir=tmp_path / "run", during=panel)
    print("technician:", {k: v for k, v in out.items() if k != "dir"}, after)
    assert "shadow-browser" in out["state"] and "agreement" in out["state"]
    assert "ndfeb" in out["classes"] or "ferrite" in out["classes"]
    # the candidate swaps ndfeb and ferrite: that is what most of its differing pieces show (it has no field model,
    # so a piece the field decided may differ otherwise)
    swapped = [c for c in out["captions"] if c in ("ndfeb \u2192 ferrite", "ferrite \u2192 ndfeb")]
    assert len(swapped) > len(out["captions"]) / 2, out["captions"]
    assert out["crop_loaded"] > 0
    assert after["version"] == "shadow-browser"
