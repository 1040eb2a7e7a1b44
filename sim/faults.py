"""`sorter demo --faults SPEC`: the simulated line meets named faults in one run, and accounts for every piece.

Unlike the plain demo (sim/demo.py, the service in-process), a fault run is an orchestrator of
processes, as a plant is: the simulator (the plant: PLC, cameras, Hall bar) and the line service, each
its own process. The service runs as `sorter run` does (through sim/servicerun.py, which only lets the
run step its wall clock), in its own session, so that `service-kill` can SIGKILL it whole (with its
children, as systemd's KillMode=control-group does) and start it again 2 s later as systemd's
Restart=always would.

The faults (SPEC: comma-separated, each optionally `@<seconds>` after the feed started; `all`: each once,
spaced over the run):

    plc-restart             the PLC power-cycles: its network drops for 2 s, its queue, seq and counters are lost
    plc-link-drop:10s       the PLC's network cable is pulled for 10 s (the PLC scans on)
    camera-stall:cam0:3s    a camera stays connected but delivers no frame for 3 s
    camera-unplug:cam1:5s   a camera's cable is pulled for 5 s
    hallbar-unplug:5s       the Hall bar's cable is pulled for 5 s
    service-kill            SIGKILL of the service; started again 2 s later
    records-disk-full:10s   the disk of the records database is full for 10 s (a tmpfs filled by a file)
    wall-clock-step:+3600s  the service's wall clock jumps (NTP, an operator): only timestamps may change

Everything is scheduled on the monotonic clock. Each fault is then judged from what the service said
(its JSON log, read as it runs: when it noticed, when it was back in Execute with the part online) and
what the simulator knows (its ground truth and the PLC's fail-safe log); the accounting joins the
service's records with the simulator's truth (sim/report.py).

Accounting: every fed piece is either accounted (it has a record; `lost_in_restart` counts: its row was
written when it was first seen) or unseen, and unseen only if it passed the cameras inside a window in
which no service or no camera was looking (named in the report). A piece without a record outside every
window is `pieces_lost` and breaks the identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import structlog
import yaml

from sim.config import SimLineConfig
from sim.demo import DemoError, SimProcess, demo_config
from sim.report import build_report, match_records
from sim.truth import load_truth
from sorter.core.geometry import unwrap
from sorter.line.records import load_pieces

# --- the SPEC ---

# name -> (what it takes after the name, the reserve after its end in which the line must have recovered)
FAULT_KINDS: dict[str, tuple[str, float]] = {
    "plc-restart": ("", 6.0),
    "plc-link-drop": ("duration", 4.0),
    "camera-stall": ("camera duration", 4.0),
    "camera-unplug": ("camera duration", 4.0),
    "hallbar-unplug": ("duration", 3.0),
    "service-kill": ("", 14.0),  # 2 s until systemd restarts it, then the service's start (model, links, cameras)
    "records-disk-full": ("duration", 3.0),
    "wall-clock-step": ("step", 3.0),
}
# `--faults all`: each once, in this order, with these parameters (those of issue 15)
ALL_FAULTS = (
    "plc-restart,plc-link-drop:10s,camera-stall:cam0:3s,camera-unplug:cam1:5s,hallbar-unplug:5s,"
    "service-kill,records-disk-full:10s,wall-clock-step:+3600s"
)
LEAD_S = 6.0  # feed before the first unscheduled fault: the line is sorting steadily by then
TAIL_S = 4.0  # feed after the last one's reserve
PLC_RESTART_DOWN_S = 2.0  # how long the restarting PLC is off the network (it boots)
SERVICE_RESTART_S = 2.0  # systemd's RestartSec for the killed service
RECORDS_FS_MB = 64  # the tmpfs the records live on in a run with records-disk-full
BELT_SAMPLE_S = 0.25  # how often the belt position is asked of the simulator (the windows interpolate between)

_SECONDS = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)?$")
_STEP = re.compile(r"^([+-]\d+(?:\.\d+)?)s?$")


class FaultSpecError(ValueError):
    """The SPEC cannot be run: the message names the item and what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Fault:
    name: str
    at_s: float  # after the feed started
    duration_s: float = 0.0  # how long the fault is applied (0: an event)
    camera: str | None = None
    step_s: float = 0.0  # wall-clock-step only

    @property
    def label(self) -> str:
        """The fault as the SPEC writes it (without its time)."""
        parts = [self.name]
        if self.camera is not None:
            parts.append(self.camera)
        if self.name == "wall-clock-step":
            parts.append(f"{self.step_s:+g}s")
        elif self.duration_s:
            parts.append(f"{self.duration_s:g}s")
        return ":".join(parts)

    @property
    def busy_until_s(self) -> float:
        """When the line should have recovered from it (the next fault may start then)."""
        return self.at_s + self.duration_s + FAULT_KINDS[self.name][1]


def _seconds(item: str, text: str) -> float:
    m = _SECONDS.match(text)
    if not m:
        raise FaultSpecError(f"{item!r}: {text!r} is not a duration (like 10s or 500ms)")
    value = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    if value <= 0:
        raise FaultSpecError(f"{item!r}: the duration must be positive")
    return value


def parse_faults(spec: str, cameras: Sequence[str], duration_s: float) -> list[Fault]:
    """The faults of SPEC, in time order; those without `@<s>` spaced evenly over the run.

    Raises FaultSpecError for an unknown fault, a missing or malformed argument, an unknown camera,
    a fault that would not end (with its recovery reserve) within the feed, or two faults that overlap:
    a fault's detection and recovery could not be told from the next one's.
    """
    text = spec.strip()
    if not text:
        raise FaultSpecError("no faults given")
    if text == "all":
        text = ALL_FAULTS
    parsed: list[tuple[Fault, bool]] = []  # (fault with at_s or 0, whether the SPEC scheduled it)
    for raw in text.split(","):
        item = raw.strip()
        body, _, at_text = item.partition("@")
        tokens = body.split(":")
        name, args = tokens[0], tokens[1:]
        if name not in FAULT_KINDS:
            raise FaultSpecError(f"{item!r}: unknown fault {name!r} (known: {', '.join(FAULT_KINDS)}, or all)")
        takes = FAULT_KINDS[name][0].split()
        if len(args) != len(takes):
            want = ":".join([name, *(f"<{t}>" for t in takes)])
            raise FaultSpecError(f"{item!r}: write it as {want}")
        kw: dict[str, Any] = {}
        for what, arg in zip(takes, args, strict=True):
            if what == "duration":
                kw["duration_s"] = _seconds(item, arg)
            elif what == "camera":
                if arg not in cameras:
                    raise FaultSpecError(f"{item!r}: no camera {arg!r} (cameras: {', '.join(cameras)})")
                kw["camera"] = arg
            else:
                m = _STEP.match(arg)
                if not m:
                    raise FaultSpecError(f"{item!r}: {arg!r} is not a signed step in seconds (like +3600s)")
                kw["step_s"] = float(m.group(1))
        at = 0.0
        if at_text:
            try:
                at = _seconds(item, at_text)
            except FaultSpecError:
                raise FaultSpecError(f"{item!r}: @{at_text} is not a time in seconds after the feed started") from None
        parsed.append((Fault(name, at, **kw), bool(at_text)))
    unscheduled = [f for f, fixed in parsed if not fixed]
    if unscheduled:
        # spread the free time evenly between the faults the SPEC left to us, in their SPEC order, around
        # the ones it scheduled
        fixed_faults = [f for f, fixed in parsed if fixed]
        need = sum(f.busy_until_s - f.at_s for f in unscheduled + fixed_faults)
        gap = max((duration_s - LEAD_S - TAIL_S - need) / len(unscheduled), 0.0)
        t = LEAD_S
        placed = []
        for f in unscheduled:
            length = f.busy_until_s - f.at_s
            while clash := next((g for g in fixed_faults if t < g.busy_until_s and g.at_s < t + length), None):
                t = clash.busy_until_s
            placed.append(Fault(f.name, round(t, 2), f.duration_s, f.camera, f.step_s))
            t = placed[-1].busy_until_s + gap
        it = iter(placed)
        parsed = [(next(it) if not fixed else f, fixed) for f, fixed in parsed]
    faults = sorted((f for f, _ in parsed), key=lambda f: f.at_s)
    for f in faults:
        if f.busy_until_s > duration_s:
            raise FaultSpecError(
                f"{f.label} at {f.at_s:g} s needs until {f.busy_until_s:g} s (its duration and "
                f"{FAULT_KINDS[f.name][1]:g} s to recover) but the feed lasts {duration_s:g} s: "
                "give a longer --duration or fewer faults"
            )
    for a, b in pairwise(faults):
        if b.at_s < a.busy_until_s:
            raise FaultSpecError(
                f"{b.label} at {b.at_s:g} s starts before {a.label} at {a.at_s:g} s has ended and the line "
                f"recovered ({a.busy_until_s:g} s): faults run one after the other"
            )
    return faults


# --- what the service says: its JSON log, read as it runs ---


@dataclass(slots=True)
class LineWatch:
    """The line as its service's log shows it, on the monotonic clock of this process."""

    cameras: tuple[str, ...]
    state: str = "-"
    plc_online: bool = False
    cams_online: set[str] = field(default_factory=set)
    incarnation: int = 0  # which start of the service is speaking
    events: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)  # (t, incarnation, log line)
    timeline: list[tuple[float, bool]] = field(default_factory=list)  # (t, Execute with PLC and every camera)

    def new_incarnation(self, t: float) -> None:
        self.incarnation += 1
        self.state, self.plc_online = "-", False
        self.cams_online.clear()
        self._mark(t)

    def dead(self, t: float) -> None:
        self.state, self.plc_online = "dead", False
        self.cams_online.clear()
        self._mark(t)

    def feed(self, t: float, line: dict[str, Any]) -> None:
        self.events.append((t, self.incarnation, line))
        ev = line.get("event", "")
        if ev == "state":
            self.state = str(line.get("new"))
        elif ev == "plc connected":
            self.plc_online = True
        elif ev == "plc disconnected":
            self.plc_online = False
        elif ev == "camera online" and line.get("camera"):
            self.cams_online.add(str(line["camera"]))
        elif str(ev).startswith("camera ") and line.get("camera"):  # camera offline / stalled / closed
            self.cams_online.discard(str(line["camera"]))
        else:
            return
        self._mark(t)

    @property
    def healthy(self) -> bool:
        return self.state == "Execute" and self.plc_online and self.cams_online >= set(self.cameras)

    def _mark(self, t: float) -> None:
        if not self.timeline or self.timeline[-1][1] != self.healthy:
            self.timeline.append((t, self.healthy))

    def first(self, t0: float, pred: Any) -> float | None:
        """Time of the first log line at or after t0 for which pred(line) holds."""
        return next((t for t, _, ln in self.events if t >= t0 and pred(ln)), None)

    def healthy_from(self, t0: float) -> float | None:
        """The first time at or after t0 at which the line was in Execute with the PLC and every camera online."""
        state = False
        for t, ok in self.timeline:
            if t > t0:
                if state:
                    return t0
                break
            state = ok
        else:
            if state:
                return t0
        return next((t for t, ok in self.timeline if t > t0 and ok), None)


class ServiceProcess:
    """One start of the line service, in its own session (its process group is what a kill takes)."""

    def __init__(self, proc: asyncio.subprocess.Process, watch: LineWatch, log_path: Path) -> None:
        self.proc = proc
        self.watch = watch
        self._log = log_path.open("ab")
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, cfg_path: Path, wall_clock: Path, watch: LineWatch, log_path: Path) -> ServiceProcess:
        watch.new_incarnation(time.monotonic())
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sim.servicerun",
            "--wall-clock-file",
            str(wall_clock),
            "--",
            "run",
            "--config",
            str(cfg_path),
            "--log-level",
            "info",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=1 << 20,  # a traceback is one long line
        )
        return cls(proc, watch, log_path)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            t = time.monotonic()
            self._log.write(raw)
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # a third-party library's plain line: in the log file only
            if isinstance(line, dict):
                self.watch.feed(t, line)
        self._log.flush()

    def kill(self) -> float:
        """SIGKILL the service and everything it started (its process group); returns when."""
        t = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.watch.dead(t)
        return t

    async def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (a clean stop: open pieces decided, records flushed), SIGKILL if it does not end in time."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        await self.closed()
        return self.proc.returncode

    async def closed(self) -> None:
        await self.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 5)
        self._log.close()


# --- the belt: PC time -> encoder count, from the simulator's status ---


@dataclass(slots=True)
class BeltTrack:
    samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic t, unwrapped count)

    def add(self, t: float, count: int) -> None:
        if not self.samples or t > self.samples[-1][0]:
            self.samples.append((t, count))

    def count_at(self, t: float) -> float:
        s = self.samples
        if not s:
            raise ValueError("no belt samples")
        i = bisect_left(s, (t, -math.inf))
        if i == 0:
            return float(s[0][1])
        if i == len(s):
            return float(s[-1][1])
        (t0, c0), (t1, c1) = s[i - 1], s[i]
        return c0 + (c1 - c0) * (t - t0) / (t1 - t0)


# --- records disk: a small tmpfs the run fills ---


class RecordsDisk:
    """The records' folder on a tmpfs of RECORDS_FS_MB (root only: mount), filled by a file for disk-full."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.filler = folder / "filler.bin"
        self.mounted = False

    def mount(self) -> None:
        if os.geteuid() != 0:
            raise FaultSpecError(
                "records-disk-full mounts a small tmpfs for the records database: run as root (CI does), "
                "or leave that fault out"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={RECORDS_FS_MB}m,mode=0755", "tmpfs", str(self.folder)],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            raise DemoError(f"cannot mount a tmpfs at {self.folder} for records-disk-full: {res.stderr.strip()}")
        self.mounted = True

    def fill(self) -> int:
        """Write the filler until the disk refuses (ENOSPC); returns its bytes."""
        n = 0
        block = b"\0" * (1 << 20)
        with self.filler.open("wb") as f:
            try:
                while True:
                    f.write(block)
                    f.flush()
                    n += len(block)
            except OSError:
                pass
        return n

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self, keep: Path) -> None:
        """Copy the records database out to `keep` (consistently, through SQLite), then unmount."""
        if not self.mounted:
            return
        self.free()
        db = self.folder / "records.sqlite"
        if db.exists():
            src, dst = sqlite3.connect(db), sqlite3.connect(keep)
            with dst:
                src.backup(dst)
            src.close()
            dst.close()
        subprocess.run(["umount", str(self.folder)], check=False, capture_output=True)
        self.mounted = False


# --- the run ---


def fault_config(cfg: SimLineConfig, run_dir: Path, seed: int, records_on_tmpfs: bool) -> SimLineConfig:
    """This run's config: the demo's (free ports, this run's files), the north side left out (the faults are
    about the line; the HMI and OPC UA server have their own tests), records on the tmpfs if it fills one."""
    cfg = demo_config(cfg, run_dir, seed)
    update: dict[str, Any] = {}
    if cfg.hmi is not None:
        update["hmi"] = cfg.hmi.model_copy(update={"enabled": False})
    if cfg.opcua_server is not None:
        update["opcua_server"] = cfg.opcua_server.model_copy(update={"enabled": False})
    if records_on_tmpfs:
        update["records"] = cfg.records.model_copy(
            # the low-space alarm scaled to the small disk: it should sound when the run fills it, not before
            update={"path": run_dir.resolve() / "records" / "records.sqlite", "min_free_mb": RECORDS_FS_MB / 8}
        )
    return cfg.model_copy(update=update)


def tracking_reach_mm(cfg: SimLineConfig) -> float:
    """How far past a piece's crossing of the camera line the cameras must have looked before its track is
    finalised and its row written: half a camera's view, the tracker's settle distance, half a large piece."""
    return max(c.height * c.mapping.mm_per_px for c in cfg.cameras) / 2 + cfg.tracking.settle_mm + 25.0


def window_margin_mm(cfg: SimLineConfig) -> float:
    """How far along the belt a piece may be from the cameras' line and still be in the service's hands
    unrecorded: half a camera's view, the tracker's settle distance, half a large piece, and 0.2 s of belt for
    frame delivery, segmentation and the first-seen row's commit. A window of "nobody looking" is widened by
    this on both sides, and only there may a fed piece be without a record."""
    half_view = max(c.height * c.mapping.mm_per_px for c in cfg.cameras) / 2
    return half_view + cfg.tracking.settle_mm + 25.0 + 0.2 * cfg.belt.nominal_speed_mm_s


def camera_fields(cfg: SimLineConfig) -> dict[str, tuple[float, float]]:
    """Each camera's extent across the belt (mm), from its mapping."""
    out = {}
    for c in cfg.cameras:
        a = math.radians(c.mapping.rotation_deg)
        half = (c.width * abs(math.cos(a)) + c.height * abs(math.sin(a))) * c.mapping.mm_per_px / 2
        x = c.mapping.centre_mm[0]
        out[c.name] = (x - half, x + half)
    return out


@dataclass(slots=True)
class Applied:
    """A fault as it was applied: its spec and the PC times (monotonic) it began and ended."""

    fault: Fault
    t_at: float
    t_end: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


async def run_fault_demo(
    cfg: SimLineConfig, duration: float, seed: int, run_dir: Path, faults: list[Fault]
) -> dict[str, Any]:
    """Run the simulated line for `duration` s of feed with `faults` applied; returns the report."""
    log = structlog.get_logger("faults")
    run_dir.mkdir(parents=True, exist_ok=True)
    disk = RecordsDisk(run_dir.resolve() / "records") if any(f.name == "records-disk-full" for f in faults) else None
    cfg = fault_config(cfg, run_dir, seed, disk is not None)
    names = tuple(c.name for c in cfg.cameras)
    if disk is not None:
        disk.mount()
    cfg_path = run_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    wall_clock = run_dir / "wall-clock-offset"
    wall_clock.write_text("0\n")
    truth_path = run_dir / "truth.sqlite"
    records_path = cfg.records.path
    watch = LineWatch(names)
    belt = BeltTrack()
    applied: list[Applied] = []
    services: list[ServiceProcess] = []
    bar = cfg.magnetometer.port if cfg.magnetometer else None
    sim = SerialSim(await SimProcess.start(cfg_path, truth_path, run_dir / "sim.log", bar))
    sampler: asyncio.Task[None] | None = None
    t_feed = t_feed_end = math.nan
    final: dict[str, Any] = {}
    try:
        await sim.wait_for("ready", 30)
        services.append(await ServiceProcess.start(cfg_path, wall_clock, watch, run_dir / "service.log"))

        async def sample() -> None:
            while True:
                t0 = time.monotonic()
                st = await sim.send(cmd="status")
                belt.add((t0 + time.monotonic()) / 2, int(st["count"]))
                await asyncio.sleep(BELT_SAMPLE_S)

        sampler = asyncio.create_task(sample())
        await _until(lambda: watch.healthy, 90, "the line to start (Execute, PLC and cameras online)", services)
        log.info("line running, feeding", duration_s=duration, faults=[f.label for f in faults])
        await sim.send(cmd="feed", on=True)
        t_feed = time.monotonic()
        for f in faults:
            await _sleep_until(t_feed + f.at_s)
            applied.append(await _apply(f, sim, services, watch, cfg_path, wall_clock, run_dir, disk, t_feed))
        await _sleep_until(t_feed + duration)
        final["state_at_feed_end"] = watch.state
        final["healthy_at_feed_end"] = watch.healthy
        await sim.send(cmd="feed", on=False)
        t_feed_end = time.monotonic()

        async def drained() -> bool:
            return bool((await sim.send(cmd="status"))["on_belt"] == 0)

        await _until_async(drained, 30, "the belt to empty")
        await asyncio.sleep(2.0)  # the last pieces leave the tracker, are decided and recorded
        final["state_at_end"] = watch.state
        final["healthy_at_end"] = watch.healthy
    finally:
        if sampler is not None:
            sampler.cancel()
        final["service_exits"] = [await svc.stop() for svc in services]  # the killed one: -9
        await sim.close()
        if disk is not None:
            disk.unmount(run_dir / "records.sqlite")
            records_path = run_dir / "records.sqlite"
    observations = {
        "t_feed": t_feed,
        "t_feed_end": t_feed_end,
        "seed": seed,
        "records": str(records_path),
        "sim_status": sim.status,
        "applied": [
            {"fault": dataclasses.asdict(a.fault), "t_at": a.t_at, "t_end": a.t_end, "detail": a.detail}
            for a in applied
        ],
        "cameras": list(names),
        "events": watch.events,
        "timeline": watch.timeline,
        "belt": belt.samples,
        "service_starts": len(services),
        "line_at_end": final,
        "load_avg": list(os.getloadavg()),
    }
    # what the run saw, so that its report can be built again (rebuild_report) without running it again
    (run_dir / "observations.json").write_text(json.dumps(observations))
    return rebuild_report(run_dir)


def rebuild_report(run_dir: Path) -> dict[str, Any]:
    """The report of a fault run from its folder (config, truth, records, observations.json); writes report.json.

    `python -m sim.faults RUN_DIR` does the same from the shell.
    """
    from sim.config import load_sim_config

    obs = json.loads((run_dir / "observations.json").read_text())
    cfg = load_sim_config(run_dir / "config.yaml")
    records_path = Path(obs["records"])
    truth, windows, meta = load_truth(run_dir / "truth.sqlite")
    records = load_pieces(records_path) if records_path.exists() else []
    gaps = load_camera_gaps(records_path) if records_path.exists() else []
    looked = load_looked(records_path) if records_path.exists() else {}
    watch = LineWatch(tuple(obs["cameras"]))
    watch.events = [(t, inc, ln) for t, inc, ln in obs["events"]]
    watch.timeline = [(t, ok) for t, ok in obs["timeline"]]
    belt = BeltTrack([(t, c) for t, c in obs["belt"]])
    applied = [Applied(Fault(**a["fault"]), a["t_at"], a["t_end"], a["detail"]) for a in obs["applied"]]
    report = fault_report(
        cfg,
        truth,
        windows,
        records,
        obs["sim_status"] or meta.get("status", {}),
        applied,
        watch,
        belt,
        obs["t_feed"],
        obs["service_starts"],
        gaps,
        fed_late_ids(run_dir / "sim.log"),
        looked,
    )
    report.update(
        {
            "duration_s": round(obs["t_feed_end"] - obs["t_feed"], 2),
            "seed": obs["seed"],
            "run_dir": str(run_dir),
            "line_at_end": obs["line_at_end"],
            "load_avg": obs["load_avg"],
        }
    )
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


class SerialSim:
    """The simulator's control channel, one command at a time: the belt sampler and the faults share it, and
    each command's answer is the next event (two at once could take each other's)."""

    def __init__(self, sim: SimProcess) -> None:
        self.proc = sim
        self._lock = asyncio.Lock()

    @property
    def status(self) -> dict[str, Any]:
        return self.proc.status

    async def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        return await self.proc.wait_for(event, timeout)

    async def send(self, **cmd: Any) -> dict[str, Any]:
        async with self._lock:
            return await self.proc.send(**cmd)

    async def close(self) -> None:
        async with self._lock:
            await self.proc.close()


async def _sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.monotonic()))


async def _until(cond: Any, timeout: float, what: str, services: list[ServiceProcess]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if services and services[-1].proc.returncode is not None:
            raise DemoError(f"the service exited ({services[-1].proc.returncode}) (see service.log in the run folder)")
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


async def _until_async(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


async def _apply(
    f: Fault,
    sim: SerialSim,
    services: list[ServiceProcess],
    watch: LineWatch,
    cfg_path: Path,
    wall_clock: Path,
    run_dir: Path,
    disk: RecordsDisk | None,
    t_feed: float,
) -> Applied:
    """Apply one fault and take it away again after its duration (returns once it is taken away)."""
    log = structlog.get_logger("faults")
    log.info("fault", fault=f.label, at_s=round(time.monotonic() - t_feed, 2))
    a = Applied(f, time.monotonic())
    if f.name == "plc-restart":
        await sim.send(cmd="plc_restart", down_s=PLC_RESTART_DOWN_S)
        await asyncio.sleep(PLC_RESTART_DOWN_S)
    elif f.name == "plc-link-drop":
        await sim.send(cmd="plc_link", on=False)
        await asyncio.sleep(f.duration_s)
        await sim.send(cmd="plc_link", on=True)
    elif f.name in ("camera-stall", "camera-unplug"):
        await sim.send(cmd="camera_fault", camera=f.camera, fault=f.name.removeprefix("camera-"))
        await asyncio.sleep(f.duration_s)
        await sim.send(cmd="camera_fault", camera=f.camera, fault="none")
    elif f.name == "hallbar-unplug":
        await sim.send(cmd="hallbar", on=False)
        await asyncio.sleep(f.duration_s)
        await sim.send(cmd="hallbar", on=True)
    elif f.name == "service-kill":
        a.detail["incarnation"] = watch.incarnation
        a.t_at = services[-1].kill()
        await services[-1].closed()
        a.detail["exit"] = services[-1].proc.returncode
        await asyncio.sleep(max(0.0, a.t_at + SERVICE_RESTART_S - time.monotonic()))
        a.detail["t_restart"] = time.monotonic()
        services.append(await ServiceProcess.start(cfg_path, wall_clock, watch, run_dir / "service.log"))
    elif f.name == "records-disk-full":
        assert disk is not None
        a.detail["filler_bytes"] = await asyncio.to_thread(disk.fill)
        await asyncio.sleep(max(0.0, a.t_at + f.duration_s - time.monotonic()))
        disk.free()
    elif f.name == "wall-clock-step":
        # the offset file is re-read by the service every 0.1 s (sim/servicerun.py)
        wall_clock.write_text(f"{f.step_s:+g}\n")
    else:  # parse_faults lets no other name through
        raise AssertionError(f.name)
    a.t_end = time.monotonic()
    return a


# --- the report ---

ABNORMAL = frozenset({"held", "offline", "timeout", "expired", "no_speed", "cancelled", "lost_in_restart", "seen"})
FIELD_FALLBACK = frozenset({"offline", "missing", "incomplete"})


def fault_report(
    cfg: SimLineConfig,
    truth: list[dict[str, Any]],
    windows: list[dict[str, Any]],
    records: list[dict[str, Any]],
    sim_status: dict[str, Any],
    applied: list[Applied],
    watch: LineWatch,
    belt: BeltTrack,
    t_feed: float,
    service_starts: int,
    gaps: list[dict[str, Any]],
    fed_late: frozenset[int] = frozenset(),
    looked: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any]:
    cpm = cfg.belt.counts_per_mm
    # piece ids are unique within a run of the service, not across its restarts
    keyed = [dict(r, run_piece=(r["run_id"], r["id"]), id=i) for i, r in enumerate(records)]
    base = build_report(cfg, truth, windows, keyed, {}, sim_status)
    matched = match_records(truth, keyed, cpm)
    margin = window_margin_mm(cfg) * cpm
    fields = camera_fields(cfg)

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t_feed, 2)

    # windows in which nobody looked: the service dead, or a camera offline
    blind: list[dict[str, Any]] = []
    faults_out: list[dict[str, Any]] = []
    fail_safe: list[float] = []
    fail_safes = sim_status.get("plc", {}).get("fail_safes", [])
    for a in applied:
        f = a.fault
        out: dict[str, Any] = {"name": f.label, "at_s": rel(a.t_at)}
        detected: float | None = None
        recovered: float | None = None
        span_end: float | None = None
        if f.name == "plc-restart":
            detected = watch.first(a.t_at, lambda ln: str(ln.get("event", "")).startswith("ALARM plc restarted"))
            recovered = watch.healthy_from(detected) if detected is not None else None
        elif f.name == "plc-link-drop":
            detected = watch.first(a.t_at, lambda ln: ln.get("event") == "plc disconnected")
            recovered = watch.healthy_from(a.t_end or a.t_at) if detected is not None else None
        elif f.name in ("camera-stall", "camera-unplug"):
            cam = f.camera
            detected = watch.first(
                a.t_at, lambda ln, cam=cam: ln.get("camera") == cam and str(ln.get("event", "")) in CAMERA_LOST_EVENTS
            )
            back = watch.first(
                a.t_end or a.t_at, lambda ln, cam=cam: ln.get("camera") == cam and ln.get("event") == "camera online"
            )
            recovered = watch.healthy_from(back) if detected is not None and back is not None else None
            if recovered is not None and back is not None:
                others = [fields[n] for n in fields if n != cam]
                blind.append(_window(f"{f.label}: {cam} not looking", a.t_at, back, belt, margin, cpm, others, t_feed))
        elif f.name == "hallbar-unplug":
            detected = watch.first(a.t_at, lambda ln: str(ln.get("event", "")).startswith("ALARM hall bar offline"))
            back = watch.first(
                a.t_end or a.t_at, lambda ln: str(ln.get("event", "")).startswith("hall bar back online")
            )
            recovered = watch.healthy_from(back) if detected is not None and back is not None else None
        elif f.name == "service-kill":
            trip = next((s for s in fail_safes if s["reason"] == "watchdog" and s["t"] >= a.t_at), None)
            if trip is not None:
                detected = float(trip["t"])
                last = trip["last_fire_t"]
                # the PLC's last ejection after the service died (0 if none fired after the death)
                fs_ms = max(0.0, (float(last) - a.t_at) * 1000) if last is not None else 0.0
                fail_safe.append(fs_ms)
                out["watchdog_trip_ms"] = round((detected - a.t_at) * 1000, 1)
                out["commands_dropped_by_watchdog"] = trip["dropped"]
                out["fail_safe_ms"] = round(fs_ms, 1)
            t_restart = a.detail.get("t_restart", a.t_at)
            looking = _cameras_back(watch, t_restart, fields)
            recovered = watch.healthy_from(t_restart) if detected is not None else None
            out["restarted_s"] = rel(t_restart)
            if looking is not None:
                kw = _window(f"{f.label}: no service", a.t_at, looking, belt, margin, cpm, [], t_feed)
                # where the dead service had durably looked to (committed with its rows): a service that
                # lagged behind the belt when it died stopped looking earlier than the kill
                run = next(
                    (ln.get("run_id") for _, inc, ln in watch.events
                     if inc == a.detail.get("incarnation") and ln.get("event") == "service starting"),
                    None,
                )  # fmt: skip
                seen_to = (looked or {}).get(str(run), {})
                if seen_to and truth:
                    ref = truth[len(truth) // 2]["count"]
                    start = min(unwrap(c, ref) for c in seen_to.values()) - tracking_reach_mm(cfg) * cpm
                    if start < kw["_lo"]:
                        kw["_lo"] = start
                        kw["belt_from_count"] = round(start)
                        kw["belt_mm"] = round((kw["_hi"] - start) / cpm, 1)
                    kw["looked_to_count"] = {cam: unwrap(c, ref) for cam, c in seen_to.items()}
                blind.append(kw)
        elif f.name == "records-disk-full":
            # noticed by the low-space alarm or by a refused write, whichever first; recovered when every
            # one of them that was raised has cleared after the disk was freed
            first = {
                kind: watch.first(a.t_at, lambda ln, ev=ev: str(ln.get("event", "")).startswith(ev))
                for kind, ev in (("low", "ALARM records_disk_low"), ("write", "ALARM records not written"))
            }
            raised: dict[str, float] = {
                k: t for k, t in first.items() if t is not None and t <= (a.t_end or a.t_at) + 5.0
            }
            detected = min(raised.values(), default=None)
            clears = {"low": "alarm cleared: records_disk_low", "write": "records written again"}
            backs = [watch.first(a.t_end or a.t_at, lambda ln, ev=clears[k]: ln.get("event") == ev) for k in raised]
            back = None if not backs or None in backs else max(t for t in backs if t is not None)
            recovered = watch.healthy_from(back) if detected is not None and back is not None else None
            out["filler_bytes"] = a.detail.get("filler_bytes")
            out["writes_refused"] = "write" in raised
        elif f.name == "wall-clock-step":
            detected, recovered, effects = _wall_clock_effects(a, keyed, watch, f.step_s)
            out.update(effects)
        span_end = recovered if recovered is not None else (a.t_end or a.t_at)
        lo, hi = belt.count_at(a.t_at) - margin, belt.count_at(span_end) + margin
        in_span = [t for t in truth if lo <= t["count"] <= hi]
        if f.name == "records-disk-full":
            affected = sum(1 for t in in_span if t["id"] in matched)  # their rows waited in memory
        else:
            affected = sum(1 for t in in_span if _affected(t, matched.get(t["id"])))
        out.update(
            {
                "detected_s": rel(detected),
                "recovered_s": rel(recovered),
                "pieces_affected": affected,
                "pieces_in_span": len(in_span),
            }
        )
        faults_out.append(out)
    # the accounting
    in_other = seen_in_other_records(truth, keyed, matched, cpm)
    skipped = FrameGaps(gaps, cfg, fields, truth[len(truth) // 2]["count"] if truth else 0)
    unseen, lost = [], []
    for t in truth:
        if t["id"] in matched or t["id"] in in_other:
            continue
        w = next((w for w in blind if _in_window(t, w)), None)
        if w is not None:
            w["pieces_unseen"] += 1
            unseen.append(t["id"])
        elif skipped.explains(t):
            unseen.append(t["id"])
        else:
            lost.append(t["id"])
    fed = len(truth)
    accounted = len(matched) + len(in_other)
    outcomes: dict[str, int] = {}
    for r in keyed:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    for w in blind:
        w.pop("_lo"), w.pop("_hi"), w.pop("_x_fields")
    report = {
        "faults": faults_out,
        "all_detected_and_recovered": all(
            f["detected_s"] is not None and f["recovered_s"] is not None for f in faults_out
        ),
        "pieces_fed": fed,
        "pieces_accounted": accounted,
        "pieces_unseen": len(unseen),
        # accounted without a matched record: seen in one blob with a touching neighbour, cut into fragments
        # (README, known gaps: segmentation), or recorded off by more than the match tolerance
        "pieces_in_another_record": dict(sorted(in_other.items())),
        "pieces_lost": len(lost),
        "lost_piece_ids": lost[:50],
        # of those, pieces the starved simulator placed where a camera could already see them (sim.log):
        # a machine too busy for the simulation, not the line
        "lost_fed_late": sum(1 for i in lost if i in fed_late),
        "identity_holds": fed == accounted + len(unseen),
        "unseen_windows": blind,
        "frames_not_looked_at": skipped.summary(cpm),
        "window_margin_mm": round(margin / cpm, 1),
        "fail_safe_ms": round(max(fail_safe), 1) if fail_safe else None,
        "service_starts": service_starts,
        "records": len(keyed),
        "records_by_run": _by_run(keyed),
        "outcomes": dict(sorted(outcomes.items())),
        "ndfeb_purity": base["fractions"].get("ndfeb", {}).get("purity"),
        "ndfeb_recovery": base["fractions"].get("ndfeb", {}).get("recovery"),
        "fractions": base["fractions"],
        "ejects_executed": base["ejects_executed"],
        "ejects_late": base["ejects_late"],
        "plc_restarts": sim_status.get("plc", {}).get("restarts"),
        "decision_latency_ms": base["decision_latency_ms"],
        # no eject_error_mm: a PLC restart starts the seq numbers again, so the PLC's fired windows cannot
        # be joined to the records by seq (the plain demo's report has it)
    }
    return report


TOUCH_MM = 1.5  # two pieces' bounding boxes this close: touching (the feed lays some "by a hair" apart)


def seen_in_other_records(
    truth: list[dict[str, Any]], records: list[dict[str, Any]], matched: dict[int, dict[str, Any]], cpm: float
) -> dict[int, str]:
    """Pieces without a record of their own whose pixels are in the records anyway: id -> why.

    Touching pieces are sometimes one blob (README, known gaps): the record of the blob covers both. A
    non-convex piece is sometimes cut in two: two records, neither near its centre. A piece seen only in
    part has a record over it placed further off than the match tolerance (sim/report.py MATCH_MM), which
    no other piece took. Either way the service saw the piece and recorded where it went: accounted.
    """
    ref = truth[len(truth) // 2]["count"] if truth else 0

    def box(row: dict[str, Any], count: float) -> tuple[float, float, float, float]:
        along, half = count / cpm, (row["length_mm"] or 0.0) / 2
        return row["x0_mm"], row["x1_mm"], along - half, along + half

    def near(a: tuple[float, ...], b: tuple[float, ...], tol: float) -> bool:
        return a[0] - tol <= b[1] and b[0] - tol <= a[1] and a[2] - tol <= b[3] and b[2] - tol <= a[3]

    used = {r["id"] for r in matched.values()}
    taken: set[int] = set()  # unmatched records given to a piece here: one piece each
    rboxes = [(r, box(r, unwrap(int(r["count32"]), ref))) for r in records]
    tboxes = {t["id"]: box(t, t["count"]) for t in truth}
    out: dict[int, str] = {}
    for t in truth:
        if t["id"] in matched:
            continue
        b = tboxes[t["id"]]
        over = [r for r, rb in rboxes if near(b, rb, 0.0)]
        touching = [i for i, nb in tboxes.items() if i != t["id"] and near(b, nb, TOUCH_MM)]
        free = [r for r in over if r["id"] not in used and r["id"] not in taken]
        if over and touching:
            out[t["id"]] = f"in one blob with touching piece(s) {touching}"
        elif len(free) >= 2:
            out[t["id"]] = "cut into fragments"
        elif len(free) == 1:  # its own record, placed further off than the match tolerance (partial views)
            taken.add(free[0]["id"])
            out[t["id"]] = "its record is more than the match tolerance off"
    return out


def fed_late_ids(sim_log: Path) -> frozenset[int]:
    """Pieces the simulator logged as placed late (it fell behind: a camera may have missed them)."""
    ids = set()
    with contextlib.suppress(OSError), sim_log.open() as f:
        for raw in f:
            if "placed late" in raw:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    ids.add(int(json.loads(raw)["piece"]))
    return frozenset(ids)


def load_looked(path: Path) -> dict[str, dict[str, int]]:
    """run id -> camera -> count32 of the last frame it looked at, as committed with its rows."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT run_id, camera, count32 FROM looked").fetchall()
    except sqlite3.OperationalError:  # a database from before the table
        rows = []
    db.close()
    out: dict[str, dict[str, int]] = {}
    for run, cam, c in rows:
        out.setdefault(run, {})[cam] = int(c)
    return out


def load_camera_gaps(path: Path) -> list[dict[str, Any]]:
    """The service's `camera_gap` events (frames it never looked at), every run of the database."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    rows = db.execute("SELECT run_id, detail FROM events WHERE kind='camera_gap'").fetchall()
    db.close()
    return [dict(json.loads(d), run_id=r) for r, d in rows]


class FrameGaps:
    """Belt spans a camera's frames skipped in the service (dropped by the queue policy, torn, not delivered):
    the second kind of window in which a camera did not look. A piece is unseen for that reason if a camera
    whose field reaches it skipped its crossing and no camera that could see it whole was looking then."""

    def __init__(
        self, gaps: list[dict[str, Any]], cfg: SimLineConfig, fields: dict[str, tuple[float, float]], ref: int
    ) -> None:
        self.fields = fields
        self.cpm = cfg.belt.counts_per_mm
        self.half_view_mm = min(c.height * c.mapping.mm_per_px for c in cfg.cameras) / 2
        self.spans = sorted(
            (unwrap(int(g["from_count32"]), ref), unwrap(int(g["to_count32"]), ref), str(g["camera"]), int(g["frames"]))
            for g in gaps
        )
        self.explained = 0

    def _blind_at(self, count: int, inset: float) -> set[str]:
        return {cam for lo, hi, cam, _ in self.spans if lo + inset < count < hi - inset}

    def explains(self, t: dict[str, Any]) -> bool:
        # a piece wholly in the view of a frame the service did look at (the last before the gap or the
        # first after it) was seen: only a piece never wholly in view of a looked-at frame is explained
        inset = max(0.0, self.half_view_mm - (t["length_mm"] or 0.0) / 2) * self.cpm
        blind = self._blind_at(int(t["count"]), inset)
        if not blind:
            return False
        x0, x1 = t["x0_mm"], t["x1_mm"]
        reached = any(self.fields[c][0] < x1 and x0 < self.fields[c][1] for c in blind if c in self.fields)
        whole_elsewhere = any(a <= x0 and x1 <= b for c, (a, b) in self.fields.items() if c not in blind)
        if reached and not whole_elsewhere:
            self.explained += 1
            return True
        return False

    def summary(self, cpm: float) -> dict[str, Any]:
        per_cam: dict[str, dict[str, float]] = {}
        for lo, hi, cam, frames in self.spans:
            c = per_cam.setdefault(cam, {"gaps": 0, "frames": 0, "belt_mm": 0.0})
            c["gaps"] += 1
            c["frames"] += frames
            c["belt_mm"] = round(c["belt_mm"] + (hi - lo) / cpm, 1)
        return {"by_camera": per_cam, "pieces_unseen": self.explained}


CAMERA_LOST_EVENTS = frozenset({"camera offline", "camera stalled", "camera closed"})


def _cameras_back(watch: LineWatch, t0: float, fields: dict[str, Any]) -> float | None:
    """When, after t0, every camera had come online again (in the service started after t0)."""
    seen: dict[str, float] = {}
    for t, _, ln in watch.events:
        if t >= t0 and ln.get("event") == "camera online" and ln.get("camera") in fields:
            seen.setdefault(str(ln["camera"]), t)
            if len(seen) == len(fields):
                return max(seen.values())
    return None


def _window(
    what: str,
    t0: float,
    t1: float,
    belt: BeltTrack,
    margin: float,
    cpm: float,
    x_fields: list[tuple[float, float]],
    t_feed: float,
) -> dict[str, Any]:
    """A window of the belt that passed the cameras while nobody (or not every camera) looked.

    `x_fields`: the across-belt fields of the cameras still looking; a piece wholly inside one of them was
    still seen (the window covers only the others). Empty: nobody looked at all.
    """
    lo, hi = belt.count_at(t0) - margin, belt.count_at(t1) + margin
    return {
        "what": what,
        "from_s": round(t0 - t_feed, 2),
        "to_s": round(t1 - t_feed, 2),
        "belt_from_count": round(lo),
        "belt_to_count": round(hi),
        "belt_mm": round((hi - lo) / cpm, 1),
        "across_mm": "all" if not x_fields else f"outside {x_fields}",
        "pieces_unseen": 0,
        "_lo": lo,
        "_hi": hi,
        "_x_fields": x_fields,
    }


def _in_window(t: dict[str, Any], w: dict[str, Any]) -> bool:
    if not w["_lo"] <= t["count"] <= w["_hi"]:
        return False
    return not any(a <= t["x0_mm"] and t["x1_mm"] <= b for a, b in w["_x_fields"])


def _affected(t: dict[str, Any], r: dict[str, Any] | None) -> bool:
    """A piece the fault changed something for: unseen, not sorted as usual, decided without the field,
    or routed into a product its air never reached (a command the PLC accepted and then lost)."""
    if r is None:
        return True
    if r["outcome"] in ABNORMAL or r.get("field_state") in FIELD_FALLBACK:
        return True
    return r["outcome"] == "accepted" and t["bin"] != r["fraction"]


def _wall_clock_effects(
    a: Applied, records: list[dict[str, Any]], watch: LineWatch, step_s: float
) -> tuple[float | None, float | None, dict[str, Any]]:
    """When the step reached the records (their t_wall jumps; t_capture is monotonic) and what else changed
    in the 10 s after it: state changes and alarms (there must be none)."""
    stepped = [r for r in records if r["t_capture"] >= a.t_at and r["t_wall"] - _wall_of(r) > step_s / 2]
    first = min((r["t_capture"] for r in stepped), default=None) if step_s > 0 else None
    if step_s < 0:
        stepped = [r for r in records if r["t_capture"] >= a.t_at and r["t_wall"] - _wall_of(r) < step_s / 2]
        first = min((r["t_capture"] for r in stepped), default=None)
    t1 = a.t_at + 10.0
    changes = [ln for t, _, ln in watch.events if a.t_at <= t <= t1 and ln.get("event") == "state"]
    alarms = [ln for t, _, ln in watch.events if a.t_at <= t <= t1 and str(ln.get("event", "")).startswith("ALARM")]
    after = [r for r in records if a.t_at <= r["t_capture"] <= t1]
    effects = {
        "records_stepped": len(stepped),
        "state_changes_10s": len(changes),
        "alarms_10s": len(alarms),
        "pieces_10s": len(after),
        "pieces_10s_abnormal": sum(1 for r in after if r["outcome"] in ABNORMAL),
    }
    ok = first is not None and not changes and not alarms
    return first, first if ok else None, effects


def _wall_of(r: dict[str, Any]) -> float:
    """The real wall time of a record: its monotonic capture time mapped with this process's clocks
    (the service and this process share CLOCK_MONOTONIC and the machine's real wall clock)."""
    return float(r["t_capture"]) + (time.time() - time.monotonic())


def _by_run(records: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r["run_id"]] = out.get(r["run_id"], 0) + 1
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "observations.json").is_file():
        raise SystemExit("usage: python -m sim.faults RUN_DIR  (the folder of a fault run, with observations.json)")
    print(json.dumps(rebuild_report(Path(sys.argv[1])), indent=2))
