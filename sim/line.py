"""The whole simulated line: belt + encoder, feed, cameras, virtual PLC, ejection
physics and bins, run in real time beside the line service.

It serves the same protocols as the plant (Modbus TCP for the PLC, the camera
stream) and keeps the ground truth the demo's report is computed from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from sim.belt import Belt
from sim.camera import SimCameraServer
from sim.config import SimConfig, SimLineConfig
from sim.feed import FeedGenerator
from sim.hallbar import SimHallBar
from sim.physics import EjectionPhysics
from sim.plc import ExecutedEject, VirtualPlc
from sim.plc_opcua import PlcOpcUaServer
from sim.render import FrameRenderer, render_sprite
from sim.target import SimTarget
from sim.truth import TruthStore
from sorter.config import SimCameraSource
from sorter.core.geometry import CameraGeometry

# pieces land this far upstream of the cameras' centre line: far enough that a simulator starved of CPU
# for a moment (2 cores shared with the service) still places them before the cameras can see them
FEED_DROP_MM = 1500.0
DRIFT_STEP_S = 0.1


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


def true_geometry(cfg: SimLineConfig, sim: SimConfig, index: int) -> CameraGeometry:
    cam = cfg.cameras[index]
    truth = sim.cameras.get(cam.name)
    m = cam.mapping
    return CameraGeometry(
        cam.width,
        cam.height,
        tuple(truth.centre_mm) if truth and truth.centre_mm else tuple(m.centre_mm),  # type: ignore[arg-type]
        truth.mm_per_px if truth and truth.mm_per_px else m.mm_per_px,
        truth.rotation_deg if truth and truth.rotation_deg is not None else m.rotation_deg,
    )


class SimLine:
    def __init__(
        self,
        cfg: SimLineConfig,
        truth_path: Path | None = None,
        record_dir: Path | None = None,
        seed: int | None = None,
        hallbar_link: Path | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cfg.simulator is None:
            raise ValueError("the config has no `simulator:` section")
        self.cfg = cfg
        self.sim = cfg.simulator if seed is None else cfg.simulator.model_copy(update={"seed": seed})
        self.log = structlog.get_logger("sim")
        sim = self.sim
        # the encoder's true resolution: everything physical converts mm <-> counts with it (encoder,
        # camera trigger and latched counts, PLC firing, ejection physics); the service uses the config's
        cpm = sim.encoder_counts_per_mm or cfg.belt.counts_per_mm
        self.clock = clock  # real time beside the service, or the lockstep simulation's virtual clock
        self.belt = Belt(cpm, cfg.belt.nominal_speed_mm_s, sim.encoder_start, sim.speed_drift, sim.seed, clock=clock)
        self.geoms = [true_geometry(cfg, sim, i) for i in range(len(cfg.cameras))]
        self._mm_per_px = self.geoms[0].mm_per_px
        self.feed = FeedGenerator(sim.feed, cfg.belt.width_mm, cfg.belt.nominal_speed_mm_s, sim.seed)
        self.physics = EjectionPhysics(cfg.ejection, sim, cpm, sim.encoder_start)
        self.truth = TruthStore(truth_path) if truth_path else None
        self.plc = VirtualPlc(
            cfg.plc.registers, self.belt, sim, banks=len(cfg.ejection.banks), on_eject=self._fired, clock=clock
        )
        # the same PLC also serves OPC UA, on plc.opcua.endpoint
        self.plc_opcua = (
            PlcOpcUaServer(self.plc, cfg.plc.opcua, sim.plc_opcua)
            if sim.plc_opcua.enabled and cfg.plc.opcua.endpoint
            else None
        )
        self._rng = np.random.default_rng(sim.seed + 1)
        self._on_belt: list[Any] = []  # SimPiece, in s order
        self._visible: tuple[tuple[Any, Any], ...] = ()  # (SimPiece, Sprite) snapshot read by camera threads
        self._sprites: dict[int, Any] = {}
        self.feeding = False
        self._next_drift = 0.0  # when the belt's speed takes its next random step (clock seconds)
        self._feed_until: float | None = None  # when a feed started with a duration stops (clock seconds)
        self._feed_offset = 0.0
        self._feed_pos = 0.0  # how far (in the generator's own coordinate) pieces were generated
        self.fed = 0
        self.fed_late = 0
        self.binned: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        trigger = round(cfg.belt.nominal_speed_mm_s / sim.fps * cpm)
        # marks lying on the belt for the encoder calibration (sim/testpieces.py), drawn into every frame
        self.marks: tuple[Any, ...] = ()
        self.cameras = []
        self.renderers: list[FrameRenderer] = []
        self.target: SimTarget | None = None  # the camera calibration target, while one lies on the belt
        for i, cam in enumerate(cfg.cameras):
            if not isinstance(cam.source, SimCameraSource):
                raise ValueError(f"camera {cam.name}: the simulator serves only `type: sim` camera sources")
            host, port = split_address(cam.source.address)
            renderer = FrameRenderer(self.geoms[i], sim.noise_sigma, sim.seed + 100 + i)
            self.renderers.append(renderer)
            self.cameras.append(
                SimCameraServer(
                    cam.name,
                    cam.width,
                    cam.height,
                    trigger,
                    self.belt,
                    self._render_fn(renderer),
                    sim.delivery_delay_ms,
                    sim.seed + 200 + i,
                    host,
                    port,
                    record=(record_dir / f"{cam.name}.avi") if record_dir else None,
                    rt_priority=sim.camera_rt_priority,
                )
            )
        self._field = (min(g.field_mm()[2] for g in self.geoms) - 60, max(g.field_mm()[3] for g in self.geoms) + 60)
        # the Hall bar streams over a pty whose slave `hallbar_link` points to (the service's magnetometer.port)
        self.hallbar = (
            SimHallBar(cfg, self.belt, lambda: tuple(self._on_belt), hallbar_link, sim.seed + 300, clock=clock)
            if hallbar_link is not None and sim.hallbar.enabled
            else None
        )

    # --- camera side (runs on camera threads) ---
    def _render_fn(self, renderer: FrameRenderer):
        rng = np.random.default_rng(self.sim.seed)

        def render(out: np.ndarray, belt_pos: float) -> None:
            y0, y1 = self._field
            items = [(p, sp) for p, sp in self._visible if y0 <= belt_pos - p.s_mm <= y1]
            renderer.render(items, belt_pos, out, gain=float(rng.uniform(0.93, 1.07)))
            for mark in self.marks:
                mark.draw(out, renderer.geom, belt_pos, rng)

        return render

    # --- PLC side ---
    def _fired(self, ex: ExecutedEject) -> None:
        w = self.physics.fire(ex.seq, ex.bank, ex.valve_mask, ex.open_at, ex.open_for, self.belt.speed_mm_s())
        if self.truth:
            self.truth.add_windows([(w.seq, w.bank, w.open_at, w.open_for, w.p_open, w.p_close, repr(w.spans))])

    # --- Hall bar ---
    def set_hallbar(self, on: bool) -> None:
        """Plug the Hall bar's cable in or pull it out (fault tests)."""
        if self.hallbar is None:
            raise RuntimeError("the simulated line runs no Hall bar (no link path, or simulator.hallbar.enabled off)")
        self.hallbar.set_plugged(on)

    async def set_camera_fault(self, name: str, fault: str) -> None:
        """Fault injection on one camera: "unplug" (its cable pulled: connection and listener gone),
        "stall" (connected, delivers nothing), "none" (back to normal; an unplugged one serves again on
        its port)."""
        cams = {c.name: c for c in self.cameras}
        if name not in cams:
            raise ValueError(f"no camera {name!r} (cameras: {', '.join(cams)})")
        if fault not in ("unplug", "stall", "none"):
            raise ValueError(f"camera fault {fault!r}: unplug, stall or none")
        cam = cams[name]
        cam.stalled = fault == "stall"
        unplugged = cam.shm_name is None
        if fault == "unplug" and not unplugged:
            await cam.stop()
        elif fault != "unplug" and unplugged:
            await cam.start()

    # --- camera commissioning (sim/target.py) ---
    def set_target(self, target: SimTarget | None) -> None:
        """Lay the calibration target on the belt (None takes it away)."""
        self.target = target
        for renderer in self.renderers:
            renderer.underlay = target.for_camera(renderer.geom) if target is not None else None

    def _camera_index(self, name: str | None) -> list[int]:
        names = [c.name for c in self.cameras]
        if name is not None and name not in names:
            raise ValueError(f"no camera {name!r}; cameras: {names}")
        return [i for i, n in enumerate(names) if name is None or n == name]

    def set_camera_trigger(self, free_run_fps: float | None, camera: str | None = None) -> None:
        """Trigger mode: None = encoder (production), a rate = free-run (frames with the belt stopped)."""
        for i in self._camera_index(camera):
            self.cameras[i].free_run_fps = free_run_fps

    def set_camera_focus(self, blur_px: float, camera: str | None = None) -> None:
        """Defocus a camera's lens (0 = sharp)."""
        for i in self._camera_index(camera):
            self.renderers[i].blur_px = blur_px

    # --- feed and bins ---
    def set_feed(self, on: bool, duration_s: float | None = None) -> None:
        """Start or stop the feeder; `duration_s`: it stops by itself after that many seconds of the clock,
        exactly (pieces up to where the belt was then), however late the simulator's next tick comes."""
        if on and not self.feeding:
            self._feed_offset = self.belt.position_mm() + FEED_DROP_MM - self._feed_pos
            # the belt's speed wanders the same way from the start of every feed, whatever the line did
            # before (a start-up takes longer in real time than in lockstep): same seed, same belt, same feed
            self.belt.restart_drift()
            self._next_drift = self.clock() + DRIFT_STEP_S
        if not on and self.feeding:
            self._feed_step()  # the pieces up to now (or up to the end of a timed feed) are on the belt
        self._feed_until = self.clock() + duration_s if on and duration_s is not None else None
        self.feeding = on
        self.log.info("feed", on=on, duration_s=duration_s)

    def _feed_step(self) -> None:
        if not self.feeding or not self.belt.running:
            return
        t = self.clock()
        if self._feed_until is not None and t >= self._feed_until:
            t, self.feeding = self._feed_until, False
            self.log.info("feed", on=False, why="its duration is over")
        target = self.belt.position_mm(t) + FEED_DROP_MM - self._feed_offset
        new = self.feed.pieces_until(target)
        self._feed_pos = target
        if not new:
            return
        self.place([dataclasses.replace(p, s_mm=p.s_mm + self._feed_offset) for p in new])

    def place(self, pieces: list[Any]) -> None:
        """Put pieces (SimPiece, s_mm already in belt position) on the belt: fed ones, or test pieces laid by hand."""
        rows = []
        pos = self.belt.position_mm()
        for p in pieces:
            if p.y_mm(pos) + p.dy_lead >= self._field[0]:
                self.fed_late += 1  # already where a camera may have seen it: the simulator fell behind
                self.log.warning("piece placed late: the simulator fell behind", piece=p.id, fed_late=self.fed_late)
            self._on_belt.append(p)
            self._sprites[p.id] = render_sprite(p, self._mm_per_px, self._rng)
            rows.append(
                (
                    p.id,
                    p.cls,
                    p.variant,
                    p.shape,
                    p.mass_g,
                    p.area_mm2,
                    p.x_mm,
                    p.s_mm,
                    self.belt.count_at_position(p.s_mm),
                    p.x_mm + p.dx0,
                    p.x_mm + p.dx1,
                    p.dy_lead - p.dy_trail,
                )
            )
        self.fed += len(pieces)
        if self.truth:
            self.truth.add_pieces(rows)
        self._visible = tuple((p, self._sprites[p.id]) for p in self._on_belt)

    def _bins_step(self) -> None:
        pos = self.belt.position_mm()
        residue = self.cfg.routing.default_fraction
        keep: list[tuple[Any, Any]] = []
        done: list[tuple[Any, Any]] = []
        for p in self._on_belt:
            out = self.physics.settle(p, pos, self.sim.belt_end_mm, residue)
            (done if out else keep).append((p, out))
        if not done:
            return
        self._on_belt = [p for p, _ in keep]
        for p, out in done:
            self.binned[out.bin] = self.binned.get(out.bin, 0) + 1
            if out.bank is not None:
                self.plc.chute_pulse(out.bank)  # the bank's chute light barrier (docs/plc-interface.md)
            self._sprites.pop(p.id, None)
        if self.truth:
            self.truth.set_outcomes([(o.bin, o.bank, o.seq, o.err_mm, o.piece_id) for _, o in done])
        self._visible = tuple((p, self._sprites[p.id]) for p in self._on_belt)
        self.physics.forget_before(pos)

    @property
    def on_belt(self) -> int:
        return len(self._on_belt)

    async def _tick(self) -> None:
        n = 0
        # the belt's speed wanders by one random step every DRIFT_STEP_S of the clock, however late the
        # ticks: the same seed gives the same speed over time in real time and in lockstep
        self._next_drift = self.clock() + DRIFT_STEP_S
        while True:
            try:
                self._feed_step()
                self._bins_step()
            except Exception:  # a broken simulator step must be loud, not a silently dead task
                self.log.exception("sim step failed")
                raise
            n += 1
            while self.clock() >= self._next_drift:
                self.belt.step_drift()
                self._next_drift += DRIFT_STEP_S
            if n % 50 == 0 and self.truth:
                self.truth.commit()  # twice a second: a commit per tick would stall the PLC scan on the disk
            await asyncio.sleep(0.01)

    async def start(self, *, serve: bool = True) -> None:
        """Run the line; `serve=False`: the PLC scans and the belt, feed and bins move, but nothing is served
        on the wire (no Modbus/OPC UA server, no camera stream, no pty): the lockstep simulation carries
        registers, frames and the bar's lines in-process (sim/lockstep.py)."""
        if not serve:
            self.plc.start_scan()
            self._tasks.append(asyncio.create_task(self._tick()))
            return
        await self.plc.start(self.cfg.plc.host, self.cfg.plc.port)
        if self.plc_opcua:
            await self.plc_opcua.start()
        for cam in self.cameras:
            await cam.start()
        self._tasks.append(asyncio.create_task(self._tick()))
        if self.hallbar:
            self.hallbar.start()
        self.log.info(
            "sim started",
            plc=f"{self.cfg.plc.host}:{self.cfg.plc.port}",
            plc_opcua=self.plc_opcua.endpoint if self.plc_opcua else None,
            cameras=[c.address for c in self.cameras],
        )

    def status(self) -> dict[str, Any]:
        return {
            "belt_mm_s": round(self.belt.speed_mm_s(), 1),
            "count32": self.belt.count32(),
            "count": self.belt.count(),  # unwrapped, as the truth's piece counts
            "feeding": self.feeding,
            "fed": self.fed,
            "fed_late": self.fed_late,
            "on_belt": self.on_belt,
            "binned": dict(self.binned),
            "plc": {
                "accepted": self.plc.accepted,
                "executed": self.plc.executed,
                "late": self.plc.late,
                "chutes": list(self.plc.chute_counts),
                "restarts": self.plc.restarts,
                "reachable": self.plc.reachable,
                "last_fire_t": self.plc.last_fire_t,
                "fail_safes": self.plc.fail_safes[-20:],
            },
            "cameras": {
                c.name: {"triggered": c.frames_triggered, "sent": c.frames_sent, "skipped": c.frames_skipped}
                for c in self.cameras
            },
            **({"hallbar": self.hallbar.counters()} if self.hallbar else {}),
        }

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.hallbar:
            await asyncio.to_thread(self.hallbar.stop)
        for cam in self.cameras:
            await cam.stop()
        if self.plc_opcua:
            await self.plc_opcua.stop()
        await self.plc.stop()
        if self.truth:
            self.truth.set_meta(
                status=self.status(),
                encoder_start=self.sim.encoder_start,
                counts_per_mm=self.belt.counts_per_mm,  # the true one
                seed=self.sim.seed,
            )
            self.truth.close()
