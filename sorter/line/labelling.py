"""Labelling on the HMI: a queue of the line's crops for a technician to confirm or correct.

Fed by a decision tap on the service loop (a few comparisons per decision; a crop copy only for the
pieces kept). Which pieces are queued, first in line first:

  rank 0  disagreement: the camera alone and the decision (camera x field) name different classes
          (model vs field), or a shadow model disagrees with the live one (`note_shadow`)
  rank 1  uncertain: confidence below `labelling.uncertain_below`
  rank 2  a random `labelling.sample_share` of the confident rest, so that labels are not only hard cases

Within a rank the least confident first, then the oldest. At `queue_max` a better candidate pushes
out the worst one (`evicted`); one no better than the worst is not kept (`passed`). On a line with a
Hall bar only pieces with a complete reading are queued (as `--capture` does), so every labelled crop
has its sensors.csv row and the dataset stays valid.

Files (DIR = labelling.folder); `_` folders are no split or class to the dataset reader:

    DIR/_pending/<name>.png, <name>.json   the queue: survives a restart
    DIR/<split>/<class>/<name>.png          labelled crops; the split from crop_capture.split_of(file name)
    DIR/<split>/sensors.csv                 file,field_mT,area_mm2 (on a line with a Hall bar)
    DIR/_discarded/<name>.png               crops found unusable (kept so that an undo can bring them back)
    DIR/labels.csv                          time,user,run_id,piece_id,file,old,new - append only

`old` is the model's guess, `new` the label, `discard` (not a usable crop) or `undone` (the label before
was taken back; the piece is in the queue again). The newest row per (run_id, piece_id) is what holds.

Pending crops are written on the `labelling` thread behind a bounded queue: a slow disk drops
candidates (`dropped`), never frames or decisions.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import queue
import random
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from sorter.core.messages import Decision, ShadowDecision
from sorter.line.crop_capture import append_sensor_row, split_of
from sorter.vision.segment import materialise

LOG_FILE = "labels.csv"
LOG_COLUMNS = ("time", "user", "run_id", "piece_id", "file", "old", "new")
DISCARD = "discard"
UNDONE = "undone"
PENDING = "_pending"
DISCARDED = "_discarded"
SPLITS = ("train", "val", "test")
WRITE_QUEUE = 64  # crops waiting for the disk; past it candidates are dropped
RECENT = 64  # pieces not queued (their first view) kept for a shadow model's late disagreement
UNDO_DEPTH = 50
NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
REASONS = {0: "disagree", 1: "uncertain", 2: "sample"}


class LabelError(ValueError):
    """A label that cannot be given (unknown class, nothing to undo); the message says why."""


@dataclass(frozen=True)
class Candidate:
    """A queued crop and what the line made of it."""

    name: str  # <run_id>-<piece id, 7 digits>: the file stem and the API's id
    run_id: str
    piece_id: int
    guess: str  # the decision's class (camera x field)
    confidence: float
    image_guess: str  # the camera alone
    image_confidence: float
    field_mT: float | None
    area_mm2: float
    rank: int
    reason: str
    queued_at: float  # wall time
    shadow: str | None = None  # a shadow model's class where it disagreed

    def key(self) -> tuple[int, float, float]:
        return (self.rank, self.confidence, self.queued_at)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _top(probs: dict[str, float]) -> tuple[str, float]:
    cls = max(probs, key=probs.__getitem__)
    return cls, float(probs[cls])


class LabelStore:
    def __init__(
        self,
        root: Path,
        run_id: str,
        *,
        classes: Callable[[], Sequence[str]],
        queue_max: int = 300,
        uncertain_below: float = 0.9,
        sample_share: float = 0.02,
        with_field: bool = True,
        wall: Callable[[], float],  # the service's wall clock (log timestamps, queue age)
        rng: random.Random | None = None,
        log: Any = None,
    ) -> None:
        self.root = Path(root)
        self.run_id = run_id
        self.classes = classes
        self.queue_max = queue_max
        self.uncertain_below = uncertain_below
        self.sample_share = sample_share
        self.with_field = with_field
        self.wall = wall
        self.rng = rng or random.Random()
        self.log = log if log is not None else structlog.get_logger("labelling").bind(dir=str(self.root))
        self.counters = {"queued": 0, "passed": 0, "evicted": 0, "dropped": 0, "failed": 0, "skipped": 0}
        # _lock guards the in-memory queue and counts only and is never held over a disk access: the service
        # loop takes it; _files serialises the labels' file moves (the HMI's threads)
        self._lock = threading.Lock()
        self._files = threading.Lock()
        self._index: dict[str, Candidate] = {}
        self._recent: OrderedDict[int, tuple[Candidate, np.ndarray]] = OrderedDict()  # not queued, for a shadow
        self._shadow_notes: dict[int, str] = {}  # for pieces still on their way to the disk
        self._undo: dict[str, list[tuple[Candidate, str, Path]]] = {}
        self._labelled: dict[str, int] = {}
        self._pending = self.root / PENDING
        self._pending.mkdir(parents=True, exist_ok=True)
        self._load()
        # a new candidate with its crop, or (crop None) a queued one whose file must say more (a shadow's class)
        self._queue: queue.Queue[tuple[Candidate, np.ndarray | None] | None] = queue.Queue(WRITE_QUEUE)
        self._thread = threading.Thread(target=self._run, name="labelling", daemon=True)
        self._thread.start()

    # --- the line's side (service loop): never blocks ---

    def add(self, decisions: list[Decision]) -> None:
        """The decision tap: keep the pieces worth a label."""
        for d in decisions:
            cand = self._candidate(d)
            if cand is not None:
                self._submit(cand, materialise(d.piece.crops[0]))
            elif d.piece.crops and d.probs and (later := self._make(d, 0, "shadow")) is not None:
                # the first view only (12 kB), never the piece with all its views
                with self._lock:
                    self._recent[d.piece.id] = (later, materialise(d.piece.crops[0]))
                    while len(self._recent) > RECENT:
                        self._recent.popitem(last=False)

    def note_shadow(self, piece_id: int, shadow_cls: str) -> None:
        """A shadow model's class for a piece of this run: where it differs from the live guess, the piece
        goes to the head of the queue (a recent piece not queued is queued now)."""
        name = self._name(piece_id)
        recent = None
        with self._lock:
            cand = self._index.get(name)
            if cand is not None:
                if shadow_cls == cand.guess or cand.shadow == shadow_cls:
                    return
                cand = self._index[name] = replace(cand, rank=0, reason="shadow", shadow=shadow_cls)
            else:
                recent = self._recent.pop(piece_id, None)
                if recent is None:  # still on its way to the disk (applied there), or gone
                    self._shadow_notes[piece_id] = shadow_cls
                    while len(self._shadow_notes) > RECENT:
                        self._shadow_notes.pop(next(iter(self._shadow_notes)))
                    return
        if cand is not None:  # its file rewritten on the writer thread, for a restart
            self._hand_over(cand, None)
        elif recent is not None and shadow_cls != recent[0].guess:
            self._submit(replace(recent[0], shadow=shadow_cls, queued_at=self.wall()), recent[1])

    def shadowed(self, decisions: Sequence[ShadowDecision]) -> None:
        """A shadow tap (parts.shadow_taps): each piece where the shadow model names another class."""
        for d in decisions:
            if d.cls != d.live_cls:
                self.note_shadow(d.piece_id, d.cls)

    def _name(self, piece_id: int) -> str:
        return f"{self.run_id}-{piece_id:07d}"

    def _candidate(self, d: Decision) -> Candidate | None:
        if not d.piece.crops or not d.probs:
            return None
        if self.with_field and (d.field.state != "ok" or d.field.field_mT is None):
            self.counters["skipped"] += 1  # no sensors row possible: the dataset would refuse the crop
            return None
        guess, _ = _top(d.probs)
        image_guess = _top(d.image_probs)[0] if d.image_probs else guess
        if image_guess != guess:
            rank = 0
        elif d.confidence < self.uncertain_below:
            rank = 1
        elif self.rng.random() < self.sample_share:
            rank = 2
        else:
            return None
        return self._make(d, rank, REASONS[rank])

    def _make(self, d: Decision, rank: int, reason: str) -> Candidate | None:
        if self.with_field and (d.field.state != "ok" or d.field.field_mT is None):
            return None
        guess, conf = _top(d.probs)
        image_guess, image_conf = _top(d.image_probs) if d.image_probs else (guess, conf)
        return Candidate(
            name=self._name(d.piece.id),
            run_id=self.run_id,
            piece_id=d.piece.id,
            guess=guess,
            confidence=round(float(d.confidence), 4),
            image_guess=image_guess,
            image_confidence=round(image_conf, 4),
            field_mT=None if d.field.field_mT is None else round(float(d.field.field_mT), 1),
            area_mm2=round(float(d.piece.area_mm2), 1),
            rank=rank,
            reason=reason,
            queued_at=self.wall(),
        )

    def _submit(self, cand: Candidate, crop: np.ndarray) -> None:
        with self._lock:
            if not self._room_for(cand):
                self.counters["passed"] += 1
                return
        self._hand_over(cand, crop)

    def _hand_over(self, cand: Candidate, crop: np.ndarray | None) -> None:
        try:
            self._queue.put_nowait((cand, crop))
        except queue.Full:
            self.counters["dropped"] += 1

    def _room_for(self, cand: Candidate) -> bool:
        if len(self._index) < self.queue_max:
            return True
        return cand.key() < max(c.key() for c in self._index.values())

    # --- the writer thread ---

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            cand, crop = item
            try:
                self._store(cand, crop)
            except OSError as exc:
                self.counters["failed"] += 1
                if self.counters["failed"] == 1 or self.counters["failed"] % 100 == 0:
                    self.log.error("labelling write failed", error=str(exc), failed=self.counters["failed"])
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def drain(self) -> None:
        """Wait until every candidate handed over so far is on disk (or refused)."""
        self._queue.join()

    def _store(self, cand: Candidate, crop: np.ndarray | None) -> None:
        if crop is None:
            with self._lock:
                current = self._index.get(cand.name)
            if current is not None:  # not labelled meanwhile
                self._write_meta(current)
            return
        with self._lock:
            if not self._room_for(cand):  # better ones came meanwhile
                self.counters["passed"] += 1
                return
        png = self._pending / f"{cand.name}.png"
        if not cv2.imwrite(str(png), crop):
            raise OSError(f"cannot write {png}")
        self._write_meta(cand)  # both files before the queue shows it
        with self._lock:
            shadow = self._shadow_notes.pop(cand.piece_id, None)
            noted = shadow is not None and shadow != cand.guess
            if noted:
                cand = replace(cand, rank=0, reason="shadow", shadow=shadow)
            self._index[cand.name] = cand
            self.counters["queued"] += 1
            evicted = []
            while len(self._index) > self.queue_max:
                worst = max(self._index.values(), key=Candidate.key)
                del self._index[worst.name]
                evicted.append(worst.name)
                self.counters["evicted"] += 1
        if noted:
            self._write_meta(cand)
        for name in evicted:
            self._remove_pending(name)

    def _write_meta(self, cand: Candidate) -> None:
        path = self._pending / f"{cand.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cand.to_json()))
        os.replace(tmp, path)

    def _remove_pending(self, name: str) -> None:
        for suffix in (".png", ".json"):
            (self._pending / f"{name}{suffix}").unlink(missing_ok=True)

    def _load(self) -> None:
        """The queue a previous run left, and the counts of what is labelled."""
        for meta in sorted(self._pending.glob("*.json")):
            try:
                cand = Candidate(**json.loads(meta.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                self.log.warning("labelling pending crop unreadable, dropped", file=str(meta), error=str(exc))
                meta.unlink(missing_ok=True)
                continue
            if (self._pending / f"{cand.name}.png").is_file():
                self._index[cand.name] = cand
            else:
                meta.unlink(missing_ok=True)
        for png in self._pending.glob("*.png"):  # a crop whose description a crash left unwritten
            if png.stem not in self._index:
                png.unlink(missing_ok=True)
        for split in SPLITS:
            if (self.root / split).is_dir():
                for folder in (self.root / split).iterdir():
                    if folder.is_dir() and not folder.name.startswith((".", "_")):
                        n = sum(1 for _ in folder.glob("*.png"))
                        self._labelled[folder.name] = self._labelled.get(folder.name, 0) + n

    # --- the HMI's side (its threads) ---

    def head(self, n: int = 1) -> list[Candidate]:
        with self._lock:
            return sorted(self._index.values(), key=Candidate.key)[:n]

    def get(self, name: str) -> Candidate | None:
        with self._lock:
            return self._index.get(name)

    def crop_file(self, name: str) -> Path | None:
        """The pending crop's PNG, None if `name` is not queued."""
        if not NAME.match(name) or self.get(name) is None:
            return None
        return self._pending / f"{name}.png"

    def can_undo(self, user: str) -> bool:
        with self._lock:
            return bool(self._undo.get(user))

    def label(self, name: str, cls: str, user: str) -> str:
        """Give the queued crop `name` its class (or `discard`); returns the file it went to, relative to the
        folder ('' for a discard). LookupError if it is not queued, LabelError for a class the model lacks."""
        if cls != DISCARD and cls not in self.classes():
            raise LabelError(f"{cls!r} is not a class of the model {list(self.classes())} nor {DISCARD!r}")
        with self._files:
            with self._lock:  # taken off the queue first: neither evicted nor labelled twice meanwhile
                cand = self._index.pop(name, None)
            if cand is None:
                raise LookupError(f"no crop {name!r} waiting for a label")
            png = self._pending / f"{name}.png"
            if cls == DISCARD:
                dest, rel = self.root / DISCARDED / png.name, ""
            else:
                split = split_of(png.name)
                dest, rel = self.root / split / cls / png.name, f"{split}/{cls}/{png.name}"
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(png, dest)
            except FileNotFoundError:  # its crop deleted by hand: off the queue, or it would stay at its head
                self._remove_pending(name)
                raise LookupError(f"the crop of {name!r} is gone from {self._pending}") from None
            except OSError:
                with self._lock:
                    self._index[name] = cand
                raise
            if cls != DISCARD and cand.field_mT is not None:
                append_sensor_row(dest.parent.parent / "sensors.csv", f"{cls}/{png.name}", cand.field_mT, cand.area_mm2)
            (self._pending / f"{name}.json").unlink(missing_ok=True)
            self._log_row(user, cand, rel, cls)
            with self._lock:
                stack = self._undo.setdefault(user, [])
                stack.append((cand, cls, dest))
                del stack[:-UNDO_DEPTH]
                if cls != DISCARD:
                    self._labelled[cls] = self._labelled.get(cls, 0) + 1
        self.log.info("crop labelled", user=user, piece=name, old=cand.guess, new=cls, file=rel)
        return rel

    def undo(self, user: str) -> Candidate:
        """Take back `user`'s last label: the crop is queued again (first in line), the log says `undone`."""
        with self._files:
            with self._lock:
                stack = self._undo.get(user)
                if not stack:
                    raise LabelError(f"nothing to undo for {user}")
                cand, cls, dest = stack.pop()
                # first in line again: the technician is looking at it
                first = min([cand.queued_at, *(c.queued_at for c in self._index.values())])
            back = replace(cand, rank=0, queued_at=first - 1)
            os.replace(dest, self._pending / dest.name)
            if cls != DISCARD:
                if cand.field_mT is not None:
                    _drop_sensor_row(dest.parent.parent / "sensors.csv", f"{cls}/{dest.name}")
                _prune(dest.parent, self.root)
            self._write_meta(back)
            self._log_row(user, cand, "", UNDONE)
            with self._lock:
                self._index[back.name] = back
                if cls != DISCARD:
                    self._labelled[cls] -= 1
        self.log.info("crop label undone", user=user, piece=cand.name, was=cls)
        return back

    def _log_row(self, user: str, cand: Candidate, file: str, new: str) -> None:
        path = self.root / LOG_FILE
        new_file = not path.exists()
        stamp = dt.datetime.fromtimestamp(self.wall(), dt.UTC).isoformat(timespec="seconds")
        with path.open("a", newline="") as f:
            w = csv.writer(f)
            if new_file:
                w.writerow(LOG_COLUMNS)
            w.writerow([stamp, user, cand.run_id, cand.piece_id, file, cand.guess, new])

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"pending": len(self._index), "labelled": dict(self._labelled), **self.counters}

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self.log.info("labelling closed", **{k: v for k, v in self.stats().items() if k != "labelled"})


def _drop_sensor_row(path: Path, file: str) -> None:
    """sensors.csv without `file`'s row (gone with the file when no row is left)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    kept = [r for r in rows[1:] if r and r[0] != file]
    if not kept:
        path.unlink()
        return
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        csv.writer(f).writerows([rows[0], *kept])
    os.replace(tmp, path)


def _prune(folder: Path, root: Path) -> None:
    """Remove `folder` and its split folder when empty: the dataset reader refuses an empty class folder."""
    while folder != root and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
