"""`sorter bench`: what each pipeline stage costs per frame on this machine.

Frames are rendered by the simulator up front (not timed), then the service's
own stage functions run on them: first each stage alone, then the whole
per-frame pipeline in sequence, so the glue's cost shows as the difference.
The PLC write is timed against the virtual PLC over real Modbus TCP on
loopback. Everything is measured in the same run, so the ratios hold on a
noisy shared machine even when the raw numbers drift.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import cv2
import numpy as np

from sim.config import SimLineConfig
from sorter.core.decide import decide
from sorter.core.geometry import camera_geometries
from sorter.core.planner import EjectPlanner
from sorter.core.tracking import Tracker
from sorter.vision.classify import Classifier, classify_views
from sorter.vision.detections import to_detections
from sorter.vision.segment import segment

FRAMES_PER_S = 120  # two cameras at 60 fps


def render_frames(
    cfg: SimLineConfig, n_per_camera: int, rate_per_s: float, seed: int = 1
) -> list[tuple[str, int, np.ndarray]]:
    """(camera, unwrapped count, image) in trigger order, as the simulated cameras would deliver them."""
    from sim.feed import FeedGenerator
    from sim.line import true_geometry
    from sim.render import FrameRenderer, render_sprite

    sim = cfg.simulator
    assert sim is not None
    feed_cfg = sim.feed.model_copy(update={"rate_per_s": rate_per_s})
    feed = FeedGenerator(feed_cfg, cfg.belt.width_mm, cfg.belt.nominal_speed_mm_s, seed)
    geoms = [true_geometry(cfg, sim, i) for i in range(len(cfg.cameras))]
    renderers = [FrameRenderer(g, sim.noise_sigma, seed + i) for i, g in enumerate(geoms)]
    step_mm = cfg.belt.nominal_speed_mm_s / sim.fps
    rng = np.random.default_rng(seed)
    total_mm = n_per_camera * step_mm + 400
    pieces = [(p, render_sprite(p, geoms[0].mm_per_px, rng)) for p in feed.pieces_until(total_mm)]
    frames = []
    for k in range(n_per_camera):
        pos = 300 + k * step_mm  # start once the belt is full
        count = round(pos * cfg.belt.counts_per_mm)
        for cam, r in zip(cfg.cameras, renderers, strict=True):
            img = np.empty((cam.height, cam.width, 3), np.uint8)
            r.render([(p, s) for p, s in pieces if -150 <= pos - p.s_mm <= 150], pos, img)
            frames.append((cam.name, count, img))
    return frames


class _Pipeline:
    """The service's per-frame work, without its async plumbing."""

    def __init__(self, cfg: SimLineConfig, clf: Classifier) -> None:
        self.cfg, self.clf = cfg, clf
        self.geoms = camera_geometries(cfg)
        self.tracker = Tracker.for_line(cfg, self.geoms)
        self.planner = EjectPlanner.for_line(cfg)
        self.t: dict[str, float] = {"segment": 0.0, "track": 0.0, "infer": 0.0, "plan": 0.0}
        self.pieces = 0
        self.commands = 0

    def frame(self, cam: str, count: int, img: np.ndarray, seq: int) -> None:
        t0 = time.perf_counter()
        blobs = segment(img, self.cfg.vision, self.geoms[cam].mm_per_px, self.clf.input_size, lazy=True)
        t1 = time.perf_counter()
        dets = to_detections(blobs, self.geoms[cam], cam, count, self.cfg.belt.counts_per_mm, seq, 0.0)
        self.tracker.add(cam, count, dets)
        pieces = self.tracker.finalise(list(self.geoms))
        t2 = time.perf_counter()
        self.t["segment"] += t1 - t0
        self.t["track"] += t2 - t1
        if pieces:
            probs, _ = classify_views(self.clf, [p.crops for p in pieces], self.cfg.classifier.sure_confidence)
            t3 = time.perf_counter()
            decisions = [decide(p, pr, self.clf.labels, self.cfg.routing) for p, pr in zip(pieces, probs, strict=True)]
            plans = self.planner.plan(decisions, self.cfg.belt.nominal_speed_mm_s)
            self.commands += sum(1 for p in plans if p.command is not None)
            self.t["infer"] += t3 - t2
            self.t["plan"] += time.perf_counter() - t3
            self.pieces += len(pieces)


def _measure(cfg: SimLineConfig, clf: Classifier, frames: list[tuple[str, int, np.ndarray]]) -> dict[str, Any]:
    pipe = _Pipeline(cfg, clf)
    w0, c0 = time.perf_counter(), time.process_time()
    for seq, (cam, count, img) in enumerate(frames):
        pipe.frame(cam, count, img, seq)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    n = len(frames)
    stages = {k: round(1000 * v / n, 3) for k, v in pipe.t.items()}
    return {
        "frames": n,
        "pieces": pipe.pieces,
        "commands": pipe.commands,
        "stage_ms_per_frame": stages,
        "sum_of_stages_ms": round(sum(stages.values()), 3),
        "whole_ms_per_frame": round(1000 * wall / n, 3),
        "whole_cpu_ms_per_frame": round(1000 * cpu / n, 3),
    }


async def _plc_write_ms(cfg: SimLineConfig, n: int = 200) -> dict[str, float]:
    """Round trip of one eject command through the real Modbus mailbox on loopback."""
    from sim.belt import Belt
    from sim.demo import free_port
    from sim.plc import VirtualPlc
    from sorter.core.clock import ClockModel
    from sorter.core.messages import EjectCommand
    from sorter.drivers.plc.link import PlcLink

    assert cfg.simulator is not None
    port = free_port()
    sim = cfg.simulator.model_copy(update={"eject_queue_size": 4096})
    belt = Belt(cfg.belt.counts_per_mm, cfg.belt.nominal_speed_mm_s, sim.encoder_start)
    belt.start()
    plc = VirtualPlc(cfg.plc.registers, belt, sim, banks=len(cfg.ejection.banks))
    await plc.start("127.0.0.1", port)
    link = PlcLink(cfg.plc.model_copy(update={"host": "127.0.0.1", "port": port}), ClockModel())
    task = asyncio.create_task(link.run())
    try:
        while not (link.status.online and link.clock.ready):
            await asyncio.sleep(0.02)
        times = []
        for i in range(n):
            cmd = EjectCommand(piece_id=i, bank=0, valve_mask=0b111, open_at=belt.count() + 10**6, open_for=400)
            t0 = time.perf_counter()
            res = await link.send(cmd, 0.03)
            times.append(1000 * (time.perf_counter() - t0))
            assert res.outcome == "accepted", res
        return {
            "p50": round(float(np.percentile(times, 50)), 3),
            "p99": round(float(np.percentile(times, 99)), 3),
            "mean": round(float(np.mean(times)), 3),
        }
    finally:
        await link.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await plc.stop()


def run_bench(
    cfg: SimLineConfig, frames_per_camera: int = 240, rates: tuple[float, ...] = (32, 64, 128, 256)
) -> dict[str, Any]:
    cv2.setNumThreads(cfg.vision.opencv_threads)  # as the service sets it (sorter/app.py)
    clf = Classifier(cfg.classifier.model, threads=cfg.classifier.threads, max_batch=cfg.classifier.batch_size)
    by_rate = {}
    for rate in rates:
        frames = render_frames(cfg, frames_per_camera, rate)
        _measure(cfg, clf, frames[:20])  # warm-up: first inference, allocator
        by_rate[rate] = _measure(cfg, clf, frames)
    plc = asyncio.run(_plc_write_ms(cfg))
    # the vision thread must keep up with FRAMES_PER_S; keep 20 % headroom for the rest of the loop
    util = {r: FRAMES_PER_S * m["whole_cpu_ms_per_frame"] / 1000 for r, m in by_rate.items()}
    keeps_up = [r for r, u in util.items() if u < 0.8]
    max_rate = max(keeps_up) if keeps_up else None
    rs = sorted(util)
    for lo, hi in itertools.pairwise(rs):  # interpolate where utilisation crosses 0.8
        if util[lo] < 0.8 <= util[hi]:
            max_rate = round(lo + (hi - lo) * (0.8 - util[lo]) / (util[hi] - util[lo]), 1)
    nominal = by_rate[rates[0]]
    return {
        "machine_note": (
            "2 cameras x 60 fps = 120 frames/s must fit one vision thread; frame transport (shm copy) not included"
        ),
        "at_nominal_feed": {
            "rate_per_s": rates[0],
            **nominal,
            "plc_write_ms_per_command": plc,
            # mostly waiting for the PLC's next poll, not CPU; spread over the frames
            "plc_write_ms_per_frame": round(plc["mean"] * nominal["commands"] / nominal["frames"], 3),
            "whole_vs_sum_of_stages": round(nominal["whole_ms_per_frame"] / nominal["sum_of_stages_ms"], 3),
        },
        "by_feed_rate": {
            str(r): {
                "whole_cpu_ms_per_frame": m["whole_cpu_ms_per_frame"],
                "vision_thread_utilisation": round(util[r], 3),
                "pieces": m["pieces"],
            }
            for r, m in by_rate.items()
        },
        "max_feed_rate_per_s": max_rate,
    }
