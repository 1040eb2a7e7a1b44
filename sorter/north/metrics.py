"""Prometheus metrics of one line service (`/metrics` of the web HMI).

Each service owns a CollectorRegistry (never prometheus-client's global one: tests, the benchmark
and the demo build several services in one process). Two kinds of metric live in it:

- histograms that need every observation: the wall time of each pipeline stage (fed by a hook in
  `StageTimes.add`, so every stage the service times is covered) and the decision latency (last
  view's capture -> eject command accepted by the PLC) and its parts (settle, field_wait, compute, plc:
  sorter/core/messages.py LatencyParts). `Histogram.observe` is a lock and a few
  additions, cheap enough for the sorting loop and the worker threads;
- everything the service already counts (frames, queues, decisions, ejects, PLC status, state,
  alarms), read at scrape time by a custom Collector from the latest `LineStats` the service
  published (`publish`, on the service loop, a few times a second): the scrape, on the HMI's
  thread, reads an immutable snapshot and never the service's live state.

    metrics = ServiceMetrics()                   # the wiring subscribes metrics.publish to the line
    body, content_type = metrics.render()        # bytes in prometheus-client's text exposition

Metric names start with `sorter_`; see `METRICS` below for the list and docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from sorter.core.linestate import LineStats
from sorter.core.messages import COMMAND_OUTCOMES, NO_COMMAND_OUTCOMES, FieldState, LatencyParts, Outcome
from sorter.core.packml import State

# stage wall times: segmentation of one frame is ~1-10 ms, a decision batch's inference tens of ms,
# waiting for the Hall bar up to magnetometer.wait_ms
STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# capture -> accepted: the budget is a few hundred ms (the commands reach the PLC well ahead of the valves)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
# its parts: the PC's compute is budgeted at ~20 ms, the settle distance and the PLC poll are tens of ms
PART_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
LATENCY_PARTS = ("settle", "field_wait", "compute", "plc")

METRICS = {
    "sorter_stage_seconds": "histogram{stage}: wall time per pipeline stage",
    "sorter_decision_latency_seconds": "histogram: last view's capture -> eject command accepted by the PLC",
    "sorter_decision_latency_part_seconds": "histogram{part}: settle, field_wait, compute, plc (they add up to it)",
    "process_resident_memory_bytes, process_cpu_seconds_total, ...": "the service process (prometheus-client)",
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
    "sorter_shadow_pieces": "gauge{model,result}: a shadow model's pieces so far: agree, differ, skipped",
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
    # registered by the wiring where the config has them (sorter/north/edge.py, plantdb/forwarder.py)
    "sorter_sparkplug_online, sorter_sparkplug_buffered": "gauge: edge node born; changes waiting for the broker",
    "sorter_sparkplug_dropped_total, sorter_sparkplug_messages_total{type}": "counter: buffer overflow; sent",
    "sorter_plantdb_lag_seconds, sorter_plantdb_lag_rows": "gauge: records not yet in the plant database",
    "sorter_plantdb_online, sorter_plantdb_forwarded_rows_total": "gauge, counter: the journal forwarder",
}


class ServiceMetrics:
    """The registry of one line, its histograms, and the collector reading the latest published stats."""

    def __init__(self) -> None:
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
        self.latency_part = Histogram(
            "sorter_decision_latency_part_seconds",
            "The decision latency in parts: settle (last view -> the frame showing the piece left the view "
            "arrived), field_wait (the Hall bar), compute (the PC's time from its last input to the command "
            "handed to the PLC link), plc (handed over -> acceptance seen)",
            ["part"],
            buckets=PART_BUCKETS,
            registry=self.registry,
        )
        self._parts = {p: self.latency_part.labels(part=p) for p in LATENCY_PARTS}
        # the process's RSS, CPU seconds, open files (Linux /proc): prometheus-client's own collector, in
        # this registry too (each service's registry is its own, never the global one)
        ProcessCollector(registry=self.registry)
        self.stats: LineStats | None = None  # replaced whole by publish(): a reference swap, atomic
        self.registry.register(_StatsCollector(self))
        self._stages: dict[str, Any] = {}

    def publish(self, stats: LineStats) -> None:
        self.stats = stats

    def observe_stage(self, stage: str, seconds: float) -> None:
        child = self._stages.get(stage)
        if child is None:
            child = self._stages[stage] = self.stage_seconds.labels(stage=stage)
        child.observe(seconds)

    def observe_latency_ms(self, ms: float) -> None:
        self.decision_latency.observe(ms / 1000)

    def observe_latency_parts(self, parts: LatencyParts) -> None:
        self._parts["settle"].observe(parts.settle_ms / 1000)
        self._parts["field_wait"].observe(parts.field_wait_ms / 1000)
        self._parts["compute"].observe(parts.compute_ms / 1000)
        if parts.plc_ms is not None:
            self._parts["plc"].observe(parts.plc_ms / 1000)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (Prometheus text; OpenMetrics if `accept` asks for it) and its content type."""
        if accept:
            from prometheus_client.exposition import choose_encoder

            encoder, ctype = choose_encoder(accept)
            return encoder(self.registry), ctype
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StatsCollector(Collector):
    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # built at scrape time; no name clash is possible with the two histograms

    def collect(self) -> Iterator[Metric]:
        s = self.metrics.stats
        if s is None:  # the line has not published yet: only the histograms
            return
        yield from _state(s)
        yield from _cameras(s)
        yield from _queues(s)
        yield from _decisions(s)
        yield from _plc(s)
        yield from _alarms(s)
        yield from _live(s)
        yield from _shadow(s)


def _state(s: LineStats) -> Iterator[Metric]:
    yield StateSetMetricFamily("sorter_state", "The line's PackML state", {st.label: st is s.state for st in State})
    yield GaugeMetricFamily("sorter_state_code", "PackML StateCurrent number (6 = Execute)", value=int(s.state))
    yield InfoMetricFamily(
        "sorter_model",
        "The classifier model in use",
        value={"version": s.model_version, "provider": s.model_provider},
    )


def _cameras(s: LineStats) -> Iterator[Metric]:
    captured = CounterMetricFamily("sorter_frames_captured", "Frames captured per camera", labels=["camera"])
    dropped = CounterMetricFamily(
        "sorter_frames_dropped",
        "Frames lost per camera: queue overflow, torn (shared-memory slot overwritten, GenICam frame incomplete), "
        "dropped at the source hand-off, missing (a gap in the camera's frame IDs)",
        labels=["camera", "reason"],
    )
    online = GaugeMetricFamily("sorter_camera_online", "1 if the camera delivers frames", labels=["camera"])
    stalls = CounterMetricFamily("sorter_camera_stalls", "Stalls seen by the watchdog", labels=["camera"])
    reconnects = CounterMetricFamily("sorter_camera_reconnects", "Reconnects per camera", labels=["camera"])
    queued = GaugeMetricFamily("sorter_frame_queue_depth", "Frames queued for the vision thread", labels=["camera"])
    for cam in s.cameras:
        captured.add_metric([cam.name], cam.captured)
        for reason, lost in (
            ("queue", cam.dropped),
            ("torn", cam.torn),
            ("source", cam.source_dropped),
            ("missing", cam.missing),  # never arrived: a gap in the camera's frame IDs (GenICam)
        ):
            dropped.add_metric([cam.name, reason], lost)
        online.add_metric([cam.name], 1.0 if cam.online else 0.0)
        stalls.add_metric([cam.name], cam.stalls)
        reconnects.add_metric([cam.name], cam.reconnects)
        queued.add_metric([cam.name], cam.queued)
    yield from (captured, dropped, online, stalls, reconnects, queued)
    n = s.counters
    for key, value, doc in (
        ("frames_processed", n.frames_processed, "Frames segmented and tracked"),
        ("frames_unplaced", n.frames_unplaced, "Frames without a belt position (no latched count, no clock model yet)"),
        ("frames_failed", n.frames_failed, "Frames whose processing raised"),
        (
            "frames_parted_coarse",
            n.frames_parted_coarse,
            "Frames whose touching pieces were parted on the downscaled image: the vision thread was behind",
        ),
        ("batches_failed", n.batches_failed, "Decision batches that raised"),
        ("records_flush_failed", n.records_flush_failed, "Failed commits of the records database"),
        ("field_wait_timeouts", n.field_wait_timeouts, "Decisions that stopped waiting for the Hall bar"),
    ):
        yield CounterMetricFamily(f"sorter_{key}", doc, value=value)


def _queues(s: LineStats) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "sorter_piece_batches_queued", "Batches of finalised pieces waiting for a decision", value=s.pieces_queued
    )
    yield GaugeMetricFamily("sorter_open_tracks", "Pieces still being tracked", value=s.open_tracks)
    yield GaugeMetricFamily(
        "sorter_ejects_in_flight", "Eject commands sent, not yet answered", value=s.ejects_in_flight
    )
    yield GaugeMetricFamily("sorter_records_pending_writes", "Rows waiting to be committed", value=s.records_pending)
    yield GaugeMetricFamily("sorter_plc_queue_free", "Free slots in the PLC's eject queue", value=s.plc.queue_free)


def _decisions(s: LineStats) -> Iterator[Metric]:
    n = s.counters
    yield CounterMetricFamily("sorter_pieces", "Pieces decided and recorded", value=n.pieces)
    dec = CounterMetricFamily("sorter_decisions", "Decisions per class", labels=["cls"])
    for c in sorted({*s.model_labels, *n.by_class}):
        dec.add_metric([c], n.by_class[c])
    yield dec
    frac = CounterMetricFamily("sorter_fraction_pieces", "Pieces sent to each fraction", labels=["fraction"])
    for f in dict.fromkeys([*s.fractions, *n.by_fraction]):
        frac.add_metric([f], n.by_fraction[f])
    yield frac
    cmd = CounterMetricFamily(
        "sorter_eject_commands",
        "Eject commands by outcome: accepted, expired (too late: not sent), offline (link down), timeout",
        labels=["outcome"],
    )
    for o in COMMAND_OUTCOMES:
        cmd.add_metric([o.value], n.outcomes[o])
    yield cmd
    yield CounterMetricFamily(
        "sorter_ejects_sent",
        "Eject commands that went out to the PLC (accepted or unanswered)",
        value=n.outcomes[Outcome.ACCEPTED] + n.outcomes[Outcome.TIMEOUT],
    )
    nocmd = CounterMetricFamily(
        "sorter_pieces_without_command",
        "Pieces planned without an eject command: no_eject (default fraction), conflict, no_speed, held",
        labels=["outcome"],
    )
    for o in NO_COMMAND_OUTCOMES:
        nocmd.add_metric([o.value], n.outcomes[o])
    yield nocmd
    field = CounterMetricFamily("sorter_field_readings", "Decisions by Hall-bar reading", labels=["state"])
    for state in FieldState:
        if state is not FieldState.NO_BAR or n.field_states[state]:
            field.add_metric([state.value], n.field_states[state])
    yield field


def _plc(s: LineStats) -> Iterator[Metric]:
    st = s.plc
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
    if s.hallbar is not None:
        yield GaugeMetricFamily(
            "sorter_hallbar_online", "1 if the Hall-sensor bar delivers", value=1.0 if s.hallbar.online else 0.0
        )


def _alarms(s: LineStats) -> Iterator[Metric]:
    yield GaugeMetricFamily("sorter_alarms_active", "Active alarms on the line's board", value=len(s.alarms_active))
    per = GaugeMetricFamily("sorter_alarm_active", "1 for each active alarm", labels=["alarm"])
    for a in s.alarms_active:
        per.add_metric([a.name], 1.0)
    yield per


def _live(s: LineStats) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "sorter_pieces_per_minute", "Pieces per minute over the last minute", value=s.pieces_per_minute
    )
    pur = GaugeMetricFamily(
        "sorter_estimated_purity",
        "Purity per fraction estimated from decision confidences (no ground truth)",
        labels=["fraction"],
    )
    for f, p in s.purity.items():
        if p == p:  # NaN until the fraction has a piece
            pur.add_metric([f], p)
    yield pur


def _shadow(s: LineStats) -> Iterator[Metric]:
    """The running shadow model's comparison (docs/shadow.md); gauges, since a new shadow starts from zero."""
    sh = s.shadow
    if sh is None:
        return
    g = GaugeMetricFamily(
        "sorter_shadow_pieces", "A shadow model's pieces so far: agree, differ, skipped", labels=["model", "result"]
    )
    g.add_metric([sh["model"], "agree"], sh["agree"])
    g.add_metric([sh["model"], "differ"], sh["compared"] - sh["agree"])
    g.add_metric([sh["model"], "skipped"], sh["skipped"])
    yield g
