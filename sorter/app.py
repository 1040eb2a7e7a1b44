"""The one wiring place: builds a line's parts from its config and hands each only what it needs.

    drivers (cameras, PLC link, Hall bar) + vision (model) + core (clock, tracker, planner)
        -> LineService (sorter/line)
    north side (HMI, OPC UA server, metrics, Sparkplug edge node) <- LineStats snapshots; -> requests
    the journal (records SQLite) -> the plant database forwarder (sorter/north/plantdb/)

Nothing else builds a LineService: the CLI (`sorter run`), the simulator's demo and its OPC UA and HMI
benches, and the commissioning scripts all come here, each with what is theirs to change (a planner of
its own for calibrate_eject, no side services where `north=False`). (`sorter bench` times the pipeline's
stages one by one, without a service.)
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import cv2
import structlog

from sorter.config import CameraConfig, ConfigError, LineConfig, PlcConfig, load_config
from sorter.config.plant import check_plant
from sorter.config.precision import position_errors, position_report
from sorter.core.clock import ClockModel
from sorter.core.geometry import camera_geometries
from sorter.core.messages import Decision, PackMLRequest, SwapModel
from sorter.core.planner import EjectPlanner
from sorter.core.timebase import REAL_TIME, Timebase
from sorter.core.tracking import Tracker
from sorter.drivers.cameras.base import FrameSource
from sorter.drivers.cameras.capture import CameraCapture
from sorter.drivers.cameras.registry import make_source
from sorter.drivers.hallbar import FieldMap, HallBar
from sorter.drivers.plc import make_plc_link
from sorter.drivers.plc.base import PlcLinkBase
from sorter.drivers.plc.link import PlcLink, RegisterClient
from sorter.line.crop_capture import CropCapture
from sorter.line.labelling import LabelStore
from sorter.line.loopwatch import LoopWatch
from sorter.line.realtime import ThreadPriority
from sorter.line.recording import Clips, Recorder, RecordingHub, RecordOptions
from sorter.line.records import RecordStore
from sorter.line.service import LineParts, LineService, worker_thread
from sorter.line.shadow import check_labels, shadow_thread
from sorter.line.virtualtime import InPlace, VirtualClock
from sorter.north.edge import EdgeNode
from sorter.north.hmi import HmiServer
from sorter.north.metrics import ServiceMetrics
from sorter.north.plantdb.forwarder import RecordForwarder
from sorter.north.scada import ScadaServer
from sorter.vision.classify import Classifier, ModelError
from sorter.vision.modelcheck import check_model


def load_checked_model(path: Path, cfg: LineConfig) -> Classifier:
    """Load a model for this line, refusing one that fails the deployment check or cannot serve the routing."""
    result = check_model(path, threads=cfg.classifier.threads)
    if not result.ok:
        raise ModelError(result.message)
    clf = Classifier(path, threads=cfg.classifier.threads, max_batch=cfg.classifier.batch_size)
    missing = sorted(set(cfg.routing.classes) - set(clf.labels))
    if missing:
        raise ModelError(f"{path}: the model has no class {missing} that the line's routing needs")
    return clf


@dataclass(frozen=True)
class Transports:
    """How a line's parts reach time and the world. The defaults are the plant's (and the real-time demo's):
    real clocks, worker threads, camera drivers from the config, Modbus TCP or OPC UA, the Hall bar's serial
    port. The lockstep simulation (sim/lockstep.py) passes its own: one virtual clock, work done in place,
    frames rendered on demand, the virtual PLC's registers in-process and the bar's lines handed over."""

    timebase: Timebase = REAL_TIME
    executor: Callable[[str], Executor] = worker_thread
    camera_source: Callable[[CameraConfig], FrameSource] = make_source
    plc_registers: Callable[[PlcConfig], RegisterClient] | None = None  # None: the protocol the config names
    hallbar_owns_port: bool = True
    # a recording (build_line(record=...)) is written on the recorder's own threads in real time; in virtual
    # time at once, in place, so that it is complete and the same every run
    record_in_place: bool = False
    # on the wall clock: the loop's stalls watched (sorter/line/loopwatch.py), the time-critical threads at a
    # real-time OS priority (sorter/line/realtime.py); neither means anything on a virtual clock
    wall_clock: bool = True
    # the shadow model's worker (docs/shadow.md): a normal-priority thread in real time, in place in virtual time
    shadow_executor: Callable[[str], Executor] = shadow_thread


def virtual_transports(
    clock: VirtualClock,
    camera_source: Callable[[CameraConfig], FrameSource],
    plc_registers: Callable[[PlcConfig], RegisterClient],
) -> Transports:
    """The transports of a line on a virtual clock (lockstep, replay): that clock for both time bases, work
    and recording done in place, the bar's lines handed over; the caller brings frames and PLC registers."""
    return Transports(
        timebase=Timebase(now=clock.now, wall=clock.wall),
        executor=lambda _name: InPlace(),
        camera_source=camera_source,
        plc_registers=plc_registers,
        hallbar_owns_port=False,
        record_in_place=True,
        wall_clock=False,
        shadow_executor=lambda _name: InPlace(),
    )


@dataclass
class Line:
    """A built line: the service and the side services around it (None where the config has none)."""

    service: LineService
    metrics: ServiceMetrics
    hmi: HmiServer | None = None
    scada: ScadaServer | None = None
    capture: CropCapture | None = None
    labels: LabelStore | None = None
    edge: EdgeNode | None = None
    forwarder: RecordForwarder | None = None
    recorder: Recorder | None = None


def build_line(
    cfg: LineConfig,
    *,
    run_id: str | None = None,
    auto_start: bool = True,
    capture: Path | None = None,
    planner: EjectPlanner | None = None,
    north: bool = True,
    transports: Transports = Transports(),
    record: RecordOptions | None = None,
) -> Line:
    """Every part of one line, wired. `planner`: another eject planner (calibrate_eject's); `north=False`:
    no HMI and no OPC UA server whatever the config says (benches and scripts that only sort); `record`:
    record what the line's sensors deliver and what it decides (sorter/line/recording.py, docs/recording.md).

    ConfigError if the config says `plant: true` and has a demo-only setting (sorter/config/plant.py), or a
    camera's frames would be placed on the belt worse than the eject margins (sorter/config/precision.py)."""
    if cfg.plant:  # a plant's line does not start with a demo-only setting (docs/config.md, `plant`)
        problems = check_plant(cfg)
        if problems:
            raise ConfigError(
                "plant: true, but the config has demo-only settings:\n" + "\n".join(f"  {p}" for p in problems)
            )
    if why := position_errors(cfg):  # frames placed worse than the eject margins: the valves would miss
        raise ConfigError("cameras too imprecise for the eject margins:\n" + why)
    log = structlog.get_logger("sorter")
    for pos in position_report(cfg):  # reported at start: how each camera's frames are placed on the belt
        log.info("camera position", **pos)
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    tb = transports.timebase
    clock = ClockModel(clock=tb.now)
    geoms = camera_geometries(cfg)
    metrics = ServiceMetrics()
    cv2.setNumThreads(cfg.vision.opencv_threads)
    classifier = load_checked_model(cfg.classifier.model, cfg)
    shadow = None
    if cfg.classifier.shadow_model is not None:  # refused at start as the live model would be (docs/shadow.md)
        try:
            shadow = load_checked_model(cfg.classifier.shadow_model, cfg)
        except ModelError as exc:  # say which of the two models it is
            raise ModelError(f"shadow model (classifier.shadow_model, --shadow-model): {exc}") from exc
        check_labels(shadow, classifier)
    recorder: Recorder | None = None
    # every recorder (the continuous one of --record, the clips a technician starts and stops) is fed by the
    # same taps, attached once here: the hub hands each item to the recorders running now
    hub = RecordingHub()

    def camera_source(cam: CameraConfig) -> FrameSource:  # every frame as delivered, before any queue
        return hub.wrap_source(transports.camera_source(cam))

    if record is not None:
        recorder = Recorder(
            record,
            config=cfg.model_dump(mode="json"),
            run_id=run_id,
            model_version=classifier.version,
            now=tb.now,
            wall=tb.wall,
            in_place=transports.record_in_place,
            log=log.bind(part="recording"),
        )
        hub.add(recorder)
    clips = Clips(
        hub,
        cfg.records.clips_folder(),
        default_max_mb=cfg.records.clip_max_mb,
        run_id=run_id,
        now=tb.now,
        wall=tb.wall,
        in_place=transports.record_in_place,
        log=log.bind(part="clip"),
    )
    plc: PlcLinkBase
    if transports.plc_registers is not None:
        plc = PlcLink(cfg.plc, clock, log=log.bind(part="plc"), now=tb.now, client=transports.plc_registers(cfg.plc))
    else:
        plc = make_plc_link(cfg.plc, clock, log=log.bind(part="plc"), now=tb.now)
    captures = {
        c.name: CameraCapture(c, cfg.queues, log.bind(camera=c.name), source_factory=camera_source, now=tb.now)
        for c in cfg.cameras
    }
    parts = LineParts(
        classifier=classifier,
        records=RecordStore(
            cfg.records.path,
            run_id,
            wall=tb.wall,
            buffer_max_rows=cfg.records.buffer_max_rows,
            min_free_mb=cfg.records.min_free_mb,
        ),
        clock=clock,
        plc=plc,
        geoms=geoms,
        captures=captures,
        tracker=Tracker.for_line(cfg, geoms),
        planner=planner or EjectPlanner.for_line(cfg),
        load_model=lambda path: load_checked_model(path, cfg),
        on_stage=metrics.observe_stage,
        on_latency_ms=metrics.observe_latency_ms,
        on_latency_parts=metrics.observe_latency_parts,
        timebase=tb,
        executor=transports.executor,
        clips=clips,
        shadow_model=shadow,
        shadow_executor=transports.shadow_executor,
    )
    parts.shadow_taps.append(parts.records.add_shadow)
    if cfg.magnetometer is not None:
        parts.fieldmap = FieldMap(cfg.magnetometer, cfg.belt.counts_per_mm, clock.count_at)
        parts.hallbar = HallBar(
            cfg.magnetometer,
            log.bind(part="hallbar"),
            on_reading=parts.fieldmap.add,
            clock=tb.now,
            own_port=transports.hallbar_owns_port,
        )
    plc.poll_taps.append(hub.poll)
    if parts.hallbar is not None:
        parts.hallbar.chunk_taps.append(hub.bar_chunk)
    parts.decision_taps.append(hub.decided)
    parts.taken_taps.append(hub.processed)
    parts.closers.append(lambda: clips.close_all(cfg.records.path))  # after the records are closed
    if recorder is not None:
        parts.extra_stats["recording"] = recorder.stats
        rec_ = recorder
        parts.closers.append(lambda: rec_.close(cfg.records.path))
    if transports.wall_clock:
        prio = ThreadPriority(cfg.priority, log=log.bind(part="priority"))
        watch = LoopWatch(log=log.bind(part="loop"))
        parts.companions[:0] = [prio, watch]  # first: the threads the others start are not raised with it
        parts.extra_stats["priority"] = prio.stats
        parts.extra_stats["loop"] = watch.stats
    service = LineService(cfg, parts, run_id=run_id, auto_start=auto_start)
    line = Line(service, metrics, recorder=recorder)
    parts.subscribers.append(metrics.publish)
    if capture is not None:
        crops = line.capture = CropCapture(capture, run_id, with_field=cfg.magnetometer is not None)

        def keep_crops(decisions: list[Decision]) -> None:
            for d in decisions:
                crops.add(d)

        parts.decision_taps.append(keep_crops)
        parts.extra_stats["capture"] = crops.stats
        parts.closers.append(crops.close)
    if north and cfg.opcua_server is not None and cfg.opcua_server.enabled:
        scada = line.scada = ScadaServer(
            cfg.opcua_server,
            cfg.users,
            cfg.fractions,
            lambda cmd, user: service.handle(PackMLRequest(cmd.value, user)),
            log=log.bind(part="opcua"),
        )
        parts.companions.append(scada)
        parts.subscribers.append(scada.publish)
    if north and cfg.sparkplug is not None and cfg.sparkplug.enabled:
        edge = line.edge = EdgeNode(cfg.sparkplug, cfg.line, log=log.bind(part="sparkplug"), wall=tb.wall, now=tb.now)
        parts.companions.append(edge)
        parts.subscribers.append(edge.publish)
        metrics.registry.register(edge.collector())
    if north and cfg.plant_db is not None and cfg.plant_db.enabled:
        fwd = line.forwarder = RecordForwarder(
            cfg.plant_db, cfg.line, cfg.records.path, run_id=run_id, log=log.bind(part="plant_db"), wall=tb.wall
        )
        parts.companions.append(fwd)
        # the service writes its last rows after its companions stop: the final drain is a closer
        parts.closers.append(fwd.close)
        metrics.registry.register(fwd.collector())
    if north and cfg.hmi is not None and cfg.hmi.enabled:
        hmi = line.hmi = HmiServer(cfg.hmi, cfg, service.handle, metrics, log=log.bind(part="hmi"))
        parts.companions.append(hmi)
        parts.subscribers.append(hmi.publish)
        parts.frame_taps.append(hmi.tap.frame)
        parts.decision_taps.append(hmi.tap.decided)
        parts.shadow_taps.append(hmi.shadow.add)
        if cfg.labelling.enabled:  # only where the HMI is served: nobody else can label (docs/hmi.md)
            try:
                lab = hmi.labels = line.labels = LabelStore(
                    cfg.labels_folder(),
                    run_id,
                    classes=lambda: service.classifier.labels,
                    queue_max=cfg.labelling.queue_max,
                    uncertain_below=cfg.labelling.uncertain_below,
                    sample_share=cfg.labelling.sample_share,
                    with_field=cfg.magnetometer is not None,
                    wall=tb.wall,
                    log=log.bind(part="labelling"),
                )
            except OSError as exc:  # a folder it cannot use is no reason not to sort
                log.error("labelling off: its folder cannot be used", folder=str(cfg.labels_folder()), error=str(exc))
            else:
                parts.decision_taps.append(lab.add)
                parts.shadow_taps.append(lab.shadowed)  # where a shadow model disagrees: labelled first
                parts.extra_stats["labelling"] = lab.stats
                parts.closers.append(lab.close)
    return line


async def run_line(
    config: Path,
    cfg: LineConfig,
    *,
    auto_start: bool = True,
    capture: Path | None = None,
    record: RecordOptions | None = None,
) -> None:
    """`sorter run`: the line until SIGINT/SIGTERM; SIGHUP swaps to the config's (re-read) classifier.model."""
    line = build_line(cfg, auto_start=auto_start, capture=capture, record=record)
    service = line.service
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    async def reload_model() -> None:
        try:
            path: Path = load_config(config).classifier.model
            await service.handle(SwapModel(path, "SIGHUP"))
        except (ConfigError, ModelError) as exc:
            service.log.error("model reload refused", error=str(exc))

    def on_hup() -> None:
        task = asyncio.create_task(reload_model())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await service.run(stop)
