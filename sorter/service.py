"""The line service: one asyncio loop from frames to eject commands to records.

    capture (bounded queues) -> segment + map to belt mm (vision thread) -> track
    -> classify (ONNX, batched) -> decide -> plan in encoder counts -> PLC mailbox -> records

The loop itself only coordinates; pixel work runs on one worker thread so PLC
polling and heartbeats stay punctual.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from sorter.capture import CameraCapture, CaptureClosed
from sorter.classify import Classifier
from sorter.clock import ClockModel
from sorter.config import LineConfig
from sorter.decide import decide
from sorter.geometry import camera_geometries, unwrap, wrap32
from sorter.messages import Decision, Frame, Piece
from sorter.planner import EjectPlanner, Plan
from sorter.plc.link import PlcLink
from sorter.records import RecordStore
from sorter.tracking import Tracker, to_detections
from sorter.vision.segment import materialise, segment

PLC_START_BELT, PLC_STOP_BELT, PLC_RESET = 1, 2, 3


@dataclass
class StageTimes:
    """Wall time spent per pipeline stage (seconds), for metrics and the benchmark."""

    total: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    n: Counter[str] = field(default_factory=Counter)

    def add(self, stage: str, seconds: float) -> None:
        self.total[stage] += seconds
        self.n[stage] += 1

    def mean_ms(self) -> dict[str, float]:
        return {k: 1000 * v / self.n[k] for k, v in self.total.items() if self.n[k]}


class LineService:
    def __init__(self, cfg: LineConfig, *, run_id: str | None = None, start_belt: bool = True) -> None:
        self.cfg = cfg
        self.log = structlog.get_logger("sorter")
        self.run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        self.start_belt = start_belt
        self.classifier = Classifier(cfg.classifier.model, threads=cfg.classifier.threads)
        self.records = RecordStore(cfg.records.path, self.run_id)
        self.clock = ClockModel()
        self.plc = PlcLink(cfg.plc, self.clock, log=self.log.bind(part="plc"))
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
        self.latencies_ms: list[float] = []

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
    def _classify(self, pieces: list[Piece]) -> list[np.ndarray | None]:
        t0 = time.perf_counter()
        crops = [materialise(c) for p in pieces for c in p.crops]
        probs = self.classifier.predict(crops) if crops else np.zeros((0, len(self.classifier.labels)))
        out: list[np.ndarray | None] = []
        i = 0
        for p in pieces:
            out.append(probs[i : i + len(p.crops)] if p.crops else None)
            i += len(p.crops)
        self.times.add("infer", time.perf_counter() - t0)
        return out

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
        probs = await loop.run_in_executor(self._infer, self._classify, pieces)
        labels = self.classifier.labels
        decisions = [decide(p, pr, labels, self.cfg.routing) for p, pr in zip(pieces, probs, strict=True)]
        t0 = time.perf_counter()
        plans = self.planner.plan(decisions, self.plc.status.speed_mm_s if self.plc.status.online else 0.0)
        self.times.add("plan", time.perf_counter() - t0)
        for plan in plans:
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
            self.records.update_outcome(cmd.piece_id, "cancelled", None, None, None)
            raise
        self.times.add("plc_send", time.perf_counter() - t0)
        latency = None
        if result.outcome == "accepted" and result.t_accepted is not None:
            latency = 1000 * (result.t_accepted - plan.decision.piece.t_last_capture)
            self.latencies_ms.append(latency)
        self.counts[f"eject_{result.outcome}"] += 1
        self.records.update_outcome(cmd.piece_id, result.outcome, result.seq, result.t_accepted, latency)

    # --- housekeeping ---
    async def _flush_loop(self) -> None:
        last_log = time.monotonic()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.2)
            # a commit can wait on the disk (WAL checkpoints): never on the loop that polls the PLC
            await loop.run_in_executor(self._writer, self.records.flush)
            if time.monotonic() - last_log > 5:
                last_log = time.monotonic()
                self.log.info("line", **self.summary())

    def summary(self) -> dict[str, Any]:
        caps = {n: c.stats() for n, c in self.captures.items()}
        st = self.plc.status
        return {
            "pieces": self.counts["pieces"],
            "open_tracks": self.tracker.open_tracks,
            "frames_captured": sum(s["captured"] for s in caps.values()),
            # every frame lost anywhere: queue overflow, torn shm slot, or dropped at the source hand-off
            "frames_dropped": sum(s["dropped"] + s["torn"] + s["source_dropped"] for s in caps.values()),
            "plc_online": st.online,
            "belt_mm_s": st.speed_mm_s,
            "plc_alarms": list(st.alarms),
            "ejects_accepted": self.counts["eject_accepted"],
            "cameras": {
                n: {k: s[k] for k in ("captured", "dropped", "torn", "source_dropped", "stalls", "reconnects")}
                for n, s in caps.items()
            },
        }

    async def _start_belt(self) -> None:
        while not self.plc.status.online:
            await asyncio.sleep(0.05)
        try:
            await self.plc.command(PLC_RESET)
            await self.plc.command(PLC_START_BELT)
        except Exception as exc:  # the link reports and retries; the operator sees the alarm
            self.log.error("belt start failed", error=str(exc))

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
        tasks = [asyncio.create_task(self.plc.run(), name="plc")]
        for cap in self.captures.values():
            tasks.append(asyncio.create_task(cap.run(), name=f"capture-{cap.name}"))
        workers = [asyncio.create_task(self._camera_loop(n), name=f"vision-{n}") for n in self.captures]
        workers += [
            asyncio.create_task(self._decide_loop(), name="decide"),
            asyncio.create_task(self._flush_loop(), name="flush"),
        ]
        if self.start_belt:
            workers.append(asyncio.create_task(self._start_belt(), name="start-belt"))
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
        with contextlib.suppress(Exception):
            if self.start_belt and self.plc.status.online:
                await asyncio.wait_for(self.plc.command(PLC_STOP_BELT), 1.0)
        await self.plc.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.records.event("stop", **{k: v for k, v in self.counts.items()})
        self._writer.shutdown(wait=True)
        self.records.close()
        self._vision.shutdown(wait=True)
        self._infer.shutdown(wait=True)
        self.log.info("service stopped", **self.summary())
