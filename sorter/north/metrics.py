"""Prometheus metrics of one line service (`/metrics` of the web HMI).

Each service owns a CollectorRegistry (never prometheus-client's global one: tests, the benchmark
and the demo build several services in one process). Two kinds of metric live in it:

- histograms that need every observation: the wall time of each pipeline stage (fed by a hook in
  `StageTimes.add`, so every stage the service times is covered) and the decision latency (last
  view's capture -> eject command accepted by the PLC). `Histogram.observe` is a lock and a few
  additions, cheap enough for the sorting loop and the worker threads;
- everything the service already counts (frames, queues, decisions, ejects, PLC status, state,
  alarms), read from the service's own state by a custom Collector at scrape time: no extra work
  on the sorting loop.

    from sorter.north.metrics import render
    body, content_type = render(service)        # bytes in prometheus-client's text exposition

Metric names start with `sorter_`; see `METRICS` below for the list and docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from sorter.core.packml import State

if TYPE_CHECKING:
    from sorter.line.service import LineService

T = TypeVar("T")

# stage wall times: segmentation of one frame is ~1-10 ms, a decision batch's inference tens of ms,
# waiting for the Hall bar up to magnetometer.wait_ms
STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# capture -> accepted: the budget is a few hundred ms (the commands reach the PLC well ahead of the valves)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)

# outcomes of an eject command handed to the PLC link (sorter/drivers/plc/base.py), and of pieces planned without one
COMMAND_OUTCOMES = ("accepted", "expired", "offline", "timeout")
NO_COMMAND_OUTCOMES = ("no_eject", "conflict", "no_speed", "held")

METRICS = {
    "sorter_stage_seconds": "histogram{stage}: wall time per pipeline stage",
    "sorter_decision_latency_seconds": "histogram: last view's capture -> eject command accepted by the PLC",
    "sorter_state": "stateset{sorter_state}: the line's PackML state (1 for the current one)",
    "sorter_state_code": "gauge: PackML StateCurrent number (6 = Execute)",
    "sorter_frames_captured_total": "counter{camera}",
    "sorter_frames_dropped_total": "counter{camera,reason}: queue (overflow), torn (shm slot), source",
    "sorter_frames_processed_total / _unplaced_total / _failed_total": "counter",
    "sorter_camera_online, sorter_camera_stalls_total, sorter_camera_reconnects_total": "{camera}",
    "sorter_frame_queue_depth": "gauge{camera}: frames waiting for the vision thread",
    "sorter_piece_batches_queued": "gauge: finalised batches waiting for a decision",
    "sorter_open_tracks": "gauge: pieces still being tracked",
    "sorter_ejects_in_flight": "gauge: commands sent, not yet answered",
    "sorter_records_pending_writes": "gauge: rows waiting for the records thread",
    "sorter_plc_queue_free": "gauge: free slots in the PLC's eject queue",
    "sorter_pieces_total": "counter: pieces decided and recorded",
    "sorter_decisions_total": "counter{cls}: decided class",
    "sorter_fraction_pieces_total": "counter{fraction}: where pieces were sent",
    "sorter_eject_commands_total": "counter{outcome}: accepted, expired (too late, not sent), offline, timeout",
    "sorter_ejects_sent_total": "counter: commands that went out to the PLC (accepted + timeout)",
    "sorter_pieces_without_command_total": "counter{outcome}: no_eject, conflict, no_speed, held",
    "sorter_plc_ejects_executed_total / sorter_plc_ejects_late_total": "counter: as the PLC reports them",
    "sorter_plc_rtt_seconds, sorter_plc_online, sorter_belt_speed_mm_per_second": "gauge",
    "sorter_plc_alarm": "gauge{alarm}: 1 for each alarm the PLC reports",
    "sorter_alarms_active / sorter_alarm_active{alarm}": "gauge: the line's alarm board",
    "sorter_pieces_per_minute, sorter_estimated_purity{fraction}": "gauge: live figures (linestate.py)",
    "sorter_field_readings_total": "counter{state}: ok, incomplete, missing, offline",
    "sorter_hallbar_online": "gauge (absent without a Hall bar)",
    "sorter_model": "info{version,provider}",
}


class ServiceMetrics:
    """The registry of one service, its histograms, and the collector reading the service's state."""

    def __init__(self, service: LineService) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.stage_seconds = Histogram(
            "sorter_stage_seconds",
            "Wall time per pipeline stage (segment, track, infer, field_wait, plan, plc_send)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.decision_latency = Histogram(
            "sorter_decision_latency_seconds",
            "Last view's capture to eject command accepted by the PLC",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ServiceCollector(service))
        self._stages: dict[str, Any] = {}

    def observe_stage(self, stage: str, seconds: float) -> None:
        child = self._stages.get(stage)
        if child is None:
            child = self._stages[stage] = self.stage_seconds.labels(stage=stage)
        child.observe(seconds)

    def observe_latency_ms(self, ms: float) -> None:
        self.decision_latency.observe(ms / 1000)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (Prometheus text; OpenMetrics if `accept` asks for it) and its content type."""
        if accept:
            from prometheus_client.exposition import choose_encoder

            encoder, ctype = choose_encoder(accept)
            return encoder(self.registry), ctype
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def render(service: LineService, accept: str | None = None) -> tuple[bytes, str]:
    """`/metrics` of this service: (body, content type)."""
    metrics: ServiceMetrics | None = getattr(service, "metrics", None)
    if metrics is None:  # a service built without metrics (a test double): counters only, no histograms
        metrics = service.metrics = ServiceMetrics(service)  # type: ignore[misc]
    return metrics.render(accept)


def _snapshot(d: Any) -> dict[Any, Any]:
    """A copy of a dict the loop may be changing (the HMI scrapes from a worker thread)."""
    return _retry(lambda: dict(d)) or {}


def _retry(fn: Callable[[], T]) -> T | None:
    """Read state the service loop may be changing meanwhile: retry a read that raced with a write."""
    for _ in range(5):
        try:
            return fn()
        except (RuntimeError, IndexError):  # dict changed size during iteration; deque emptied meanwhile
            continue
    return None


class _ServiceCollector(Collector):
    def __init__(self, service: LineService) -> None:
        self.svc = service

    def describe(self) -> list[Metric]:
        return []  # built at scrape time; no name clash is possible with the two histograms

    def collect(self) -> Iterator[Metric]:
        svc = self.svc
        yield from self._state(svc)
        yield from self._cameras(svc)
        yield from self._queues(svc)
        yield from self._decisions(svc)
        yield from self._plc(svc)
        yield from self._alarms(svc)
        yield from self._live(svc)

    # --- state ---
    def _state(self, svc: LineService) -> Iterator[Metric]:
        st = svc.control.state
        yield StateSetMetricFamily("sorter_state", "The line's PackML state", {s.label: s is st for s in State})
        yield GaugeMetricFamily("sorter_state_code", "PackML StateCurrent number (6 = Execute)", value=int(st))
        clf = svc.classifier
        yield InfoMetricFamily(
            "sorter_model", "The classifier model in use", value={"version": clf.version, "provider": clf.provider}
        )

    # --- frames ---
    def _cameras(self, svc: LineService) -> Iterator[Metric]:
        caps = {n: _retry(c.stats) for n, c in list(svc.captures.items())}
        captured = CounterMetricFamily("sorter_frames_captured", "Frames captured per camera", labels=["camera"])
        dropped = CounterMetricFamily(
            "sorter_frames_dropped",
            "Frames lost per camera: queue overflow, torn shared-memory slot, dropped at the source hand-off",
            labels=["camera", "reason"],
        )
        online = GaugeMetricFamily("sorter_camera_online", "1 if the camera delivers frames", labels=["camera"])
        stalls = CounterMetricFamily("sorter_camera_stalls", "Stalls seen by the watchdog", labels=["camera"])
        reconnects = CounterMetricFamily("sorter_camera_reconnects", "Reconnects per camera", labels=["camera"])
        queued = GaugeMetricFamily("sorter_frame_queue_depth", "Frames queued for the vision thread", labels=["camera"])
        for n, s in caps.items():
            if s is None:
                continue
            captured.add_metric([n], s["captured"])
            for reason, key in (("queue", "dropped"), ("torn", "torn"), ("source", "source_dropped")):
                dropped.add_metric([n, reason], s[key])
            online.add_metric([n], 1.0 if s["online"] else 0.0)
            stalls.add_metric([n], s["stalls"])
            reconnects.add_metric([n], s["reconnects"])
            queued.add_metric([n], s["queued"])
        yield from (captured, dropped, online, stalls, reconnects, queued)
        counts = _snapshot(svc.counts)
        for key, doc in (
            ("frames_processed", "Frames segmented and tracked"),
            ("frames_unplaced", "Frames without a belt position (no latched count, no clock model yet)"),
            ("frames_failed", "Frames whose processing raised"),
            ("batches_failed", "Decision batches that raised"),
            ("records_flush_failed", "Failed commits of the records database"),
            ("field_wait_timeouts", "Decisions that stopped waiting for the Hall bar"),
        ):
            yield CounterMetricFamily(f"sorter_{key}", doc, value=counts.get(key, 0))

    # --- queues ---
    def _queues(self, svc: LineService) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "sorter_piece_batches_queued",
            "Batches of finalised pieces waiting for a decision",
            value=svc._pieces.qsize(),
        )
        yield GaugeMetricFamily("sorter_open_tracks", "Pieces still being tracked", value=svc.tracker.open_tracks)
        yield GaugeMetricFamily(
            "sorter_ejects_in_flight", "Eject commands sent, not yet answered", value=len(svc._sends)
        )
        yield GaugeMetricFamily(
            "sorter_records_pending_writes", "Rows waiting to be committed", value=svc.records.pending_writes
        )
        yield GaugeMetricFamily(
            "sorter_plc_queue_free", "Free slots in the PLC's eject queue", value=svc.plc.status.queue_free
        )

    # --- decisions and ejects ---
    def _decisions(self, svc: LineService) -> Iterator[Metric]:
        counts = _snapshot(svc.counts)
        yield CounterMetricFamily("sorter_pieces", "Pieces decided and recorded", value=counts.get("pieces", 0))
        classes = sorted({*svc.classifier.labels, *(k[6:] for k in counts if k.startswith("class_"))})
        dec = CounterMetricFamily("sorter_decisions", "Decisions per class", labels=["cls"])
        for c in classes:
            dec.add_metric([c], counts.get(f"class_{c}", 0))
        yield dec
        fractions = list(dict.fromkeys([*svc.cfg.fractions, *(k[9:] for k in counts if k.startswith("fraction_"))]))
        frac = CounterMetricFamily("sorter_fraction_pieces", "Pieces sent to each fraction", labels=["fraction"])
        for f in fractions:
            frac.add_metric([f], counts.get(f"fraction_{f}", 0))
        yield frac
        cmd = CounterMetricFamily(
            "sorter_eject_commands",
            "Eject commands by outcome: accepted, expired (too late: not sent), offline (link down), timeout",
            labels=["outcome"],
        )
        for o in COMMAND_OUTCOMES:
            cmd.add_metric([o], counts.get(f"eject_{o}", 0))
        yield cmd
        yield CounterMetricFamily(
            "sorter_ejects_sent",
            "Eject commands that went out to the PLC (accepted or unanswered)",
            value=counts.get("eject_accepted", 0) + counts.get("eject_timeout", 0),
        )
        nocmd = CounterMetricFamily(
            "sorter_pieces_without_command",
            "Pieces planned without an eject command: no_eject (default fraction), conflict, no_speed, held",
            labels=["outcome"],
        )
        for o in NO_COMMAND_OUTCOMES:
            nocmd.add_metric([o], counts.get(f"eject_{o}", 0))
        yield nocmd
        field = CounterMetricFamily("sorter_field_readings", "Decisions by Hall-bar reading", labels=["state"])
        for k, v in sorted(counts.items()):
            if k.startswith("field_") and k != "field_wait_timeouts":
                field.add_metric([k[6:]], v)
        yield field

    # --- PLC ---
    def _plc(self, svc: LineService) -> Iterator[Metric]:
        st = svc.plc.status
        yield GaugeMetricFamily("sorter_plc_online", "1 if the PLC link is up", value=1.0 if st.online else 0.0)
        yield GaugeMetricFamily("sorter_plc_rtt_seconds", "PLC round-trip time (last poll)", value=st.rtt_ms / 1000)
        yield GaugeMetricFamily("sorter_belt_speed_mm_per_second", "Belt speed from the encoder", value=st.speed_mm_s)
        yield GaugeMetricFamily(
            "sorter_belt_running", "1 if the PLC reports the belt running", value=1.0 if st.belt_running else 0.0
        )
        yield CounterMetricFamily("sorter_plc_ejects_executed", "Ejects the PLC fired", value=st.ejects_done)
        yield CounterMetricFamily("sorter_plc_ejects_late", "Ejects the PLC fired late", value=st.ejects_late)
        alarm = GaugeMetricFamily("sorter_plc_alarm", "1 for each alarm the PLC reports", labels=["alarm"])
        for a in st.alarms:
            alarm.add_metric([a], 1.0)
        yield alarm
        if svc.hallbar is not None:
            yield GaugeMetricFamily(
                "sorter_hallbar_online", "1 if the Hall-sensor bar delivers", value=1.0 if svc.hallbar.online else 0.0
            )

    # --- alarms and live figures ---
    def _alarms(self, svc: LineService) -> Iterator[Metric]:
        active = _retry(lambda: list(svc.alarm_board.active)) or []
        yield GaugeMetricFamily("sorter_alarms_active", "Active alarms on the line's board", value=len(active))
        per = GaugeMetricFamily("sorter_alarm_active", "1 for each active alarm", labels=["alarm"])
        for a in active:
            per.add_metric([a.name], 1.0)
        yield per

    def _live(self, svc: LineService) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "sorter_pieces_per_minute",
            "Pieces per minute over the last minute",
            value=_retry(svc.live.pieces_per_minute) or 0.0,
        )
        pur = GaugeMetricFamily(
            "sorter_estimated_purity",
            "Purity per fraction estimated from decision confidences (no ground truth)",
            labels=["fraction"],
        )
        for f, p in (_retry(svc.live.purity) or {}).items():
            if p == p:  # NaN until the fraction has a piece
                pur.add_metric([f], p)
        yield pur
