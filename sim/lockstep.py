"""The line in virtual time: the simulator and the unchanged service pipeline on one clock, deterministic.

`sorter demo --lockstep` runs what the real-time demo runs — the service's segmentation, tracking,
classification, fusion, decision, planning, PLC mailbox protocol and records, the simulator's belt,
feed, rendering, virtual PLC, Hall bar and ejection physics — in one process on one event loop whose
clock is virtual: nothing ever waits for real time. When every task is waiting, the clock jumps to the
next timer (a camera trigger, a PLC scan, a poll); work takes no virtual time at all, so the figures
are those of a line whose computer is never late, and the same seed gives the same run, row for row,
on any machine and under any load.

The service is built by the product's wiring (sorter/app.py `build_line`) with `Transports` that swap
only what crosses a wire or a thread:
- time: one `VirtualClock` is the loop's clock and the line's `Timebase` (wall time = a fixed start plus
  the virtual time, so record timestamps repeat too);
- threads: the worker threads for pixels, inference and disk writes become an executor that runs the
  work in place, on the loop (and so does asyncio's default executor); the loop and the executor are the
  product's (sorter/line/virtualtime.py), which `sorter replay` runs on too;
- frames: a camera source that renders frame k with the simulator's renderer when the belt reaches
  trigger count k, and delivers it after the simulated delivery delay;
- the PLC: the link's Modbus requests reach the virtual PLC's register images in-process (the same
  `VirtualPlc.request` pymodbus calls), each way taking a fixed `ONE_WAY_S`;
- the Hall bar: the simulated board's lines are handed to the service's `HallBar.receive` when their
  last byte would have left the UART.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import yaml

from sim.camera import SimCameraServer
from sim.config import SimLineConfig
from sim.demo import demo_report, keep_truth, new_run_folder
from sim.hallbar import INFO_PERIOD_S, SimHallBar
from sim.line import SimLine
from sim.plc import VALVES_PER_BANK, VirtualPlc
from sorter.app import Line, build_line, virtual_transports
from sorter.config import CameraConfig, PlcConfig
from sorter.core.geometry import wrap32
from sorter.core.messages import Frame
from sorter.core.packml import State
from sorter.drivers.hallbar import HallBar
from sorter.drivers.hallbar.protocol import wire_seconds
from sorter.drivers.plc.base import PlcError
from sorter.line.recording import RecordOptions
from sorter.line.virtualtime import VirtualClock, VirtualTimeLoop

VT0 = 1000.0  # the virtual monotonic clock at the start of a run
WALL0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: the wall clock at VT0, the same in every run
ONE_WAY_S = 0.0004  # a Modbus request, or its answer, on the PLC's Ethernet
START_TIMEOUT_S = 30.0  # virtual seconds for the line to come up, and for the belt to empty after the feed
POLL_S = 0.05


class PlcRegisters:
    """The PLC link's register transport, reaching the virtual PLC in-process (sorter's RegisterClient)."""

    def __init__(self, plc: VirtualPlc, now: Callable[[], float]) -> None:
        self.plc = plc
        self._now = now
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    async def connect(self) -> None:
        await asyncio.sleep(2 * ONE_WAY_S)
        self._connected = True

    def close(self) -> None:
        self._connected = False

    async def _request(self, function: int, address: int, count: int, values: list[Any] | None = None) -> list[int]:
        if not self._connected:
            raise PlcError("lockstep PLC: not connected")
        await asyncio.sleep(ONE_WAY_S)
        registers = [0] * count
        exc = await self.plc.request(function, address, address, count, registers, values)
        await asyncio.sleep(ONE_WAY_S)
        if exc is not None:
            raise PlcError(f"lockstep PLC answered exception {int(exc)} to function {function}", int(exc))
        return registers

    async def read_input_registers_timed(self, address: int, count: int) -> tuple[list[int], float, float]:
        t_request = self._now()
        regs = await self._request(4, address, count)
        return regs, t_request, self._now()

    async def read_input_registers(self, address: int, count: int) -> list[int]:
        return await self._request(4, address, count)

    async def read_holding_registers(self, address: int, count: int) -> list[int]:
        return await self._request(3, address, count)

    async def write_register(self, address: int, value: int) -> None:
        await self._request(6, address, 1, [value])

    async def write_registers(self, address: int, values: Sequence[int]) -> None:
        await self._request(16, address, len(values), list(values))

    async def write_coil(self, address: int, on: bool) -> None:
        await self._request(5, address, 1, [on])

    async def read_coils(self, address: int, count: int) -> list[bool]:
        await asyncio.sleep(2 * ONE_WAY_S)
        first = address - self.plc.regs.coil_valves
        return [self.plc.coil(*divmod(first + i, VALVES_PER_BANK)) for i in range(count)]


class LockstepCamera:
    """A frame source rendering the simulated camera's frames on the virtual clock (sorter's FrameSource).

    Exposed when the belt reaches each trigger count (a multiple of the camera's encoder divider), with
    the count latched; delivered in order after the simulated delivery delay, as the real-time camera
    stream delivers them.
    """

    def __init__(self, cam: SimCameraServer, now: Callable[[], float], seed: int) -> None:
        self.cam = cam
        self._now = now
        self._rng = random.Random(seed)
        self.torn = 0
        self.dropped = 0
        self.exposed = 0
        self.delivered = 0

    @property
    def name(self) -> str:
        return self.cam.name

    async def frames(self) -> AsyncIterator[Frame]:
        cam, belt, trig = self.cam, self.cam.belt, self.cam.trigger_counts
        lo, hi = cam.delay_ms
        pending: deque[tuple[float, Frame]] = deque()  # exposed, not yet delivered: (delivery time, frame)
        last_delivery = 0.0
        next_count = (belt.count() // trig + 1) * trig
        while True:
            pos = belt.position_at_count(next_count)
            t_exp = belt.time_at_position(pos)  # None while the belt stands
            t_next = min(t_exp if t_exp is not None else self._now() + POLL_S, pending[0][0] if pending else np.inf)
            if t_next > self._now():
                await asyncio.sleep(t_next - self._now())
                continue
            if pending and pending[0][0] <= self._now():
                self.delivered += 1
                yield pending.popleft()[1]
                continue
            if t_exp is None:
                continue
            image = np.empty((cam.height, cam.width, 3), np.uint8)
            cam.render(image, pos)
            self.exposed += 1
            last_delivery = max(t_exp + self._rng.uniform(lo, hi) / 1000, last_delivery)  # in order
            # received when delivered, as a real source stamps it (the service's compute time runs from then)
            frame = Frame(cam.name, self.exposed, image, t_exp, wrap32(next_count), last_delivery)
            pending.append((last_delivery, frame))
            next_count += trig

    async def close(self) -> None:
        return None


async def hallbar_wire(board: SimHallBar, bar: HallBar, now: Callable[[], float], baudrate: int) -> None:
    """The bar's serial line: the simulated board's lines reach the service's HallBar when their last byte
    would have left the UART (a line every period_ms, later while the UART is still busy)."""
    period = board.hb.period_ms / 1000

    async def send(line: bytes) -> None:
        await asyncio.sleep(wire_seconds(len(line), baudrate))
        bar.receive(line, now())

    t0 = now()
    info = board.boot(t0)
    await send(info)
    next_info = t0 + INFO_PERIOD_S
    while True:
        t = now()
        _, line = board.latch(t)
        await send(line)
        if now() >= next_info:
            await send(info)
            next_info += INFO_PERIOD_S
        await asyncio.sleep(max(0.0, t + period - now()))


def lockstep_config(cfg: SimLineConfig, run_dir: Path, seed: int) -> SimLineConfig:
    """This run's config: its records in run_dir, this seed. Nothing is served, so no ports are taken."""
    assert cfg.simulator is not None
    return cfg.model_copy(
        update={
            "records": cfg.records.model_copy(update={"path": run_dir.resolve() / "records.sqlite"}),
            "simulator": cfg.simulator.model_copy(update={"seed": seed}),
        }
    )


async def _until(cond: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise RuntimeError(f"lockstep: {what} not within {timeout:g} virtual s")
        await asyncio.sleep(POLL_S)


async def _run(
    cfg: SimLineConfig,
    duration: float,
    seed: int,
    run_dir: Path,
    clock: VirtualClock,
    record: RecordOptions | None,
    capture: Path | None,
) -> dict[str, Any]:
    log = structlog.get_logger("lockstep")
    truth_path = run_dir / "truth.sqlite"
    for old in (truth_path, cfg.records.path):  # a rerun in the same folder starts from nothing
        for suffix in ("", "-wal", "-shm"):
            Path(f"{old}{suffix}").unlink(missing_ok=True)
    bar_on = cfg.magnetometer is not None and cfg.simulator is not None and cfg.simulator.hallbar.enabled
    sim = SimLine(
        cfg, truth_path, seed=seed, hallbar_link=run_dir / "hallbar.unused" if bar_on else None, clock=clock.now
    )
    cams = {c.name: c for c in sim.cameras}
    sources: dict[str, LockstepCamera] = {}

    def camera_source(cam: CameraConfig) -> LockstepCamera:
        src = sources[cam.name] = LockstepCamera(cams[cam.name], clock.now, seed + 200 + len(sources))
        return src

    def plc_registers(_: PlcConfig) -> PlcRegisters:
        return PlcRegisters(sim.plc, clock.now)

    transports = virtual_transports(clock, camera_source, plc_registers)
    await sim.start(serve=False)
    line: Line | None = None
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    wall0 = time.perf_counter()
    try:
        line = build_line(
            cfg, run_id=f"lockstep-seed{seed}", north=False, transports=transports, record=record, capture=capture
        )
        service = line.service
        tasks.append(asyncio.create_task(service.run(stop), name="service"))
        if sim.hallbar is not None and service.hallbar is not None and cfg.magnetometer is not None:
            wire = hallbar_wire(sim.hallbar, service.hallbar, clock.now, cfg.magnetometer.baudrate)
            tasks.append(asyncio.create_task(wire, name="hallbar-wire"))

        def ready() -> bool:
            if tasks[0].done():
                tasks[0].result()  # what stopped the service
            return bool(
                service.control.state is State.EXECUTE
                and service.plc.status.online
                and service.clock.ready
                and all(c.online for c in service.captures.values())
                and (service.hallbar is None or service.hallbar.online)
            )

        await _until(ready, "the line to start (PLC online, belt running, cameras streaming)")
        sim.set_feed(True, duration)
        t_feed = clock.now()
        await asyncio.sleep(duration)
        t_end = clock.now()
        await _until(lambda: sim.on_belt == 0 and service.idle, "the belt to empty")
    finally:
        stop.set()
        if tasks:
            await asyncio.gather(tasks[0], return_exceptions=True)
            for t in tasks[1:]:
                t.cancel()
            await asyncio.gather(*tasks[1:], return_exceptions=True)
        status = sim.status()
        await sim.stop()
    status["cameras"] = {n: {"triggered": s.exposed, "sent": s.delivered} for n, s in sources.items()}
    report = demo_report(
        cfg, line, truth_path, status, seed=seed, run_dir=run_dir, duration_s=t_end - t_feed, interrupted=False
    )
    report["lockstep"] = {
        "virtual_s": round(clock.now() - VT0, 3),
        "wall_s": round(time.perf_counter() - wall0, 2),
    }
    report["lockstep"]["speed_factor"] = round(report["lockstep"]["virtual_s"] / report["lockstep"]["wall_s"], 3)
    log.info("lockstep run done", **report["lockstep"])
    if record is not None:
        keep_truth(record, truth_path, report)
    return report


def run_lockstep(
    cfg: SimLineConfig,
    duration: float,
    seed: int,
    run_dir: Path,
    record: RecordOptions | None = None,
    capture: Path | None = None,
) -> dict[str, Any]:
    """Run the simulated line sorted by the service in virtual time; returns the demo's report. `capture`: save
    each decided piece's crop as a labelled data set there (sorter/line/crop_capture.py), as `sorter run --capture`."""
    new_run_folder(run_dir)
    cfg = lockstep_config(cfg, run_dir, seed)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    clock = VirtualClock(VT0, WALL0)
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(clock)) as runner:
        return runner.run(_run(cfg, duration, seed, run_dir, clock, record, capture))
