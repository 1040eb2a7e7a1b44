"""Validation of a classifier model before it is deployed (`sorter model check`, and at run time).

`check_model(path)` opens the file the way the line service does (onnxruntime,
`sorter.vision.classify.Classifier`), checks its input and output, its metadata (including
the field likelihood when there is one), and runs test inferences on synthetic crops:
probabilities must be finite, in [0, 1], sum to 1, not depend on the batch they are
computed in, and fusing a field reading must keep them so. It never raises for a bad
model: the result says what is wrong.

Exit status of the command: 0 ok, 1 the model fails a check, 2 the file is missing or
not an ONNX model at all.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

OK, FAILED, UNREADABLE = 0, 1, 2
PROB_TOL = 1e-4
BATCH_TOL = 1e-4


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class CheckResult:
    """What `check_model` found; true when the model may be deployed."""

    path: Path
    status: int = OK  # 0 ok, 1 failed, 2 unreadable
    checks: list[Check] = field(default_factory=list)
    version: str | None = None
    labels: list[str] | None = None
    input_size: int | None = None
    has_field_model: bool = False
    ms_per_crop: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    def __bool__(self) -> bool:
        return self.ok

    @property
    def exit_code(self) -> int:
        return self.status

    @property
    def problems(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.passed]

    @property
    def message(self) -> str:
        """One line for a log or a terminal."""
        if self.status == OK:
            fusion = "with field likelihood" if self.has_field_model else "no field likelihood (image only)"
            return (
                f"{self.path}: ok: version {self.version}, classes {self.labels}, input {self.input_size}px, "
                f"{fusion}, {self.ms_per_crop:.2f} ms/crop"
            )
        what = "unreadable" if self.status == UNREADABLE else "not deployable"
        return f"{self.path}: {what}: " + "; ".join(self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "status": self.status,
            "message": self.message,
            "version": self.version,
            "labels": self.labels,
            "input_size": self.input_size,
            "field_likelihood": self.has_field_model,
            "ms_per_crop": self.ms_per_crop,
            "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks],
        }

    def _add(self, name: str, passed: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, passed, detail))
        if not passed and self.status == OK:
            self.status = FAILED
        return passed


def _synthetic_crops(size: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """Belt-like dark crops with a bright blob, plus pure noise and flat extremes: BGR uint8."""
    rng = np.random.default_rng(seed)
    crops = [np.zeros((size, size, 3), np.uint8), np.full((size, size, 3), 255, np.uint8)]
    while len(crops) < n:
        img = rng.normal(20, 3, (size, size, 3))
        yy, xx = np.indices((size, size))
        r = rng.uniform(0.15, 0.4) * size
        blob = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r
        img[blob] = rng.uniform(40, 220, 3)
        crops.append(np.clip(img, 0, 255).astype(np.uint8))
        crops.append(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return crops[:n]


def _probs_ok(p: np.ndarray, n: int, c: int) -> str:
    """'' when `p` is (n, c) probabilities, else what is wrong."""
    if p.shape != (n, c):
        return f"shape {p.shape}, expected {(n, c)}"
    if not np.all(np.isfinite(p)):
        return "non-finite probabilities"
    if p.min() < -PROB_TOL or p.max() > 1 + PROB_TOL:
        return f"probabilities outside [0, 1] ({p.min():.3g} .. {p.max():.3g})"
    s = p.sum(axis=1)
    if np.abs(s - 1).max() > PROB_TOL:
        return f"probabilities sum to {s.min():.6f} .. {s.max():.6f}, not 1"
    return ""


def check_model(path: Path | str, threads: int = 1) -> CheckResult:
    """Validate a model file for deployment; see the module's notes. Never raises for a bad model."""
    from sorter.vision.classify import FIELD_META_KEY, REQUIRED_META, Classifier, ModelError

    path = Path(path)
    res = CheckResult(path=path)
    if not path.is_file():
        res._add("file", False, "not found")
        res.status = UNREADABLE
        return res
    # 1. an ONNX model at all: onnxruntime must load it
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises untyped errors
        res._add("onnx", False, f"not a loadable ONNX model ({type(exc).__name__}: {str(exc)[:200]})")
        res.status = UNREADABLE
        return res
    res._add("onnx", True, f"loads in onnxruntime {ort.__version__}")
    try:  # the full ONNX checker when the onnx package is there (the training extra)
        import onnx

        onnx.checker.check_model(str(path))
        res._add("onnx checker", True)
    except ImportError:
        pass
    except Exception as exc:
        res._add("onnx checker", False, f"{type(exc).__name__}: {str(exc)[:200]}")

    meta = dict(sess.get_modelmeta().custom_metadata_map)
    missing = [k for k in REQUIRED_META if k not in meta]
    res._add("metadata keys", not missing, f"lacks {missing}" if missing else f"{sorted(meta)}")
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    ok_io = len(inputs) == 1 and len(outputs) >= 1
    res._add("inputs/outputs", ok_io, f"{len(inputs)} input(s), {len(outputs)} output(s); expected 1 and >= 1")
    if ok_io:
        inp = inputs[0]
        res._add("input type", inp.type == "tensor(float)", f"{inp.name}: {inp.type} {inp.shape}")
        batch = inp.shape[0] if inp.shape else None
        res._add(
            "dynamic batch",
            not isinstance(batch, int),
            f"batch axis is {batch!r}" + (" (fixed)" if isinstance(batch, int) else ""),
        )
        out = outputs[0]
        res._add("output type", out.type == "tensor(float)", f"{out.name}: {out.type} {out.shape}")

    # 2. the service's own reading of the contract
    try:
        clf = Classifier(path, threads=threads)
    except ModelError as exc:
        res._add("contract", False, str(exc).removeprefix(f"{path}: "))
        return res
    res.version, res.labels, res.input_size = clf.version, list(clf.labels), clf.input_size
    res._add("contract", True, f"version {clf.version}")
    labels = list(clf.labels)
    res._add(
        "labels",
        len(set(labels)) == len(labels) and all(s.strip() == s and s for s in labels),
        f"{labels}",
    )
    res._add("input size", 8 <= clf.input_size <= 1024, f"{clf.input_size} px")
    t = clf.temperature
    res._add("temperature", math.isfinite(t) and 0.01 <= t <= 100, f"{t:g}")
    for key in ("mean", "std"):
        vals = json.loads(meta[key])
        good = all(math.isfinite(v) for v in vals) and (key == "mean" or all(v > 1e-4 for v in vals))
        res._add(key, good, f"{vals}")
    if "train_data_hash" in meta:
        h = meta["train_data_hash"]
        res._add("train_data_hash", len(h) == 64 and all(ch in "0123456789abcdef" for ch in h), h[:16] + "...")
    if "metrics" in meta:
        try:
            json.loads(meta["metrics"])
            res._add("metrics", True)
        except ValueError as exc:
            res._add("metrics", False, f"not JSON ({exc})")

    # 3. test inferences on synthetic crops
    n, c = 6, len(labels)
    crops = _synthetic_crops(clf.input_size, n)
    try:
        t0 = time.perf_counter()
        p = clf.predict(crops)
        res.ms_per_crop = round((time.perf_counter() - t0) * 1000 / n, 3)
        one = clf.predict(crops[:1])
        other_size = clf.predict([np.full((clf.input_size * 2, clf.input_size + 3, 3), 30, np.uint8)])
    except Exception as exc:
        res._add("inference", False, f"{type(exc).__name__}: {str(exc)[:200]}")
        return res
    why = _probs_ok(p, n, c) or _probs_ok(other_size, 1, c)
    res._add("inference", not why, why or f"{n} synthetic crops: finite probabilities summing to 1")
    diff = float(np.abs(one[0] - p[0]).max()) if not why else math.inf
    res._add("batch independence", diff <= BATCH_TOL, f"max difference {diff:.2e} between batch of 1 and of {n}")

    # 4. the field likelihood, when there is one
    fm = clf.field_model
    res.has_field_model = fm is not None
    if fm is not None:
        from sorter.core.fusion import fuse

        readings = np.array([0.0, 0.5, 5.0, -40.0, 150.0, 400.0, 5000.0, np.nan])
        ll = fm.log_likelihood(readings)
        finite = bool(np.all(np.isfinite(ll)))
        res._add(FIELD_META_KEY, finite, f"{fm!r}" if finite else "non-finite log-likelihoods")
        ratio = fm.max_log_ratio()
        res._add("field evidence bounded", math.isfinite(ratio), f"max log-likelihood ratio {ratio:.2f}")
        fused = fuse(np.repeat(p[:1], len(readings), axis=0), readings, fm)
        why = _probs_ok(fused, len(readings), c)
        if not why and np.any(fused[p[0][None, :].repeat(len(readings), 0) > 1e-12] <= 0):
            why = "a field reading zeroed a class"
        res._add("fused inference", not why, why or "finite, summing to 1, no class zeroed")
    return res
