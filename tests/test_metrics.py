"""Prometheus metrics of the line service (sorter/north/metrics.py): scraped mid-run and parsed back."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sim.config import load_sim_config
from sim.demo import run_demo
from sorter.core.alarms import Alarm
from sorter.core.linestate import CameraStats, LineCounters, LineStats
from sorter.core.messages import FieldState, LatencyParts, Outcome, PlcStatus
from sorter.core.packml import State
from sorter.north.metrics import ServiceMetrics
from tests.conftest import wait_until

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


def make_stats(**changes: Any) -> LineStats:
    """A LineStats with a distinct value in every field (so a metric reading the wrong one shows)."""
    counters = LineCounters(
        pieces=40,
        frames_processed=900,
        frames_unplaced=3,
        frames_failed=1,
        batches_failed=2,
        records_flush_failed=4,
        field_wait_timeouts=5,
        by_class=Counter({"ndfeb": 25, "steel": 15}),
        by_fraction=Counter({"ndfeb": 25, "residue": 15}),
        outcomes=Counter({Outcome.ACCEPTED: 21, Outcome.EXPIRED: 2, Outcome.TIMEOUT: 1, Outcome.NO_EJECT: 15}),
        field_states=Counter({FieldState.OK: 37, FieldState.INCOMPLETE: 3}),
    )
    base: dict[str, Any] = dict(
        line="line-1",
        run_id="r1",
        t=0.0,
        state=State.EXECUTE,
        allowed=("Hold", "Stop", "Abort"),
        counters=counters,
        cameras=(
            CameraStats("cam0", True, None, 500, 6, 7, 8, 2, 1, 0),
            CameraStats("cam1", False, "no frames", 400, 0, 0, 0, 0, 3, 2),
        ),
        plc=PlcStatus(
            online=True,
            belt_running=True,
            air_ok=True,
            queue_free=60,
            ejects_done=19,
            ejects_late=1,
            speed_mm_s=2500.0,
            rtt_ms=4.0,
        ),
        plc_protocol="modbus",
        hallbar=None,
        pieces_queued=1,
        ejects_in_flight=2,
        open_tracks=9,
        records_pending=11,
        model_version="m-1",
        model_provider="CPUExecutionProvider",
        model_labels=("ferrite", "ndfeb", "other", "smco", "steel"),
        fractions=("ndfeb", "ferrite_smco", "residue"),
        default_fraction="residue",
        min_confidence=0.9,
        fallback_min_confidence=0.97,
        fraction_counts={"ndfeb": 20, "ferrite_smco": 0, "residue": 16},
        pieces_per_minute=123.0,
        purity={"ndfeb": 0.99, "ferrite_smco": float("nan"), "residue": 0.8},
        latency_ms_p99=180.0,
        alarms_active=(Alarm("camera_cam1_offline", "no frames", "check", 1.0),),
        alarms_shown=(Alarm("camera_cam1_offline", "no frames", "check", 1.0),),
    )
    return LineStats(**(base | changes))


@pytest.mark.fast
def test_every_metric_shows_the_published_stats():
    m = ServiceMetrics()
    assert parse(m.render()[0]).get("sorter_state") is None  # nothing published yet: histograms only
    m.publish(make_stats())
    f = parse(m.render()[0])
    assert value(f, "sorter_state", sorter_state="Execute") == 1
    assert sum(s.value for s in f["sorter_state"].samples) == 1
    assert value(f, "sorter_state_code") == 6
    assert value(f, "sorter_model_info", version="m-1", provider="CPUExecutionProvider") == 1
    assert value(f, "sorter_frames_captured_total", camera="cam0") == 500
    assert value(f, "sorter_frames_dropped_total", camera="cam0", reason="queue") == 6
    assert value(f, "sorter_frames_dropped_total", camera="cam0", reason="torn") == 7
    assert value(f, "sorter_frames_dropped_total", camera="cam0", reason="source") == 8
    assert value(f, "sorter_frame_queue_depth", camera="cam0") == 2
    assert value(f, "sorter_camera_online", camera="cam1") == 0
    assert value(f, "sorter_camera_stalls_total", camera="cam1") == 3
    assert value(f, "sorter_camera_reconnects_total", camera="cam1") == 2
    for key, n in (
        ("frames_processed", 900),
        ("frames_unplaced", 3),
        ("frames_failed", 1),
        ("batches_failed", 2),
        ("records_flush_failed", 4),
        ("field_wait_timeouts", 5),
    ):
        assert value(f, f"sorter_{key}_total") == n, key
    assert value(f, "sorter_piece_batches_queued") == 1
    assert value(f, "sorter_open_tracks") == 9
    assert value(f, "sorter_ejects_in_flight") == 2
    assert value(f, "sorter_records_pending_writes") == 11
    assert value(f, "sorter_plc_queue_free") == 60
    assert value(f, "sorter_pieces_total") == 40
    assert value(f, "sorter_decisions_total", cls="ndfeb") == 25
    assert value(f, "sorter_decisions_total", cls="smco") == 0  # every label of the model, seen or not
    assert value(f, "sorter_fraction_pieces_total", fraction="residue") == 15
    assert value(f, "sorter_eject_commands_total", outcome="accepted") == 21
    assert value(f, "sorter_eject_commands_total", outcome="expired") == 2
    assert value(f, "sorter_ejects_sent_total") == 22  # accepted + timeout
    assert value(f, "sorter_pieces_without_command_total", outcome="no_eject") == 15
    assert value(f, "sorter_pieces_without_command_total", outcome="held") == 0
    # the Hall bar's states only: the field-wait timeouts are a counter of their own, not a state
    states = {s.labels["state"] for s in f["sorter_field_readings"].samples if s.name.endswith("_total")}
    assert states == {"ok", "incomplete", "missing", "offline"}
    assert value(f, "sorter_field_readings_total", state="ok") == 37
    assert value(f, "sorter_plc_ejects_executed_total") == 19
    assert value(f, "sorter_plc_ejects_late_total") == 1
    assert value(f, "sorter_plc_rtt_seconds") == pytest.approx(0.004)
    assert value(f, "sorter_belt_speed_mm_per_second") == 2500
    assert "sorter_hallbar_online" not in f  # the line has no bar
    assert value(f, "sorter_alarms_active") == 1
    assert value(f, "sorter_alarm_active", alarm="camera_cam1_offline") == 1
    assert value(f, "sorter_pieces_per_minute") == 123
    assert value(f, "sorter_estimated_purity", fraction="ndfeb") == pytest.approx(0.99)
    assert "ferrite_smco" not in {s.labels["fraction"] for s in f["sorter_estimated_purity"].samples}  # NaN: none yet


@pytest.mark.fast
def test_each_line_has_its_own_registry():
    a_m, b_m = ServiceMetrics(), ServiceMetrics()
    a_m.observe_stage("segment", 0.003)
    a_m.observe_latency_ms(120.0)
    b_m.publish(make_stats(state=State.STOPPED, plc=PlcStatus()))
    a, b = parse(a_m.render()[0]), parse(b_m.render()[0])
    assert value(a, "sorter_stage_seconds_count", stage="segment") == 1
    assert value(a, "sorter_stage_seconds_bucket", stage="segment", le="0.005") == 1
    assert value(a, "sorter_decision_latency_seconds_count") == 1
    assert value(a, "sorter_decision_latency_seconds_bucket", le="0.15") == 1
    assert "sorter_stage_seconds" not in b or not b["sorter_stage_seconds"].samples
    assert value(b, "sorter_decision_latency_seconds_count") == 0
    # the decision latency's parts; plc only once the PLC accepted
    a_m.observe_latency_parts(LatencyParts(90.0, 0.0, 12.0, 21.0))
    a_m.observe_latency_parts(LatencyParts(95.0, 8.0, 30.0))
    a = parse(a_m.render()[0])
    assert value(a, "sorter_decision_latency_part_seconds_count", part="compute") == 2
    assert value(a, "sorter_decision_latency_part_seconds_bucket", part="compute", le="0.015") == 1
    assert value(a, "sorter_decision_latency_part_seconds_count", part="plc") == 1
    assert value(a, "sorter_decision_latency_part_seconds_sum", part="settle") == pytest.approx(0.185)
    assert value(a, "process_resident_memory_bytes") > 0  # the process's own figures, in this registry too
    assert value(b, "sorter_state", sorter_state="Stopped") == 1
    assert value(b, "sorter_plc_online") == 0
    # OpenMetrics when the scraper asks for it
    body, ctype = b_m.render("application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text") and body.rstrip().endswith(b"# EOF")


@pytest.mark.line
async def test_metrics_scraped_mid_run(tmp_path):
    """The wiring on a real line: the histograms get every observation and the scrape shows the
    published stats. Needs the real-time simulator for a running line (a few s of feed)."""
    scraped: dict[str, Any] = {}

    async def scrape(line, sim) -> None:
        # until the line has sorted a few dozen pieces and sent commands; then what is asserted is read
        # from one snapshot (the stats below are what the scrape renders: no await in between)
        await wait_until(
            lambda: (
                (s := line.metrics.stats) is not None
                and s.counters.pieces >= 30
                and s.counters.outcomes["accepted"] >= 5
            ),
            20,
            "pieces sorted",
        )
        scraped["line"] = line
        scraped["stats"] = line.metrics.stats  # what the scrape below renders (no await in between)
        scraped["mid"] = line.metrics.render()

    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    report = await run_demo(cfg, duration=6, seed=3, run_dir=tmp_path / "run", during=scrape)
    body, ctype = scraped["mid"]
    stats: LineStats = scraped["stats"]
    assert ctype.startswith("text/plain")
    fams = parse(body)
    assert value(fams, "sorter_state", sorter_state="Execute") == 1
    for cam in stats.cameras:
        assert value(fams, "sorter_frames_captured_total", camera=cam.name) == cam.captured > 0
        assert value(fams, "sorter_camera_online", camera=cam.name) == 1
    assert value(fams, "sorter_pieces_total") == stats.counters.pieces > 0
    assert total(fams, "sorter_decisions_total") == value(fams, "sorter_pieces_total")
    assert total(fams, "sorter_fraction_pieces_total") == value(fams, "sorter_pieces_total")
    assert value(fams, "sorter_eject_commands_total", outcome="accepted") > 0
    assert value(fams, "sorter_plc_online") == 1
    assert 0 < value(fams, "sorter_plc_rtt_seconds") < 1
    # per-stage latency histograms, decision latency: fed by the service as it works
    for stage in ("segment", "track", "infer", "plan", "plc_send"):
        assert value(fams, "sorter_stage_seconds_count", stage=stage) > 0
        assert value(fams, "sorter_stage_seconds_bucket", stage=stage, le="+Inf") == value(
            fams, "sorter_stage_seconds_count", stage=stage
        )
    assert value(fams, "sorter_decision_latency_seconds_count") > 0
    assert value(fams, "sorter_model_info", version=report["model_version"]) == 1

    # after the run: the counters agree with the demo's report (every observation went in)
    line = scraped["line"]
    end = parse(line.metrics.render()[0])
    assert value(end, "sorter_pieces_total") == report["records"]
    assert value(end, "sorter_decision_latency_seconds_count") == report["decision_latency_ms"]["n"]
    for part, got in report["latency_parts_ms"].items():  # the same pieces: commands the PLC accepted
        assert value(end, "sorter_decision_latency_part_seconds_count", part=part) == got["n"] > 0, part
    assert value(end, "sorter_eject_commands_total", outcome="accepted") == report["eject_outcomes"]["accepted"]
    assert total(end, "sorter_frames_captured_total") == report["frames_captured"]
    assert value(end, "sorter_stage_seconds_count", stage="segment") == line.service.times.n["segment"]
    assert value(end, "sorter_state", sorter_state="Stopped") == 1
