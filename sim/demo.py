"""`sorter demo`: the simulated line sorted by the real line service, with a report.

The simulator runs as its own process (as the plant would be), on free
loopback ports; the service runs here, unchanged, against its Modbus PLC and
camera streams. The report joins the service's piece records with the
simulator's ground truth. Ctrl-C stops the feed, drains the belt, and still
writes the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog
import yaml

from sim.config import SimLineConfig
from sim.hostcpu import cpu_shares, cpu_ticks
from sim.report import build_report, shadow_section
from sim.truth import load_truth
from sorter.app import Line, build_line
from sorter.config import OpcUaServerConfig
from sorter.core.packml import State
from sorter.line.recording import RecordOptions
from sorter.line.records import load_pieces, load_shadow
from sorter.line.service import LineService


class DemoError(Exception):
    pass


RUN_FILES = ("records.sqlite", "truth.sqlite", "report.json")  # what a run leaves in its folder


def new_run_folder(run_dir: Path) -> None:
    """Create the run's folder; one that holds a run already is refused before anything starts (its records,
    truth and report would be mixed with this run's, and its server certificate is not replaced)."""
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held:
        raise DemoError(f"{run_dir} holds a run already ({', '.join(held)}): give another --out, or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on loopback. The sockets are held open together while the kernel picks, so no
    port is handed out twice (one at a time, a port just closed can come back: a CI run once had the virtual
    PLC's OPC UA server find its port taken)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def demo_config(cfg: SimLineConfig, run_dir: Path, seed: int) -> SimLineConfig:
    """The config both sides use for this run: free ports, this run's records and bar link, this seed."""
    run_dir = run_dir.resolve()  # the written config resolves paths against its own folder, not the cwd
    ports = iter(free_ports(len(cfg.cameras) + 3))
    cams = [
        c.model_copy(update={"source": c.source.model_copy(update={"address": f"127.0.0.1:{next(ports)}"})})
        if c.source.type == "sim"
        else c
        for c in cfg.cameras
    ]
    assert cfg.simulator is not None
    return cfg.model_copy(
        update={
            "cameras": cams,
            "plc": cfg.plc.model_copy(
                update={
                    "host": "127.0.0.1",
                    "port": next(ports),
                    "opcua": cfg.plc.opcua.model_copy(update={"endpoint": f"opc.tcp://127.0.0.1:{next(ports)}"}),
                }
            ),
            "records": cfg.records.model_copy(update={"path": run_dir / "records.sqlite"}),
            "magnetometer": cfg.magnetometer.model_copy(update={"port": str(run_dir / "hallbar.tty")})
            if cfg.magnetometer
            else None,
            "simulator": cfg.simulator.model_copy(update={"seed": seed}),
            "opcua_server": cfg.opcua_server.model_copy(
                update={
                    "endpoint": f"opc.tcp://127.0.0.1:{next(ports)}",
                    "certificate": run_dir / "pki" / "line-server-cert.der",
                    "private_key": run_dir / "pki" / "line-server-key.pem",
                    "trust_dir": run_dir / "pki" / "trusted",
                }
            )
            if cfg.opcua_server
            else None,
        }
    )


def make_server_certificate(srv: OpcUaServerConfig) -> None:
    """This run's line-server certificate (what `sorter opcua certs` makes for a plant), and its trust folder."""
    from sorter.north.opcua.pki import DEFAULT_APPLICATION_URI, make_certificate

    srv.trust_dir.mkdir(parents=True, exist_ok=True)
    make_certificate(
        srv.certificate,
        srv.private_key,
        common_name="magnet-sorter demo line server",
        application_uri=DEFAULT_APPLICATION_URI,
        hostnames=[socket.gethostname(), "localhost", "127.0.0.1"],
    )


class SimProcess:
    """The simulator subprocess, driven over its JSON-line stdio control channel."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.status: dict[str, Any] = {}
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, config_path: Path, truth: Path, log_path: Path, hallbar_link: str | None) -> SimProcess:
        log = log_path.open("wb")
        bar = ["--hallbar-link", hallbar_link] if hallbar_link else []
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sim",
            "--config",
            str(config_path),
            "--truth",
            str(truth),
            "--control",
            "stdio",
            "--no-feed",
            *bar,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # Ctrl-C goes to the demo, which stops the simulator in order
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if ev.get("event") in ("status", "stopped"):
                    self.status = ev
                await self._events.put(ev)
        await self._events.put({"event": "exited"})

    async def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            ev = await asyncio.wait_for(self._events.get(), max(0.01, deadline - time.monotonic()))
            if ev["event"] == event:
                return ev
            if ev["event"] == "exited":
                raise DemoError("the simulator exited unexpectedly (see sim.log in the run folder)")

    async def send(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        if cmd["cmd"] == "stop":
            return await self.wait_for("stopped", 15)
        return await self.wait_for("status", 5)

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.send(cmd="stop")
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._reader.cancel()


async def _wait_until(cond, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


async def run_demo(
    cfg: SimLineConfig,
    duration: float,
    seed: int,
    run_dir: Path,
    progress: bool = False,
    during: Callable[[Line, SimProcess], Coroutine[Any, Any, None]] | None = None,
    capture: Path | None = None,
    record: RecordOptions | None = None,
) -> dict[str, Any]:
    """Run the simulated line sorted by the service for `duration` s of feed; returns the report.

    `during` runs beside the feed (tests use it to act on the running line: swap a model, pull a cable).
    The line is built by the product's wiring (sorter/app.py), as `sorter run` builds it.
    """
    log = structlog.get_logger("demo")
    new_run_folder(run_dir)
    cfg = demo_config(cfg, run_dir, seed)
    if cfg.opcua_server is not None and cfg.opcua_server.enabled:
        make_server_certificate(cfg.opcua_server)
    cfg_path = run_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    truth_path = run_dir / "truth.sqlite"

    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    loop.add_signal_handler(signal.SIGTERM, interrupted.set)

    bar = cfg.magnetometer.port if cfg.magnetometer else None
    sim = await SimProcess.start(cfg_path, truth_path, run_dir / "sim.log", bar)
    line: Line | None = None
    service: LineService | None = None
    stop = asyncio.Event()
    svc_task: asyncio.Task[None] | None = None
    t_feed = t_end = None
    cpu_at_feed = cpu_at_end = None
    try:
        ready = await sim.wait_for("ready", 30)
        bar_simulated = bool(ready.get("hallbar"))  # simulator.hallbar.enabled: false leaves the port dead
        line = build_line(cfg, capture=capture, record=record)
        service = line.service
        svc_task = asyncio.create_task(service.run(stop))

        async def line_ready() -> bool:
            if svc_task.done():
                svc_task.result()  # re-raise what stopped the service
            st = await sim.send(cmd="status")
            return bool(
                st["belt_mm_s"] > 0
                and service.control.state is State.EXECUTE
                and service.plc.status.online
                and service.clock.ready
                and all(c.online for c in service.captures.values())
                and (service.hallbar is None or service.hallbar.online or not bar_simulated)
            )

        await _wait_until(line_ready, 30, "the line to start (PLC online, belt running, cameras streaming)")
        # whatever the log level: where the operator's panel and SCADA's endpoint are (the config's users)
        if line.hmi is not None and line.hmi.listening:
            log.info("operator HMI", url=line.hmi.url)
            print(f"operator HMI: {line.hmi.url}", file=sys.stderr, flush=True)
        if line.scada is not None and line.scada.listening:
            log.info("OPC UA server", endpoint=line.scada.endpoint_url)
            print(f"OPC UA server: {line.scada.endpoint_url}", file=sys.stderr, flush=True)
        log.info("line running, feeding", duration_s=duration)
        # the simulator times the feed (the same pieces every run, as in lockstep); with an action beside the
        # feed (`during`), the feed lasts until the action is over too, so the action acts on a fed line
        timed = {} if during else {"for_s": duration}
        await sim.send(cmd="feed", on=True, **timed)
        t_feed, cpu_at_feed = time.monotonic(), cpu_ticks()
        acting = asyncio.create_task(during(line, sim)) if during else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_progress(interrupted, duration, progress, service), duration)
        if acting is not None:
            if interrupted.is_set():  # Ctrl-C: the action ends with the feed (a soak's sampler, say)
                acting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acting
            else:
                await acting  # its failure is the caller's to see
        await sim.send(cmd="feed", on=False)
        t_end, cpu_at_end = time.monotonic(), cpu_ticks()
        log.info("feed stopped, draining the belt", interrupted=interrupted.is_set())

        async def drained() -> bool:
            st = await sim.send(cmd="status")
            return bool(st["on_belt"] == 0 and service.idle)

        await _wait_until(drained, 20, "the belt to empty", 0.1)
    finally:
        stop.set()
        if svc_task is not None:
            try:
                await asyncio.wait_for(svc_task, 30)
            except TimeoutError:
                log.error("the service did not stop within 30 s; cancelling it")
            except Exception:
                log.exception("the service failed")
        await sim.close()
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)

    report = demo_report(
        cfg,
        line,
        truth_path,
        sim.status,
        seed=seed,
        run_dir=run_dir,
        duration_s=(t_end or time.monotonic()) - (t_feed or time.monotonic()),
        interrupted=interrupted.is_set(),
        host_cpu=cpu_shares(cpu_at_feed, cpu_at_end),
    )
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    if record is not None:
        keep_truth(record, truth_path, report)
    return report


def keep_truth(record: RecordOptions, truth_path: Path, report: dict[str, Any]) -> None:
    """A recording of the simulated line keeps the simulator's ground truth and the live run's report beside it,
    so that `sorter replay` can judge purity and recovery (docs/recording.md, `truth.sqlite`)."""
    if not (record.folder / "manifest.json").exists():
        return  # the line never started, so nothing was recorded
    src = sqlite3.connect(truth_path)
    try:
        dst = sqlite3.connect(record.folder / "truth.sqlite")
        with dst:
            src.backup(dst)  # a consistent copy, WAL included
        dst.close()
    finally:
        src.close()
    (record.folder / "live_report.json").write_text(json.dumps(report, indent=2))


async def _progress(interrupted: asyncio.Event, duration: float, show: bool, service: LineService) -> None:
    if not show:
        await interrupted.wait()
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("sorting", total=duration)
        t0 = time.monotonic()
        while not interrupted.is_set():
            s = service.summary()
            bar.update(
                task,
                completed=time.monotonic() - t0,
                description=f"sorting: {s['pieces']} pieces, {s['ejects_accepted']} ejects",
            )
            await asyncio.sleep(0.25)


def demo_report(
    cfg: SimLineConfig,
    line: Line | None,
    truth_path: Path,
    sim_status: dict[str, Any] | None,
    *,
    seed: int,
    run_dir: Path,
    duration_s: float,
    interrupted: bool,
    host_cpu: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A demo run's report: the simulator's truth against the service's records and summary. `host_cpu`: the
    machine's CPU time while it fed (sim/hostcpu.py), in real time; a lockstep run's figures do not depend on it."""
    service = line.service if line is not None else None
    truth, windows, meta = load_truth(truth_path)
    records = load_pieces(cfg.records.path, service.run_id) if service else []
    summary = service.summary() if service else {}
    report = build_report(cfg, truth, windows, records, summary, sim_status or meta.get("status", {}))
    report.update(
        {
            "duration_s": round(duration_s, 2),
            "seed": seed,
            "interrupted": interrupted,
            "run_dir": str(run_dir),
            "model": str(cfg.classifier.model.name),
            "model_version": service.classifier.version if service else None,
            "stage_ms": {k: round(v, 3) for k, v in service.times.mean_ms().items()} if service else {},
            # the service's process (the demo's own: the service runs in it, the simulator in its own; in
            # lockstep both are in it): RSS in MB at start, peak, end, and the parts of the peak
            "service_rss_mb": service.memory.summary() if service else None,
            # what else the machine did meanwhile (its host's steal too): latencies depend on it
            "host_cpu": host_cpu,
            "late_views": service.tracker.late_views if service else 0,
            "merged_views": service.tracker.merged_views if service else 0,
            "partial_views": service.tracker.partial_views if service else 0,
            "cameras": summary.get("cameras", {}),
            "frames_failed": service.counters.frames_failed if service else 0,
            "frames_parted_coarse": service.counters.frames_parted_coarse if service else 0,
            "batches_failed": service.counters.batches_failed if service else 0,
            "field_wait_timeouts": service.counters.field_wait_timeouts if service else 0,
            "magnetometer": summary.get("magnetometer"),
            "field_states": {k.value: v for k, v in service.counters.field_states.items()} if service else {},
            "hmi_url": line.hmi.url if line and line.hmi else None,
            "opcua_endpoint": line.scada.endpoint_url if line and line.scada else None,
        }
    )
    if service is not None and service.shadow is not None:
        rows = load_shadow(cfg.records.path, service.run_id)
        report["shadow"] = shadow_section(cfg, truth, records, rows, service.shadow.stats())
    return report
