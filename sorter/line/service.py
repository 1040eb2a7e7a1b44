"""The line service: one asyncio loop from frames to eject commands to records.

    capture (bounded queues) -> segment + map to belt mm (vision thread) -> track
    -> classify (ONNX, batched) -> decide -> plan in encoder counts -> PLC mailbox -> records

The loop itself only coordinates; pixel work runs on one worker thread so PLC
polling and heartbeats stay punctual.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from sorter.config import LineConfig, RoutingConfig
from sorter.core.alarms import AlarmBoard, Condition
from sorter.core.clock import ClockModel
from sorter.core.decide import decide
from sorter.core.geometry import camera_geometries, unwrap, wrap32
from sorter.core.linestate import LineSnapshot, LiveStats
from sorter.core.messages import NO_BAR, Decision, FieldReading, Frame, Piece
from sorter.core.packml import State
from sorter.core.planner import EjectPlanner, Plan
from sorter.core.tracking import Tracker
from sorter.drivers.cameras.capture import CameraCapture, CaptureClosed
from sorter.drivers.hallbar import FieldMap, HallBar
from sorter.drivers.plc import make_plc_link
from sorter.line.control import LineControl
from sorter.line.crop_capture import CropCapture
from sorter.line.records import RecordStore
from sorter.north.hmi import HmiError, HmiServer
from sorter.north.metrics import ServiceMetrics
from sorter.north.opcua.server import LineOpcUaServer, OpcUaServerError
from sorter.vision.classify import Classifier, ModelError
from sorter.vision.detections import to_detections
from sorter.vision.modelcheck import check_model
from sorter.vision.segment import materialise, segment

PLC_ALARM_ACTIONS = {
    "offline": "check the PLC's network cable and power; the line is held meanwhile",
    "estop": "release the e-stop when it is safe, then Clear and Reset",
    "air_pressure_low": "check the compressor and the valve manifold's air supply",
    "watchdog_tripped": "the PLC stopped hearing the PC; Reset once the link is stable",
    "eject_queue_overflow": "the PC sent more commands than the PLC queue holds; Reset",
}
LATENCY_WINDOW = 10_000  # decision latencies kept in memory (LineService.latencies_ms)


@dataclass
class StageTimes:
    """Wall time spent per pipeline stage (seconds), for metrics and the benchmark."""

    total: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    n: Counter[str] = field(default_factory=Counter)
    on_add: Callable[[str, float], None] | None = None  # the metrics' stage histograms (sorter/north/metrics.py)

    def add(self, stage: str, seconds: float) -> None:
        self.total[stage] += seconds
        self.n[stage] += 1
        if self.on_add is not None:
            self.on_add(stage, seconds)

    def mean_ms(self) -> dict[str, float]:
        return {k: 1000 * v / self.n[k] for k, v in self.total.items() if self.n[k]}


def load_checked_model(path: Path, cfg: LineConfig) -> Classifier:
    """Load a model for this line, refusing one that fails the deployment check or cannot serve the routing."""
    result = check_model(path, threads=cfg.classifier.threads)
    if not result.ok:
        raise ModelError(result.message)
    clf = Classifier(path, threads=cfg.classifier.threads)
    missing = sorted(set(cfg.routing.classes) - set(clf.labels))
    if missing:
        raise ModelError(f"{path}: the model has no class {missing} that the line's routing needs")
    return clf


class LineService:
    def __init__(
        self, cfg: LineConfig, *, run_id: str | None = None, auto_start: bool = True, capture: Path | None = None
    ) -> None:
        self.cfg = cfg
        self.log = structlog.get_logger("sorter")
        self.run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        self.auto_start = auto_start
        self.classifier = load_checked_model(cfg.classifier.model, cfg)
        self.records = RecordStore(cfg.records.path, self.run_id)
        self.clock = ClockModel()
        self.plc = make_plc_link(cfg.plc, self.clock, log=self.log.bind(part="plc"))
        self.geoms = camera_geometries(cfg)
        self.captures = {c.name: CameraCapture(c, cfg.queues, self.log.bind(camera=c.name)) for c in cfg.cameras}
        self.tracker = Tracker.for_line(cfg, self.geoms)
        self.planner = EjectPlanner.for_line(cfg)
        # pixels and inference on their own threads (both release the GIL): a burst of crops to
        # classify must not hold up the next frames, nor either of them the PLC polling on the loop
        self._vision = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision")
        self._infer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="records")
        self._pieces: asyncio.Queue[list[Piece]] = asyncio.Queue()
        self._sends: set[asyncio.Task[None]] = set()
        self._ref_count: int | None = None
        self.times = StageTimes()
        self.counts: Counter[str] = Counter()
        # the latest decision latencies (every one goes into the metrics' histogram and the records)
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.metrics = ServiceMetrics(self)
        self.times.on_add = self.metrics.observe_stage
        self.hallbar: HallBar | None = None
        self.fieldmap: FieldMap | None = None
        if cfg.magnetometer is not None:
            self.fieldmap = FieldMap(cfg.magnetometer, cfg.belt.counts_per_mm, self.clock.count_at)
            self.hallbar = HallBar(cfg.magnetometer, self.log.bind(part="hallbar"), on_reading=self.fieldmap.add)
        self._bar_online: bool | None = None
        self.capture = CropCapture(capture, self.run_id, with_field=cfg.magnetometer is not None) if capture else None
        self._swap_lock = asyncio.Lock()
        self.live = LiveStats(cfg.fractions, cfg.routing)
        self.control = LineControl(self)
        self.alarm_board = AlarmBoard()
        self.opcua: LineOpcUaServer | None = None
        self._opcua_error: str | None = None
        self._opcua_started = False
        # the operator's web HMI (sorter/hmi, docs/hmi.md): its own thread; here only references are handed over
        self.hmi: HmiServer | None = None
        if cfg.hmi is not None and cfg.hmi.enabled:
            self.hmi = HmiServer(self, cfg.hmi, log=self.log.bind(part="hmi"))
        if cfg.opcua_server is not None and cfg.opcua_server.enabled:
            self.opcua = LineOpcUaServer(
                cfg.opcua_server, cfg.users, cfg.fractions, self.control.command, log=self.log.bind(part="opcua")
            )
            self.control.listeners.append(lambda old, new, why: self._publish())

    # --- frames -> pieces ---
    def _frame_count(self, frame: Frame) -> int | None:
        """The frame's unwrapped encoder count: latched by the camera, else from the clock model."""
        if frame.count is None:
            if not self.clock.ready:
                return None
            return round(self.clock.count_at(frame.t_capture))
        if self.clock.ready:
            return self.clock.unwrap(frame.count)
        ref = self._ref_count if self._ref_count is not None else frame.count
        return unwrap(frame.count, ref)

    def _segment(self, frame: Frame) -> list[Any]:
        t0 = time.perf_counter()
        blobs = segment(
            frame.image, self.cfg.vision, self.geoms[frame.camera].mm_per_px, self.classifier.input_size, lazy=True
        )
        self.times.add("segment", time.perf_counter() - t0)
        return blobs

    async def _camera_loop(self, name: str) -> None:
        cap, loop = self.captures[name], asyncio.get_running_loop()
        while True:
            try:
                frame = await cap.get()
            except CaptureClosed:
                return
            try:
                await self._process(name, frame, loop)
            except Exception:  # one bad frame must not stop the line: count it, log it, go on
                self.counts["frames_failed"] += 1
                self.log.exception("frame processing failed", camera=name, seq=frame.seq)

    async def _process(self, name: str, frame: Frame, loop: asyncio.AbstractEventLoop) -> None:
        count = self._frame_count(frame)
        if count is None:
            self.counts["frames_unplaced"] += 1  # no latched count and no clock model yet
            return
        self._ref_count = count
        blobs = await loop.run_in_executor(self._vision, self._segment, frame)
        if self.hmi is not None:
            self.hmi.tap.frame(name, frame, count, blobs)  # a reference for the live view, no copy
        t0 = time.perf_counter()
        dets = to_detections(
            blobs, self.geoms[name], name, count, self.cfg.belt.counts_per_mm, frame.seq, frame.t_capture
        )
        self.tracker.add(name, count, dets)
        active = [n for n, c in self.captures.items() if c.online]
        pieces = self.tracker.finalise(active)
        self.times.add("track", time.perf_counter() - t0)
        self.counts["frames_processed"] += 1
        if pieces:
            self._pieces.put_nowait(pieces)

    # --- pieces -> decisions -> commands ---
    def _classify(self, pieces: list[Piece]) -> tuple[list[np.ndarray | None], Classifier]:
        t0 = time.perf_counter()
        clf = self.classifier  # one model per batch, even if a swap lands meanwhile
        crops = [materialise(c) for p in pieces for c in p.crops]
        probs = clf.predict(crops) if crops else np.zeros((0, len(clf.labels)))
        out: list[np.ndarray | None] = []
        i = 0
        for p in pieces:
            out.append(probs[i : i + len(p.crops)] if p.crops else None)
            i += len(p.crops)
        self.times.add("infer", time.perf_counter() - t0)
        return out, clf

    async def _decide_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pieces = await self._pieces.get()
            while not self._pieces.empty():  # batch whatever else is ready
                pieces += self._pieces.get_nowait()
            try:
                await self._decide(pieces, loop)
            except Exception:  # record what can be recorded; never let the decision loop die
                self.counts["batches_failed"] += 1
                self.log.exception("decision batch failed", pieces=len(pieces))

    async def _decide(self, pieces: list[Piece], loop: asyncio.AbstractEventLoop) -> None:
        probs, clf = await loop.run_in_executor(self._infer, self._classify, pieces)
        readings = await self._fields(pieces)
        lik = clf.field_model
        decisions = [
            decide(p, pr, clf.labels, self.cfg.routing, r, lik, clf.version)
            for p, pr, r in zip(pieces, probs, readings, strict=True)
        ]
        self.control.piece_seen()
        held: set[int] = set()
        if not self.control.ejecting:  # held, stopping, PLC lost...: nothing goes into the products
            default = self.cfg.routing.default_fraction
            held = {d.piece.id for d in decisions if d.fraction != default}
            decisions = [replace(d, fraction=default) if d.piece.id in held else d for d in decisions]
        if self.hmi is not None:
            self.hmi.tap.decided(decisions)
        if self.capture:
            for d in decisions:
                self.capture.add(d)
        t0 = time.perf_counter()
        plans = self.planner.plan(decisions, self.plc.status.speed_mm_s if self.plc.status.online else 0.0)
        self.times.add("plan", time.perf_counter() - t0)
        for plan in plans:
            if plan.decision.piece.id in held:
                plan = replace(plan, outcome="held")
            self._record(plan)
            if plan.command is not None:
                task = asyncio.create_task(self._send(plan))
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)

    def _record(self, plan: Plan) -> None:
        d: Decision = plan.decision
        p, cmd, cpm = d.piece, plan.command, self.cfg.belt.counts_per_mm
        self.counts[f"class_{d.cls}"] += 1
        self.counts[f"fraction_{d.fraction}"] += 1
        self.counts["pieces"] += 1
        if not cmd:  # no air: it ends in the default fraction (an ejected one is counted when the PLC took it)
            self.live.add(d, self.cfg.routing.default_fraction)
        outcome = "pending" if cmd else plan.outcome
        if not cmd:
            self.counts[f"eject_{plan.outcome}"] += 1
        self.records.add_piece(
            {
                "id": p.id,
                "t_wall": time.time(),
                "t_capture": p.t_last_capture,
                "count": round(p.u),
                "count32": wrap32(round(p.u)),
                "x_mm": p.x,
                "x0_mm": p.x0,
                "x1_mm": p.x1,
                "length_mm": (p.u_trail - p.u_lead) / cpm,
                "area_mm2": p.area_mm2,
                "cameras": ",".join(p.cameras),
                "n_views": p.n_views,
                "probs": d.probs,
                "image_probs": d.image_probs,
                "field_mT": d.field.field_mT,
                "field_state": d.field.state,
                "threshold": d.threshold,
                "model": d.model,
                "cls": d.cls,
                "confidence": d.confidence,
                "fraction": d.fraction,
                "bank": self.cfg.ejection.banks[cmd.bank].name if cmd else None,
                "valve_mask": cmd.valve_mask if cmd else None,
                "open_at": cmd.open_at if cmd else None,
                "open_for": cmd.open_for if cmd else None,
                "outcome": outcome,
            }
        )

    async def _send(self, plan: Plan) -> None:
        cmd = plan.command
        assert cmd is not None
        t0 = time.perf_counter()
        try:
            result = await self.plc.send(cmd, self.cfg.ejection.min_lead_ms / 1000)
        except asyncio.CancelledError:
            self.live.add(plan.decision, self.cfg.routing.default_fraction)
            self.records.update_outcome(cmd.piece_id, "cancelled", None, None, None)
            raise
        self.times.add("plc_send", time.perf_counter() - t0)
        # where it ends: the product only if the PLC took the command (counted as the line shows it)
        ended = plan.decision.fraction if result.outcome == "accepted" else self.cfg.routing.default_fraction
        self.live.add(plan.decision, ended)
        latency = None
        if result.outcome == "accepted" and result.t_accepted is not None:
            latency = 1000 * (result.t_accepted - plan.decision.piece.t_last_capture)
            self.latencies_ms.append(latency)
            self.metrics.observe_latency_ms(latency)
        self.counts[f"eject_{result.outcome}"] += 1
        self.records.update_outcome(cmd.piece_id, result.outcome, result.seq, result.t_accepted, latency)

    async def _fields(self, pieces: list[Piece]) -> list[FieldReading]:
        """Each piece's peak field, waiting (at most magnetometer.wait_ms) until the bar has read past it."""
        bar, fmap, mag = self.hallbar, self.fieldmap, self.cfg.magnetometer
        if bar is None or fmap is None or mag is None:
            return [NO_BAR] * len(pieces)
        need = max(fmap.window(p.u_lead, p.u_trail)[1] for p in pieces)
        t0 = time.monotonic()
        deadline = t0 + mag.wait_ms / 1000
        while bar.online and ((c := fmap.covered_until()) is None or c < need):
            if time.monotonic() >= deadline:
                self.counts["field_wait_timeouts"] += 1
                self.log.debug("field wait timed out", behind_mm=(need - (c or need)) / self.cfg.belt.counts_per_mm)
                break
            await asyncio.sleep(0.005)
        self.times.add("field_wait", time.monotonic() - t0)
        out = []
        for p in pieces:
            r = fmap.query(p.u_lead, p.u_trail, p.x0, p.x1)
            if r.complete and not r.pending and r.field_mT is not None:
                reading = FieldReading(r.field_mT, "ok")
            elif not bar.online:
                reading = FieldReading(r.field_mT, "offline")
            else:
                reading = FieldReading(r.field_mT, "incomplete" if r.field_mT is not None else "missing")
            self.counts[f"field_{reading.state}"] += 1
            out.append(reading)
        return out

    def field_states(self) -> dict[str, int]:
        """How many pieces were decided with each kind of field reading (ok, incomplete, missing, offline)."""
        return {k.removeprefix("field_"): v for k, v in self.counts.items() if k.startswith("field_")}

    def _watch_bar(self) -> None:
        """Log and record the bar going offline or coming back: decisions fall back to the camera meanwhile."""
        if self.hallbar is None or self.hallbar.online == self._bar_online:
            return
        was, self._bar_online = self._bar_online, self.hallbar.online
        if self._bar_online:
            if was is not None:
                self.log.info("hall bar back online: decisions use the field again")
        else:
            reason = self.hallbar.offline_reason
            self.log.warning(
                "ALARM hall bar offline: deciding on the camera alone",
                reason=reason,
                threshold=self.cfg.routing.fallback_min_confidence,
                action="check the bar's USB/serial cable and power",
            )

    # --- the model ---
    async def swap_model(self, path: Path) -> str:
        """Switch to another model between two inference batches, without stopping the line.

        The new file is loaded and checked off the loop first; a model that fails the check is
        refused (ModelError) and the running one stays. Returns the new model's version.
        """
        async with self._swap_lock:
            try:
                new = await asyncio.to_thread(load_checked_model, Path(path), self.cfg)
            except ModelError as exc:
                self.log.error("model refused", path=str(path), error=str(exc))
                self.records.event("model_refused", path=str(path), error=str(exc))
                raise
            old, self.classifier = self.classifier, new
            self.log.info("model swapped", old=old.version, new=new.version, path=str(path))
            self.records.event("model_swap", old=old.version, new=new.version, path=str(path))
            return new.version

    # --- housekeeping ---
    async def _flush_loop(self) -> None:
        last_log = time.monotonic()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.2)
            # a commit can wait on the disk (WAL checkpoints): never on the loop that polls the PLC
            try:
                await loop.run_in_executor(self._writer, self.records.flush)
            except Exception as exc:  # rows stay queued and are retried; the line goes on
                self.counts["records_flush_failed"] += 1
                self.log.error(
                    "ALARM records not written, retrying", error=str(exc), pending=self.records.pending_writes
                )
            self._watch_bar()
            self._watch_alarms()
            if time.monotonic() - last_log > 5:
                last_log = time.monotonic()
                self.log.info("line", **self.summary())

    def summary(self) -> dict[str, Any]:
        caps = {n: c.stats() for n, c in self.captures.items()}
        st = self.plc.status
        return {
            "state": self.control.state.label,
            "pieces": self.counts["pieces"],
            "open_tracks": self.tracker.open_tracks,
            "frames_captured": sum(s["captured"] for s in caps.values()),
            # every frame lost anywhere: queue overflow, torn shm slot, or dropped at the source hand-off
            "frames_dropped": sum(s["dropped"] + s["torn"] + s["source_dropped"] for s in caps.values()),
            "plc_online": st.online,
            "belt_mm_s": st.speed_mm_s,
            "plc_alarms": list(st.alarms),
            "ejects_accepted": self.counts["eject_accepted"],
            "magnetometer": self.hallbar.counters() if self.hallbar else None,
            "capture": self.capture.stats() if self.capture else None,
            "cameras": {
                n: {k: s[k] for k in ("captured", "dropped", "torn", "source_dropped", "stalls", "reconnects")}
                for n, s in caps.items()
            },
        }

    async def _start_hmi(self) -> bool:
        """Start the operator's web HMI; one that cannot start (port in use) is an alarm and retries by itself."""
        assert self.hmi is not None
        try:
            await self.hmi.start()
        except HmiError as exc:
            self.log.error("ALARM HMI not started: the operator panel is unavailable", error=str(exc))
            return False
        return True

    def set_routing_thresholds(self, user: str, **changes: float) -> RoutingConfig:
        """Change routing.min_confidence / fallback_min_confidence on the running line (HMI, technician).

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
        return routing

    async def _start_opcua(self) -> bool:
        """Start the line's OPC UA server (a few s: asyncua builds its address space).

        A server that cannot start is an alarm, not a reason to stop sorting.
        """
        assert self.opcua is not None
        try:
            await self.opcua.start()
        except OpcUaServerError as exc:
            self._opcua_error = str(exc)
            self.log.error("ALARM OPC UA server not started: SCADA cannot see the line", error=str(exc))
            return False
        self._opcua_started = True
        return True

    async def _serve_opcua(self) -> None:
        """Feed the OPC UA server snapshots at 5 Hz (and on every state change, see __init__)."""
        while True:
            self._publish()
            await asyncio.sleep(0.2)

    def _publish(self) -> None:
        if self.opcua is not None:
            self.opcua.publish(self.snapshot())

    def snapshot(self) -> LineSnapshot:
        """What the outside sees of the line right now (OPC UA server, HMI)."""
        return LineSnapshot(
            state=self.control.state,
            fraction_counts=dict(self.live.counts),
            pieces_per_minute=self.live.pieces_per_minute(),
            purity=self.live.purity(),
            model_version=self.classifier.version,
            alarms=self.alarms(),
        )

    def alarms(self) -> list[str]:
        """Active alarms as "name: cause - what to do"."""
        return [a.text() for a in self.alarm_board.active]

    def _conditions(self) -> list[Condition]:
        """The alarm conditions that hold right now."""
        st = self.plc.status
        out = [
            Condition(
                f"plc_{a}",
                (st.last_error or "no answer") if a == "offline" else f"the PLC reports {a.replace('_', ' ')}",
                PLC_ALARM_ACTIONS.get(a, "check the PLC"),
            )
            for a in st.alarms
        ]
        if self.hallbar is not None and not self.hallbar.online:
            out.append(
                Condition(
                    "hallbar_offline",
                    self.hallbar.offline_reason or "no data",
                    "check the bar's USB/serial cable and power (deciding on the camera alone meanwhile)",
                )
            )
        if self.control.state in (State.EXECUTE, State.SUSPENDED, State.HELD):
            out += [
                Condition(f"camera_{n}_offline", c.offline_reason or "no frames", "check the camera's cable and power")
                for n, c in self.captures.items()
                if not c.online
            ]
        if self.records.pending_writes > 1000:
            out.append(
                Condition(
                    "records_not_written",
                    f"{self.records.pending_writes} rows waiting",
                    "check the disk holding the records database",
                )
            )
        if self._opcua_error is not None:
            out.append(Condition("opcua_server_down", self._opcua_error, "fix the OPC UA server's config; restart"))
        elif self.opcua is not None and self._opcua_started and not self.opcua.listening:
            out.append(
                Condition("opcua_server_down", "the OPC UA server process ended", "SCADA is blind: restart the service")
            )
        if self.hmi is not None and (hmi_down := self.hmi.condition()) is not None:
            out.append(hmi_down)
        return out

    def _watch_alarms(self) -> None:
        raised, cleared = self.alarm_board.update(self._conditions())
        for a in raised:
            self.log.warning(f"ALARM {a.name}", cause=a.cause, action=a.action)
            self.records.event("alarm", alarm=a.name, reason=a.cause, action=a.action)
        for a in cleared:
            self.log.info(f"alarm cleared: {a.name}")
            self.records.event("alarm_cleared", alarm=a.name)
        if raised or cleared:
            self._publish()

    async def run(self, stop: asyncio.Event) -> None:
        self.log.info(
            "service starting",
            run_id=self.run_id,
            model=str(self.cfg.classifier.model),
            model_version=self.classifier.version,
            provider=self.classifier.provider,
            records=str(self.records.path),
        )
        self.records.event("start", model=self.classifier.version)
        serving = self.opcua is not None and await self._start_opcua()
        if self.hmi is not None:
            await self._start_hmi()
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
        ]
        workers.append(asyncio.create_task(self.control.supervise(), name="state-supervisor"))
        if serving:
            workers.append(asyncio.create_task(self._serve_opcua(), name="opcua-server"))
        if self.auto_start:
            workers.append(asyncio.create_task(self.control.start_line(), name="start-line"))
        try:
            await stop.wait()
        finally:
            await self._shutdown(tasks, workers)

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
        if self._sends:
            _, pending = await asyncio.wait(self._sends, timeout=1.0)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.control.shutdown()
        await self.plc.stop()
        if self.opcua is not None:
            self._publish()
            await self.opcua.stop()
        if self.hmi is not None:
            await self.hmi.stop()
        if self.hallbar is not None:
            await asyncio.to_thread(self.hallbar.stop)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.records.event("stop", **{k: v for k, v in self.counts.items()})
        self._writer.shutdown(wait=True)
        self.records.close()
        if self.capture:
            await asyncio.to_thread(self.capture.close)
        self._vision.shutdown(wait=True)
        self._infer.shutdown(wait=True)
        self.log.info("service stopped", **self.summary())
