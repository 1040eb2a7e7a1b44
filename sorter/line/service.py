"""The line service: one asyncio loop from frames to eject commands to records.

    capture (bounded queues) -> segment + map to belt mm (vision thread) -> track
    -> classify (ONNX, batched) -> decide -> plan in encoder counts -> PLC mailbox -> records

The loop itself only coordinates; pixel work runs on worker threads so PLC polling and heartbeats
stay punctual. The service is handed its parts ready-made (`LineParts`, built by sorter/app.py) and
knows nothing of who watches it: every 0.2 s (and on each state change) it builds one immutable
`LineStats` on the loop and gives it to its subscribers (HMI, OPC UA, metrics); requests come back
as messages (`handle()`: PackML commands, alarm acknowledgements, thresholds, model swaps).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog

from sorter.config import LineConfig, RoutingConfig
from sorter.core import priority
from sorter.core.alarms import AlarmBoard, Condition
from sorter.core.clock import ClockModel
from sorter.core.decide import decide
from sorter.core.geometry import CameraGeometry, wrap32
from sorter.core.linestate import BarStats, CameraStats, LineCounters, LineStats, LiveStats
from sorter.core.messages import (
    NO_BAR,
    AckAlarm,
    Decision,
    FieldReading,
    FieldState,
    Frame,
    LatencyParts,
    LineRequest,
    Outcome,
    PackMLRequest,
    Piece,
    SetThresholds,
    ShadowDecision,
    StartClip,
    StartShadow,
    StopClip,
    StopShadow,
    SwapModel,
)
from sorter.core.packml import Command
from sorter.core.planner import EjectPlanner, Plan
from sorter.core.position import FramePlacer, TriggerGrid
from sorter.core.timebase import REAL_TIME, Timebase
from sorter.core.tracking import Tracker
from sorter.drivers.cameras.capture import CameraCapture, CaptureClosed
from sorter.drivers.hallbar import FieldMap, HallBar
from sorter.drivers.plc.base import PlcLinkBase
from sorter.line.conditions import line_conditions
from sorter.line.control import LineControl
from sorter.line.memory import RssWatch, glibc_trim
from sorter.line.recording import ClipError, Clips, Recorder
from sorter.line.records import RecordStore, piece_row
from sorter.line.shadow import ShadowRunner, check_labels, shadow_thread
from sorter.vision.classify import Classifier, ModelError, classify_views
from sorter.vision.detections import to_detections
from sorter.vision.segment import materialise, segment

LATENCY_WINDOW = 10_000  # decision latencies kept in memory (the records hold every one)
LATENCY_P99_OVER = 500  # the live p99 is taken over the latest this many
STATS_S = 0.2  # how often the line's stats are built and published
RSS_S = 1.0  # how often the service's resident memory is sampled (sorter/line/memory.py)
# a chunk count further than this from where the clock model puts its frame is not the PLC's count: ten times
# the timestamp method's own error at 3.5 m/s (sorter/config/precision.py), so only counters out of step trip it
CHUNK_TOLERANCE_MM = 70.0
PLACEMENT_EVENTS = {
    "slipped": "trigger-counted position slipped: re-anchored on the clock model (a trigger the camera ignored: "
    "trigger rate above what exposure + readout allow, or a noisy trigger input)",
    "doubtful": "trigger-counted frame not placed: its timestamp disagrees with the trigger grid",
    "chunk_mismatch": "chunk encoder count disagrees with the PLC's count: frame not placed (is the camera's "
    "counter counting the PLC's encoder and reset with it? docs/cameras.md)",
}


class Companion(Protocol):
    """A side service that lives as long as the line (the HMI, the OPC UA server)."""

    name: str

    async def start(self) -> None: ...  # raises when it cannot start: an alarm, the line sorts on

    async def stop(self) -> None: ...

    def condition(self) -> Condition | None: ...  # an alarm while it should serve and does not


@dataclass
class StageTimes:
    """Wall time spent per pipeline stage (seconds), for the metrics and the benchmark."""

    total: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    n: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    on_add: Callable[[str, float], None] | None = None  # the metrics' stage histograms
    # added to from the vision threads (one per camera) and the inference thread at once
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.total[stage] += seconds
            self.n[stage] += 1
        if self.on_add is not None:
            self.on_add(stage, seconds)

    def mean_ms(self) -> dict[str, float]:
        return {k: 1000 * v / self.n[k] for k, v in self.total.items() if self.n[k]}


@dataclass(frozen=True, slots=True)
class _Classified:
    """A piece classified ahead of its decision (LineService._classify_ahead): from which of its views."""

    n_views: int  # the views it had then: equal at the decision, the crops are the ones it is decided on
    probs: np.ndarray | None
    clf: Classifier
    crops: list[Any]


def worker_thread(name: str) -> Executor:
    """One worker thread for one kind of work (pixels, inference, the records' disk writes), time-critical
    (sorter/core/priority.py: at a real-time priority while the line's config asks for one)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=priority.enter)


@dataclass
class LineParts:
    """What the service works with, built by the wiring (sorter/app.py): each part ready to run."""

    classifier: Classifier
    records: RecordStore
    clock: ClockModel
    plc: PlcLinkBase
    geoms: dict[str, CameraGeometry]
    captures: dict[str, CameraCapture]
    tracker: Tracker
    planner: EjectPlanner
    load_model: Callable[[Path], Classifier]  # a checked load (swaps)
    hallbar: HallBar | None = None
    fieldmap: FieldMap | None = None
    # who watches: side services started and stopped with the line, stats subscribers, pipeline taps
    companions: list[Companion] = field(default_factory=list)
    subscribers: list[Callable[[LineStats], None]] = field(default_factory=list)
    frame_taps: list[Callable[[str, Frame, int, list[Any]], None]] = field(default_factory=list)
    # every frame the pipeline takes off a capture queue, before anything is done with it (the recorder:
    # which frames a replay gives the pipeline, and when; docs/recording.md)
    taken_taps: list[Callable[[str, Frame], None]] = field(default_factory=list)
    decision_taps: list[Callable[[list[Decision]], None]] = field(default_factory=list)
    on_stage: Callable[[str, float], None] | None = None  # stage wall times (metrics histograms)
    on_latency_ms: Callable[[float], None] | None = None  # decision latencies (metrics histogram)
    on_latency_parts: Callable[[LatencyParts], None] | None = None  # their parts (metrics histograms)
    extra_stats: dict[str, Callable[[], Any]] = field(default_factory=dict)  # more for the periodic log line
    closers: list[Callable[[], None]] = field(default_factory=list)  # called off the loop at the very end
    # the clocks, and where work that must not hold up the loop runs: real time and worker threads on a
    # plant; one virtual clock and work done in place in the lockstep simulation (docs/architecture.md)
    timebase: Timebase = REAL_TIME
    executor: Callable[[str], Executor] = worker_thread
    # clips a technician starts and stops on the running line (StartClip, StopClip; docs/recording.md)
    clips: Clips | None = None
    # shadow mode (docs/shadow.md): a candidate model deciding beside the live one, never acted on; its thread
    # (normal priority in real time, in place in virtual time) and who gets its decisions (records, HMI)
    shadow_model: Classifier | None = None
    shadow_executor: Callable[[str], Executor] = shadow_thread
    shadow_taps: list[Callable[[list[ShadowDecision]], None]] = field(default_factory=list)


class LineService:
    def __init__(self, cfg: LineConfig, parts: LineParts, *, run_id: str, auto_start: bool = True) -> None:
        self.cfg = cfg
        self.log = structlog.get_logger("sorter")
        self.run_id = run_id
        self.auto_start = auto_start
        self.parts = parts
        self.classifier = parts.classifier
        self.records = parts.records
        self.clock = parts.clock
        self.plc = parts.plc
        self.geoms = parts.geoms
        self.captures = parts.captures
        self.tracker = parts.tracker
        self.planner = parts.planner
        self.hallbar = parts.hallbar
        self.fieldmap = parts.fieldmap
        # pixels and inference on their own threads (both release the GIL): a burst of crops to
        # classify must not hold up the next frames, nor either of them the PLC polling on the loop
        # one vision thread per camera: a frame never waits behind another camera's (both cores work)
        self._vision = {name: parts.executor(f"vision-{name}") for name in self.captures}
        self._infer = parts.executor("infer")
        self._writer = parts.executor("records")
        self._now, self._wall = parts.timebase.now, parts.timebase.wall
        self._pieces: asyncio.Queue[list[Piece]] = asyncio.Queue()
        # pieces out of every camera's view but not finalised yet, being or already classified (Tracker.viewed)
        self._ahead: dict[int, asyncio.Future[_Classified]] = {}
        self._ahead_tasks: set[asyncio.Task[None]] = set()
        self._flush_soon = asyncio.Event()  # first-seen rows are waiting: commit them now, not at the next tick
        self._sends: set[asyncio.Task[None]] = set()
        self._ref_count: int | None = None
        # where each frame is on the belt (core/position.py): trigger-counted cameras on their grid, chunk
        # counts checked against the clock model (a camera counter out of step with the PLC's would misplace
        # every frame silently)
        self.placer = FramePlacer(
            grids={
                c.name: TriggerGrid(c.source.counts_per_trigger, c.source.trigger_phase)
                for c in cfg.cameras
                if c.source.type == "genicam" and c.source.position == "trigger" and c.source.counts_per_trigger
            },
            checked={c.name for c in cfg.cameras if c.source.type == "genicam" and c.source.position == "chunk"},
            tolerance=CHUNK_TOLERANCE_MM * cfg.belt.counts_per_mm,
        )
        self._placement_events: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._last_frame_count: dict[str, int] = {}  # per camera: the last frame looked at (unwrapped count)
        self._frame_spacing: dict[str, int] = {}  # per camera: the smallest step between two frames (counts)
        self.times = StageTimes(on_add=parts.on_stage)
        self.counters = LineCounters()
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        # this process's RSS: start, peak, latest (the periodic log, reports); trims the C heap after a peak
        self.memory = RssWatch(trim=glibc_trim())
        self._trimming: asyncio.Future[None] | None = None
        self._bar_online: bool | None = None
        self._swap_lock = asyncio.Lock()
        self._clip_tasks: set[asyncio.Task[Any]] = set()  # clips that stopped themselves, being completed
        self.live = LiveStats(cfg.fractions, cfg.routing)
        self.alarm_board = AlarmBoard()
        self.control = LineControl(
            cfg.states,
            self.plc,
            clock_ready=lambda: self.clock.ready,
            cameras_online=lambda: all(c.online for c in self.captures.values()),
            record_event=self.records.event,
            log=self.log,
            now=self._now,
        )
        self.control.listeners.append(lambda old, new, why: self._publish())
        self.shadow: ShadowRunner | None = None
        if parts.shadow_model is not None:
            check_labels(parts.shadow_model, self.classifier)
            self.shadow = self._shadow_runner(parts.shadow_model)
        self.stats: LineStats = self._build_stats()

    # --- frames -> pieces ---
    def _frame_count(self, frame: Frame) -> int | None:
        """The frame's unwrapped encoder count (core/position.py, FramePlacer); None: not placed."""
        count, event = self.placer.place(frame, self.clock, self._ref_count)
        if event is not None:
            n = self._placement_events[frame.camera, event] = self._placement_events[frame.camera, event] + 1
            if event == "slipped" or n == 1 or n % 100 == 0:  # every slip; the others now and then
                self.log.warning(PLACEMENT_EVENTS[event], camera=frame.camera, frame=frame.seq, times=n)
        return count

    def _note_gap(self, name: str, count: int) -> None:
        """Record the belt a camera's frames skipped (dropped, torn, not delivered) as a `camera_gap` event.

        Frames are triggered every so many counts, so the smallest step between two processed frames is the
        trigger spacing; a step of more than 1.5 of it means frames between were never looked at, and a
        piece that crossed the camera line there may be missing from the records for that reason alone.
        """
        last, self._last_frame_count[name] = self._last_frame_count.get(name), count
        if last is None or count <= last:
            return
        step = count - last
        spacing = self._frame_spacing.get(name)
        if spacing is None or step < spacing:
            self._frame_spacing[name] = spacing = step
        if step > 1.5 * spacing:
            self.records.event(
                "camera_gap",
                camera=name,
                from_count32=wrap32(last),
                to_count32=wrap32(count),
                frames=step // spacing - 1,
            )

    def _segment(self, frame: Frame) -> tuple[list[Any], bool]:
        """The frame's blobs, and whether its touching pieces were parted on the downscaled image only: a
        frame that waited longer than `vision.full_res_max_lag_ms` for its vision thread is (the thread is
        behind; parting on the frame itself would cost it frames)."""
        t0 = time.perf_counter()
        vision = self.cfg.vision
        coarse = vision.split_full_res and self._now() - frame.t_received > vision.full_res_max_lag_ms / 1000
        mm_per_px = self.geoms[frame.camera].mm_per_px
        blobs = segment(frame.image, vision, mm_per_px, self.classifier.input_size, lazy=True, full_res=not coarse)
        self.times.add("segment", time.perf_counter() - t0)
        return blobs, coarse

    async def _camera_loop(self, name: str) -> None:
        cap, loop = self.captures[name], asyncio.get_running_loop()
        while True:
            try:
                frame = await cap.get()
            except CaptureClosed:
                return
            try:
                for tap in self.parts.taken_taps:
                    tap(name, frame)
                await self._process(name, frame, loop)
            except Exception:  # one bad frame must not stop the line: count it, log it, go on
                self.counters.frames_failed += 1
                self.log.exception("frame processing failed", camera=name, seq=frame.seq)

    async def _process(self, name: str, frame: Frame, loop: asyncio.AbstractEventLoop) -> None:
        count = self._frame_count(frame)
        if count is None:
            self.counters.frames_unplaced += 1
            return
        self._ref_count = count
        if frame.count is not None:  # encoder-triggered: frames come every so many counts (free-run ones jitter)
            self._note_gap(name, count)
        # The frame's belt position alone finalises the pieces that have left every camera's view by settle_mm:
        # no piece this frame shows is one of them, and none it shows first reaches them while settle_mm is
        # longer than a piece, so they go to their decision before its pixels are looked at (classified
        # ahead, as a rule: only fusion and planning are left)
        t0 = time.perf_counter()
        self.tracker.advance(name, count)
        active = [n for n, c in self.captures.items() if c.online]
        # this frame is the input that finalised them: the PC's compute time runs from its arrival
        pieces = [replace(p, t_ready=frame.t_received) for p in self.tracker.finalise(active)]
        for pid in self.tracker.take_dropped():
            self._ahead.pop(pid, None)
        viewed = self.tracker.viewed(active)  # out of every camera's view now: classified while they settle
        self.times.add("track", time.perf_counter() - t0)
        if viewed:
            self._classify_ahead(viewed, loop)
        if pieces:
            # its row before its decision, written at once: a service killed meanwhile loses nothing silently
            self.records.add_seen(pieces, self.cfg)
            self._flush_soon.set()
            # their crops cut now, so that their frames can go: a piece waiting for its decision (a backlog on
            # a busy computer) must not keep up to max_views whole frames alive (classified ahead: cut there)
            if uncut := [p for p in pieces if p.id not in self._ahead]:
                try:
                    cut = {p.id: p for p in await loop.run_in_executor(self._vision[name], self._cut_crops, uncut)}
                except BaseException:  # stopping, or a crop failed: decided uncut (cut again when classified)
                    self._pieces.put_nowait(pieces)
                    raise
                pieces = [cut.get(p.id, p) for p in pieces]
            self._pieces.put_nowait(pieces)
        blobs, coarse = await loop.run_in_executor(self._vision[name], self._segment, frame)
        self.counters.frames_parted_coarse += coarse
        for tap in self.parts.frame_taps:
            tap(name, frame, count, blobs)  # a reference (the HMI's live view), no copy
        t0 = time.perf_counter()
        dets = to_detections(
            blobs, self.geoms[name], name, count, self.cfg.belt.counts_per_mm, frame.seq, frame.t_capture
        )
        self.tracker.add(name, count, dets)
        self.times.add("track", time.perf_counter() - t0)
        self.counters.frames_processed += 1
        # after the rows this frame finalised: a flush that writes this position has written them too
        self.records.looked_at(name, wrap32(count))

    def _cut_crops(self, pieces: list[Piece]) -> list[Piece]:
        """The pieces with their crops cut (segment(lazy=True) left them as cutters holding whole frames)."""
        t0 = time.perf_counter()
        out = [replace(p, crops=[materialise(c) for c in p.crops]) if p.crops else p for p in pieces]
        self.times.add("cut", time.perf_counter() - t0)
        return out

    # --- pieces -> decisions -> commands ---
    def _classify(self, pieces: list[Piece]) -> tuple[list[np.ndarray | None], Classifier, list[Piece]]:
        """Each piece's view probabilities, the model that gave them, and the pieces holding the crops they were
        classified on (`classify_views`: the first view alone where it is sure).

        Pieces classified ahead (`_classify_ahead`) arrive holding cutters (segment(lazy=True)) that hold their
        whole camera frames (2.7 MB) and are cut here; a piece finalised before that is cut then
        (`_cut_crops`), and one finalised at shutdown may still hold cutters. The pieces handed back hold the
        cut crops (a few kB each), so that nothing downstream (the decision, the planner's neighbours, a
        command waiting for the PLC, the recorder) keeps a frame alive.
        """
        clf = self.classifier  # one model per batch, even if a swap lands meanwhile
        sure = self.cfg.classifier.sure_confidence
        probs, crops = classify_views(clf, [p.crops for p in pieces], sure, self.times.add)
        # only the crops classified: the views left uncut go with their cutters, and their frames with them
        cut = [replace(p, crops=list(cs)) if p.crops else p for p, cs in zip(pieces, crops, strict=True)]
        return probs, clf, cut

    def _classify_ahead(self, pieces: list[Piece], loop: asyncio.AbstractEventLoop) -> None:
        """Cut and classify pieces whose views are all in while the tracker waits for their neighbours
        (`settle_mm`): the frame that finalises them then leaves only fusion and planning before their
        commands. The same crops, thread and model as at the decision; only the time changes. Their crops
        are cut on the inference thread, in the same batch: cut on the camera's vision thread (until
        session 15) they delayed that camera's next segmentation by 2.5-2.8 ms a batch, and its frames'
        time from arrival to tracked at p99 from 34-38 to 24-30 ms (the default demo, its frames
        timed). The frames their cutters hold go as soon as the batch is cut."""
        futures = {p.id: loop.create_future() for p in pieces}
        self._ahead.update(futures)
        task = asyncio.create_task(self._run_ahead(pieces, futures, loop), name="classify-ahead")
        self._ahead_tasks.add(task)
        task.add_done_callback(self._ahead_tasks.discard)

    async def _run_ahead(
        self,
        pieces: list[Piece],
        futures: dict[int, asyncio.Future[_Classified]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        try:
            probs, clf, cut = await loop.run_in_executor(self._infer, self._classify, pieces)
            for p, pr in zip(cut, probs, strict=True):
                if not futures[p.id].done():
                    futures[p.id].set_result(_Classified(p.n_views, pr, clf, p.crops))
        except Exception:  # classified again at the decision, which counts and logs a failure of its own
            self.log.debug("classifying ahead failed", pieces=len(futures), exc_info=True)
        finally:  # never leave a decision waiting: what was not classified here is classified there
            for f in futures.values():
                if not f.done():
                    f.cancel()

    async def _classified(
        self, pieces: list[Piece], loop: asyncio.AbstractEventLoop
    ) -> list[tuple[np.ndarray | None, Classifier, Piece]]:
        """Each piece's view probabilities, the model that gave them, and the piece with its crops cut: from
        its classification ahead where that saw all its views with the model running now (a swap between the
        two: the new model decides), else classified now."""
        ahead = {p.id: f for p in pieces if (f := self._ahead.pop(p.id, None)) is not None}
        if ahead:  # on the inference thread already, before anything asked for now
            await asyncio.wait(ahead.values())
        done: dict[int, tuple[np.ndarray | None, Classifier, Piece]] = {}
        for p in pieces:
            f = ahead.get(p.id)
            if f is None or f.cancelled():
                continue
            if (got := f.result()).n_views == p.n_views and got.clf is self.classifier:
                done[p.id] = (got.probs, got.clf, replace(p, crops=got.crops))
        rest = [p for p in pieces if p.id not in done]
        if rest:
            probs, clf, cut = await loop.run_in_executor(self._infer, self._classify, rest)
            done |= {p.id: (pr, clf, p) for p, pr in zip(cut, probs, strict=True)}
        return [done[p.id] for p in pieces]

    async def _decide_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pieces = await self._pieces.get()
            while not self._pieces.empty():  # batch whatever else is ready
                pieces += self._pieces.get_nowait()
            try:
                await self._decide(pieces, loop)
            except asyncio.CancelledError:
                # stopped while this batch was classified or waited for the bar (nothing of it is recorded
                # before both are done): back in the queue, where the shutdown decides and records it
                self._pieces.put_nowait(pieces)
                raise
            except Exception:  # record what can be recorded; never let the decision loop die
                self.counters.batches_failed += 1
                self.log.exception("decision batch failed", pieces=len(pieces))

    async def _decide(self, pieces: list[Piece], loop: asyncio.AbstractEventLoop) -> None:
        classified = await self._classified(pieces, loop)
        pieces = [p for _, _, p in classified]
        readings, field_wait_s = await self._fields(pieces)
        decisions = [
            decide(p, pr, clf.labels, self.cfg.routing, r, clf.field_model, clf.version)
            for (pr, clf, p), r in zip(classified, readings, strict=True)
        ]
        if self.shadow is not None:  # what the live model decided, before a hold changes where it goes
            self.shadow.offer(decisions, self.cfg.routing)
        self.control.piece_seen()
        held: set[int] = set()
        if not self.control.ejecting:  # held, stopping, PLC lost...: nothing goes into the products
            default = self.cfg.routing.default_fraction
            held = {d.piece.id for d in decisions if d.fraction != default}
            decisions = [replace(d, fraction=default) if d.piece.id in held else d for d in decisions]
        for tap in self.parts.decision_taps:
            tap(decisions)
        t0 = time.perf_counter()
        plans = self.planner.plan(decisions, self.plc.status.speed_mm_s if self.plc.status.online else 0.0)
        self.times.add("plan", time.perf_counter() - t0)
        t_planned = self._now()  # the commands are handed to the PLC link now
        for plan in plans:
            if plan.decision.piece.id in held:
                plan = replace(plan, outcome=Outcome.HELD)
            parts = self._latency_parts(plan.decision.piece, field_wait_s, t_planned)
            self._record(plan, parts)
            if plan.command is not None:
                task = asyncio.create_task(self._send(plan, parts, t_planned))
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)

    @staticmethod
    def _latency_parts(p: Piece, field_wait_s: float, t_planned: float) -> LatencyParts | None:
        """The decision latency's parts known once the command is planned (core/messages.py LatencyParts)."""
        if p.t_ready is None:
            return None  # finalised at shutdown, not by a frame
        settle = p.t_ready - p.t_last_capture
        compute = t_planned - p.t_ready - field_wait_s
        return LatencyParts(round(1000 * settle, 3), round(1000 * field_wait_s, 3), round(1000 * compute, 3))

    def _record(self, plan: Plan, parts: LatencyParts | None = None) -> None:
        d = plan.decision
        c = self.counters
        c.by_class[d.cls] += 1
        c.by_fraction[d.fraction] += 1
        c.pieces += 1
        if plan.command is None:  # no air: it ends in the default fraction (an ejected one: once the PLC took it)
            self.live.add(d, self.cfg.routing.default_fraction, self._now())
            c.outcomes[plan.outcome] += 1
        self.records.add_piece(piece_row(plan, self.cfg, self._wall(), parts))

    async def _send(self, plan: Plan, parts: LatencyParts | None = None, t_planned: float | None = None) -> None:
        cmd = plan.command
        assert cmd is not None
        t0 = time.perf_counter()
        try:
            result = await self.plc.send(cmd, self.cfg.ejection.min_lead_ms / 1000)
        except asyncio.CancelledError:
            self.live.add(plan.decision, self.cfg.routing.default_fraction, self._now())
            self.counters.outcomes[Outcome.CANCELLED] += 1
            self.records.update_outcome(cmd.piece_id, Outcome.CANCELLED, None, None, None)
            raise
        self.times.add("plc_send", time.perf_counter() - t0)
        # where it ends: the product only if the PLC took the command (counted as the line shows it)
        accepted = result.outcome is Outcome.ACCEPTED
        fraction = plan.decision.fraction if accepted else self.cfg.routing.default_fraction
        self.live.add(plan.decision, fraction, self._now())
        latency = plc_ms = None
        if accepted and result.t_accepted is not None:
            latency = 1000 * (result.t_accepted - plan.decision.piece.t_last_capture)
            self.latencies_ms.append(latency)
            if self.parts.on_latency_ms is not None:
                self.parts.on_latency_ms(latency)
            if parts is not None and t_planned is not None:
                plc_ms = round(1000 * (result.t_accepted - t_planned), 3)
                if self.parts.on_latency_parts is not None:
                    self.parts.on_latency_parts(replace(parts, plc_ms=plc_ms))
        self.counters.outcomes[result.outcome] += 1
        self.records.update_outcome(cmd.piece_id, result.outcome, result.seq, result.t_accepted, latency, plc_ms)

    async def _fields(self, pieces: list[Piece]) -> tuple[list[FieldReading], float]:
        """Each piece's peak field, waiting (at most magnetometer.wait_ms) until the bar has read past it;
        and how long that wait was (s)."""
        bar, fmap, mag = self.hallbar, self.fieldmap, self.cfg.magnetometer
        if bar is None or fmap is None or mag is None:
            return [NO_BAR] * len(pieces), 0.0
        need = max(fmap.window(p.u_lead, p.u_trail)[1] for p in pieces)
        t0 = self._now()
        deadline = t0 + mag.wait_ms / 1000
        while bar.online and ((c := fmap.covered_until()) is None or c < need):
            if self._now() >= deadline:
                self.counters.field_wait_timeouts += 1
                self.log.debug("field wait timed out", behind_mm=(need - (c or need)) / self.cfg.belt.counts_per_mm)
                break
            await asyncio.sleep(0.005)
        waited = self._now() - t0
        self.times.add("field_wait", waited)
        out = []
        for p in pieces:
            r = fmap.query(p.u_lead, p.u_trail, p.x0, p.x1)
            if r.complete and not r.pending and r.field_mT is not None:
                reading = FieldReading(r.field_mT, FieldState.OK)
            elif not bar.online:
                reading = FieldReading(r.field_mT, FieldState.OFFLINE)
            elif r.field_mT is not None:
                reading = FieldReading(r.field_mT, FieldState.INCOMPLETE)
            else:
                reading = FieldReading(None, FieldState.MISSING)
            self.counters.field_states[reading.state] += 1
            out.append(reading)
        return out, waited

    def _watch_bar(self) -> None:
        """Log the bar going offline or coming back: decisions fall back to the camera meanwhile."""
        if self.hallbar is None or self.hallbar.online == self._bar_online:
            return
        was, self._bar_online = self._bar_online, self.hallbar.online
        if self._bar_online:
            if was is not None:
                self.log.info("hall bar back online: decisions use the field again")
        else:
            self.log.warning(
                "ALARM hall bar offline: deciding on the camera alone",
                reason=self.hallbar.offline_reason,
                threshold=self.cfg.routing.fallback_min_confidence,
                action="check the bar's USB/serial cable and power",
            )

    # --- requests from outside (HMI, OPC UA, signals): messages handled on the loop ---
    async def handle(self, req: LineRequest) -> Any:
        """Carry out one request on the service loop and return its answer (see sorter.core.messages)."""
        match req:
            case PackMLRequest(command, user):
                return await self.control.command(Command(command), user)
            case AckAlarm(name, user):
                alarm = self.alarm_board.acknowledge(name, user, now=self._wall())
                if alarm is not None:
                    self.records.event("alarm_ack", alarm=alarm.name, user=user)
                    self._publish()
                return alarm
            case SetThresholds(user, changes):
                return self._set_thresholds(user, dict(changes))
            case SwapModel(path, user):
                return await self._swap_model(path, user)
            case StartClip(user, max_mb):
                return self._start_clip(user, max_mb)
            case StopClip(user):
                return await self._close_clip(self._clips().detach(), user)
            case StartShadow(path, user):
                return await self._start_shadow(path, user)
            case StopShadow(user):
                return await self._stop_shadow(user)
        raise TypeError(f"not a line request: {req!r}")

    def _set_thresholds(self, user: str, changes: dict[str, float]) -> RoutingConfig:
        """Change routing.min_confidence / fallback_min_confidence on the running line (technician).

        Validated as the config is (ValueError, nothing changed), then the routing and the config
        are replaced whole: the next decision batch uses the new thresholds, none sees half of them.
        """
        unknown = set(changes) - {"min_confidence", "fallback_min_confidence"}
        if unknown:
            raise ValueError(f"only the thresholds can change on a running line, not {sorted(unknown)}")
        old = self.cfg.routing
        routing = RoutingConfig.model_validate({**old.model_dump(), **changes})
        self.cfg = self.cfg.model_copy(update={"routing": routing})
        self.log.info("routing thresholds changed", user=user, **changes)
        self.records.event(
            "routing_thresholds",
            user=user,
            old={k: getattr(old, k) for k in changes},
            new={k: getattr(routing, k) for k in changes},
        )
        self._publish()
        return routing

    async def _swap_model(self, path: Path, user: str) -> str:
        """Switch to another model between two inference batches, without stopping the line.

        The new file is loaded and checked off the loop first; a model that fails the check is
        refused (ModelError) and the running one stays. Returns the new model's version.
        """
        async with self._swap_lock:
            try:
                new = await asyncio.to_thread(self.parts.load_model, Path(path))
            except ModelError as exc:
                self.log.error("model refused", path=str(path), error=str(exc), user=user)
                self.records.event("model_refused", path=str(path), error=str(exc), user=user)
                raise
            old, self.classifier = self.classifier, new
            self.log.info("model swapped", old=old.version, new=new.version, path=str(path), user=user)
            self.records.event("model_swap", old=old.version, new=new.version, path=str(path), user=user)
            if self.shadow is not None and tuple(self.shadow.classifier.labels) != tuple(new.labels):
                # its decisions could no longer be compared class by class with the live ones
                runner, self.shadow = self.shadow, None
                self.log.warning("shadow model stopped: the new live model has other classes", shadow=runner.version)
                await self._end_shadow(runner)
                self.records.event("shadow_stop", user=user, reason="live model has other classes", **runner.brief())
            self._publish()
            return new.version

    def _shadow_runner(self, model: Classifier) -> ShadowRunner:
        def failed(exc: BaseException) -> None:
            self.log.error("shadow batch failed (the line is not affected)", error=repr(exc))

        return ShadowRunner(
            model, self.parts.shadow_executor("shadow"), self.parts.shadow_taps, on_error=failed, on_time=self.times.add
        )

    async def _start_shadow(self, path: Path, user: str) -> str:
        """Run a candidate model beside the live one (technician). Checked as a swap is (the model check, the
        routing's classes) and against the live model's classes; a refused one changes nothing."""
        async with self._swap_lock:
            try:
                model = await asyncio.to_thread(self.parts.load_model, Path(path))
                check_labels(model, self.classifier)
            except ModelError as exc:
                self.log.error("shadow model refused", path=str(path), error=str(exc), user=user)
                self.records.event("shadow_refused", path=str(path), error=str(exc), user=user)
                raise
            old = self.shadow
            self.shadow = self._shadow_runner(model)
            if old is not None:
                await self._end_shadow(old)
            self.log.info("shadow model started", version=model.version, path=str(path), user=user)
            self.records.event("shadow_start", version=model.version, path=str(path), user=user)
            self._publish()
            return model.version

    async def _stop_shadow(self, user: str) -> dict[str, Any] | None:
        async with self._swap_lock:
            old, self.shadow = self.shadow, None
            if old is None:
                return None
            await self._end_shadow(old)
            self.log.info("shadow model stopped", user=user, **old.brief())
            self.records.event("shadow_stop", user=user, **old.brief())
            self._publish()
            return old.stats()

    async def _end_shadow(self, runner: ShadowRunner) -> None:
        await runner.drain()
        await asyncio.to_thread(runner.close)

    def _clips(self) -> Clips:
        if self.parts.clips is None:
            raise ClipError("this line records no clips")
        return self.parts.clips

    def _start_clip(self, user: str, max_mb: float | None) -> Any:
        """Start a clip (technician): a recording of level frames into a new folder, with the line's config as it
        runs now (thresholds changed on the line, the model swapped in) so that a replay decides as the line did."""
        clips = self._clips()
        cfg = self.cfg
        path = getattr(self.classifier, "path", None)
        if path is not None:
            cfg = cfg.model_copy(update={"classifier": cfg.classifier.model_copy(update={"model": Path(path)})})
        status = clips.start(user, max_mb, config=cfg.model_dump(mode="json"), model_version=self.classifier.version)
        self.log.info("clip started", folder=status.folder, max_mb=round(status.max_bytes / 1024**2), user=user)
        self.records.event("clip_start", folder=status.folder, max_bytes=status.max_bytes, user=user)
        self._publish()
        return status

    async def _close_clip(self, rec: Recorder, stopped_by: str) -> Any:
        """Complete a clip taken off the taps: the records written first (its decisions.jsonl comes from them),
        then the recorder drained and closed, all off the loop."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._writer, self.records.flush)
        except Exception as exc:  # the clip is completed all the same, with the decisions the disk has
            self.log.warning("records not flushed before the clip closed", error=str(exc))
        try:
            await asyncio.to_thread(rec.close, self.records.path)
        except Exception as exc:  # a disk that fails at the end: the clip is over all the same, the line goes on
            self.log.error("clip not completed", folder=str(rec.folder), error=str(exc))
            rec.full = rec.full or f"completing the clip failed: {exc}"
        status = self._clips().closed(rec, stopped_by)
        log = self.log.warning if status.stopped_early else self.log.info
        log(
            "clip stopped" + (", the line goes on" if status.stopped_early else ""),
            folder=status.folder,
            bytes=status.bytes,
            frames=status.frames,
            stopped_by=stopped_by,
            reason=status.stopped_early,
        )
        self.records.event(
            "clip_stop",
            folder=status.folder,
            bytes=status.bytes,
            frames=status.frames,
            user=stopped_by,
            reason=status.stopped_early,
        )
        self._publish()
        return status

    def _watch_clip(self) -> None:
        """A clip that stopped itself (its size bound, a full disk) is completed without waiting for its stop."""
        clips = self.parts.clips
        if clips is None or clips.stopped_itself() is None:
            return
        task = asyncio.create_task(self._close_clip(clips.detach(), "bound"), name="clip-close")
        self._clip_tasks.add(task)
        task.add_done_callback(self._clip_tasks.discard)

    # --- what the outside sees ---
    def _build_stats(self) -> LineStats:
        """The line now, as one immutable LineStats (on the loop: nothing changes while it is built)."""
        st = self.plc.status
        bar = self.hallbar
        lat = list(self.latencies_ms)[-LATENCY_P99_OVER:]
        caps = tuple(
            CameraStats(
                name=n,
                online=c.online,
                reason=None if c.online else c.offline_reason,
                captured=c.captured,
                dropped=c.dropped,
                torn=c.torn,
                source_dropped=c.source_dropped,
                queued=c.queued,
                stalls=c.stalls,
                reconnects=c.reconnects,
                missing=c.missing,
            )
            for n, c in self.captures.items()
        )
        return LineStats(
            line=self.cfg.line,
            run_id=self.run_id,
            t=self._now(),
            state=self.control.state,
            allowed=tuple(c.value for c in self.control.machine.allowed()),
            counters=self.counters.copy(),
            cameras=caps,
            plc=st,
            plc_protocol=self.cfg.plc.protocol,
            hallbar=None if bar is None else BarStats(bar.online, bar.offline_reason, bar.counters()),
            pieces_queued=self._pieces.qsize(),
            ejects_in_flight=len(self._sends),
            open_tracks=self.tracker.open_tracks,
            records_pending=self.records.pending_writes,
            model_version=self.classifier.version,
            model_provider=self.classifier.provider,
            model_labels=tuple(self.classifier.labels),
            fractions=tuple(self.cfg.fractions),
            default_fraction=self.cfg.routing.default_fraction,
            min_confidence=self.cfg.routing.min_confidence,
            fallback_min_confidence=self.cfg.routing.fallback_min_confidence,
            fraction_counts=dict(self.live.counts),
            pieces_per_minute=self.live.pieces_per_minute(self._now()),
            purity=self.live.purity(),
            latency_ms_p99=round(float(np.percentile(lat, 99)), 1) if lat else None,
            alarms_active=tuple(self.alarm_board.active),
            alarms_shown=tuple(self.alarm_board.shown),
            records_error=self.records.error,
            records_dropped=self.records.rows_dropped,
            records_disk_low=self.records.disk_low,
            model_path=str(getattr(self.classifier, "path", "")),
            clip=None if self.parts.clips is None else self.parts.clips.status(),
            shadow=None if self.shadow is None else self.shadow.stats() | {"path": str(self.shadow.path or "")},
        )

    def _publish(self) -> None:
        self.stats = self._build_stats()
        for fn in self.parts.subscribers:
            try:
                fn(self.stats)
            except Exception:  # a broken viewer must not stop the line
                self.log.exception("stats subscriber failed")

    def close_workers(self) -> None:
        """End the worker threads (vision, inference, records): at the end of run(), or for a service that
        was built but never run (a test, a script)."""
        for pool in (*self._vision.values(), self._infer, self._writer):
            pool.shutdown(wait=True)
        if self.shadow is not None:
            self.shadow.close()

    def summary(self) -> dict[str, Any]:
        """The line's summary as the log shows it (from the latest stats)."""
        out = self.stats.summary()
        if self.memory.last is not None:
            out["rss_mb"] = round(self.memory.last.total)
        out |= {k: fn() for k, fn in self.parts.extra_stats.items()}
        return out

    def _watch_alarms(self) -> None:
        conditions = line_conditions(self.stats)
        conditions += [c for comp in self.parts.companions if (c := comp.condition()) is not None]
        raised, cleared = self.alarm_board.update(conditions, now=self._wall(), t_mono=self._now())
        for a in raised:
            self.log.warning(f"ALARM {a.name}", cause=a.cause, action=a.action)
            self.records.event("alarm", alarm=a.name, reason=a.cause, action=a.action)
        for a in cleared:
            self.log.info(f"alarm cleared: {a.name}")
            self.records.event("alarm_cleared", alarm=a.name)
        if raised or cleared:
            self._publish()

    # --- housekeeping ---
    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            if failing:  # the disk refuses: retry at the tick, not at every new row
                await asyncio.sleep(0.2)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._flush_soon.wait(), 0.2)
            self._flush_soon.clear()
            # a commit can wait on the disk (WAL checkpoints): never on the loop that polls the PLC
            try:
                await loop.run_in_executor(self._writer, self.records.flush)
            except Exception as exc:  # rows stay queued and are retried; the line goes on
                self.counters.records_flush_failed += 1
                if not failing:
                    self.log.error(
                        "ALARM records not written, retrying", error=str(exc), pending=self.records.pending_writes
                    )
                failing = True
                continue
            if failing:
                self.log.info("records written again", dropped=self.records.rows_dropped)
            failing = False

    async def _stats_loop(self) -> None:
        last_log = last_rss = self._now()
        while True:
            await asyncio.sleep(STATS_S)
            if self._now() - last_rss >= RSS_S:
                last_rss = self._now()
                self.memory.sample()
                if self.memory.trim_due and (self._trimming is None or self._trimming.done()):
                    # on the records thread: housekeeping that may take a few ms, never on this loop
                    loop = asyncio.get_running_loop()
                    self._trimming = asyncio.ensure_future(loop.run_in_executor(self._writer, self.memory.trim))
            self._publish()
            self._watch_bar()
            self._watch_alarms()
            self._watch_clip()
            if self._now() - last_log > 5:
                last_log = self._now()
                self.log.info("line", **self.summary())

    async def _close_dead_runs(self) -> None:
        """Rows an earlier run left open (it died: SIGKILL, power loss) become `lost_in_restart`."""
        try:
            lost = await asyncio.get_running_loop().run_in_executor(self._writer, self.records.close_dead_runs)
        except Exception as exc:  # an unwritable disk must not keep the line from sorting: the next start retries
            self.log.error("ALARM earlier runs' open records not closed", error=str(exc))
            return
        if lost:
            self.log.warning("pieces of a run that died recorded lost_in_restart", pieces=lost)

    async def _start_companion(self, comp: Companion) -> None:
        """Start a side service; one that cannot start is an alarm (its condition()), not a reason to stop sorting."""
        try:
            await comp.start()
        except Exception as exc:
            self.log.error(f"ALARM {comp.name} not started", error=str(exc))

    async def run(self, stop: asyncio.Event) -> None:
        self.log.info(
            "service starting",
            run_id=self.run_id,
            model=str(self.cfg.classifier.model),
            model_version=self.classifier.version,
            provider=self.classifier.provider,
            records=str(self.records.path),
        )
        await self._close_dead_runs()
        self.records.event("start", model=self.classifier.version)
        self._publish()
        for comp in self.parts.companions:
            await self._start_companion(comp)
        self.memory.sample()
        # Everything built so far lives as long as the service (the model, the libraries): exempt it
        # from the cyclic GC, whose full collections would otherwise stop this loop for tens of ms.
        gc.freeze()
        tasks = [asyncio.create_task(self.plc.run(), name="plc")]
        if self.hallbar is not None:
            self.hallbar.start()
        for cap in self.captures.values():
            tasks.append(asyncio.create_task(cap.run(), name=f"capture-{cap.name}"))
        workers = [asyncio.create_task(self._camera_loop(n), name=f"vision-{n}") for n in self.captures]
        workers += [
            asyncio.create_task(self._decide_loop(), name="decide"),
            asyncio.create_task(self._flush_loop(), name="flush"),
            asyncio.create_task(self._stats_loop(), name="stats"),
            asyncio.create_task(self.control.supervise(), name="state-supervisor"),
        ]
        if self.auto_start:
            workers.append(asyncio.create_task(self.control.start_line(), name="start-line"))
        try:
            await stop.wait()
        finally:
            await self._shutdown(tasks, workers)

    @property
    def idle(self) -> bool:
        """Nothing tracked, queued for a decision, or waiting for the PLC's answer."""
        return self.tracker.open_tracks == 0 and not self._sends and self._pieces.empty()

    async def _shutdown(self, tasks: list[asyncio.Task[Any]], workers: list[asyncio.Task[Any]]) -> None:
        self.log.info("service stopping")
        for cap in self.captures.values():
            await cap.stop()
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        # every piece still tracked or queued is decided and recorded, even if too late to eject
        loop = asyncio.get_running_loop()
        rest = self.tracker.flush()
        while not self._pieces.empty():
            rest += self._pieces.get_nowait()
        if rest:
            await self._decide(rest, loop)
        await asyncio.gather(*self._ahead_tasks, return_exceptions=True)  # of pieces dropped meanwhile
        if self.shadow is not None:  # its last results reach the records before they close
            await self.shadow.drain()
            self.records.event("shadow_stop", user="shutdown", **self.shadow.brief())
        if self._sends:
            _, pending = await asyncio.wait(self._sends, timeout=1.0)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*self._clip_tasks, return_exceptions=True)  # clips closing: completed
        await self.control.shutdown()
        await self.plc.stop()
        self._publish()
        for comp in reversed(self.parts.companions):
            try:
                await comp.stop()
            except Exception:
                self.log.exception(f"{comp.name} did not stop cleanly")
        if self.hallbar is not None:
            await asyncio.to_thread(self.hallbar.stop)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.records.event("stop", **self.counters.flat())
        self._writer.shutdown(wait=True)
        self.records.close()
        for close in self.parts.closers:
            await asyncio.to_thread(close)
        self.close_workers()
        self.memory.sample()
        self._publish()
        self.log.info("service stopped", **self.summary())
