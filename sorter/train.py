"""Training of the piece classifier (PyTorch, CPU) and its export to ONNX.

Only this module needs torch (the 'train' extra); the line service runs the
exported file with onnxruntime alone (sorter.classify), reading the input
contract from the metadata written here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from sorter.config import CLASSES

SPLITS = ("train", "val", "test")
OPSET = 17
CONFIDENCE = 0.9  # the line's routing threshold; reported so the card shows what the line will see


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ImportError(
            "training needs PyTorch, which the line service does not install: "
            "pip install 'sorter[train]' (or pip install torch --index-url https://download.pytorch.org/whl/cpu)"
        ) from exc
    return torch


def data_hash(data: Path) -> str:
    """sha256 over the sorted relative names and bytes of all split images."""
    h = hashlib.sha256()
    files = sorted(p for s in SPLITS for p in (data / s).rglob("*.png"))
    for p in files:
        h.update(p.relative_to(data).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _labels_of(train_dir: Path) -> list[str]:
    found = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and any(p.glob("*.png")))
    if len(found) < 2:
        raise ValueError(f"{train_dir}: need at least two class folders with PNG crops, found {found}")
    # the line's class order first, so a model trained on the standard classes has the standard columns
    return [c for c in CLASSES if c in found] + [c for c in found if c not in CLASSES]


def _load_split(d: Path, labels: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for i, cls in enumerate(labels):
        for p in sorted((d / cls).glob("*.png")):
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"{p}: not a readable image")
            if img.shape[:2] != (size, size):
                img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
            xs.append(img[..., ::-1])
            ys.append(i)
    if not xs:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    return np.stack(xs), np.asarray(ys, np.int64)


def _build_model(torch: Any, n_classes: int) -> Any:
    nn = torch.nn

    def block(cin: int, cout: int) -> list[Any]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    class SorterCNN(nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            # cheap at full resolution (2 CPU cores), wider where the image is small
            self.features = nn.Sequential(
                *block(3, 16),
                nn.MaxPool2d(2),
                *block(16, 32),
                nn.MaxPool2d(2),
                *block(32, 64),
                *block(64, 64),
                nn.MaxPool2d(2),
                *block(64, 128),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, n_classes))

        def forward(self, x: Any) -> Any:
            return self.head(self.features(x))

    return SorterCNN()


def _augment(torch: Any, x: Any, gen: Any) -> Any:
    """Random flips, quarter turns, lighting, colour and small scale changes of an RGB 0..1 batch."""
    n = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> Any:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    x = torch.where((torch.rand(n, generator=gen) < 0.5)[:, None, None, None], x.flip(3), x)
    k = torch.randint(0, 4, (n,), generator=gen)
    x = x.clone()
    for r in range(1, 4):
        sel = k == r
        x[sel] = torch.rot90(x[sel], r, (2, 3))
    # lighting varies little on the line (the renderer's gain, 0.93-1.07); brightness is a real cue
    x = x * u(0.9, 1.1, 1, 1, 1) * u(0.97, 1.03, 3, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.9, 1.1, 1, 1, 1) + mean
    scale = u(0.92, 1.08)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = u(-0.04, 0.04, 2)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x + 0.01 * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def _fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising validation NLL (golden-section search on log T)."""

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def evaluate(probs: np.ndarray, y: np.ndarray, labels: list[str], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Accuracy, confusion (rows true, columns predicted), per-class precision/recall, and the
    figures at the line's confidence threshold (uncertain pieces go to residue)."""
    c = len(labels)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    cm = np.zeros((c, c), np.int64)
    np.add.at(cm, (y, pred), 1)
    per_class = {}
    for i, name in enumerate(labels):
        tp = int(cm[i, i])
        per_class[name] = {
            "precision": tp / max(int(cm[:, i].sum()), 1),
            "recall": tp / max(int(cm[i].sum()), 1),
        }
    sure = conf >= confidence
    res: dict[str, Any] = {
        "n": len(y),
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "confusion": cm.tolist(),
        "per_class": per_class,
        "confident_share": float(sure.mean()) if len(y) else float("nan"),
        "confident_accuracy": float((pred[sure] == y[sure]).mean()) if sure.any() else float("nan"),
        "mean_confidence": float(conf.mean()) if len(y) else float("nan"),
    }
    at: dict[str, dict[str, float]] = {}
    for i, name in enumerate(labels):
        chosen = sure & (pred == i)
        at[name] = {
            "purity": float((y[chosen] == i).mean()) if chosen.any() else float("nan"),
            "recovery": float((chosen & (y == i)).sum() / max(int((y == i).sum()), 1)),
        }
    res[f"at_{confidence}"] = at
    # expected calibration error over 10 confidence bins
    bins = np.minimum((conf * 10).astype(int), 9)
    ece = 0.0
    for b in range(10):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(float((pred[m] == y[m]).mean()) - float(conf[m].mean()))
    res["ece"] = float(ece)
    return res


def _export(torch: Any, model: Any, size: int, path: Path) -> str:
    """Write the model as ONNX (dynamic batch); returns which exporter worked."""
    model.eval()
    dummy = torch.zeros(1, 3, size, size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter announces its own deprecation
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        return "torchscript"
    except Exception:  # the legacy exporter is going away; the dynamo one needs onnxscript
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=True,
            opset_version=max(OPSET, 18),
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            external_data=False,
        )
        return "dynamo"


def train(
    data: Path,
    out: Path,
    epochs: int = 40,
    seed: int = 0,
    input_size: int = 64,
    progress: bool = True,
    batch_size: int = 64,
    lr: float = 2e-3,
    patience: int = 8,
    threads: int = 2,
) -> dict[str, Any]:
    """Train the piece classifier on an ImageFolder tree and export it to ONNX with its metadata.

    Args:
        data: directory with train/<class>/*.png and val/<class>/*.png (test/ optional, only reported),
            e.g. made by `sorter sim dataset` (sim.dataset.write_dataset).
        out: the .onnx file to write (replaced atomically).
        epochs: maximum epochs; training stops early when validation loss stops improving.
        seed: seeds initialisation, shuffling and augmentation.
        input_size: square input side in pixels; crops of another size are resized.
        progress: show a progress bar and print the results.
        batch_size: training batch size.
        lr: peak AdamW learning rate (one-cycle schedule).
        patience: epochs without a better validation loss before stopping (never before 75 % of `epochs`).
        threads: torch CPU threads (the machine is shared: keep it small).

    Returns:
        Metrics: labels, temperature, epochs run, val (and test) accuracy, confusion matrices,
        per-class precision/recall, figures at the 0.9 confidence threshold, model size and hash.
    """
    torch = _import_torch()
    import onnx
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sorter.classify import Classifier

    console = Console(quiet=not progress)
    data, out = Path(data), Path(out)
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise FileNotFoundError(f"{data / split}: missing; expected {data}/train|val|test/<class>/*.png")
    torch.set_num_threads(max(1, threads))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    labels = _labels_of(data / "train")
    xs = {s: _load_split(data / s, labels, input_size) for s in SPLITS if (data / s).is_dir()}
    x_train, y_train = xs["train"]
    if len(xs["val"][0]) == 0:
        raise ValueError(f"{data / 'val'}: no validation crops")
    mean = (x_train.reshape(-1, 3).mean(axis=0) / 255.0).round(4)
    std = (x_train.reshape(-1, 3).std(axis=0) / 255.0).round(4)
    norm_m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    norm_s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def tensor(x: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float() / 255.0

    net = _build_model(torch, len(labels))
    n_params = sum(p.numel() for p in net.parameters())
    # evaluate and export an exponential moving average of the weights: single-step weights
    # (and their batch-norm statistics) make validation loss jump about, and early stopping with it
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)
    model = ema.module
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    steps = max(1, math.ceil(len(x_train) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.15)
    # one-cycle training converges in its last, low-learning-rate epochs: never stop before those
    min_epochs = math.ceil(0.75 * epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = tensor(x_train), torch.from_numpy(y_train)
    xv, yv = tensor(xs["val"][0]), xs["val"][1]

    def logits_of(x: Any) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            return torch.cat([model((x[i : i + 256] - norm_m) / norm_s) for i in range(0, len(x), 256)]).numpy()

    console.print(
        f"training on {len(x_train)} crops ({', '.join(labels)}), {n_params} parameters, "
        f"{torch.get_num_threads()} threads"
    )
    best: tuple[float, dict[str, Any], int] | None = None
    history = []
    t0 = time.monotonic()
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("epoch", total=epochs * steps)
        for epoch in range(epochs):
            net.train()
            perm = torch.randperm(len(xt), generator=gen)
            total = 0.0
            for i in range(steps):
                idx = perm[i * batch_size : (i + 1) * batch_size]
                xb = (_augment(torch, xt[idx], gen) - norm_m) / norm_s
                loss = loss_fn(net(xb), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                ema.update_parameters(net)
                total += loss.item() * len(idx)
                bar.update(task, advance=1, description=f"epoch {epoch + 1}/{epochs}")
            lv = logits_of(xv)
            val_loss = float(loss_fn(torch.from_numpy(lv), torch.from_numpy(yv)))
            val_acc = float((lv.argmax(1) == yv).mean())
            history.append(
                {"epoch": epoch + 1, "train_loss": total / len(xt), "val_loss": val_loss, "val_acc": val_acc}
            )
            console.print(
                f"epoch {epoch + 1:3d}  train loss {total / len(xt):.4f}  val loss {val_loss:.4f}  "
                f"val acc {val_acc:.4f}"
            )
            if best is None or val_loss < best[0]:
                best = (val_loss, {k: v.clone() for k, v in model.state_dict().items()}, epoch + 1)
            elif epoch + 1 >= min_epochs and epoch + 1 - best[2] >= patience:
                console.print(f"no better validation loss for {patience} epochs: stopping")
                break
    assert best is not None
    model.load_state_dict(best[1])
    lv = logits_of(xv)
    temperature = _fit_temperature(lv, yv)
    metrics: dict[str, Any] = {
        "labels": labels,
        "input_size": input_size,
        "seed": seed,
        "parameters": n_params,
        "epochs_run": len(history),
        "best_epoch": best[2],
        "train_seconds": round(time.monotonic() - t0, 1),
        "temperature": temperature,
        "history": history,
        "n_train": len(x_train),
        "val": evaluate(_softmax(lv / temperature), yv, labels),
    }
    if "test" in xs and len(xs["test"][0]):
        metrics["test"] = evaluate(_softmax(logits_of(tensor(xs["test"][0])) / temperature), xs["test"][1], labels)

    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    digest = data_hash(data)
    meta = {
        "labels": json.dumps(labels),
        "input_size": str(input_size),
        "mean": json.dumps([float(v) for v in mean]),
        "std": json.dumps([float(v) for v in std]),
        "temperature": f"{temperature:.6f}",
        "version": f"sorter-cnn-{created:%Y%m%d}-{digest[:8]}",
        "layout": "NCHW",
        "color": "RGB",
        "val_accuracy": f"{metrics['val']['accuracy']:.6f}",
        "train_data_hash": digest,
        "created": created.isoformat(),
    }
    if "test" in metrics:
        meta["test_accuracy"] = f"{metrics['test']['accuracy']:.6f}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        metrics["exporter"] = _export(torch, model, input_size, raw)
        proto = onnx.load(str(raw))
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.checker.check_model(proto)
        staged = out.with_name(out.name + ".tmp")
        onnx.save(proto, str(staged), save_as_external_data=False)
    # the exported graph must agree with torch before it replaces a working model
    check = Classifier(staged)
    probe = xs["val"][0][:32]
    got = check.predict([img[..., ::-1].copy() for img in probe])
    want = _softmax(logits_of(tensor(probe)) / temperature)
    if not np.allclose(got, want, atol=1e-3):
        staged.unlink()
        raise RuntimeError(f"exported model disagrees with torch (max diff {np.abs(got - want).max():.2e})")
    staged.replace(out)
    metrics["version"] = meta["version"]
    metrics["model_bytes"] = out.stat().st_size
    metrics["train_data_hash"] = digest
    if progress:
        _print_report(console, metrics)
    return metrics


def _print_report(console: Any, metrics: dict[str, Any]) -> None:
    from rich.table import Table

    labels = metrics["labels"]
    for split in ("val", "test"):
        if split not in metrics:
            continue
        m = metrics[split]
        table = Table(
            title=f"{split}: accuracy {m['accuracy']:.4f} (n={m['n']}), "
            f"{m['confident_share']:.1%} at confidence >= {CONFIDENCE}"
        )
        table.add_column("true \\ predicted")
        for name in labels:
            table.add_column(name, justify="right")
        table.add_column("precision", justify="right")
        table.add_column("recall", justify="right")
        for i, name in enumerate(labels):
            pc = m["per_class"][name]
            table.add_row(name, *(str(v) for v in m["confusion"][i]), f"{pc['precision']:.3f}", f"{pc['recall']:.3f}")
        console.print(table)
    console.print(
        f"temperature {metrics['temperature']:.3f}, model {metrics['model_bytes']} bytes, version {metrics['version']}"
    )
