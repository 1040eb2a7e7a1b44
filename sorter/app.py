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
from dataclasses import dataclass
from pathlib import Path

import structlog

from sorter.config import ConfigError, LineConfig, load_config
from sorter.config.plant import check_plant
from sorter.core.clock import ClockModel
from sorter.core.geometry import camera_geometries
from sorter.core.messages import Decision, PackMLRequest, SwapModel
from sorter.core.planner import EjectPlanner
from sorter.core.tracking import Tracker
from sorter.drivers.cameras.capture import CameraCapture
from sorter.drivers.hallbar import FieldMap, HallBar
from sorter.drivers.plc import make_plc_link
from sorter.line.crop_capture import CropCapture
from sorter.line.records import RecordStore
from sorter.line.service import LineParts, LineService
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
    clf = Classifier(path, threads=cfg.classifier.threads)
    missing = sorted(set(cfg.routing.classes) - set(clf.labels))
    if missing:
        raise ModelError(f"{path}: the model has no class {missing} that the line's routing needs")
    return clf


@dataclass
class Line:
    """A built line: the service and the side services around it (None where the config has none)."""

    service: LineService
    metrics: ServiceMetrics
    hmi: HmiServer | None = None
    scada: ScadaServer | None = None
    capture: CropCapture | None = None
    edge: EdgeNode | None = None
    forwarder: RecordForwarder | None = None


def build_line(
    cfg: LineConfig,
    *,
    run_id: str | None = None,
    auto_start: bool = True,
    capture: Path | None = None,
    planner: EjectPlanner | None = None,
    north: bool = True,
) -> Line:
    """Every part of one line, wired. `planner`: another eject planner (calibrate_eject's); `north=False`:
    no HMI and no OPC UA server whatever the config says (benches and scripts that only sort).

    ConfigError if the config says `plant: true` and has a demo-only setting (sorter/config/plant.py)."""
    if cfg.plant:  # a plant's line does not start with a demo-only setting (docs/config.md, `plant`)
        problems = check_plant(cfg)
        if problems:
            raise ConfigError(
                "plant: true, but the config has demo-only settings:\n" + "\n".join(f"  {p}" for p in problems)
            )
    log = structlog.get_logger("sorter")
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    clock = ClockModel()
    geoms = camera_geometries(cfg)
    metrics = ServiceMetrics()
    parts = LineParts(
        classifier=load_checked_model(cfg.classifier.model, cfg),
        records=RecordStore(cfg.records.path, run_id),
        clock=clock,
        plc=make_plc_link(cfg.plc, clock, log=log.bind(part="plc")),
        geoms=geoms,
        captures={c.name: CameraCapture(c, cfg.queues, log.bind(camera=c.name)) for c in cfg.cameras},
        tracker=Tracker.for_line(cfg, geoms),
        planner=planner or EjectPlanner.for_line(cfg),
        load_model=lambda path: load_checked_model(path, cfg),
        on_stage=metrics.observe_stage,
        on_latency_ms=metrics.observe_latency_ms,
    )
    if cfg.magnetometer is not None:
        parts.fieldmap = FieldMap(cfg.magnetometer, cfg.belt.counts_per_mm, clock.count_at)
        parts.hallbar = HallBar(cfg.magnetometer, log.bind(part="hallbar"), on_reading=parts.fieldmap.add)
    service = LineService(cfg, parts, run_id=run_id, auto_start=auto_start)
    line = Line(service, metrics)
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
        edge = line.edge = EdgeNode(cfg.sparkplug, cfg.line, log=log.bind(part="sparkplug"))
        parts.companions.append(edge)
        parts.subscribers.append(edge.publish)
        metrics.registry.register(edge.collector())
    if north and cfg.plant_db is not None and cfg.plant_db.enabled:
        fwd = line.forwarder = RecordForwarder(
            cfg.plant_db, cfg.line, cfg.records.path, run_id=run_id, log=log.bind(part="plant_db")
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
    return line


async def run_line(config: Path, cfg: LineConfig, *, auto_start: bool = True, capture: Path | None = None) -> None:
    """`sorter run`: the line until SIGINT/SIGTERM; SIGHUP swaps to the config's (re-read) classifier.model."""
    line = build_line(cfg, auto_start=auto_start, capture=capture)
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
