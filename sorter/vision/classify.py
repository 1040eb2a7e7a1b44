"""The runtime piece classifier: an ONNX model run by onnxruntime on the CPU.

The model file carries its own input contract in its metadata (labels, input
size, normalisation, temperature), so a retrained model is a file swap: the
service never hard-codes what the training script chose.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from sorter.core.decide import fuse_views
from sorter.vision.segment import Crop, materialise

if TYPE_CHECKING:
    from sorter.core.fusion import FieldLikelihood

log = logging.getLogger(__name__)

REQUIRED_META = ("labels", "input_size", "mean", "std", "version")
FIELD_META_KEY = "field_likelihood"  # optional: sorter.core.fusion.FieldLikelihood as JSON


class ModelError(Exception):
    """The model file is missing, unreadable, or lacks the metadata the service needs."""


def _json_floats(meta: dict[str, str], key: str, n: int, path: Path) -> np.ndarray:
    try:
        vals = json.loads(meta[key])
        arr = np.asarray(vals, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{path}: metadata {key!r} must be a JSON list of {n} numbers, got {meta[key]!r}") from exc
    if arr.shape != (n,):
        raise ModelError(f"{path}: metadata {key!r} must be a JSON list of {n} numbers, got {meta[key]!r}")
    return arr


class Classifier:
    """Class probabilities for piece crops (BGR uint8, any size, any batch size)."""

    def __init__(self, path: Path, threads: int = 1, max_batch: int | None = None) -> None:
        """`max_batch`: crops per inference run; more are classified in runs of this size. ONNX Runtime keeps
        the memory of the largest batch it has run for the session's life (measured on this model: a run of
        16 crops +13 MB, 128 +77 MB, 256 +135 MB), so a backlog classified in one run would raise the
        process's RSS for good. None: any size in one run."""
        import onnxruntime as ort

        if max_batch is not None and max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        self.path = path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # onnxruntime's own warnings would bury ours
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {exc})") from exc
        meta = dict(self._session.get_modelmeta().custom_metadata_map)
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise ModelError(f"{path}: model metadata lacks {missing}; was it exported by `sorter model train`?")
        for key, want in (("layout", "NCHW"), ("color", "RGB")):
            if meta.get(key, want) != want:
                raise ModelError(f"{path}: metadata {key!r} is {meta[key]!r}, only {want!r} is supported")
        try:
            labels = json.loads(meta["labels"])
            size = int(meta["input_size"])
            self._temperature = float(meta.get("temperature", "1"))
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{path}: malformed metadata ({exc})") from exc
        if not isinstance(labels, list) or not labels or not all(isinstance(s, str) for s in labels):
            raise ModelError(f"{path}: metadata 'labels' must be a JSON list of class names, got {meta['labels']!r}")
        if size <= 0 or self._temperature <= 0:
            raise ModelError(f"{path}: input_size and temperature must be positive")
        self._labels: tuple[str, ...] = tuple(labels)
        self._size = size
        self._mean = _json_floats(meta, "mean", 3, path).reshape(1, 3, 1, 1)
        self._std = _json_floats(meta, "std", 3, path).reshape(1, 3, 1, 1)
        if np.any(self._std <= 0):
            raise ModelError(f"{path}: metadata 'std' must be positive")
        self._scale = (1.0 / (255.0 * self._std)).astype(np.float32)
        self._shift = (self._mean / self._std).astype(np.float32)
        self._version = meta["version"]
        self._meta = meta
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelError(f"{path}: expected one input and one output, got {len(inputs)} and {len(outputs)}")
        self._input = inputs[0].name
        shape = inputs[0].shape
        if len(shape) != 4 or shape[1] != 3 or any(isinstance(d, int) and d != size for d in shape[2:]):
            raise ModelError(f"{path}: input shape {shape} does not match NCHW 3x{size}x{size}")
        n_out = outputs[0].shape[-1] if outputs[0].shape else None
        if isinstance(n_out, int) and n_out != len(labels):
            raise ModelError(f"{path}: model has {n_out} outputs but {len(labels)} labels")
        self._field_model: FieldLikelihood | None = None
        if FIELD_META_KEY in meta:
            from sorter.core.fusion import FieldLikelihood, FieldModelError

            try:
                fm = FieldLikelihood.from_json(meta[FIELD_META_KEY])
            except FieldModelError as exc:
                raise ModelError(f"{path}: metadata {FIELD_META_KEY!r}: {exc}") from exc
            if fm.labels != self._labels:
                raise ModelError(
                    f"{path}: metadata {FIELD_META_KEY!r} is for classes {list(fm.labels)}, the model's are {labels}"
                )
            self._field_model = fm
        self._provider = self._session.get_providers()[0]
        log.info("classifier %s version %s on %s (%d threads)", path.name, self._version, self._provider, threads)

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    @property
    def input_size(self) -> int:
        return self._size

    @property
    def version(self) -> str:
        return self._version

    @property
    def provider(self) -> str:
        """The onnxruntime execution provider actually running the model."""
        return self._provider

    @property
    def temperature(self) -> float:
        return self._temperature

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    @property
    def field_model(self) -> FieldLikelihood | None:
        """p(|B| | class) for fusing a Hall-sensor reading (`sorter.core.fusion.fuse`), None when the model has none."""
        return self._field_model

    def preprocess(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """BGR uint8 crops -> normalised float32 NCHW RGB batch."""
        s = self._size
        batch = np.empty((len(crops), s, s, 3), np.uint8)
        for i, crop in enumerate(crops):
            if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
                raise ValueError(f"crop {i}: expected H x W x 3 uint8 BGR, got {crop.shape} {crop.dtype}")
            if crop.shape[:2] != (s, s):
                crop = cv2.resize(crop, (s, s), interpolation=cv2.INTER_AREA)
            batch[i] = crop[..., ::-1]
        # (x / 255 - mean) / std as one scale and one shift, in place: one float array per batch, not four
        x = batch.transpose(0, 3, 1, 2).astype(np.float32)
        x *= self._scale
        x -= self._shift
        return x

    def predict(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(N, C) class probabilities, columns in `labels` order."""
        if len(crops) == 0:
            return np.zeros((0, len(self._labels)), np.float32)
        step = self.max_batch or len(crops)
        runs = [
            np.asarray(self._session.run(None, {self._input: self.preprocess(crops[i : i + step])})[0], np.float32)
            for i in range(0, len(crops), step)
        ]
        z = (runs[0] if len(runs) == 1 else np.concatenate(runs)) / self._temperature
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def _top(probs: np.ndarray) -> float:
    return float(fuse_views(probs).max())


def classify_views(
    clf: Classifier,
    views: Sequence[Sequence[Crop]],
    sure: float,
    on_time: Callable[[str, float], None] | None = None,
) -> tuple[list[np.ndarray | None], list[list[np.ndarray]]]:
    """Each piece's view probabilities and the crops they came from, for pieces given as their views (crops or
    cutters, best view first), classified in two rounds: every piece's first view in one batch, then the other
    views of the pieces whose first view's top class is below `sure`, in a second batch. Views not needed are
    never cut. `on_time("cut" | "infer", seconds)` is told what each part took.

    Why: a piece's 3-4 views cost 1.1 ms each (cut and model) and most pieces are plain from their first view
    (`sorter bench`: 3.7 views a piece classified before, 1.3 with `sure` 0.99); a piece one view leaves in doubt
    is still judged on all of them, so the views that would pull a wrong first view's confidence down are there
    where it matters. `sure` >= 1: every view, in one round.
    """
    probs: list[np.ndarray | None] = [None] * len(views)
    crops: list[list[np.ndarray]] = [[] for _ in views]

    def run(batch: list[tuple[int, Sequence[Crop]]]) -> None:
        if not batch:
            return
        t0 = time.perf_counter()
        cut = [[materialise(c) for c in vs] for _, vs in batch]
        t1 = time.perf_counter()
        p = clf.predict([c for cs in cut for c in cs])
        k = 0
        for (i, _), cs in zip(batch, cut, strict=True):
            got, k = p[k : k + len(cs)], k + len(cs)
            old = probs[i]
            probs[i] = got if old is None else np.concatenate([old, got])
            crops[i] += cs
        if on_time is not None:
            on_time("cut", t1 - t0)
            on_time("infer", time.perf_counter() - t1)

    if sure >= 1.0:
        run([(i, v) for i, v in enumerate(views) if v])
        return probs, crops
    run([(i, v[:1]) for i, v in enumerate(views) if v])
    run([(i, v[1:]) for i, v in enumerate(views) if len(v) > 1 and (p := probs[i]) is not None and _top(p) < sure])
    return probs, crops
