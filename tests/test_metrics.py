"""Prometheus metrics of the line service (sorter/north/metrics.py): scraped mid-run and parsed back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sim.config import load_sim_config
from sim.demo import run_demo
from sorter.line.service import LineService
from sorter.north.metrics import render

ROOT = Path(__file__).resolve().parents[1]


def parse(body: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(fams: dict[str, Any], sample: str, **labels: str) -> float:
    name = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum").removesuffix("_bucket")
    for s in fams[name].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise KeyError(f"{sample} {labels}")


def total(fams: dict[str, Any], sample: str) -> float:
    name = sample.removesuffix("_total")
    return sum(float(s.value) for s in fams[name].samples if s.name == sample)


@pytest.mark.slow
async def test_metrics_scraped_mid_run(tmp_path):
    scraped: dict[str, Any] = {}

    async def scrape(service, sim) -> None:
        await asyncio.sleep(4)
        scraped["service"] = service
        scraped["mid"] = render(service)

    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    report = await run_demo(cfg, duration=6, seed=3, run_dir=tmp_path / "run", during=scrape)
    body, ctype = scraped["mid"]
    assert ctype.startswith("text/plain")
    fams = parse(body)

    # the line's state: Execute, as a state set and as the PackML number
    assert value(fams, "sorter_state", sorter_state="Execute") == 1
    assert sum(s.value for s in fams["sorter_state"].samples) == 1
    assert value(fams, "sorter_state_code") == 6
    # frames per camera
    for cam in ("cam0", "cam1"):
        assert value(fams, "sorter_frames_captured_total", camera=cam) > 0
        for reason in ("queue", "torn", "source"):
            assert value(fams, "sorter_frames_dropped_total", camera=cam, reason=reason) >= 0
        assert value(fams, "sorter_frame_queue_depth", camera=cam) >= 0
        assert value(fams, "sorter_camera_online", camera=cam) == 1
    # queues
    for g in ("sorter_piece_batches_queued", "sorter_open_tracks", "sorter_ejects_in_flight"):
        assert value(fams, g) >= 0
    # decisions per class, fractions, ejects
    assert total(fams, "sorter_decisions_total") > 0
    assert value(fams, "sorter_decisions_total", cls="ndfeb") > 0
    assert total(fams, "sorter_decisions_total") == value(fams, "sorter_pieces_total")
    assert total(fams, "sorter_fraction_pieces_total") == value(fams, "sorter_pieces_total")
    assert value(fams, "sorter_eject_commands_total", outcome="accepted") > 0
    assert value(fams, "sorter_ejects_sent_total") >= value(fams, "sorter_eject_commands_total", outcome="accepted")
    assert value(fams, "sorter_plc_ejects_executed_total") > 0
    assert value(fams, "sorter_plc_ejects_late_total") >= 0
    # the PLC
    assert value(fams, "sorter_plc_online") == 1
    assert 0 < value(fams, "sorter_plc_rtt_seconds") < 1
    assert value(fams, "sorter_belt_speed_mm_per_second") > 0
    # per-stage latency histograms, decision latency
    for stage in ("segment", "track", "infer", "plan", "plc_send"):
        assert value(fams, "sorter_stage_seconds_count", stage=stage) > 0
        assert value(fams, "sorter_stage_seconds_bucket", stage=stage, le="+Inf") == value(
            fams, "sorter_stage_seconds_count", stage=stage
        )
    assert value(fams, "sorter_decision_latency_seconds_count") > 0
    assert (
        0
        < value(fams, "sorter_decision_latency_seconds_sum") / value(fams, "sorter_decision_latency_seconds_count")
        < 2
    )
    assert value(fams, "sorter_model_info", version=report["model_version"]) == 1
    assert value(fams, "sorter_pieces_per_minute") > 0

    # after the run: the counters agree with the demo's report (every observation went in)
    service = scraped["service"]
    end = parse(render(service)[0])
    assert value(end, "sorter_pieces_total") == report["records"]
    assert value(end, "sorter_decision_latency_seconds_count") == report["decision_latency_ms"]["n"]
    assert value(end, "sorter_eject_commands_total", outcome="accepted") == report["eject_outcomes"]["accepted"]
    assert total(end, "sorter_frames_captured_total") == report["frames_captured"]
    assert value(end, "sorter_stage_seconds_count", stage="segment") == service.times.n["segment"]
    assert value(end, "sorter_state", sorter_state="Stopped") == 1
    assert len(service.latencies_ms) <= service.latencies_ms.maxlen


def test_each_service_has_its_own_registry(tmp_path):
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    services = []
    try:
        for i in range(2):
            c = cfg.model_copy(update={"records": cfg.records.model_copy(update={"path": tmp_path / f"r{i}.sqlite"})})
            services.append(LineService(c, run_id=f"r{i}"))
        services[0].times.add("segment", 0.003)
        services[0].metrics.observe_latency_ms(120.0)
        a, b = (parse(render(s)[0]) for s in services)
        assert value(a, "sorter_stage_seconds_count", stage="segment") == 1
        assert value(a, "sorter_stage_seconds_bucket", stage="segment", le="0.005") == 1
        assert value(a, "sorter_decision_latency_seconds_count") == 1
        assert value(a, "sorter_decision_latency_seconds_bucket", le="0.15") == 1
        assert "sorter_stage_seconds" not in b or not b["sorter_stage_seconds"].samples
        assert value(b, "sorter_decision_latency_seconds_count") == 0
        assert value(b, "sorter_state", sorter_state="Stopped") == 1
        assert value(b, "sorter_plc_online") == 0
        # OpenMetrics when the scraper asks for it
        body, ctype = services[1].metrics.render("application/openmetrics-text; version=1.0.0")
        assert ctype.startswith("application/openmetrics-text") and body.rstrip().endswith(b"# EOF")
    finally:
        for s in services:
            s.records.close()
