"""Fusion of the image classifier's probabilities with the Hall-sensor bar's field reading.

The bar gives one number per piece: the peak |B| (mT) a sensor saw as the piece passed.
NdFeB and SmCo read strong, ferrite weak, steel a few mT, non-magnetic scrap nothing —
but a small magnet between two sensors reads less, a thermally demagnetised NdFeB reads
about nothing, and a strong neighbour can add its field to a weak piece's reading.

`FieldLikelihood` holds p(|B| | class) per class, learnt from labelled readings (the
`sensors.csv` of a dataset) as a kernel density on a fixed grid in u = log1p(|B| / 1 mT)
(so 1 mT and 300 mT are resolved alike), mixed with a uniform share (`contamination`):
no reading, however odd, can make a class impossible, it can only make it less likely
by a bounded factor. Classes without readings get the flat density.

`fuse` combines it with the image: posterior ∝ image probability × likelihood (image and
field taken as independent given the class); a missing reading (None/NaN) leaves the
image's probabilities as they are.

Only numpy: the line service uses this at run time (the likelihood travels in the
ONNX model's metadata, key `field_likelihood`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

META_KEY = "field_likelihood"  # the ONNX metadata key
KIND = "log1p-kde"
U_MAX = math.log1p(3000.0)  # readings above 3 T are clamped: no permanent magnet makes more
N_BINS = 128
CONTAMINATION = 0.03  # uniform share: max likelihood ratio between classes stays finite (~ 1e2 - 1e3)
MIN_BANDWIDTH = 0.10  # in u: about 10 % of the reading, or 0.1 mT near zero


class FieldModelError(ValueError):
    """A field likelihood that cannot be built or read (bad JSON, wrong shapes, bad numbers)."""


def _grid(u_max: float, bins: int) -> np.ndarray:
    """Bin centres in u."""
    return (np.arange(bins) + 0.5) * (u_max / bins)


def _as_fields(field_mT: float | Sequence[float | None] | np.ndarray | None) -> tuple[np.ndarray, bool]:
    """Readings as a float64 array (None -> NaN) and whether the input was a scalar."""
    if field_mT is None:
        return np.array([np.nan]), True
    if isinstance(field_mT, int | float | np.number) or (isinstance(field_mT, np.ndarray) and field_mT.ndim == 0):
        return np.array([float(field_mT)]), True
    if isinstance(field_mT, np.ndarray) and field_mT.dtype.kind in "fiu":
        return field_mT.astype(np.float64).ravel(), False
    arr = np.asarray([np.nan if v is None else v for v in np.asarray(field_mT, dtype=object).ravel()], np.float64)
    return arr, False


class FieldLikelihood:
    """p(|B| | class) for each class, in the order of `labels`."""

    def __init__(
        self,
        labels: Sequence[str],
        density: np.ndarray,
        *,
        u_max: float = U_MAX,
        contamination: float = CONTAMINATION,
        counts: Sequence[int] | None = None,
        bandwidth: Sequence[float | None] | None = None,
        medians_mT: Sequence[float | None] | None = None,
    ) -> None:
        """`density`: (n_classes, bins) probability density in u at the bin centres, before contamination."""
        labels = [str(s) for s in labels]
        dens = np.asarray(density, np.float64)
        if not labels or len(set(labels)) != len(labels):
            raise FieldModelError(f"labels must be distinct class names, got {labels}")
        if dens.ndim != 2 or dens.shape[0] != len(labels) or dens.shape[1] < 2:
            raise FieldModelError(f"density must be ({len(labels)}, bins >= 2), got shape {dens.shape}")
        if not np.all(np.isfinite(dens)) or np.any(dens < 0):
            raise FieldModelError("density must be finite and >= 0")
        if not (math.isfinite(u_max) and u_max > 0):
            raise FieldModelError(f"u_max must be positive, got {u_max}")
        if not (0 < contamination <= 1):
            raise FieldModelError(f"contamination must be in (0, 1], got {contamination}")
        # each class's density integrates to 1 over [0, u_max]: renormalise what was given
        du = u_max / dens.shape[1]
        mass = dens.sum(axis=1, keepdims=True) * du
        flat = np.full_like(dens, 1.0 / u_max)
        dens = np.where(mass > 0, dens / np.where(mass > 0, mass, 1.0), flat)
        self._labels = tuple(labels)
        self._u_max = float(u_max)
        self._contamination = float(contamination)
        self._raw = dens
        self._density = (1.0 - contamination) * dens + contamination / u_max
        self._log_density = np.log(self._density)
        self._centres = _grid(u_max, dens.shape[1])
        n = len(labels)
        self._counts = [int(c) for c in counts] if counts is not None else [0] * n
        self._bandwidth = list(bandwidth) if bandwidth is not None else [None] * n
        self._medians = list(medians_mT) if medians_mT is not None else [None] * n
        if len(self._counts) != n or len(self._bandwidth) != n or len(self._medians) != n:
            raise FieldModelError("counts, bandwidth and medians_mT need one entry per class")

    # --- fitting ---

    @classmethod
    def fit(
        cls,
        labels: Sequence[str],
        field_mT: np.ndarray | Sequence[float],
        y: np.ndarray | Sequence[int],
        *,
        bins: int = N_BINS,
        u_max: float = U_MAX,
        contamination: float = CONTAMINATION,
        min_bandwidth: float = MIN_BANDWIDTH,
    ) -> FieldLikelihood:
        """Fit from labelled readings: `field_mT[i]` (signed or not; NaN: none) of a piece of class `labels[y[i]]`.

        Per class: Gaussian kernel density in u = log1p(|B|) with Silverman's bandwidth (at least
        `min_bandwidth`), reflected at u = 0; classes without readings get the flat density.
        """
        f = np.asarray(field_mT, np.float64).ravel()
        yy = np.asarray(y).ravel()
        if f.shape != yy.shape:
            raise FieldModelError(f"{f.size} readings but {yy.size} labels")
        if yy.size and (yy.min() < 0 or yy.max() >= len(labels)):
            raise FieldModelError(f"class indices must be in 0..{len(labels) - 1}")
        if bins < 2:
            raise FieldModelError("need at least 2 bins")
        centres = _grid(u_max, bins)
        dens = np.zeros((len(labels), bins))
        counts: list[int] = []
        bws: list[float | None] = []
        medians: list[float | None] = []
        for c in range(len(labels)):
            v = f[(yy == c) & np.isfinite(f)]
            counts.append(int(v.size))
            if v.size == 0:
                dens[c] = 1.0 / u_max
                bws.append(None)
                medians.append(None)
                continue
            u = np.minimum(np.log1p(np.abs(v)), u_max)
            sd = float(u.std())
            iqr = float(np.subtract(*np.percentile(u, [75, 25]))) / 1.349
            spread = min(sd, iqr) if iqr > 0 else sd
            bw = max(min_bandwidth, 0.9 * spread * v.size ** (-0.2))
            # reflection at 0 keeps the mass of near-zero readings (steel, other) inside the grid
            pts = np.concatenate([u, -u])
            k = np.exp(-0.5 * ((centres[:, None] - pts[None, :]) / bw) ** 2).sum(axis=1)
            dens[c] = k / (v.size * bw * math.sqrt(2 * math.pi))
            bws.append(round(bw, 6))
            medians.append(round(float(np.median(np.abs(v))), 3))
        return cls(
            labels,
            dens,
            u_max=u_max,
            contamination=contamination,
            counts=counts,
            bandwidth=bws,
            medians_mT=medians,
        )

    # --- use ---

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    @property
    def contamination(self) -> float:
        return self._contamination

    @property
    def counts(self) -> list[int]:
        """Readings per class the likelihood was fitted on (0: flat)."""
        return list(self._counts)

    @property
    def medians_mT(self) -> list[float | None]:
        return list(self._medians)

    def log_likelihood(self, field_mT: float | Sequence[float | None] | np.ndarray | None) -> np.ndarray:
        """log p(|B| | class): (n_classes,) for one reading, (N, n_classes) for a sequence.

        The sign is ignored (the bar reports the signed field; polarity says nothing about the
        material). A missing reading (None/NaN) gives zeros: no evidence.
        """
        f, scalar = _as_fields(field_mT)
        out = np.zeros((f.size, len(self._labels)))
        ok = np.isfinite(f)
        if ok.any():
            u = np.clip(np.log1p(np.abs(f[ok])), 0.0, self._u_max)
            out[ok] = np.stack([np.interp(u, self._centres, ld) for ld in self._log_density], axis=1)
        return out[0] if scalar else out

    def likelihood(self, field_mT: float | Sequence[float | None] | np.ndarray | None) -> np.ndarray:
        return np.exp(self.log_likelihood(field_mT))

    def max_log_ratio(self) -> float:
        """The most any one reading can shift the log-odds between two classes."""
        return float((self._log_density.max(axis=1)[:, None] - self._log_density.min(axis=1)[None, :]).max())

    def reordered(self, labels: Sequence[str]) -> FieldLikelihood:
        """The same likelihood with its classes in the order of `labels` (flat for classes it does not know)."""
        idx = {c: i for i, c in enumerate(self._labels)}
        flat = np.full(self._raw.shape[1], 1.0 / self._u_max)
        dens = np.stack([self._raw[idx[c]] if c in idx else flat for c in labels])

        def pick(vals: list[Any], default: Any) -> list[Any]:
            return [vals[idx[c]] if c in idx else default for c in labels]

        return FieldLikelihood(
            labels,
            dens,
            u_max=self._u_max,
            contamination=self._contamination,
            counts=pick(self._counts, 0),
            bandwidth=pick(self._bandwidth, None),
            medians_mT=pick(self._medians, None),
        )

    # --- serialisation (the model's metadata) ---

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": KIND,
                "version": 1,
                "space": "u = log1p(|B| / mT), density at bin centres (k + 0.5) * u_max / bins",
                "labels": list(self._labels),
                "u_max": self._u_max,
                "contamination": self._contamination,
                "counts": self._counts,
                "bandwidth": self._bandwidth,
                "median_mT": self._medians,
                "density": [[float(f"{v:.6g}") for v in row] for row in self._raw],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> FieldLikelihood:
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise FieldModelError(f"field likelihood is not valid JSON ({exc})") from exc
        if not isinstance(d, dict) or d.get("kind") != KIND:
            kind = d.get("kind") if isinstance(d, dict) else type(d).__name__
            raise FieldModelError(f"field likelihood of unknown kind {kind!r} (expected {KIND!r})")
        try:
            return cls(
                d["labels"],
                np.asarray(d["density"], np.float64),
                u_max=float(d["u_max"]),
                contamination=float(d["contamination"]),
                counts=d.get("counts"),
                bandwidth=d.get("bandwidth"),
                medians_mT=d.get("median_mT"),
            )
        except KeyError as exc:
            raise FieldModelError(f"field likelihood lacks {exc}") from exc
        except (TypeError, ValueError) as exc:
            if isinstance(exc, FieldModelError):
                raise
            raise FieldModelError(f"malformed field likelihood ({exc})") from exc

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{c}: n={n}" + (f" median {m:g} mT" if m is not None else " flat")
            for c, n, m in zip(self._labels, self._counts, self._medians, strict=True)
        )
        return f"FieldLikelihood({parts})"


def fuse(
    image_probs: np.ndarray,
    field_mT: float | Sequence[float | None] | np.ndarray | None,
    likelihood: FieldLikelihood | None,
    labels: Sequence[str] | None = None,
) -> np.ndarray:
    """Posterior class probabilities from the image's and one field reading per piece.

    Args:
        image_probs: (C,) or (N, C) calibrated image probabilities.
        field_mT: the reading of each piece (scalar for (C,), one per row for (N, C)); None/NaN = no reading.
        likelihood: p(|B| | class), classes in the order of the probabilities' columns,
            unless `labels` names that order (then it is reordered to match); None: no fusion
            (a model without field likelihood), the probabilities are returned unchanged.
        labels: the classes of the probabilities' columns, when they may differ from `likelihood.labels`.

    Returns:
        Probabilities of the same shape; rows without a reading are returned unchanged.
    """
    p = np.asarray(image_probs, np.float64)
    if p.ndim not in (1, 2):
        raise ValueError(f"image_probs must be (C,) or (N, C), got shape {p.shape}")
    if likelihood is None:
        return p
    if labels is not None and tuple(labels) != likelihood.labels:
        likelihood = likelihood.reordered(labels)
    single = p.ndim == 1
    rows = p[None, :] if single else p
    if rows.shape[1] != len(likelihood.labels):
        raise ValueError(f"{rows.shape[1]} probability columns but the likelihood has {len(likelihood.labels)} classes")
    f, _ = _as_fields(field_mT)
    if f.size == 1 and rows.shape[0] != 1:
        f = np.full(rows.shape[0], f[0])
    if f.size != rows.shape[0]:
        raise ValueError(f"{f.size} field readings for {rows.shape[0]} rows of probabilities")
    ll = likelihood.log_likelihood(f)
    w = rows * np.exp(ll - ll.max(axis=1, keepdims=True))
    total = w.sum(axis=1, keepdims=True)
    post = w / np.where(total > 0, total, 1.0)
    out = np.where((np.isfinite(f) & (total[:, 0] > 0))[:, None], post, rows)
    return out[0] if single else out
