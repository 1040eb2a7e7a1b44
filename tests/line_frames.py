"""One camera's frames through the service's pipeline by hand, on a line built but not run (no simulator):
the fast tier's way into `LineService._process` and `_decide` (tests/test_memory.py, test_classify_ahead.py)."""

from __future__ import annotations

import asyncio
import weakref
from pathlib import Path

import numpy as np

from sim.config import load_sim_config
from sorter.app import Transports, build_line
from sorter.core.messages import Frame, Piece
from sorter.line.service import LineService
from sorter.line.virtualtime import InPlace

ROOT = Path(__file__).resolve().parents[1]
BELT = 20  # the dark belt's grey level; pieces are far brighter (vision.threshold 34)
COUNT0 = 1_000_000  # the encoder count of the first frame


def built_service(tmp_path: Path) -> LineService:
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    cfg = cfg.model_copy(
        update={
            "records": cfg.records.model_copy(update={"path": tmp_path / "records.sqlite"}),
            "magnetometer": None,
            "opcua_server": None,
            "hmi": None,
        }
    )
    # the pixel and inference work done in place (as in lockstep), not on worker threads: a worker thread drops
    # its work item (the pieces it classified) a moment after the loop has the result, which a test would race
    svc = build_line(cfg, auto_start=False, north=False, transports=Transports(executor=lambda _: InPlace())).service
    for cap in svc.captures.values():  # built, not run: the cameras count as streaming
        cap._set_state("online", None)
    return svc


def frame(camera: str, seq: int, count: int, t: float, piece_at: tuple[int, int] | None) -> Frame:
    image = np.full((720, 1280, 3), BELT, np.uint8)
    if piece_at is not None:
        row, col = piece_at
        image[row - 40 : row + 40, col - 50 : col + 50] = (60, 170, 200)  # a 25 x 20 mm piece
    return Frame(camera, seq, image, t, count, t + 0.02)


async def show_piece(svc: LineService) -> list[weakref.ref[np.ndarray]]:
    """One piece through the service's pipeline (segment, track) in three frames of cam0, the belt moving
    10 mm between them (cam1 sees the empty belt); weak references to those three frames' pixels. (Here,
    not in the test, so that no local of the test, pytest's assertion temporaries included, holds a frame.)"""
    loop = asyncio.get_running_loop()
    shown = []
    for k in range(3):
        f = frame(
            "cam0", k + 1, COUNT0 + round(10 * k * svc.cfg.belt.counts_per_mm), 100.0 + 0.004 * k, (320 + 40 * k, 640)
        )
        shown.append(weakref.ref(f.image))
        await svc._process("cam0", f, loop)
        await svc._process("cam1", frame("cam1", k + 1, f.count or 0, f.t_capture, None), loop)
    return shown


async def move_on(svc: LineService) -> None:
    """The belt moves on until both cameras have seen the piece leave (field + settle): it is finalised."""
    loop = asyncio.get_running_loop()
    count, t = COUNT0 + round(20 * svc.cfg.belt.counts_per_mm), 100.008
    for k in range(6):
        count, t = count + round(100 * svc.cfg.belt.counts_per_mm), t + 0.04
        for cam in ("cam0", "cam1"):
            await svc._process(cam, frame(cam, 4 + k, count, t, None), loop)


def queued(svc: LineService) -> list[Piece]:
    pieces: list[Piece] = []
    while not svc._pieces.empty():
        pieces += svc._pieces.get_nowait()
    return pieces
