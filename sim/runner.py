"""Run the simulated line as its own process (`sorter sim` / `python -m sim`).

With `--control stdio` it takes JSON-line commands on stdin and answers with
JSON-line events on stdout — how `sorter demo` drives the feeder and learns
when the belt has emptied, without the service knowing anything about it:
    {"cmd": "feed", "on": true}   {"cmd": "speed", "mm_s": 2600}
    {"cmd": "status"}             {"cmd": "stop"}
    {"cmd": "hallbar", "on": false}   (pull the Hall bar's cable; true plugs it back)
    {"cmd": "plc_opcua", "on": false} (the PLC's OPC UA server goes down; true restarts it on the same port)
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
from pathlib import Path
from typing import Any

import structlog

from sim.line import SimLine
from sorter.config import LineConfig


def _emit(event: str, **data: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
    sys.stdout.flush()


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run_sim(
    cfg: LineConfig,
    truth: Path | None,
    control: str,
    seed: int | None,
    feed: bool,
    record_dir: Path | None = None,
    duration: float | None = None,
    start_belt: bool = False,
    hallbar_link: Path | None = None,
) -> None:
    log = structlog.get_logger("sim")
    line = SimLine(cfg, truth_path=truth, record_dir=record_dir, seed=seed, hallbar_link=hallbar_link)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await line.start()
    # the PLC's OPC UA address space is ~400 000 long-lived objects: keep them out of full GC
    # collections, which would stall the PLC scan and the cameras for ~150 ms each
    gc.freeze()
    if start_belt:  # normally the line service starts it through the PLC
        line.belt.start()
    if feed:
        line.set_feed(True)
    tasks = []
    if control == "stdio":
        _emit(
            "ready",
            plc=f"{cfg.plc.host}:{cfg.plc.port}",
            plc_opcua=line.plc_opcua.endpoint if line.plc_opcua else None,
            hallbar=str(hallbar_link) if line.hallbar else None,
        )
        reader = await _stdin_lines()

        async def commands() -> None:
            while not stop.is_set():
                raw = await reader.readline()
                if not raw:  # the demo went away: stop cleanly rather than run orphaned
                    stop.set()
                    return
                try:
                    msg = json.loads(raw)
                    cmd = msg["cmd"]
                except (ValueError, KeyError, TypeError):
                    _emit("error", detail=f"bad command line: {raw[:200]!r}")
                    continue
                if cmd == "feed":
                    line.set_feed(bool(msg.get("on", True)))
                elif cmd == "speed":
                    line.belt.set_speed(float(msg["mm_s"]))
                elif cmd == "hallbar":
                    if line.hallbar is None:
                        _emit("error", detail="no Hall bar is simulated (start with --hallbar-link)")
                        continue
                    line.set_hallbar(bool(msg.get("on", True)))
                elif cmd == "plc_opcua":
                    if line.plc_opcua is None:
                        _emit("error", detail="the virtual PLC serves no OPC UA (simulator.plc_opcua.enabled off)")
                        continue
                    try:
                        await line.plc_opcua.set_reachable(bool(msg.get("on", True)))
                    except OSError as exc:  # the port was taken meanwhile: report it, keep the channel alive
                        _emit("error", detail=str(exc))
                        continue
                elif cmd == "stop":
                    stop.set()
                    return
                elif cmd != "status":
                    _emit("error", detail=f"unknown command {cmd!r}")
                    continue
                _emit("status", **line.status())

        tasks.append(asyncio.create_task(commands()))
    else:

        async def report() -> None:
            while True:
                await asyncio.sleep(5)
                log.info("sim", **line.status())

        tasks.append(asyncio.create_task(report()))
    try:
        if duration:
            await asyncio.wait_for(stop.wait(), duration)
        else:
            await stop.wait()
    except TimeoutError:
        pass
    finally:
        for t in tasks:
            t.cancel()
        await line.stop()
        if control == "stdio":
            _emit("stopped", **line.status())
        log.info("sim stopped", **line.status())
