"""Blobs of one frame -> detections in belt coordinates (the vision stage's output to the tracker)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from sorter.core.geometry import CameraGeometry
from sorter.core.messages import Detection
from sorter.vision.segment import Blob


def to_detections(
    blobs: Iterable[Blob],
    geom: CameraGeometry,
    camera: str,
    count: int,
    counts_per_mm: float,
    frame_seq: int,
    t_capture: float,
) -> list[Detection]:
    """Image blobs of one frame -> detections in belt coordinates."""
    out = []
    for b in blobs:
        xs, ys = geom.px_to_mm(np.array([b.cu, b.u0, b.u1, b.u0, b.u1]), np.array([b.cv, b.v0, b.v0, b.v1, b.v1]))
        y_c, y_min, y_max = float(ys[0]), float(ys[1:].min()), float(ys[1:].max())
        out.append(
            Detection(
                camera=camera,
                frame_seq=frame_seq,
                t_capture=t_capture,
                u=count - y_c * counts_per_mm,
                u_lead=count - y_max * counts_per_mm,
                u_trail=count - y_min * counts_per_mm,
                x=float(xs[0]),
                x0=float(xs[1:].min()),
                x1=float(xs[1:].max()),
                area_mm2=b.area_px * geom.mm_per_px**2,
                cut_along=b.touches_top_bottom,
                cut_across=b.touches_left_right,
                crop=b.crop,
            )
        )
    return out
