"""Segmentation against the dark belt: touching pieces split, single pieces stay whole."""

from __future__ import annotations

import cv2
import numpy as np

from sorter.config import VisionConfig
from sorter.vision.segment import segment

CFG = VisionConfig()


def frame() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(rng.normal(18, 3, (720, 1280, 3)), 0, 255).astype(np.uint8)


def areas(img: np.ndarray) -> list[int]:
    return sorted(int(b.area_px) for b in segment(img, CFG, 0.25, crop_size=None))


def test_touching_discs_of_different_size_and_colour_split_where_they_touch():
    img = frame()
    cv2.circle(img, (300, 300), 40, (200, 200, 200), -1)
    cv2.circle(img, (352, 300), 14, (60, 60, 70), -1)
    a = areas(img)
    assert len(a) == 2
    assert abs(a[0] - np.pi * 14**2) < 150 and abs(a[1] - np.pi * 40**2) < 300


def test_two_touching_magnets_of_one_colour_split_at_a_narrow_neck():
    img = frame()
    cv2.circle(img, (300, 300), 40, (200, 200, 200), -1)
    cv2.circle(img, (379, 300), 40, (200, 200, 200), -1)
    assert len(areas(img)) == 2


def test_screw_ring_and_arc_stay_whole():
    img = frame()
    cv2.circle(img, (200, 200), 30, (150, 150, 150), -1)  # screw head
    cv2.rectangle(img, (200, 190), (330, 210), (150, 150, 150), -1)  # and shank
    cv2.circle(img, (600, 400), 60, (150, 150, 150), -1)  # ring
    cv2.circle(img, (600, 400), 30, (18, 18, 18), -1)
    cv2.ellipse(img, (1000, 400), (100, 100), 0, 200, 340, (90, 90, 90), 30)  # ferrite arc
    assert len(areas(img)) == 3


def test_centroid_extent_and_partial_views():
    img = frame()
    cv2.rectangle(img, (500, 300), (579, 339), (180, 180, 180), -1)  # 80 x 40 px
    cv2.circle(img, (900, 5), 30, (180, 180, 180), -1)  # cut by the top edge
    blobs = sorted(segment(img, CFG, 0.25, crop_size=64), key=lambda b: b.cu)
    whole, cut = blobs
    assert abs(whole.cu - 539.5) < 0.5 and abs(whole.cv - 319.5) < 0.5
    assert abs((whole.u1 - whole.u0) - 80) <= 2 and abs((whole.v1 - whole.v0) - 40) <= 2
    assert not whole.touches_top_bottom and whole.crop is not None and whole.crop.shape == (64, 64, 3)
    assert cut.touches_top_bottom and cut.crop is None  # partial views are not classified


def test_a_small_piece_pressed_against_a_big_one_is_cut_off_at_the_contact():
    img = frame()
    cv2.circle(img, (400, 300), 90, (170, 170, 170), -1)  # a bright disc
    block = cv2.boxPoints(((502.0, 300.0), (24.0, 24.0), 45.0))  # a small matte block, a corner against its side
    cv2.fillPoly(img, [np.round(block).astype(np.int32)], (90, 95, 100))
    cv2.circle(img, (800, 300), 60, (150, 150, 150), -1)  # two discs of one grey touching by a hair
    cv2.circle(img, (800, 391), 30, (150, 150, 150), -1)
    a = areas(img)
    assert len(a) == 4
    assert abs(a[0] - 24 * 24) < 150 and abs(a[1] - np.pi * 30**2) < 200
    assert abs(a[2] - np.pi * 60**2) < 300 and abs(a[3] - np.pi * 90**2) < 400
