"""Labelled crop datasets: the ImageFolder layout, with optional Hall-sensor readings.

    DIR/{train,val,test}/<class>/*.png        (.jpg/.jpeg/.bmp/.tif too; any size: resized to the model's input)
    DIR/<split>/sensors.csv                   optional: `file,field_mT` per image, `file` relative to the split
                                              folder (e.g. `ndfeb/0001.png`); the peak field (mT) the bar saw,
                                              signed or not (only |B| is used); optionally a column `area_mm2`,
                                              the piece's area seen from above (blank: unknown), so that the
                                              field likelihood is fitted per size band (sorter.core.fusion)

Used by training (`sorter model train`) and evaluation (`sorter model evaluate`). Everything
wrong with a dataset is a `DatasetError` whose message names the file or folder at fault:
a class folder present in one split and missing (or empty) in another, an unreadable image,
a `sensors.csv` naming files that are not there, images without a sensors row, readings
that are not finite numbers.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sorter.config import CLASSES

SPLITS = ("train", "val", "test")
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
SENSORS_FILE = "sensors.csv"
FIELD_COLUMN = "field_mT"
AREA_COLUMN = "area_mm2"


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the file or folder at fault."""


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _images(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.iterdir() if _is_image(p))


def order_labels(names: Iterable[str]) -> list[str]:
    """The line's class order first (so a model of the standard classes has the standard columns), then the rest."""
    found = set(names)
    return [c for c in CLASSES if c in found] + sorted(found - set(CLASSES))


@dataclass(frozen=True)
class Split:
    """One split's images (sorted by class, then name), their class indices and readings."""

    name: str
    root: Path
    labels: tuple[str, ...]
    files: tuple[Path, ...]
    y: np.ndarray  # int64 (N,): index into `labels`
    fields: np.ndarray | None  # float64 (N,) from sensors.csv, None without one
    sensors_file: Path | None
    areas: np.ndarray | None = None  # float64 (N,) mm² from sensors.csv's optional area column (NaN: blank)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def has_sensors(self) -> bool:
        return self.fields is not None

    def load_images(self, size: int, rgb: bool = True) -> np.ndarray:
        """(N, size, size, 3) uint8 images (RGB, or BGR with rgb=False), resized as `Classifier.preprocess` does."""
        out = np.empty((len(self.files), size, size, 3), np.uint8)
        for i, p in enumerate(self.files):
            img = read_image(p)
            if img.shape[:2] != (size, size):
                img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
            out[i] = img[..., ::-1] if rgb else img
        return out

    def counts(self) -> dict[str, int]:
        return {c: int((self.y == i).sum()) for i, c in enumerate(self.labels)}


@dataclass(frozen=True)
class Dataset:
    root: Path
    labels: tuple[str, ...]
    splits: dict[str, Split]

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]

    def __contains__(self, split: object) -> bool:
        return split in self.splits

    def describe(self) -> dict[str, object]:
        return {
            "root": str(self.root),
            "labels": list(self.labels),
            "splits": {
                name: {"n": len(s), "per_class": s.counts(), "sensors": s.has_sensors}
                for name, s in self.splits.items()
            },
        }


def read_image(path: Path) -> np.ndarray:
    """A colour image as BGR uint8 (grey and 16-bit images converted, alpha dropped), or DatasetError."""
    try:
        buf = np.fromfile(str(path), np.uint8)  # cv2.imread fails silently on some non-ASCII paths
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    except (OSError, cv2.error) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from exc
    if img is None or img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise DatasetError(f"{path}: not a readable image")
    return img


def _number(raw: str) -> float:
    """A CSV cell as a float; NaN for text that is not a number."""
    try:
        return float(raw)
    except ValueError:
        return math.nan


def _read_sensors(csv_path: Path, split_dir: Path, files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray | None]:
    """The reading of every image in `files` from the split's sensors.csv (same order), and the pieces'
    areas when the file has an area column."""
    index = {p.relative_to(split_dir).as_posix(): i for i, p in enumerate(files)}
    fields = np.full(len(files), np.nan)
    areas = np.full(len(files), np.nan)
    seen: dict[str, int] = {}
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{csv_path}: cannot be read ({exc})") from exc
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    cols = [h.strip().lower() for h in header] if header else []
    if "file" not in cols or FIELD_COLUMN.lower() not in cols:
        raise DatasetError(f"{csv_path}: line 1 must be a header with columns 'file,{FIELD_COLUMN}', got {header}")
    fi, vi = cols.index("file"), cols.index(FIELD_COLUMN.lower())
    ai = cols.index(AREA_COLUMN.lower()) if AREA_COLUMN.lower() in cols else None
    for lineno, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(fi, vi):
            raise DatasetError(f"{csv_path}: line {lineno}: expected columns file,{FIELD_COLUMN}, got {row}")
        name = row[fi].strip().replace("\\", "/").removeprefix("./")
        if name not in index:
            where = split_dir / name
            why = "no such file" if not where.exists() else "not an image of a class folder"
            raise DatasetError(f"{csv_path}: line {lineno}: names {name!r} ({where}: {why})")
        if name in seen:
            raise DatasetError(f"{csv_path}: line {lineno}: {name!r} again (first on line {seen[name]})")
        seen[name] = lineno
        raw = row[vi].strip()
        value = _number(raw)
        if not math.isfinite(value):
            raise DatasetError(f"{csv_path}: line {lineno}: {FIELD_COLUMN} of {name!r} is {raw!r}, not a finite number")
        fields[index[name]] = value
        raw_area = row[ai].strip() if ai is not None and ai < len(row) else ""
        if raw_area:
            area = _number(raw_area)
            if not (math.isfinite(area) and area > 0):
                raise DatasetError(
                    f"{csv_path}: line {lineno}: {AREA_COLUMN} of {name!r} is {raw_area!r}, not a positive number"
                )
            areas[index[name]] = area
    missing = [p for p in files if p.relative_to(split_dir).as_posix() not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more images)" if len(missing) > 1 else ""
        raise DatasetError(f"{missing[0]}: no row in {csv_path}{more}")
    return fields, areas if ai is not None else None


def _scan_split(split_dir: Path, labels: Sequence[str], reference: str | None, skip_empty: bool = False) -> Split:
    dirs = {p.name: p for p in _class_dirs(split_dir) if not skip_empty or _images(p)}
    for cls in labels:
        if cls not in dirs:
            src = f"it is in {reference}" if reference else "the model knows it"
            raise DatasetError(f"{split_dir / cls}: missing class folder ({src})")
    extra = sorted(set(dirs) - set(labels))
    if extra:
        src = f"not a class of {reference}" if reference else f"not a class of the model {list(labels)}"
        raise DatasetError(f"{dirs[extra[0]]}: {src}")
    files: list[Path] = []
    ys: list[int] = []
    for i, cls in enumerate(labels):
        imgs = _images(dirs[cls])
        if not imgs:
            raise DatasetError(f"{dirs[cls]}: empty class folder (no {'/'.join(sorted(IMAGE_EXTS))} images)")
        files.extend(imgs)
        ys.extend([i] * len(imgs))
    sensors = split_dir / SENSORS_FILE
    fields, areas = _read_sensors(sensors, split_dir, files) if sensors.is_file() else (None, None)
    return Split(
        name=split_dir.name,
        root=split_dir,
        labels=tuple(labels),
        files=tuple(files),
        y=np.asarray(ys, np.int64),
        fields=fields,
        sensors_file=sensors if fields is not None else None,
        areas=areas,
    )


def scan_dataset(
    root: Path,
    required: Sequence[str] = ("train", "val"),
    labels: Sequence[str] | None = None,
    splits: Sequence[str] = SPLITS,
) -> Dataset:
    """Check a dataset's layout and sensors files and list its images (without decoding them).

    Args:
        root: the dataset folder.
        required: splits that must be there.
        labels: the classes (in column order) when they are given, e.g. by a model to evaluate;
            otherwise the class folders of `train` (or of the first split present) in the line's order.
        splits: the splits to scan when present.

    Every split present must have a non-empty folder for each class, and no other class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory (expected {root}/{{train,val,test}}/<class>/*.png)")
    for name in required:
        if not (root / name).is_dir():
            raise DatasetError(f"{root / name}: missing split folder (expected {root}/{name}/<class>/*.png)")
    present = [s for s in splits if (root / s).is_dir()]
    if not present:
        raise DatasetError(f"{root}: none of the split folders {list(splits)}")
    reference: str | None = None
    if labels is None:
        first = "train" if "train" in present else present[0]
        ref_dir = root / first
        dirs = _class_dirs(ref_dir)
        for d in dirs:
            if not _images(d):
                raise DatasetError(f"{d}: empty class folder (no {'/'.join(sorted(IMAGE_EXTS))} images)")
        labels = order_labels(d.name for d in dirs)
        if len(labels) < 2:
            raise DatasetError(f"{ref_dir}: need at least two class folders with images, found {labels}")
        reference = str(ref_dir)
        scanned = {s: _scan_split(root / s, labels, None if s == first else reference) for s in present}
    else:
        labels = list(labels)
        scanned = {}
        for s in present:
            split_dir = root / s
            # a split may hold a subset of the model's classes, but every class folder it has must be known,
            # and the other splits' classes must be there too
            names = {d.name for d in _class_dirs(split_dir)}
            unknown = sorted(names - set(labels))
            if unknown:
                raise DatasetError(f"{split_dir / unknown[0]}: not a class of the model {labels}")
            scanned[s] = _scan_split(split_dir, [c for c in labels if c in names], None)
        union = {c for sp in scanned.values() for c in sp.labels}
        for s, sp in scanned.items():
            lacking = [c for c in labels if c in union and c not in sp.labels]
            if lacking:
                other = next(o for o, osp in scanned.items() if lacking[0] in osp.labels)
                raise DatasetError(f"{root / s / lacking[0]}: missing class folder (it is in {root / other})")
        # re-index every split on the model's full label list
        scanned = {
            s: Split(
                sp.name,
                sp.root,
                tuple(labels),
                sp.files,
                np.asarray([labels.index(sp.labels[i]) for i in sp.y], np.int64),
                sp.fields,
                sp.sensors_file,
                sp.areas,
            )
            for s, sp in scanned.items()
        }
    return Dataset(root=root, labels=tuple(labels), splits=scanned)


def scan_addition(root: Path) -> Dataset:
    """A dataset added to another (`sorter model train --data MAIN --data MORE`), such as the crops labelled on
    the HMI: any of the splits, each with the classes it has (a labels folder fills up a class and a split at a
    time; empty class folders are passed over). Every image still needs its sensors row where a split has a
    sensors.csv. The main dataset brings the complete train and val splits (`merge_datasets`)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory (expected {root}/{{train,val,test}}/<class>/*.png)")
    found: dict[str, list[str]] = {}
    for s in SPLITS:
        if (root / s).is_dir():
            names = [d.name for d in _class_dirs(root / s) if _images(d)]
            if names:
                found[s] = order_labels(names)
    if not found:
        raise DatasetError(f"{root}: no labelled images (expected {root}/{{train,val,test}}/<class>/*.png)")
    labels = order_labels({c for names in found.values() for c in names})
    splits = {}
    for s, names in found.items():
        sp = _scan_split(root / s, names, None, skip_empty=True)
        y = np.asarray([labels.index(names[i]) for i in sp.y], np.int64)
        splits[s] = Split(sp.name, sp.root, tuple(labels), sp.files, y, sp.fields, sp.sensors_file, sp.areas)
    return Dataset(root=root, labels=tuple(labels), splits=splits)


def data_hash(root: Path, dataset: Dataset | None = None) -> str:
    """sha256 over the sorted relative names and bytes of all images and sensors files of the splits.

    For a dataset of PNGs without sensors files this is the hash the first models recorded.
    """
    root = Path(root)
    if dataset is None:
        files = sorted(
            p
            for s in SPLITS
            if (root / s).is_dir()
            for p in (root / s).rglob("*")
            if _is_image(p) or (p.name == SENSORS_FILE and p.parent.parent == root)
        )
    else:
        files = sorted(
            [p for sp in dataset.splits.values() for p in sp.files]
            + [sp.sensors_file for sp in dataset.splits.values() if sp.sensors_file is not None]
        )
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def merge_datasets(datasets: Sequence[Dataset]) -> tuple[Dataset, dict[str, np.ndarray]]:
    """Several datasets as one (e.g. the shipped set and the plant's labelled crops): each split the union of
    theirs, the classes the union in the line's order. Readings are kept where every dataset of a split has
    them (a field likelihood fitted on some crops' readings only would misjudge the others); areas likewise.

    Returns the merged dataset and, per split, the index (into `datasets`) of the set each crop came from."""
    if len(datasets) == 1:
        only = datasets[0]
        return only, {s: np.zeros(len(sp), np.int64) for s, sp in only.splits.items()}
    labels = order_labels({c for d in datasets for c in d.labels})
    splits: dict[str, Split] = {}
    origin: dict[str, np.ndarray] = {}
    for name in SPLITS:
        parts = [(k, d[name]) for k, d in enumerate(datasets) if name in d]
        if not parts:
            continue
        ys = [np.asarray([labels.index(sp.labels[i]) for i in sp.y], np.int64) for _, sp in parts]
        fields = [sp.fields for _, sp in parts]
        areas = [sp.areas if sp.areas is not None else np.full(len(sp), np.nan) for _, sp in parts]
        splits[name] = Split(
            name,
            parts[0][1].root,
            tuple(labels),
            tuple(p for _, sp in parts for p in sp.files),
            np.concatenate(ys),
            np.concatenate(fields) if all(f is not None for f in fields) else None,  # type: ignore[arg-type]
            None,
            np.concatenate(areas) if any(sp.areas is not None for _, sp in parts) else None,
        )
        origin[name] = np.concatenate([np.full(len(sp), k, np.int64) for k, sp in parts])
    return Dataset(root=datasets[0].root, labels=tuple(labels), splits=splits), origin


def merged_hash(datasets: Sequence[Dataset]) -> str:
    """data_hash of one dataset; of several, the sha256 over their hashes in the given order."""
    hashes = [data_hash(d.root, d) for d in datasets]
    if len(hashes) == 1:
        return hashes[0]
    return hashlib.sha256("".join(hashes).encode()).hexdigest()
