"""Segmentation against the dark belt: touching pieces split, single pieces stay whole."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sorter.config import VisionConfig
from sorter.vision.segment import _flood, _peaks, segment

pytestmark = pytest.mark.fast

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


def test_an_arc_touching_a_bar_at_both_ends_is_parted_but_a_necked_ring_stays_whole():
    img = frame()
    # a dark ferrite arc whose two tips rest on a bright steel bar: the pair encloses a hole
    cv2.rectangle(img, (200, 280), (520, 310), (190, 190, 190), -1)
    outer = cv2.ellipse2Poly((360, 277), (150, 120), 0, 20, 160, 5)
    inner = cv2.ellipse2Poly((360, 277), (124, 94), 0, 20, 160, 5)
    cv2.fillPoly(img, [np.vstack([outer, inner[::-1]])], (90, 90, 90))  # its tips' inner corners rest on the bar
    # a ring of one colour, thinner on one side (a worn washer): it has a neck and a hole, and is one piece
    cv2.circle(img, (900, 400), 70, (150, 150, 150), -1)
    cv2.circle(img, (915, 400), 45, (18, 18, 18), -1)
    ring = np.zeros(img.shape[:2], np.uint8)
    cv2.circle(ring, (900, 400), 70, 255, -1)
    cv2.circle(ring, (915, 400), 45, 0, -1)
    shine = np.zeros_like(ring)  # a specular highlight across it, bright as the bar
    cv2.ellipse(shine, (900, 400), (90, 78), 0, 110, 250, 255, -1)
    img[(ring > 0) & (shine > 0)] = (200, 200, 200)
    a = areas(img)
    assert len(a) == 3
    bar = 321 * 31
    ring = np.pi * (70**2 - 45**2)
    assert any(abs(v - bar) < 0.1 * bar for v in a)
    assert any(abs(v - ring) < 0.1 * ring for v in a)


# --- the vision: settings reach segmentation -------------------------------------------------------------


def _two_discs() -> np.ndarray:  # one grey, a narrow neck
    img = frame()
    cv2.circle(img, (300, 300), 40, (200, 200, 200), -1)
    cv2.circle(img, (379, 300), 40, (200, 200, 200), -1)
    return img


# the block on the disc also narrows the blob to a neck: with necks never narrow enough, the notch rules alone
NOTCHES_ONLY = {"neck_sure": 0.05, "neck_colour": 0.05}
FAR_ONLY = {**NOTCHES_ONLY, "cut_sure": 0.5, "cut_ratio": 0.5}  # notch pairs are cut by the far rule alone


def _block_on_disc() -> np.ndarray:  # two colours, parted between two notches of the outline
    img = frame()
    cv2.circle(img, (400, 300), 90, (170, 170, 170), -1)
    block = cv2.boxPoints(((502.0, 300.0), (24.0, 24.0), 45.0))
    cv2.fillPoly(img, [np.round(block).astype(np.int32)], (90, 95, 100))
    return img


def _arc_on_bar() -> np.ndarray:  # two colours touching at both ends: a blob with a hole
    img = frame()
    cv2.rectangle(img, (200, 280), (520, 310), (190, 190, 190), -1)
    outer = cv2.ellipse2Poly((360, 277), (150, 120), 0, 20, 160, 5)
    inner = cv2.ellipse2Poly((360, 277), (124, 94), 0, 20, 160, 5)
    cv2.fillPoly(img, [np.vstack([outer, inner[::-1]])], (90, 90, 90))
    return img


def _small_block_on_a_side() -> np.ndarray:  # one grey, pressed along a side: two right-angled notches
    img = frame()
    cv2.rectangle(img, (300, 250), (400, 350), (180, 180, 180), -1)
    cv2.rectangle(img, (401, 290), (425, 314), (180, 180, 180), -1)
    return img


def _arc_on_disc() -> np.ndarray:  # one grey: a disc touching a thin arc's outside, the arc's inside a notch too
    img = frame()
    outer = cv2.ellipse2Poly((420, 300), (60, 60), 0, 120, 240, 3)
    inner = cv2.ellipse2Poly((420, 300), (48, 48), 0, 120, 240, 3)
    cv2.fillPoly(img, [np.vstack([outer, inner[::-1]])], (200, 200, 200))
    cv2.circle(img, (338, 300), 23, (200, 200, 200), -1)
    return img


def _screw() -> np.ndarray:  # one piece of one grey whose wide head looks like a disc on a bar
    img = frame()
    cv2.circle(img, (200, 200), 30, (150, 150, 150), -1)
    cv2.rectangle(img, (200, 190), (330, 210), (150, 150, 150), -1)
    return img


@pytest.mark.parametrize(
    ("picture", "setting", "pieces_by_default", "pieces_with_setting"),
    [
        (_two_discs, {"split_touching": False}, 2, 1),
        (_two_discs, {"neck_sure": 0.05, "cut_levels": 0}, 2, 1),  # the neck no longer counts as narrow
        # (at full resolution the blob's hole parts it by colour alone whatever the neck; 2x smaller, it does not)
        (_arc_on_bar, {"neck_colour": 0.45, "split_full_res": False}, 2, 1),
        (_small_block_on_a_side, {"split_full_res": False}, 2, 1),
        (_arc_on_bar, {"colour_step": 200.0}, 2, 1),
        (_arc_on_bar, {"hole_min_share": 0.5}, 2, 1),
        (_arc_on_bar, {"hole_colour_step": 200.0}, 2, 1),
        (_arc_on_bar, {"hole_rim_max_share": 0.5}, 2, 1),
        (_block_on_disc, NOTCHES_ONLY, 2, 2),  # parted by its notches alone
        (_block_on_disc, {**NOTCHES_ONLY, "cut_depth_mm": 5.0}, 2, 1),  # its notches are now roughness
        (_block_on_disc, {**NOTCHES_ONLY, "cut_sure": 0.5, "cut_ratio": 0.5, "cut_far_ratio": 0.5}, 2, 1),
        # a far pair one of whose notches is a crevice asks the ordinary colour step, not the far one
        (_block_on_disc, {**FAR_ONLY, "cut_far_colour_step": 400.0}, 2, 2),
        (_block_on_disc, {**FAR_ONLY, "cut_far_colour_step": 400.0, "crevice_deg": 0.0}, 2, 1),
        (_block_on_disc, {**NOTCHES_ONLY, "cut_min_px": 5000}, 2, 1),
        (_block_on_disc, {**NOTCHES_ONLY, "cut_levels": 0}, 2, 1),
        (_screw, {"cut_sure": 1.3}, 1, 2),  # cut without asking the colour
    ],
)
def test_each_vision_setting_reaches_segmentation(picture, setting, pieces_by_default, pieces_with_setting):
    img = picture()
    assert len(segment(img, CFG, 0.25, crop_size=None)) == pieces_by_default
    assert len(segment(img, VisionConfig(**setting), 0.25, crop_size=None)) == pieces_with_setting


@pytest.mark.parametrize("cfg", [VisionConfig(downscale=1), CFG], ids=["full resolution", "parted at full resolution"])
def test_a_small_block_pressed_on_a_bigger_ones_side_is_parted_along_its_sharp_notches(cfg):
    """At full resolution its two right-angled notches are crevices (`vision.cut_sharp_deg`): one grey, cut
    without asking the colour. Asked the colour, it stays one blob. Found on the downscaled image, the blob is
    parted on the frame itself, with the same outcome."""
    got = sorted(b.area_px for b in segment(_small_block_on_a_side(), cfg, 0.25, crop_size=None))
    assert np.allclose(got, [25 * 25, 101 * 101], rtol=0.05)
    asked = cfg.model_copy(update={"cut_sharp_deg": 0.0})
    assert len(segment(_small_block_on_a_side(), asked, 0.25, crop_size=None)) == 1


@pytest.mark.parametrize("downscale", [1, 2])
def test_an_arc_touched_on_its_outside_stays_whole(downscale):
    """The arc's own inside is a notch too, and the shortest cut from it to the contact crosses the arc: the
    cut between the two sharp notches of the contact leaves a whole arc and a whole disc."""
    arc = frame()
    outer = cv2.ellipse2Poly((420, 300), (60, 60), 0, 120, 240, 3)
    inner = cv2.ellipse2Poly((420, 300), (48, 48), 0, 120, 240, 3)
    cv2.fillPoly(arc, [np.vstack([outer, inner[::-1]])], (200, 200, 200))
    cfg = VisionConfig(downscale=downscale)
    alone = segment(arc, cfg, 0.25, crop_size=None)[0].area_px
    got = sorted(b.area_px for b in segment(_arc_on_disc(), cfg, 0.25, crop_size=None))
    assert np.allclose(got, sorted([alone, np.pi * 23**2]), rtol=0.08), got


def test_vision_thresholds_must_be_ordered():
    with pytest.raises(ValidationError, match="neck_sure"):
        VisionConfig(neck_sure=0.9, neck_colour=0.8)
    with pytest.raises(ValidationError, match="cut_sure"):
        VisionConfig(cut_sure=1.5, cut_ratio=1.3)
    with pytest.raises(ValidationError):
        VisionConfig(cut_depth_mm=0)


def test_a_crop_leaves_out_the_seam_along_a_touching_neighbour():
    # a dark ferrite block pressed against a bright magnet disc: segmented on a 2x smaller image, the border
    # lands on the chord between the notches, not on the disc's arc, so without a seam the block's crop
    # shows a rim of the disc (parted on the full-resolution frame, the border lands closer)
    img = frame()
    cv2.circle(img, (300, 300), 40, (220, 220, 220), -1)
    cv2.rectangle(img, (336, 270), (398, 330), (70, 70, 70), -1)
    cfg = VisionConfig(downscale=2, split_full_res=False)
    blobs = segment(img, cfg, 0.25, crop_size=64)
    assert len(blobs) == 2
    block = max(blobs, key=lambda b: b.cu)
    crop = block.crop
    assert crop is not None and not callable(crop)
    assert int(crop.max()) < 150  # no pixel of the magnet
    # the area and centroid still count the block's every pixel
    assert abs(block.area_px - 63 * 61) < 0.1 * 63 * 61
    seamless = segment(img, cfg.model_copy(update={"crop_seam_mm": 0.0}), 0.25, crop_size=64)
    assert int(max(seamless, key=lambda b: b.cu).crop.max()) >= 150


def test_a_blob_parted_at_full_resolution_keeps_its_pieces_outlines():
    """Found on the 2x smaller image, the disc-and-block blob is parted on the frame: areas and centroids as
    at full resolution, the box's margin and a neighbour just beside it left out (the bar, convex, stays as
    found on the smaller image)."""
    img = frame()
    cv2.circle(img, (300, 300), 40, (220, 220, 220), -1)
    cv2.rectangle(img, (336, 270), (398, 330), (70, 70, 70), -1)
    cv2.rectangle(img, (402, 280), (420, 320), (200, 200, 200), -1)  # 3 px away: a blob of its own
    full = sorted(segment(img, VisionConfig(downscale=1), 0.25, crop_size=64), key=lambda b: b.cu)
    got = sorted(segment(img, CFG, 0.25, crop_size=64), key=lambda b: b.cu)
    assert len(got) == len(full) == 3
    for a, b in zip(got[:2], full[:2], strict=True):
        assert abs(a.cu - b.cu) < 0.1 and abs(a.cv - b.cv) < 0.1
        assert abs(a.area_px - b.area_px) < 0.01 * b.area_px
    assert abs(got[2].area_px - 19 * 41) < 0.1 * 19 * 41
    assert int(got[1].crop.max()) < 150  # the block's crop shows neither the disc nor the bar


def _peaks_by_every_level(dist: np.ndarray) -> list[tuple[int, int, float]]:
    """The definition `_peaks` implements: label every level, keep the components that hold nothing of
    the level before."""
    seeds, covered, level = [], np.zeros(dist.shape, bool), float(dist.max())
    while level >= 2.0:
        above = dist >= level
        n, lab = cv2.connectedComponents(above.astype(np.uint8), connectivity=8)
        for k in range(1, n):
            comp = lab == k
            if not (comp & covered).any():
                y, x = np.unravel_index(int(np.where(comp, dist, -1.0).argmax()), dist.shape)
                seeds.append((int(y), int(x), float(dist[y, x])))
        covered, level = above, level * 0.8
    return sorted(seeds)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(10, 150), st.integers(10, 110), st.integers(3, 40)), min_size=1, max_size=6))
def test_peaks_skip_only_levels_where_no_new_component_can_appear(discs):
    """`_peaks` labels only the levels where a local maximum of the map could start a component, and only
    the box above the level: the same seeds as labelling every level whole."""
    mask = np.zeros((120, 160), np.uint8)
    for x, y, r in discs:
        cv2.circle(mask, (x, y), r, 255, -1)
    dist = cv2.distanceTransform(cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0), cv2.DIST_L2, 5)
    dist = dist[1:-1, 1:-1]
    assert sorted(_peaks(dist)) == _peaks_by_every_level(dist)


def test_a_frame_marked_coarse_is_parted_on_the_downscaled_image():
    """`full_res=False` (a vision thread that is behind) parts as `vision.split_full_res` false would."""
    img = _small_block_on_a_side()
    coarse = sorted(b.area_px for b in segment(img, CFG, 0.25, crop_size=None, full_res=False))
    half = sorted(b.area_px for b in segment(img, VisionConfig(split_full_res=False), 0.25, crop_size=None))
    assert coarse == half and len(coarse) == 1
    assert len(segment(img, CFG, 0.25, crop_size=None)) == 2


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.integers(8, 30), st.floats(0, 2 * np.pi), st.floats(0.88, 0.99)), min_size=2, max_size=4),
    st.integers(0, 1),
    st.integers(0, 1),
)
def test_a_flood_on_the_coarser_grid_labels_every_pixel_and_keeps_the_pieces(chain, odd_h, odd_w):
    """`_flood` at scale 2 on a blob of discs touching at necks, as `_split_at_necks` floods it (its box, the
    distance map padded; odd sides too): every pixel labelled, by the same markers as at scale 1; each piece's
    centroid within a pixel; between two discs, the border within 4 px of the fine one. (Discs pressed
    deeper into each other, centres under 0.88 x their radii apart, leave flat ridges where either flood's
    border is arbitrary: this test found centroids 6-18 px apart there.)"""
    h, w = 120 + odd_h, 160 + odd_w
    discs = [(80.0, 60.0, chain[0][0])]
    for r, angle, gap in chain[1:]:
        x, y, r0 = discs[-1]
        d = gap * (r0 + r)
        discs.append((x + d * np.cos(angle), y + d * np.sin(angle), r))
    assume(all(r <= x < w - r and r <= y < h - r for x, y, r in discs))
    apart = (np.hypot(a[0] - b[0], a[1] - b[1]) >= 0.88 * (a[2] + b[2]) for i, a in enumerate(discs) for b in discs[:i])
    assume(all(apart))
    shape = np.zeros((h, w), np.uint8)
    markers = np.zeros(shape.shape, np.int32)
    for k, (x, y, r) in enumerate(discs, start=1):
        cv2.circle(shape, (round(x), round(y)), r, 255, -1)
        cv2.circle(markers, (round(x), round(y)), max(1, r // 3), k, -1)
    markers[shape == 0] = 0
    dist = cv2.distanceTransform(cv2.copyMakeBorder(shape, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0), cv2.DIST_L2, 5)
    dist = dist[1:-1, 1:-1]
    fine, coarse = _flood(-dist, markers, shape, 1), _flood(-dist, markers, shape, 2)
    assert coarse.shape == fine.shape and coarse.dtype.kind == "i"
    assert ((coarse > 0) == (shape > 0)).all() and ((fine > 0) == (shape > 0)).all()
    for k in np.unique(fine[fine > 0]):
        (yf, xf), (yc, xc) = np.nonzero(fine == k), np.nonzero(coarse == k)
        assert len(yc) and np.hypot(yf.mean() - yc.mean(), xf.mean() - xc.mean()) < 1.0
    if len(discs) == 2:
        near = cv2.dilate((fine == 1).astype(np.uint8), np.ones((9, 9), np.uint8)) & (fine == 2)
        near = cv2.dilate(near, np.ones((9, 9), np.uint8)) > 0  # within 4 px of the fine border
        assert not ((coarse != fine) & ~near).any()


@pytest.mark.parametrize("downscale", [3, 4])
def test_touching_pieces_found_on_a_smaller_image_are_parted_at_full_resolution(downscale):
    """Any `vision.downscale`: the flood between the pieces runs on the grid they were found on."""
    img = frame()
    cv2.circle(img, (300, 300), 40, (200, 200, 200), -1)
    cv2.circle(img, (379, 300), 40, (200, 200, 200), -1)
    got = sorted(segment(img, VisionConfig(downscale=downscale), 0.25, crop_size=None), key=lambda b: b.cu)
    assert len(got) == 2
    assert abs(got[0].cu - 300) < 1.5 and abs(got[1].cu - 379) < 1.5


def _feed_group(seed: int, rate: float, until_mm: float, kinds: list[tuple[str, str]]):
    """The first group of touching pieces of these kinds, (shape, variant) sorted, in the simulator's feed (15 %
    touching, 2 m/s), rendered on a frame as wide as the belt: (frame, geometry, (x, y) of each piece, sorted)."""
    from sim.config import SimFeedConfig
    from sim.feed import FeedGenerator
    from sim.render import FrameRenderer, render_sprite
    from sim.touching import BELT_MM, FRAME, MM_PER_PX, clusters
    from sorter.core.geometry import CameraGeometry

    feed = SimFeedConfig(touching_share=0.15, rate_per_s=rate)
    pieces = FeedGenerator(feed, BELT_MM, 2000, seed=seed).pieces_until(until_mm)
    group = next(g for g in clusters(pieces) if sorted((p.shape, p.variant) for p in g) == kinds)
    pos = float(np.mean([p.s_mm for p in group]))
    geom = CameraGeometry(FRAME[1], FRAME[0], (BELT_MM / 2, 0.0), MM_PER_PX)
    img = np.empty((*FRAME, 3), np.uint8)
    FrameRenderer(geom, noise_sigma=3.0, seed=seed).render([(p, render_sprite(p, MM_PER_PX)) for p in group], pos, img)
    return img, geom, sorted((p.x_mm, pos - p.s_mm) for p in group)


def _errors(img: np.ndarray, geom, truth: list[tuple[float, float]]) -> list[float]:
    """Each piece's distance (mm) to the nearest blob found (as many blobs as pieces, each the nearest of one)."""
    found = [geom.px_to_mm(b.cu, b.cv) for b in segment(img, CFG, 0.25, crop_size=None)]
    assert len(found) == len(truth)
    dist = [[float(np.hypot(fx - tx, fy - ty)) for fx, fy in found] for tx, ty in truth]
    assert len({int(np.argmin(row)) for row in dist}) == len(truth)  # no blob stands for two pieces
    return [min(row) for row in dist]


def test_a_notch_with_a_sure_partner_is_not_cut_to_another_contacts_notch():
    """The simulator's feed (seed 42): a dusty ferrite shard touched by a block at one corner and a screw at
    another. The sharpest pair of notches ran from the block's contact to the screw's, across the shard,
    and left the block on one half of it; each contact is now cut on its own."""
    img, geom, truth = _feed_group(42, 60, 22_000, [("block", "ni"), ("screw", "screw"), ("shard", "dusty")])
    assert max(_errors(img, geom, truth)) < 1.0


def test_a_cut_between_two_materials_follows_the_edge_between_their_colours():
    """The simulator's feed (seed 42, 40 pieces/s): a plated NdFeB block lying on a ferrite arc. The straight
    cut between the contact's notches gave the block a third of the arc (centroids 3.4 and 1.8 mm off); the
    border moved onto the edge between their colours puts both within 0.5 mm."""
    img, geom, truth = _feed_group(42, 40, 12_000, [("arc", "matte"), ("block", "ni")])
    assert max(_errors(img, geom, truth)) < 0.5


def test_a_colour_border_that_breaks_a_side_up_is_refused():
    """The simulator's feed (seed 12): a plated arc on an L-shaped steel bracket with rust spots, a small
    bracket beside it. The colour flood ran along the bracket's shading and spots and left the arc's side in
    nine pieces (its largest 56 %); that cut stays straight, and all three pieces are found."""
    img, geom, truth = _feed_group(12, 60, 60_000, [("arc", "ni"), ("bracket", "bracket"), ("bracket", "bracket")])
    # found 0.4, 1.7 and 2.5 mm off (straight cuts alone: 2.3, 1.7, 1.3): the bound asks that each piece is
    # found, not where the borders of an arc over two brackets run
    assert max(_errors(img, geom, truth)) < 3.0


def test_a_small_piece_pressed_into_a_crevice_is_cut_off_without_a_second_notch():
    """The simulator's feed (seed 42, 40 pieces/s): a zinc-plated NdFeB arc pressed against a block of the same
    plating. One crevice, 4 mm deep and sharp, runs between them; at the contact's other end their outlines run
    on nearly straight, so no second notch pairs with it and the two were one blob (the arc lost at every belt
    speed on the line). The crevice alone is cut now; without it (`crevice_deg` 0) they stay one blob."""
    img, geom, truth = _feed_group(42, 40, 12_000, [("arc", "zn"), ("block", "zn")])
    # found 0.24 and 0.09 mm off (cut to the nearest outline point instead of on along the crevice: 1.7 and 0.7)
    assert max(_errors(img, geom, truth)) < 0.5
    whole = segment(img, CFG.model_copy(update={"crevice_deg": 0.0}), 0.25, crop_size=None)
    assert len(whole) == 1


@pytest.mark.parametrize(
    ("seed", "until_mm", "kinds"),
    [
        (5, 16_000, [("disc", "ni"), ("plate", "aluminium")]),
        (43, 6_000, [("plate", "plate"), ("washer", "washer")]),
        (12, 36_000, [("cylinder", "grey"), ("disc", "brown")]),
    ],
    ids=["aluminium plate on a plated disc", "steel plate on a washer", "cylinder on a disc of one grey"],
)
def test_a_notch_pair_from_a_crevice_is_cut_without_asking_the_colour(seed, until_mm, kinds):
    """The simulator's feed (60 pieces/s): a piece pressed on a rounder one leaves a sharp crevice at one end of
    the contact and a notch farther away at the other. Such a pair was cut only for sides `colour_step` or
    `cut_far_colour_step` apart, though the crevice alone (no partner) is cut with no colour test at all; now it
    is cut as the crevice would be. Before, one blob stood for both pieces (up to 2.3 mm from the nearer one,
    the other lost); without crevices (`crevice_deg` 0) it still does."""
    img, geom, truth = _feed_group(seed, 60, until_mm, kinds)
    assert max(_errors(img, geom, truth)) < 0.5
    whole = segment(img, CFG.model_copy(update={"crevice_deg": 0.0}), 0.25, crop_size=None)
    assert len(whole) == 1
