"""`sorter run --capture DIR`: crops and field readings of the running line, saved as a dataset.

The layout is the one `sorter model train` reads: DIR/{train,val,test}/<class>/*.png
plus a `sensors.csv` (file,field_mT,area_mm2) per split. The class folder is the line's
decision, for a technician to review and relabel by moving files; the split is
a hash of the file name, so captures of many shifts merge into one dataset with
stable splits. On a line with a Hall-sensor bar every saved crop has its field
(pieces without a complete reading are skipped, so the dataset stays whole).
Saving runs on its own thread behind a bounded queue: a slow disk drops
captures (counted), never frames or decisions.
"""

from __future__ import annotations

import csv
import hashlib
import queue
import threading
from pathlib import Path

import cv2
import numpy as np
import structlog

from sorter.core.messages import Decision
from sorter.vision.segment import materialise

SPLIT_SHARES = (("train", 0.8), ("val", 0.1), ("test", 0.1))
QUEUE_SIZE = 256


def split_of(name: str) -> str:
    h = int.from_bytes(hashlib.sha1(name.encode()).digest()[:4], "big") / 2**32
    acc = 0.0
    for split, share in SPLIT_SHARES:
        acc += share
        if h < acc:
            return split
    return SPLIT_SHARES[-1][0]


def append_sensor_row(path: Path, file: str, field: float, area_mm2: float) -> None:
    """One `file,field_mT,area_mm2` row of a split's sensors.csv (the header first in a new file)."""
    new = not path.exists()
    with_area = True
    if not new:  # a file begun by a version without the area column keeps its two columns
        with path.open() as f:
            with_area = "area_mm2" in f.readline()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["file", "field_mT", "area_mm2"])
        w.writerow([file, f"{field:.1f}", f"{area_mm2:.1f}"] if with_area else [file, f"{field:.1f}"])


class CropCapture:
    def __init__(self, root: Path, run_id: str, with_field: bool) -> None:
        self.root = Path(root)
        self.run_id = run_id
        self.with_field = with_field
        self.saved = 0
        self.skipped = 0
        self.dropped = 0
        self.failed = 0
        self.log = structlog.get_logger("capture").bind(dir=str(self.root))
        self._queue: queue.Queue[tuple[str, str, np.ndarray, float | None, float] | None] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def add(self, d: Decision) -> None:
        """Queue the piece's first (sharpest) view under its decided class; never blocks."""
        if not d.piece.crops or d.cls == "unknown":
            return
        if self.with_field and (d.field.state != "ok" or d.field.field_mT is None):
            self.skipped += 1
            return
        crop = materialise(d.piece.crops[0])
        name = f"{self.run_id}-{d.piece.id:07d}.png"
        try:
            self._queue.put_nowait((name, d.cls, crop, d.field.field_mT, d.piece.area_mm2))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            name, cls, crop, field, area = item
            split = split_of(name)
            folder = self.root / split / cls
            try:
                folder.mkdir(parents=True, exist_ok=True)
                if not cv2.imwrite(str(folder / name), crop):
                    raise OSError(f"cannot write {folder / name}")
                if field is not None:
                    append_sensor_row(self.root / split / "sensors.csv", f"{cls}/{name}", field, area)
                self.saved += 1
            except OSError as exc:
                self.failed += 1
                if self.failed == 1 or self.failed % 100 == 0:
                    self.log.error("capture write failed", error=str(exc), failed=self.failed)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self.log.info("capture closed", **self.stats())

    def stats(self) -> dict[str, int]:
        return {"saved": self.saved, "skipped": self.skipped, "dropped": self.dropped, "failed": self.failed}
