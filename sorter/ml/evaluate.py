"""Evaluation of a classifier model on a labelled dataset split (`sorter model evaluate`).

Figures, image-only and fused with the Hall-sensor reading (when the split has a
`sensors.csv` and the model carries a field likelihood):

- accuracy; per-class precision, recall and support; confusion matrix (rows true, columns predicted)
- expected calibration error (10 equal-width confidence bins) and a reliability diagram
- the coverage-vs-accuracy curve: keep the most confident pieces first, send the rest to
  recirculation; `coverage_at_999` is the largest share that can be kept with accuracy >= 0.999
  on the kept ones (by fused confidence when there are readings, else by image confidence)

Only numpy and onnxruntime (and matplotlib for the PNGs): no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ECE_BINS = 10
TARGET = 0.999
COVERAGE_TARGETS = (0.99, 0.995, 0.999)
CURVE_POINTS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
PLOT_POINTS = tuple(round(0.3 + 0.01 * i, 2) for i in range(71))  # the coverage curve of the PNG


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Share-weighted |accuracy - mean confidence| over equal-width confidence bins (top class)."""
    if len(y) == 0:
        return math.nan
    conf = probs.max(axis=1).astype(np.float64)
    correct = probs.argmax(axis=1) == y
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(float(correct[m].mean()) - float(conf[m].mean()))
    return float(ece)


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float | int]]:
    """Per confidence bin: its range, count, mean confidence and accuracy (empty bins left out)."""
    conf = probs.max(axis=1).astype(np.float64)
    correct = probs.argmax(axis=1) == y
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append(
                {
                    "lo": b / bins,
                    "hi": (b + 1) / bins,
                    "n": int(m.sum()),
                    "confidence": float(conf[m].mean()),
                    "accuracy": float(correct[m].mean()),
                }
            )
    return out


def _uncertainty(probs: np.ndarray) -> np.ndarray:
    """1 - top probability, computed as the sum of the other classes' probabilities.

    float32 probabilities saturate at 1.0 for confident pieces, but their small
    complements keep full precision: ranking by this keeps confident pieces apart.
    """
    p = probs.astype(np.float64)
    top = p.argmax(axis=1)
    rest = p.sum(axis=1) - p[np.arange(len(p)), top]
    return np.maximum(rest, 0.0)


def coverage_curve(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coverage, accuracy of the kept, confidence threshold) at every cut between distinct confidences.

    Pieces are kept most confident first; pieces of equal confidence are kept or dropped together
    (a threshold cannot split them).
    """
    n = len(y)
    if n == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    unc = _uncertainty(probs)
    order = np.argsort(unc, kind="stable")
    correct = (probs.argmax(axis=1) == y)[order]
    u = unc[order]
    cum = np.cumsum(correct)
    # cut after position i only where the next piece is less confident (or at the end)
    ends = np.flatnonzero(np.append(u[1:] > u[:-1], True))
    k = ends + 1
    conf = probs.max(axis=1).astype(np.float64)[order]
    return k / n, cum[ends] / k, conf[ends]


def coverage_at(probs: np.ndarray, y: np.ndarray, target: float = TARGET) -> tuple[float, float | None]:
    """The largest share kept (most confident first) with accuracy >= `target`, and the confidence threshold."""
    cov, acc, thr = coverage_curve(probs, y)
    k = np.rint(cov * len(y))
    # accuracy >= target in counts, free of rounding: correct >= target * kept
    ok = np.flatnonzero(np.rint(acc * k) >= target * k - 1e-9)
    if ok.size == 0:
        return 0.0, None
    i = ok[-1]
    return float(cov[i]), float(thr[i])


def accuracy_at_coverage(probs: np.ndarray, y: np.ndarray, shares: Sequence[float] = CURVE_POINTS) -> list[dict]:
    """Accuracy of the most confident `share` of pieces, for each share."""
    cov, acc, thr = coverage_curve(probs, y)
    out = []
    for s in shares:
        i = int(np.searchsorted(cov, s - 1e-12))  # the first cut keeping at least `s`
        i = min(i, len(cov) - 1)
        out.append({"coverage": float(cov[i]), "accuracy": float(acc[i]), "threshold": float(thr[i])})
    return out


def classification_metrics(probs: np.ndarray, y: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/support, confusion (rows true), ECE, coverage figures."""
    c = len(labels)
    y = np.asarray(y, np.int64)
    pred = probs.argmax(axis=1)
    cm = np.zeros((c, c), np.int64)
    np.add.at(cm, (y, pred), 1)
    per_class: dict[str, dict[str, float | int | None]] = {}
    for i, name in enumerate(labels):
        tp, predicted, support = int(cm[i, i]), int(cm[:, i].sum()), int(cm[i].sum())
        per_class[name] = {
            "precision": tp / predicted if predicted else None,
            "recall": tp / support if support else None,
            "support": support,
        }
    cov, thr = coverage_at(probs, y, TARGET)
    return {
        "accuracy": float((pred == y).mean()) if len(y) else math.nan,
        "per_class": per_class,
        "confusion": cm.tolist(),
        "ece": expected_calibration_error(probs, y),
        "mean_confidence": float(probs.max(axis=1).mean()) if len(y) else math.nan,
        "coverage_at_999": cov,
        "threshold_at_999": thr,
        "coverage_at": {str(t): coverage_at(probs, y, t)[0] for t in COVERAGE_TARGETS},
        "accuracy_at_coverage": accuracy_at_coverage(probs, y) if len(y) else [],
        "curve": accuracy_at_coverage(probs, y, PLOT_POINTS) if len(y) else [],
        "reliability": reliability(probs, y),
    }


def compute_report(
    image_probs: np.ndarray, y: np.ndarray, labels: Sequence[str], fused_probs: np.ndarray | None = None
) -> dict[str, Any]:
    """The evaluation report from probabilities.

    Top-level `accuracy`, `per_class`, `confusion`, `ece` are image-only; `fused_*` the same with
    the field reading (null without); `coverage_at_999` uses the fused probabilities when there are any.
    """
    img = classification_metrics(image_probs, y, labels)
    rep: dict[str, Any] = {
        "labels": list(labels),
        "n": len(y),
        "accuracy": img["accuracy"],
        "fused_accuracy": None,
        "ece": img["ece"],
        "fused_ece": None,
        "coverage_at_999": img["coverage_at_999"],
        "recirculation_at_999": 1.0 - img["coverage_at_999"],
        "threshold_at_999": img["threshold_at_999"],
        "coverage_by": "image",
        "per_class": img["per_class"],
        "confusion": img["confusion"],
        "fused_per_class": None,
        "fused_confusion": None,
        "image": img,
        "fused": None,
    }
    if fused_probs is not None:
        fz = classification_metrics(fused_probs, y, labels)
        rep.update(
            fused_accuracy=fz["accuracy"],
            fused_ece=fz["ece"],
            coverage_at_999=fz["coverage_at_999"],
            recirculation_at_999=1.0 - fz["coverage_at_999"],
            threshold_at_999=fz["threshold_at_999"],
            coverage_by="fused",
            fused_per_class=fz["per_class"],
            fused_confusion=fz["confusion"],
            fused=fz,
        )
    return rep


class EvaluationError(Exception):
    """The model and the dataset do not fit together (no common class, bad split name...)."""


def evaluate_model(
    model: Path,
    data: Path,
    split: str = "test",
    out_dir: Path | None = None,
    threads: int = 2,
    plots: bool = True,
) -> dict[str, Any]:
    """Run `model` on `data/<split>` and compute the report; write the PNGs to `out_dir` when `plots`.

    Raises ModelError (bad model), DatasetError (bad dataset, naming the file), EvaluationError.
    """
    from sorter.core.fusion import fuse
    from sorter.ml.dataset import SPLITS, data_hash, scan_dataset
    from sorter.vision.classify import Classifier

    if split not in SPLITS:
        raise EvaluationError(f"unknown split {split!r}; one of {list(SPLITS)}")
    clf = Classifier(Path(model), threads=threads)
    ds = scan_dataset(Path(data), required=(split,), labels=clf.labels)
    sp = ds[split]
    images = sp.load_images(clf.input_size, rgb=False)
    probs = np.concatenate([clf.predict(list(images[i : i + 256])) for i in range(0, len(images), 256)])
    field_model = clf.field_model
    fused = None
    note = None
    if sp.fields is not None and field_model is not None:
        fused = fuse(probs, sp.fields, field_model, labels=clf.labels, area_mm2=sp.areas)
    elif sp.fields is not None:
        note = "the split has sensors.csv but the model carries no field likelihood: image-only figures"
    elif field_model is not None:
        note = f"the model has a field likelihood but {sp.root} has no sensors.csv: image-only figures"
    rep = compute_report(probs, sp.y, clf.labels, fused)
    digest = data_hash(Path(data), ds)
    rep.update(
        model=str(model),
        model_version=clf.version,
        data=str(data),
        split=split,
        sensors=sp.fields is not None,
        data_hash=digest,
        # the model's training data hash covers all splits: True means "the dataset it was trained on"
        same_dataset_as_training=clf.metadata.get("train_data_hash") == digest,
    )
    if note:
        rep["note"] = note
    if plots and out_dir is not None:
        rep["plots"] = write_plots(rep, Path(out_dir))
    return rep


def write_plots(rep: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """confusion.png (image-only and fused side by side) and reliability.png (with the coverage curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = rep["labels"]
    panels = [("image only", rep["image"])] + ([("fused with field", rep["fused"])] if rep["fused"] else [])
    title = f"{Path(rep.get('model', 'model')).name} on {rep.get('split', '')} (n={rep['n']})"

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (name, m) in zip(axes[0], panels, strict=True):
        cm = np.asarray(m["confusion"], np.float64)
        rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(
                    j,
                    i,
                    str(int(cm[i, j])),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if rows[i, j] > 0.5 else "black",
                )
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}: accuracy {m['accuracy']:.4f}")
    fig.suptitle(title)
    fig.tight_layout()
    confusion = out_dir / "confusion.png"
    fig.savefig(confusion, dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.6))
    ax1.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    for (name, m), colour in zip(panels, ("tab:blue", "tab:orange"), strict=False):
        rel = m["reliability"]
        conf = [b["confidence"] for b in rel]
        acc = [b["accuracy"] for b in rel]
        ax1.plot(conf, acc, marker="o", color=colour, label=f"{name} (ECE {m['ece']:.4f})")
        cov, acc_kept, _ = _curve_from(m)
        ax2.plot(cov, acc_kept, color=colour, label=f"{name}: {m['coverage_at_999']:.1%} kept at >= 99.9 %")
    ax1.set_xlabel("confidence (mean of bin)")
    ax1.set_ylabel("accuracy")
    ax1.set_title(f"reliability ({ECE_BINS} bins)")
    ax1.set_xlim(0, 1.01)
    ax1.set_ylim(0, 1.01)
    ax1.legend(loc="upper left", fontsize=8)
    ax2.axhline(TARGET, color="grey", lw=1, ls="--")
    ax2.set_xlabel("share kept (most confident first); the rest goes to recirculation")
    ax2.set_ylabel("accuracy of the kept")
    ax2.set_title("coverage vs accuracy")
    lo = min(min(b["accuracy"] for b in m["curve"]) for _, m in panels) if rep["n"] else 0.9
    ax2.set_ylim(max(0.0, min(lo, 0.99) - 0.005), 1.0005)
    ax2.set_xlim(0, 1.0)
    ax2.legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    rel_png = out_dir / "reliability.png"
    fig.savefig(rel_png, dpi=110)
    plt.close(fig)
    return {"confusion": str(confusion), "reliability": str(rel_png)}


def _curve_from(m: dict[str, Any]) -> tuple[list[float], list[float], list[float]]:
    pts = m["curve"]
    return [p["coverage"] for p in pts], [p["accuracy"] for p in pts], [p["threshold"] for p in pts]


def confusion_table(title: str, labels: Sequence[str], m: dict[str, Any]) -> Any:
    """A rich table of a confusion matrix (rows true) with per-class precision and recall."""
    from rich.table import Table

    def f3(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    table = Table(title=title)
    table.add_column("true \\ predicted")
    for c in labels:
        table.add_column(c, justify="right")
    table.add_column("precision", justify="right")
    table.add_column("recall", justify="right")
    for i, c in enumerate(labels):
        pc = m["per_class"][c]
        table.add_row(c, *(str(v) for v in m["confusion"][i]), f3(pc["precision"]), f3(pc["recall"]))
    return table


def print_report(rep: dict[str, Any], console: Any = None) -> None:
    """Rich tables of the report (what `sorter model evaluate` prints without --json)."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    labels = rep["labels"]

    def f(v: float | None, fmt: str = ".4f") -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    head = Table(title=f"{rep.get('model', '')} on {rep.get('data', '')}/{rep.get('split', '')} (n={rep['n']})")
    head.add_column("")
    head.add_column("image only", justify="right")
    head.add_column("fused with field", justify="right")
    fused = rep["fused"]
    img = rep["image"]
    head.add_row("accuracy", f(rep["accuracy"]), f(rep["fused_accuracy"]))
    head.add_row("ECE (10 bins)", f(rep["ece"]), f(rep["fused_ece"]))
    head.add_row("mean confidence", f(img["mean_confidence"]), f(fused["mean_confidence"] if fused else None))
    for t in COVERAGE_TARGETS:
        head.add_row(
            f"kept at accuracy >= {t:g}",
            f(img["coverage_at"][str(t)], ".1%"),
            f(fused["coverage_at"][str(t)] if fused else None, ".1%"),
        )
    con.print(head)
    for name, m in (("image only", img), ("fused with field", fused)):
        if m is not None:
            con.print(confusion_table(f"{name}: confusion (rows true, columns predicted)", labels, m))
    con.print(
        f"coverage_at_999 ({rep['coverage_by']}): {rep['coverage_at_999']:.1%} kept, "
        f"{rep['recirculation_at_999']:.1%} to recirculation"
        + (f" (confidence >= {rep['threshold_at_999']:.6f})" if rep["threshold_at_999"] is not None else "")
    )
    if rep.get("note"):
        con.print(f"note: {rep['note']}")
    if rep.get("plots"):
        con.print(f"plots: {rep['plots']['confusion']}, {rep['plots']['reliability']}")
