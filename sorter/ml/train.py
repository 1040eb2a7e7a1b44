"""Training of the piece classifier (PyTorch, CPU) and its export to ONNX.

Only this module needs torch (the 'train' extra); the line service runs the
exported file with onnxruntime alone (sorter.vision.classify), reading the input
contract from the metadata written here.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sorter.ml import dataset as _dataset
from sorter.ml.dataset import SPLITS, scan_dataset

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
    """sha256 over the sorted relative names and bytes of all split images (and sensors.csv files)."""
    return _dataset.data_hash(Path(data))


WIDTHS = (16, 32, 64, 64, 128)
ARCHS = ("cnn", "lite0")
LITE0_INPUT = 96  # on 2 cores 13 epochs fit 240 s (128 px: 5 epochs, 64 px: 13, both less accurate)


def _build_model(torch: Any, n_classes: int, stem_stride: int = 1, widths: tuple[int, ...] = WIDTHS) -> Any:
    nn = torch.nn
    w = widths

    def block(cin: int, cout: int, stride: int = 1) -> list[Any]:
        return [
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]

    class SorterCNN(nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            # cheap at full resolution (2 CPU cores), wider where the image is small; large inputs
            # (128 px) are halved by a strided first convolution, so they cost what 64 px inputs do
            self.features = nn.Sequential(
                *block(3, w[0], stem_stride),
                nn.MaxPool2d(2),
                *block(w[0], w[1]),
                nn.MaxPool2d(2),
                *block(w[1], w[2]),
                *block(w[2], w[3]),
                nn.MaxPool2d(2),
                *block(w[3], w[4]),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(w[4], n_classes))

        def forward(self, x: Any) -> Any:
            return self.head(self.features(x))

    return SorterCNN()


# augmentation ranges: wide enough for another plant's lighting, belt and scale, narrow enough to
# keep what tells the classes apart on the line (brightness: Ni-plated NdFeB vs steel; colour
# temperature: warm nickel vs cold steel; size: SmCo is small)
AUGMENT: dict[str, tuple[float, float]] = {
    "brightness": (0.88, 1.12),
    "channel": (0.96, 1.04),
    "contrast": (0.88, 1.12),
    "gamma": (0.9, 1.1),
    "scale": (0.9, 1.1),
    "shift": (-0.05, 0.05),
    "rotate_deg": (-20.0, 20.0),
    "blur_share": (0.3, 0.3),
    "noise": (0.0, 0.02),
}


def _augment(torch: Any, x: Any, gen: Any, ranges: dict[str, tuple[float, float]] | None = None) -> Any:
    """Random mirroring, rotation, scale and shift, lighting, colour, blur and noise of an RGB 0..1 batch.

    Written for two CPU cores: one resampling does all the geometry, one multiply-add the lighting.
    """
    r = {**AUGMENT, **(ranges or {})}
    n = x.shape[0]
    f = torch.nn.functional

    def u(key: str, *shape: int) -> Any:
        lo, hi = r[key]
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    # geometry: mirror, quarter turns plus a small rotation, scale, shift; reflected borders continue a
    # belt's texture (small angles: a large piece reaching the crop's edge would be mirrored into the corners)
    quarter = torch.randint(0, 4, (n,), generator=gen).float() * (math.pi / 2)
    ang = quarter + u("rotate_deg") * (math.pi / 180)
    mirror = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    scale = u("scale")
    cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * mirror
    theta[:, 0, 1] = -sin
    theta[:, 1, 0] = sin * mirror
    theta[:, 1, 1] = cos
    theta[:, :, 2] = u("shift", 2)
    grid = f.affine_grid(theta, list(x.shape), align_corners=False)
    x = f.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # optics: a random share of the batch softened by up to a 3x3 box blur
    share = r["blur_share"][0]
    if share > 0:
        sel = torch.rand(n, generator=gen) < share
        if sel.any():
            xs = x[sel]
            amount = torch.rand(len(xs), 1, 1, 1, generator=gen)
            x[sel] = xs + amount * (f.avg_pool2d(xs, 3, stride=1, padding=1, count_include_pad=False) - xs)
    # light: level and colour temperature (gain), contrast around the crop's mean: one multiply-add
    gain = u("brightness", 1, 1, 1) * u("channel", 3, 1, 1)
    contrast = u("contrast", 1, 1, 1)
    mean = (x.mean(dim=(2, 3), keepdim=True) * gain).mean(dim=1, keepdim=True)
    x = (x * (gain * contrast) + mean * (1 - contrast)).clamp_(0, 1)
    x = x.pow_(u("gamma", 1, 1, 1))
    x = x.add_(u("noise", 1, 1, 1) * torch.randn(x.shape, generator=gen))
    return x.clamp_(0, 1)


def _lr_at(t: float, peak: float, warmup: float = 0.15) -> float:
    """One-cycle learning rate at progress t (0..1): cosine up from peak/25, cosine down to peak/25e4."""
    t = min(max(t, 0.0), 1.0)
    lo, end = peak / 25, peak / 25e4
    if t < warmup:
        return lo + (peak - lo) * (1 - math.cos(math.pi * t / warmup)) / 2
    return end + (peak - end) * (1 + math.cos(math.pi * (t - warmup) / (1 - warmup))) / 2


def _replan(epoch_s: list[float], elapsed: float, budget: float, planned: int, most: int) -> int:
    """How many epochs fit the time budget, judged by the recent epochs' pace (a shared machine's
    load comes and goes: the plan shrinks when epochs slow down and grows back, up to `most`,
    when they speed up). Small changes are ignored: each change bends the LR schedule."""
    done = len(epoch_s)
    pace = float(np.median(epoch_s[-5:])) if done > 1 else epoch_s[0] / 2  # the first one warms up
    fits = done + int(max(0.0, budget - elapsed) // max(pace, 1e-6))
    new = min(most, max(done + 1, fits))
    if new > planned and (done < 3 or new - planned < 3):
        return planned
    if new < planned and new >= planned - 1 and fits >= planned - 1:
        return planned
    return new


def _use_bf16(torch: Any, precision: str, arch: str = "cnn") -> bool:
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    if arch == "lite0":  # its depthwise convolutions: a training step 0.71 s in bfloat16, 0.56 s in float32
        return False
    try:  # native bfloat16 doubles the speed; emulated it would be far slower than float32
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def auto_input_size(sizes: list[tuple[int, int]]) -> int:
    """64 for crops up to about 96 px (the line's 64 px crops), 128 for larger ones."""
    if not sizes:
        return 64
    side = float(np.median([min(h, w) for h, w in sizes]))
    return 128 if side >= 96 else 64


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
    """`sorter.ml.evaluate.classification_metrics` plus the figures at the line's confidence threshold
    (uncertain pieces go to residue)."""
    from sorter.ml.evaluate import classification_metrics

    res = classification_metrics(probs, y, labels)
    for bulky in ("accuracy_at_coverage", "curve", "reliability", "coverage_at"):  # for plots, not for metadata
        res.pop(bulky)
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    sure = conf >= confidence
    res["n"] = len(y)
    res["confident_share"] = float(sure.mean()) if len(y) else float("nan")
    res["confident_accuracy"] = float((pred[sure] == y[sure]).mean()) if sure.any() else float("nan")
    res[f"at_{confidence}"] = {
        name: {
            "purity": float((y[sure & (pred == i)] == i).mean()) if (sure & (pred == i)).any() else float("nan"),
            "recovery": float((sure & (pred == i) & (y == i)).sum() / max(int((y == i).sum()), 1)),
        }
        for i, name in enumerate(labels)
    }
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


def _fit_contamination(
    labels: list[str],
    fields: np.ndarray,
    y: np.ndarray,
    areas: np.ndarray | None,
    probs: np.ndarray,
    f_check: np.ndarray,
    y_check: np.ndarray,
    a_check: np.ndarray | None,
) -> tuple[Any, float]:
    """The field likelihood fitted on (fields, y[, areas]), its contamination share minimising fused NLL on
    the check set."""
    from sorter.core.fusion import FieldLikelihood, fuse

    best: tuple[float, float] | None = None
    for eps in (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2):
        fl = FieldLikelihood.fit(labels, fields, y, contamination=eps, area_mm2=areas)
        post = fuse(probs, f_check, fl, area_mm2=a_check)
        nll = float(-np.log(np.clip(post[np.arange(len(y_check)), y_check], 1e-12, None)).mean())
        if best is None or nll < best[0] - 1e-9:
            best = (nll, eps)
    assert best is not None
    return FieldLikelihood.fit(labels, fields, y, contamination=best[1], area_mm2=areas), best[1]


def _split_report(probs: np.ndarray, y: np.ndarray, labels: list[str], fused: np.ndarray | None) -> dict[str, Any]:
    m = evaluate(probs, y, labels)
    if fused is not None:
        mf = evaluate(fused, y, labels)
        m["fused_accuracy"] = mf["accuracy"]
        m["fused_ece"] = mf["ece"]
        m["fused_confusion"] = mf["confusion"]
        m["fused_per_class"] = mf["per_class"]
        m["fused_coverage_at_999"] = mf["coverage_at_999"]
        m[f"fused_at_{CONFIDENCE}"] = mf[f"at_{CONFIDENCE}"]
    return m


def train(
    data: Path | Sequence[Path],
    out: Path,
    epochs: int = 60,
    seed: int = 0,
    input_size: int | None = None,
    progress: bool = True,
    batch_size: int = 64,
    lr: float = 2e-3,
    patience: int = 8,
    threads: int = 2,
    time_budget_s: float | None = 240.0,
    augment: dict[str, tuple[float, float]] | None = None,
    precision: str = "auto",
    widths: tuple[int, ...] = WIDTHS,
    arch: str = "cnn",
    data_shares: Sequence[float] | None = None,
    frozen_blocks: int = 0,
) -> dict[str, Any]:
    """Train the piece classifier on an ImageFolder tree and export it to ONNX with its metadata.

    Args:
        data: directory with train/<class>/*.png and val/<class>/*.png (test/ optional, only reported),
            each split optionally with sensors.csv (file,field_mT); see sorter.ml.dataset. E.g. made by
            `sorter sim dataset`, or any labelled crops of single pieces.
            Several folders (the shipped set and the plant's labelled crops) are merged split by split
            (sorter.ml.dataset.merge_datasets): the first must be complete, the others may lack splits
            and classes (sorter.ml.dataset.scan_addition: a folder labelled on the HMI fills up slowly).
        out: the .onnx file to write (replaced atomically).
        epochs: maximum epochs; training stops early when validation loss stops improving.
        seed: seeds initialisation, shuffling and augmentation.
        input_size: square input side in pixels; crops of another size are resized. None: lite0 96; the
            small CNN 64 for the line's 64 px crops (up to ~96 px), 128 for larger crops (halved by a strided
            first layer).
        progress: show a progress bar and print the results.
        batch_size: training batch size.
        lr: peak AdamW learning rate (one-cycle schedule).
        patience: epochs without a better validation loss before stopping (never before 75 % of `epochs`).
        threads: torch CPU threads (the machine is shared: keep it small).
        time_budget_s: the training loop's wall-clock budget; when the first epochs show that `epochs`
            would overrun it, fewer epochs are run (the learning-rate schedule is compressed to fit).
        augment: overrides of the augmentation ranges (`AUGMENT`).
        precision: "fp32", "bf16" (convolutions in bfloat16 under autocast, weights and optimiser
            in float32), or "auto": for the small CNN bf16 where the CPU does it natively (AVX512-BF16 or
            AMX), else fp32; for lite0 fp32 (faster: its depthwise convolutions).
        widths: channels of the five convolutions (`arch` "cnn").
        data_shares: with several `data` folders, the share of every training epoch drawn from each (e.g.
            0.5, 0.5 for a small plant set beside a large shipped one: its crops are drawn more often); None:
            each crop once per epoch, so each folder weighs by its size.
        arch: "cnn", the small network trained from scratch (ARCHS); "lite0", EfficientNet-Lite0 started from
            its ImageNet weights (sorter.ml.backbones), the whole network fine-tuned: better on one foreign
            set, worse on another (models/MODEL_CARD.md), so not the default.

    Returns:
        Metrics: labels, temperature, epochs run, val (and test) accuracy, confusion matrices,
        per-class precision/recall, figures at the 0.9 confidence threshold, fused figures when the
        dataset has sensors, model size and hash.

    Raises:
        DatasetError: the dataset is not usable as it is (the message names the file).
    """
    torch = _import_torch()
    import onnx
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sorter.core.fusion import META_KEY, fuse
    from sorter.vision.classify import Classifier
    from sorter.vision.modelcheck import check_model

    console = Console(quiet=not progress, stderr=True)
    folders = [Path(data)] if isinstance(data, str | Path) else [Path(d) for d in data]
    out = Path(out)
    if data_shares is not None and (len(data_shares) != len(folders) or min(data_shares) <= 0):
        raise ValueError(f"data shares {list(data_shares)}: one positive share per data folder ({len(folders)})")
    t_start = time.monotonic()
    # the first folder is the complete dataset; the others add to it (e.g. the crops labelled on the HMI)
    sets = [scan_dataset(folders[0], required=("train", "val"))] + [_dataset.scan_addition(d) for d in folders[1:]]
    ds, origin = _dataset.merge_datasets(sets)
    labels = list(ds.labels)
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: one of {', '.join(ARCHS)}")
    if input_size is None and arch == "lite0":
        input_size = LITE0_INPUT
    elif input_size is None:
        sample = ds["train"].files[:: max(1, len(ds["train"].files) // 50)]
        input_size = auto_input_size([_dataset.read_image(p).shape[:2] for p in sample])
    stem_stride = 2 if input_size >= 96 else 1
    torch.set_num_threads(max(1, threads))
    use_bf16 = _use_bf16(torch, precision, arch)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xs = {s: (ds[s].load_images(input_size), ds[s].y) for s in SPLITS if s in ds}
    x_train, y_train = xs["train"]
    mean = (x_train.reshape(-1, 3).mean(axis=0) / 255.0).round(4)
    std = np.maximum(x_train.reshape(-1, 3).std(axis=0) / 255.0, 1e-3).round(4)
    norm_m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    norm_s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    cl = torch.channels_last  # faster convolutions on CPU

    def tensor(x: np.ndarray) -> Any:
        """NCHW uint8 (a quarter of float32's memory); batches become float 0..1 when used."""
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def unit(x: Any) -> Any:
        return x.float().div_(255.0)

    if arch == "lite0":
        from sorter.ml.backbones import build_lite0

        net = build_lite0(torch, len(labels), frozen_blocks=frozen_blocks).to(memory_format=cl)
    else:
        net = _build_model(torch, len(labels), stem_stride, tuple(widths)).to(memory_format=cl)
    n_params = sum(p.numel() for p in net.parameters())
    # evaluate and export an exponential moving average of the weights: single-step weights
    # (and their batch-norm statistics) make validation loss jump about, and early stopping with it
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)
    model = ema.module
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr / 25, weight_decay=5e-4)
    steps = max(1, math.ceil(len(x_train) / batch_size))
    planned = epochs
    # one-cycle training converges in its last, low-learning-rate epochs: never stop before those
    min_epochs = math.ceil(0.75 * planned)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = tensor(x_train), torch.from_numpy(y_train)
    draw = None  # per-crop sampling weights: each folder's share of an epoch spread over its crops
    sources = [{"data": str(f), "n_train": int((origin["train"] == k).sum())} for k, f in enumerate(folders)]
    if data_shares is not None:
        n_of = np.bincount(origin["train"], minlength=len(folders))
        share = np.asarray(data_shares, float) / sum(data_shares)
        draw = torch.from_numpy(share[origin["train"]] / np.maximum(n_of[origin["train"]], 1))
        for src, sh in zip(sources, share, strict=True):
            src["share"] = round(float(sh), 4)
    if len(folders) > 1:
        said = [
            f"{s['data']} {s['n_train']} crops" + (f", {s['share']:.0%} of each epoch" if "share" in s else "")
            for s in sources
        ]
        console.print("training data: " + "; ".join(said))
    xv, yv = tensor(xs["val"][0]), xs["val"][1]

    def logits_of(x: Any) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            return torch.cat(
                [
                    model(((unit(x[i : i + 256]) - norm_m) / norm_s).contiguous(memory_format=cl))
                    for i in range(0, len(x), 256)
                ]
            ).numpy()

    console.print(
        f"training on {len(x_train)} crops ({', '.join(f'{c} {n}' for c, n in ds['train'].counts().items())}), "
        f"input {input_size} px, {n_params} parameters, {torch.get_num_threads()} threads"
        + (", bfloat16 convolutions" if use_bf16 else "")
    )
    best: tuple[float, dict[str, Any], int] | None = None
    history = []
    epoch_s: list[float] = []
    t0 = time.monotonic()
    step = 0
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("epoch", total=planned * steps)
        epoch = 0
        while epoch < planned:
            t_epoch = time.monotonic()
            net.train()
            if draw is None:
                perm = torch.randperm(len(xt), generator=gen)
            else:
                perm = torch.multinomial(draw, len(xt), replacement=True, generator=gen)
            total = 0.0
            for i in range(steps):
                idx = perm[i * batch_size : (i + 1) * batch_size]
                if len(idx) < 2:
                    continue  # batch norm needs two samples
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step / (planned * steps), lr)
                xb = ((_augment(torch, unit(xt[idx]), gen, augment) - norm_m) / norm_s).contiguous(memory_format=cl)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    logits = net(xb)
                loss = loss_fn(logits.float(), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                ema.update_parameters(net)
                step += 1
                total += loss.item() * len(idx)
                bar.update(task, advance=1, description=f"epoch {epoch + 1}/{planned}")
            epoch += 1
            lv = logits_of(xv)
            val_loss = float(loss_fn(torch.from_numpy(lv), torch.from_numpy(yv)))
            val_acc = float((lv.argmax(1) == yv).mean())
            history.append({"epoch": epoch, "train_loss": total / len(xt), "val_loss": val_loss, "val_acc": val_acc})
            console.print(
                f"epoch {epoch:3d}  train loss {total / len(xt):.4f}  val loss {val_loss:.4f}  val acc {val_acc:.4f}"
            )
            if best is None or val_loss < best[0]:
                best = (val_loss, {k: v.clone() for k, v in model.state_dict().items()}, epoch)
            elif epoch >= min_epochs and epoch - best[2] >= patience:
                console.print(f"no better validation loss for {patience} epochs: stopping")
                break
            if time_budget_s is not None and epoch < planned and time.monotonic() - t0 > 1.1 * time_budget_s:
                console.print(f"over the time budget ({time_budget_s:.0f} s): stopping after epoch {epoch}")
                break
            epoch_s.append(time.monotonic() - t_epoch)
            if time_budget_s is not None and epoch < planned:
                new = _replan(epoch_s, time.monotonic() - t0, time_budget_s, planned, epochs)
                if new != planned:
                    console.print(
                        f"{np.median(epoch_s[-5:]):.1f} s per epoch: {new} epochs instead of {planned} "
                        f"to stay within {time_budget_s:.0f} s"
                    )
                    planned = new
                    min_epochs = math.ceil(0.75 * planned)
                    bar.update(task, total=planned * steps)
    assert best is not None
    model.load_state_dict(best[1])
    lv = logits_of(xv)
    temperature = _fit_temperature(lv, yv)
    val_probs = _softmax(lv / temperature)
    test_probs = None
    if "test" in xs and len(xs["test"][0]):
        test_probs = _softmax(logits_of(tensor(xs["test"][0])) / temperature)

    # the Hall-sensor readings: p(|B| | class) fitted on train (or val when only val has them)
    field_model = None
    fusion_info: dict[str, Any] = {}
    f_train, f_val = ds["train"].fields, ds["val"].fields
    if f_train is not None or f_val is not None:
        fit_split = "train" if f_train is not None else "val"
        fit_f, fit_y, fit_a = ds[fit_split].fields, ds[fit_split].y, ds[fit_split].areas
        assert fit_f is not None
        if f_val is not None:
            field_model, eps = _fit_contamination(labels, fit_f, fit_y, fit_a, val_probs, f_val, yv, ds["val"].areas)
        else:
            from sorter.core.fusion import FieldLikelihood

            field_model, eps = FieldLikelihood.fit(labels, fit_f, fit_y, area_mm2=fit_a), None
        fusion_info = {
            "fitted_on": fit_split,
            "contamination": field_model.contamination,
            "chosen_on_val": eps,
            "size_edges_mm2": field_model.size_edges_mm2 or None,
        }
        console.print(f"field likelihood fitted on {fit_split}: {field_model!r}")

    def fused_of(split: str, probs: np.ndarray | None) -> np.ndarray | None:
        if field_model is None or probs is None or split not in ds or ds[split].fields is None:
            return None
        return fuse(probs, ds[split].fields, field_model, area_mm2=ds[split].areas)

    metrics: dict[str, Any] = {
        "labels": labels,
        "input_size": input_size,
        "arch": arch,
        "data": sources,
        "precision": "bf16" if use_bf16 else "fp32",
        "seed": seed,
        "parameters": n_params,
        "epochs_run": len(history),
        "epochs_planned": planned,
        "best_epoch": best[2],
        "train_seconds": round(time.monotonic() - t0, 1),
        "temperature": temperature,
        "history": history,
        "n_train": len(x_train),
        "fusion": fusion_info or None,
        "val": _split_report(val_probs, yv, labels, fused_of("val", val_probs)),
    }
    if test_probs is not None:
        metrics["test"] = _split_report(test_probs, xs["test"][1], labels, fused_of("test", test_probs))

    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    digest = _dataset.merged_hash(sets)
    summary: dict[str, Any] = {
        "n_train": len(x_train),
        "epochs_run": len(history),
        "best_epoch": best[2],
        "train_seconds": metrics["train_seconds"],
    }
    for split in ("val", "test"):
        if split in metrics:
            m = metrics[split]
            summary[split] = {
                "n": m["n"],
                "accuracy": round(m["accuracy"], 6),
                "ece": round(m["ece"], 6),
                "coverage_at_999": round(m["coverage_at_999"], 6),
                "fused_accuracy": round(m["fused_accuracy"], 6) if "fused_accuracy" in m else None,
                "fused_coverage_at_999": round(m["fused_coverage_at_999"], 6) if "fused_accuracy" in m else None,
                "confusion": m["confusion"],
            }
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
        "metrics": json.dumps(summary, separators=(",", ":")),
    }
    if "test" in metrics:
        meta["test_accuracy"] = f"{metrics['test']['accuracy']:.6f}"
    if field_model is not None:
        meta[META_KEY] = field_model.to_json()
        if "fused_accuracy" in metrics["val"]:
            meta["val_fused_accuracy"] = f"{metrics['val']['fused_accuracy']:.6f}"
        if "test" in metrics and "fused_accuracy" in metrics["test"]:
            meta["test_fused_accuracy"] = f"{metrics['test']['fused_accuracy']:.6f}"
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
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
    verdict = check_model(staged)  # what the line service will ask of it before swapping it in
    if not verdict.ok:
        staged.unlink()
        raise RuntimeError(f"the exported model fails its deployment check: {verdict.message}")
    staged.replace(out)
    metrics["version"] = meta["version"]
    metrics["model_bytes"] = out.stat().st_size
    metrics["train_data_hash"] = digest
    metrics["total_seconds"] = round(time.monotonic() - t_start, 1)
    if progress:
        _print_report(console, metrics)
    return metrics


def _print_report(console: Any, metrics: dict[str, Any]) -> None:
    from sorter.ml.evaluate import confusion_table

    labels = metrics["labels"]
    for split in ("val", "test"):
        if split not in metrics:
            continue
        m = metrics[split]
        fused = (
            f"; fused with field: accuracy {m['fused_accuracy']:.4f}, {m['fused_coverage_at_999']:.1%} kept at 99.9 %"
            if "fused_accuracy" in m
            else ""
        )
        title = (
            f"{split}: accuracy {m['accuracy']:.4f} (n={m['n']}), ECE {m['ece']:.4f}, "
            f"{m['confident_share']:.1%} at confidence >= {CONFIDENCE}{fused}"
        )
        table = confusion_table(title, labels, m)
        console.print(table)
    console.print(
        f"temperature {metrics['temperature']:.3f}, {metrics['epochs_run']} epochs (best {metrics['best_epoch']}) "
        f"in {metrics['train_seconds']:.0f} s, model {metrics['model_bytes']} bytes, version {metrics['version']}"
    )
