"""Labelled classifier crops from simulated pieces.

Each piece is rendered onto a noisy belt patch by the same FrameRenderer the
simulated cameras use and cut out by the service's own `segment()`, so the
model trains on exactly the crops it will be served.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from sim.config import SimFeedConfig, SimHallBarConfig
from sim.feed import VARIANTS, SimPiece, class_size_range, make_piece
from sim.magnet import field_at_mT
from sim.render import FrameRenderer, render_sprite
from sorter.config import CLASSES, MagnetometerConfig, VisionConfig
from sorter.core.geometry import CameraGeometry
from sorter.ml.dataset import SPLITS
from sorter.vision.segment import materialise, segment

PATCH_MM = 100.0  # holds the largest piece (50 mm, any rotation) with room for its crop margin
GAIN_RANGE = (0.9, 1.1)  # lighting drift the line's cameras may show (the simulated line uses 0.93-1.07)
_MAX_TRIES = 20
_SENSOR_SALT = 0x53454E53  # the readings' random stream, apart from the renders' (crops stay as they were)


def sensor_reading(
    piece: SimPiece,
    rng: np.random.Generator,
    pitch_mm: float | None = None,
    lift_off_mm: float | None = None,
    noise_mT: float | None = None,
) -> float:
    """The signed peak field (mT) the line's Hall bar reports for `piece`.

    The nearest sensor is anywhere within half a pitch across from the piece's centroid; the bar's
    noise is added. Defaults: the line's bar (MagnetometerConfig.pitch_mm, SimHallBarConfig).
    """
    bar = SimHallBarConfig()
    pitch = pitch_mm if pitch_mm is not None else MagnetometerConfig.model_fields["pitch_mm"].default
    lift = lift_off_mm if lift_off_mm is not None else bar.lift_off_mm
    noise = noise_mT if noise_mT is not None else bar.noise_mT
    dx = float(rng.uniform(-pitch / 2, pitch / 2))
    return field_at_mT(piece, dx, 0.0, lift) + float(rng.normal(0.0, noise))


class CropRenderer:
    """Renders one piece on a belt patch and cuts its classifier crop with `segment()`."""

    def __init__(
        self,
        mm_per_px: float = 0.25,
        vision: VisionConfig | None = None,
        crop_size: int = 64,
        noise_sigma: float = 3.0,
        seed: int = 0,
    ) -> None:
        self.mm_per_px = mm_per_px
        self.vision = vision or VisionConfig()
        self.crop_size = crop_size
        self.rng = np.random.default_rng(seed)
        side = math.ceil(PATCH_MM / mm_per_px / 2) * 2
        self.renderer = FrameRenderer(
            CameraGeometry(side, side, (0.0, 0.0), mm_per_px),
            noise_sigma,
            seed=int(self.rng.integers(2**31)),
            bank_size=8,
        )
        self.frame = np.empty((side, side, 3), np.uint8)

    def crop(self, piece: SimPiece) -> np.ndarray | None:
        """The crop of `piece` (placed near the patch centre), or None unless segment() finds it as one whole blob."""
        rng = self.rng
        piece = piece.placed(float(rng.uniform(-2, 2)), float(rng.uniform(-2, 2)))
        sprite = render_sprite(piece, self.mm_per_px, rng)
        self.renderer.render([(piece, sprite)], 0.0, self.frame, gain=float(rng.uniform(*GAIN_RANGE)))
        blobs = segment(self.frame, self.vision, self.mm_per_px, self.crop_size)
        if len(blobs) != 1 or blobs[0].touches_top_bottom or blobs[0].touches_left_right:
            return None
        crop = blobs[0].crop
        return None if crop is None else materialise(crop)


def split_counts(per_class: int, splits: tuple[float, ...] | tuple[int, ...]) -> dict[str, int]:
    """Per-class counts of each split from shares (summing to 1) or from counts (summing to `per_class`)."""
    if len(splits) != len(SPLITS):
        raise ValueError(f"splits needs {len(SPLITS)} entries ({', '.join(SPLITS)}), got {splits}")
    if all(isinstance(s, int) for s in splits):
        if sum(splits) != per_class:
            raise ValueError(f"split counts {splits} do not add up to per_class={per_class}")
        return dict(zip(SPLITS, (int(s) for s in splits), strict=True))
    if any(s < 0 for s in splits) or not math.isclose(sum(splits), 1.0, abs_tol=1e-6):
        raise ValueError(f"split shares {splits} must be >= 0 and add up to 1")
    val = round(per_class * splits[1])
    test = round(per_class * splits[2])
    return {"train": per_class - val - test, "val": val, "test": test}


def write_dataset(
    out: Path,
    per_class: int,
    seed: int = 0,
    splits: tuple[float, ...] | tuple[int, ...] = (0.7, 0.15, 0.15),
    mm_per_px: float = 0.25,
    vision: VisionConfig | None = None,
    crop_size: int = 64,
    noise_sigma: float = 3.0,
    feed: SimFeedConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
    sensors: bool = True,
) -> dict[str, object]:
    """Render `per_class` crops of every class into an ImageFolder tree.

    Writes out/{train,val,test}/<class>/<n>.png, out/manifest.csv (what each crop shows:
    variant, shape, size) and out/dataset.json.

    Args:
        out: target directory (created; existing PNGs of the same names are overwritten).
        per_class: crops per class over all splits.
        seed: makes the whole dataset reproducible.
        splits: shares of train/val/test (summing to 1) or per-class counts (summing to per_class).
        mm_per_px: camera scale the crops are rendered at (the line's cameras' scale).
        vision: segmentation settings; must match the line's `vision:` section.
        crop_size: side of the saved crops in pixels (the classifier's input size).
        noise_sigma: sensor noise of the rendered frames (grey levels).
        feed: its size range limits the pieces' sizes, as on the line.
        progress: called as progress(done, total) after each crop.
        sensors: write the sensors.csv files.

    Returns:
        A summary: counts per split and class, variants per class, rejected renders, settings.
    """
    vision = vision or VisionConfig()
    feed = feed or SimFeedConfig()
    counts = split_counts(per_class, splits)
    cropper = CropRenderer(mm_per_px, vision, crop_size, noise_sigma, seed)
    rng = cropper.rng
    sensor_rng = np.random.default_rng([seed, _SENSOR_SALT])
    readings: dict[str, list[str]] = {split: ["file,field_mT,area_mm2"] for split in SPLITS}
    for split in SPLITS:
        for cls in CLASSES:
            (out / split / cls).mkdir(parents=True, exist_ok=True)

    order = [(split, k) for split in SPLITS for k in range(counts[split])]
    variants: dict[str, dict[str, int]] = {c: {} for c in CLASSES}
    manifest = ["file,class,variant,shape,size_mm,area_mm2"]
    rejected = 0
    total = per_class * len(CLASSES)
    done = 0
    for i, (split, k) in enumerate(order):
        for cls in CLASSES:  # classes interleaved, variants cycled: every split sees every variant evenly
            names = list(VARIANTS[cls])
            variant = names[i % len(names)]
            for _ in range(_MAX_TRIES):
                piece = make_piece(rng, cls, variant, size_mm=class_size_range(cls, feed.size_mm))
                crop = cropper.crop(piece)
                if crop is not None:
                    name = f"{split}/{cls}/{k:05d}.png"
                    cv2.imwrite(str(out / name), crop)
                    field = sensor_reading(piece, sensor_rng)
                    readings[split].append(f"{cls}/{k:05d}.png,{field:.2f},{piece.area_mm2:.1f}")
                    manifest.append(f"{name},{cls},{variant},{piece.shape},{piece.size_mm:.2f},{piece.area_mm2:.1f}")
                    variants[cls][variant] = variants[cls].get(variant, 0) + 1
                    break
                rejected += 1
            else:
                raise RuntimeError(f"segment() did not find a {cls}/{variant} piece {_MAX_TRIES} times in a row")
            done += 1
            if progress:
                progress(done, total)

    summary: dict[str, object] = {
        "seed": seed,
        "per_class": per_class,
        "counts": {s: {c: counts[s] for c in CLASSES} for s in SPLITS},
        "crop_size": crop_size,
        "mm_per_px": mm_per_px,
        "noise_sigma": noise_sigma,
        "gain_range": list(GAIN_RANGE),
        "size_mm": list(feed.size_mm),
        "vision": vision.model_dump(),
        "variants": variants,
        "rejected": rejected,
        "sensors": sensors,
    }
    if sensors:
        for split in SPLITS:
            (out / split / "sensors.csv").write_text("\n".join(readings[split]) + "\n")
    (out / "manifest.csv").write_text("\n".join(manifest) + "\n")
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
