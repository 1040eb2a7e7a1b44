"""Run the simulated line as its own process (`sorter sim` / `python -m sim`).

With `--control stdio` it takes JSON-line commands on stdin and answers with
JSON-line events on stdout — how `sorter demo` drives the feeder and learns
when the belt has emptied, without the service knowing anything about it:
    {"cmd": "feed", "on": true}   {"cmd": "speed", "mm_s": 2600}
    {"cmd": "feed", "on": true, "for_s": 60}   (the feeder stops by itself after 60 s of the simulator's clock)
    {"cmd": "status"}             {"cmd": "stop"}
    {"cmd": "hallbar", "on": false}   (pull the Hall bar's cable; true plugs it back)
    {"cmd": "plc_opcua", "on": false} (the PLC's OPC UA server goes down; true restarts it on the same port)
    {"cmd": "plc_link", "on": false}  (pull the PLC's network cable: Modbus side down, the PLC scans on; true: back)
    {"cmd": "camera_fault", "camera": "cam1", "fault": "unplug"}  ("stall": connected, no frames; "none": back)
    {"cmd": "plc_restart", "down_s": 2}  (power-cycle the PLC: queue, seq, counters lost; answered at once)
    {"cmd": "target", "on": true, "x_mm": 15, "y_mm": 0, "angle_deg": 0}   (lay the camera calibration target)
    {"cmd": "camera_trigger", "mode": "free_run", "fps": 15}   ("encoder" again for production; "camera": one only)
    {"cmd": "camera_focus", "camera": "cam1", "blur_px": 3}   (defocus a lens; 0 = sharp)
    {"cmd": "ref_magnet", "field_mT": 300} (slide a reference magnet once along the Hall bar)
    {"cmd": "encoder_target", "distance_mm": 300, "x_mm": 290}   (two dots 300 mm apart; "on": false clears marks)
    {"cmd": "belt_mark", "belt_length_mm": 3000, "x_mm": 290}   (a dot on the belt loop, once per revolution)
    {"cmd": "test_pieces", "n": 120, "group": 6, "spacing_mm": 100, "gap_mm": 500}   (identical 20 mm NdFeB discs)
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

from sim.config import SimLineConfig
from sim.line import SimLine
from sim.refmagnet import pass_reference_magnet
from sim.target import target_from_command
from sim.testpieces import TEST_PIECE_ID0, command_objects, make_test_pieces
from sorter.core import priority


def _emit(event: str, **data: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
    sys.stdout.flush()


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run_sim(
    cfg: SimLineConfig,
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
    # the simulator is the plant's hardware: it keeps its pace as the line service's time-critical threads do
    # (the same `priority:` of the config), every thread it starts with it; its cameras one level down
    # (simulator.camera_rt_priority: on a plant they render on hardware of their own)
    priority.configure(priority.Priority(cfg.priority.policy, cfg.priority.rt_priority))
    log.info("simulator priority", priority=priority.enter(inherited=True))
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
                    for_s = msg.get("for_s")
                    line.set_feed(bool(msg.get("on", True)), None if for_s is None else float(for_s))
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
                elif cmd == "plc_link":
                    try:
                        await line.plc.set_reachable(bool(msg.get("on", True)))
                    except OSError as exc:  # the port was taken meanwhile: report it, keep the channel alive
                        _emit("error", detail=str(exc))
                        continue
                elif cmd == "camera_fault":
                    try:
                        await line.set_camera_fault(str(msg["camera"]), str(msg.get("fault", "none")))
                    except (KeyError, ValueError, OSError) as exc:
                        _emit("error", detail=f"camera_fault: {exc!r}")
                        continue
                elif cmd == "plc_restart":
                    try:
                        down_s = float(msg.get("down_s", 2.0))
                    except (TypeError, ValueError) as exc:
                        _emit("error", detail=f"plc_restart: {exc}")
                        continue
                    # it takes down_s: answered now, so the channel stays responsive while the PLC boots
                    restart = asyncio.create_task(line.plc.restart(down_s))
                    tasks.append(restart)
                elif cmd == "ref_magnet":
                    if line.hallbar is None:
                        _emit("error", detail="no Hall bar is simulated (start with --hallbar-link)")
                        continue
                    bar = line.hallbar
                    ref = pass_reference_magnet(bar, float(msg["field_mT"]), float(msg.get("speed_mm_s", 200.0)))
                    # the answer carries the bar's true errors: what a test checks the calibration against
                    _emit(
                        "status",
                        **line.status(),
                        ref_magnet={
                            "seconds": round(ref.t1 - ref.t0, 3),
                            "true_offsets_mT": bar.true_offsets_mT.tolist(),
                            "true_gains": bar.true_gains.tolist(),
                        },
                    )
                    continue
                elif cmd == "target":  # lay the camera calibration target on the belt (sim/target.py)
                    try:
                        pos = line.belt.position_mm()
                        # drawing the plate for each camera takes ~0.1 s: not on the loop that scans the PLC
                        target = await asyncio.to_thread(target_from_command, msg, pos) if msg.get("on", True) else None
                        await asyncio.to_thread(line.set_target, target)
                    except (TypeError, ValueError) as exc:
                        _emit("error", detail=f"target: {exc}")
                        continue
                elif cmd == "camera_trigger":  # "free_run" (at `fps`, default simulator.fps) or "encoder"
                    try:
                        fps = float(msg.get("fps", line.sim.fps)) if msg.get("mode") == "free_run" else None
                        line.set_camera_trigger(fps, msg.get("camera"))
                    except (TypeError, ValueError) as exc:
                        _emit("error", detail=f"camera_trigger: {exc}")
                        continue
                elif cmd == "camera_focus":  # defocus a camera's lens: blur sigma in px, 0 = sharp
                    try:
                        line.set_camera_focus(float(msg.get("blur_px", 0.0)), msg.get("camera"))
                    except (TypeError, ValueError) as exc:
                        _emit("error", detail=f"camera_focus: {exc}")
                        continue
                elif cmd in ("encoder_target", "belt_mark"):  # marks for hw.calibrate_encoder (sim/testpieces.py)
                    try:
                        on = bool(msg.get("on", True))
                        pos, width = line.belt.position_mm(), cfg.belt.width_mm
                        line.marks = (*line.marks, *command_objects(msg, pos, width)) if on else ()
                    except (KeyError, TypeError, ValueError) as exc:
                        _emit("error", detail=f"{cmd}: {exc!r}")
                        continue
                elif cmd == "test_pieces":  # identical pieces laid upstream, for hw.calibrate_eject
                    try:
                        args = {k: msg[k] for k in ("cls", "shape") if k in msg}
                        nums = ("size_mm", "spacing_mm", "gap_mm", "x_mm", "upstream_mm")
                        args |= {k: float(msg[k]) for k in nums if k in msg}
                        pieces = make_test_pieces(
                            line.belt.position_mm(),
                            int(msg.get("n", 20)),
                            group=int(msg.get("group", 0)),
                            belt_width_mm=cfg.belt.width_mm,
                            seed=line.sim.seed,
                            first_id=TEST_PIECE_ID0 + line.fed,  # unique: fed grows by every piece placed
                            **args,
                        )
                    except (TypeError, ValueError) as exc:
                        _emit("error", detail=f"test_pieces: {exc}")
                        continue
                    line.place(pieces)
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
