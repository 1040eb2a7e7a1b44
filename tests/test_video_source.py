"""The OpenCV source on a video the simulator recorded, placed on the belt by the clock model.

The simulator runs here in real time (its cameras expose on the running belt's encoder while it records):
the replay's pacing and the clock model are checked against the recording's own timeline."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from sim.config import load_sim_config
from sim.demo import demo_config
from sim.line import SimLine
from sim.truth import load_truth
from sorter.config import TrackingConfig
from sorter.core.clock import ClockModel
from sorter.core.geometry import CameraGeometry
from sorter.core.tracking import Tracker
from sorter.drivers.cameras.opencv import OpenCVCaptureSource
from sorter.vision.detections import to_detections
from sorter.vision.segment import segment
from tests.conftest import wait_until

pytestmark = pytest.mark.wire

ROOT = Path(__file__).resolve().parents[1]


async def test_opencv_file_source_through_clock_model_finds_every_piece(tmp_path):
    cfg = load_sim_config(ROOT / "config/sim.yaml")
    cfg = demo_config(cfg, tmp_path, seed=3)
    assert cfg.simulator is not None
    cfg = cfg.model_copy(
        update={"cameras": cfg.cameras[:1], "simulator": cfg.simulator.model_copy(update={"speed_drift": 0.0})}
    )
    line = SimLine(cfg, truth_path=tmp_path / "truth.sqlite", record_dir=tmp_path)
    await line.start()
    line.belt.start()

    def recorded() -> int:
        return int(line.status()["cameras"]["cam0"]["triggered"])  # every exposure goes into the recording

    # about 2.5 s of fed belt at 60 frames/s, then the last pieces carried on out of the field
    line.set_feed(True)
    await wait_until(lambda: recorded() >= 150, 30, "150 frames of fed belt recorded")
    line.set_feed(False)
    fed_until = recorded()
    await wait_until(lambda: recorded() >= fed_until + 30, 30, "30 more frames recorded")
    await line.stop()

    cam = cfg.cameras[0]
    with (tmp_path / "cam0.csv").open() as f:
        sidecar = [(int(r["seq"]), int(r["count"]), float(r["t_exposure"])) for r in csv.DictReader(f)]
    assert len(sidecar) > 100

    source = OpenCVCaptureSource("cam0", str(tmp_path / "cam0.avi"), realtime=True)
    geom = CameraGeometry.from_mapping(cam.mapping, cam.width, cam.height)
    tracker = Tracker({"cam0": geom.field_mm()[3]}, TrackingConfig(), cfg.belt.counts_per_mm, max_views=4)
    clock = ClockModel(window_s=10.0, tau_s=10.0)
    t_exp0 = sidecar[0][2]
    pieces, frames = [], 0
    async for frame in source.frames():
        assert frame.count is None  # a plain video knows nothing of the encoder
        if frames == 0:
            # the recording's encoder log, re-based onto this replay's clock: the polls of the clock model
            t0 = frame.t_capture
            for _, count, t_exp in sidecar:
                clock.add(t0 + t_exp - t_exp0, t0 + t_exp - t_exp0, count)
        count = round(clock.count_at(frame.t_capture))
        blobs = segment(frame.image, cfg.vision, geom.mm_per_px, crop_size=None)
        tracker.add("cam0", count, to_detections(blobs, geom, "cam0", count, cfg.belt.counts_per_mm, frames, 0.0))
        pieces += tracker.finalise(["cam0"])
        frames += 1
    await source.close()
    pieces += tracker.flush()
    # paced like a live camera: a frame the consumer was too slow for is dropped and counted, never lost silently
    assert frames + source.dropped == len(sidecar)

    truth, _, _ = load_truth(tmp_path / "truth.sqlite")
    x_lo, x_hi, y_lo, y_hi = geom.field_mm()
    first_pos = line.belt.position_at_count(sidecar[0][1])
    last_pos = line.belt.position_at_count(sidecar[-1][1])
    # pieces whose every point crossed this camera's whole field while it was recording
    seen = [
        t
        for t in truth
        if x_lo + 1 < t["x0_mm"]
        and t["x1_mm"] < x_hi - 1
        and first_pos + 60 < t["s_mm"] + y_lo
        and t["s_mm"] + y_hi + 60 < last_pos
    ]
    assert len(seen) > 20
    mm = np.array([(p.u - cfg.simulator.encoder_start) / cfg.belt.counts_per_mm for p in pieces])
    for t in seen:
        near = [abs(m - t["s_mm"]) for m, p in zip(mm, pieces, strict=True) if abs(p.x - t["x_mm"]) < 3]
        assert near and min(near) < 3.0, f"piece {t['id']} ({t['cls']}) not found where it was"
