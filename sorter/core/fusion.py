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

A small magnet reads far less than a big one of the same grade, so where the labelled
readings come with the pieces' areas (`area_mm2`), the likelihood is also kept per size
band (terciles of the fitted areas): a broken NdFeB bit reading 30 mT is then judged
among small pieces, where that is typical of NdFeB, not among all, where it looks like
ferrite. A band with too few readings of a class uses that class's overall density, and a
piece without an area is judged by the overall densities.

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
from itertools import pairwise
from typing import Any

import numpy as np

META_KEY = "field_likelihood"  # the ONNX metadata key
KIND = "log1p-kde"
U_MAX = math.log1p(3000.0)  # readings above 3 T are clamped: no permanent magnet makes more
N_BINS = 128
CONTAMINATION = 0.03  # uniform share: max likelihood ratio between classes stays finite (~ 1e2 - 1e3)
MIN_BANDWIDTH = 0.10  # in u: about 10 % of the reading, or 0.1 mT near zero
SIZE_BANDS = 3  # size bands of a size-conditioned likelihood (terciles of the fitted areas)
MIN_PER_BAND = 25  # fewer readings of a class in a band: the band uses the class's overall density
# a class's density is mixed with the flat one as if from this many readings more: three readings of a
# plant's rare class must not make a sharp peak that rules other readings out (3 readings: 23 % of their
# density, 400: 98 %)
PRIOR_READINGS = 10


class FieldModelError(ValueError):
    """A field likelihood that cannot be built or read (bad JSON, wrong shapes, bad numbers)."""


def _grid(u_max: float, bins: int) -> np.ndarray:
    """Bin centres in u."""
    return (np.arange(bins) + 0.5) * (u_max / bins)


def _shrunk(density: np.ndarray, n: int, u_max: float) -> np.ndarray:
    """A density from `n` readings, mixed with the flat one by PRIOR_READINGS / (n + PRIOR_READINGS)."""
    w = n / (n + PRIOR_READINGS)
    return w * density + (1 - w) / u_max


def _kde(v: np.ndarray, centres: np.ndarray, u_max: float, min_bandwidth: float) -> tuple[np.ndarray, float]:
    """Gaussian kernel density of readings `v` (mT) in u = log1p(|B|) at `centres`, reflected at u = 0, with
    Silverman's bandwidth (at least `min_bandwidth`); returns (density, bandwidth)."""
    u = np.minimum(np.log1p(np.abs(v)), u_max)
    sd = float(u.std())
    iqr = float(np.subtract(*np.percentile(u, [75, 25]))) / 1.349
    spread = min(sd, iqr) if iqr > 0 else sd
    bw = max(min_bandwidth, 0.9 * spread * v.size ** (-0.2))
    # reflection at 0 keeps the mass of near-zero readings (steel, other) inside the grid
    pts = np.concatenate([u, -u])
    k = np.exp(-0.5 * ((centres[:, None] - pts[None, :]) / bw) ** 2).sum(axis=1)
    return k / (v.size * bw * math.sqrt(2 * math.pi)), bw


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
        size_edges_mm2: Sequence[float] = (),
        density_by_size: np.ndarray | None = None,
    ) -> None:
        """`density`: (n_classes, bins) probability density in u at the bin centres, before contamination.
        `size_edges_mm2` (increasing) and `density_by_size` (len(edges) + 1, n_classes, bins): the same per
        size band, band k holding areas in [edges[k - 1], edges[k]); none: not conditioned on size."""
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
        edges = [float(e) for e in size_edges_mm2]
        by_size = np.asarray(density_by_size, np.float64) if density_by_size is not None else None
        if edges or by_size is not None:
            if by_size is None or by_size.shape != (len(edges) + 1, *dens.shape):
                got = None if by_size is None else by_size.shape
                raise FieldModelError(f"density_by_size must be ({len(edges) + 1}, {dens.shape}), got {got}")
            if not edges or not all(math.isfinite(e) for e in edges) or any(b <= a for a, b in pairwise(edges)):
                raise FieldModelError(f"size_edges_mm2 must be finite and increasing, got {edges}")
            if not np.all(np.isfinite(by_size)) or np.any(by_size < 0):
                raise FieldModelError("density_by_size must be finite and >= 0")

        def normalised(d: np.ndarray) -> np.ndarray:
            """Each class's density integrates to 1 over [0, u_max] (flat where none was given)."""
            mass = d.sum(axis=-1, keepdims=True) * (u_max / d.shape[-1])
            return np.where(mass > 0, d / np.where(mass > 0, mass, 1.0), np.full_like(d, 1.0 / u_max))

        dens = normalised(dens)
        self._labels = tuple(labels)
        self._u_max = float(u_max)
        self._contamination = float(contamination)
        self._raw = dens
        self._density = (1.0 - contamination) * dens + contamination / u_max
        self._log_density = np.log(self._density)
        self._edges = edges
        self._raw_by_size = normalised(by_size) if by_size is not None else None
        self._log_density_by_size = (
            np.log((1.0 - contamination) * self._raw_by_size + contamination / u_max)
            if self._raw_by_size is not None
            else None
        )
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
        area_mm2: np.ndarray | Sequence[float] | None = None,
        size_bands: int = SIZE_BANDS,
        min_per_band: int = MIN_PER_BAND,
    ) -> FieldLikelihood:
        """Fit from labelled readings: `field_mT[i]` (signed or not; NaN: none) of a piece of class `labels[y[i]]`.

        Per class: Gaussian kernel density in u = log1p(|B|) with Silverman's bandwidth (at least
        `min_bandwidth`), reflected at u = 0, mixed with the flat density as if from PRIOR_READINGS readings
        more (few readings, a broad density); classes without readings get the flat density. With the
        pieces' areas (`area_mm2[i]`, NaN: unknown), also per size band: `size_bands` bands of equal
        counts, a class with fewer than `min_per_band` readings in a band using its overall density there.
        """
        f = np.asarray(field_mT, np.float64).ravel()
        yy = np.asarray(y).ravel()
        if f.shape != yy.shape:
            raise FieldModelError(f"{f.size} readings but {yy.size} labels")
        areas = np.asarray(area_mm2, np.float64).ravel() if area_mm2 is not None else np.full(f.shape, np.nan)
        if areas.shape != f.shape:
            raise FieldModelError(f"{f.size} readings but {areas.size} areas")
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
            dens[c], bw = _kde(v, centres, u_max, min_bandwidth)
            dens[c] = _shrunk(dens[c], v.size, u_max)
            bws.append(round(bw, 6))
            medians.append(round(float(np.median(np.abs(v))), 3))
        edges: list[float] = []
        by_size = None
        sized = np.isfinite(f) & np.isfinite(areas) & (areas > 0)
        if size_bands > 1 and sized.sum() >= size_bands * min_per_band:
            qs = np.quantile(areas[sized], np.arange(1, size_bands) / size_bands)
            edges = sorted({round(float(q), 3) for q in qs})
            band = np.digitize(areas, edges)
            by_size = np.repeat(dens[None], len(edges) + 1, axis=0)
            for b in range(len(edges) + 1):
                for c in range(len(labels)):
                    v = f[sized & (band == b) & (yy == c)]
                    if v.size >= min_per_band:
                        by_size[b, c] = _shrunk(_kde(v, centres, u_max, min_bandwidth)[0], v.size, u_max)
        return cls(
            labels,
            dens,
            u_max=u_max,
            contamination=contamination,
            counts=counts,
            bandwidth=bws,
            medians_mT=medians,
            size_edges_mm2=edges,
            density_by_size=by_size,
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

    @property
    def size_edges_mm2(self) -> list[float]:
        """Edges of the size bands (mm²); empty when the likelihood is not conditioned on size."""
        return list(self._edges)

    def log_likelihood(
        self,
        field_mT: float | Sequence[float | None] | np.ndarray | None,
        area_mm2: float | Sequence[float | None] | np.ndarray | None = None,
    ) -> np.ndarray:
        """log p(|B| | class[, size]): (n_classes,) for one reading, (N, n_classes) for a sequence.

        The sign is ignored (the bar reports the signed field; polarity says nothing about the
        material). A missing reading (None/NaN) gives zeros: no evidence. `area_mm2` (one per
        reading, or one for all) picks the size band where the likelihood has them; a missing
        area (None/NaN) uses the overall densities.
        """
        f, scalar = _as_fields(field_mT)
        out = np.zeros((f.size, len(self._labels)))
        ok = np.isfinite(f)
        if not ok.any():
            return out[0] if scalar else out
        u = np.clip(np.log1p(np.abs(f)), 0.0, self._u_max)
        band = np.full(f.size, -1)
        if self._log_density_by_size is not None and area_mm2 is not None:
            a, _ = _as_fields(area_mm2)
            if a.size == 1 and f.size != 1:
                a = np.full(f.size, a[0])
            if a.size != f.size:
                raise ValueError(f"{a.size} areas for {f.size} field readings")
            known = np.isfinite(a) & (a > 0)
            band[known] = np.digitize(a[known], self._edges)
        for b in np.unique(band[ok]):
            rows = ok & (band == b)
            table = self._log_density if b < 0 else self._log_density_by_size[b]  # type: ignore[index]
            out[rows] = np.stack([np.interp(u[rows], self._centres, ld) for ld in table], axis=1)
        return out[0] if scalar else out

    def likelihood(
        self,
        field_mT: float | Sequence[float | None] | np.ndarray | None,
        area_mm2: float | Sequence[float | None] | np.ndarray | None = None,
    ) -> np.ndarray:
        return np.exp(self.log_likelihood(field_mT, area_mm2))

    def max_log_ratio(self) -> float:
        """The most any one reading can shift the log-odds between two classes."""
        tables = [self._log_density] + (
            list(self._log_density_by_size) if self._log_density_by_size is not None else []
        )
        return max(float((t.max(axis=1)[:, None] - t.min(axis=1)[None, :]).max()) for t in tables)

    def reordered(self, labels: Sequence[str]) -> FieldLikelihood:
        """The same likelihood with its classes in the order of `labels` (flat for classes it does not know)."""
        idx = {c: i for i, c in enumerate(self._labels)}
        flat = np.full(self._raw.shape[1], 1.0 / self._u_max)
        dens = np.stack([self._raw[idx[c]] if c in idx else flat for c in labels])
        by_size = (
            np.stack([np.stack([band[idx[c]] if c in idx else flat for c in labels]) for band in self._raw_by_size])
            if self._raw_by_size is not None
            else None
        )

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
            size_edges_mm2=self._edges,
            density_by_size=by_size,
        )

    # --- serialisation (the model's metadata) ---

    def to_json(self) -> str:
        def rows(table: np.ndarray) -> list[list[float]]:
            return [[float(f"{v:.6g}") for v in row] for row in table]

        d: dict[str, Any] = {
            "kind": KIND,
            "version": 1,
            "space": "u = log1p(|B| / mT), density at bin centres (k + 0.5) * u_max / bins",
            "labels": list(self._labels),
            "u_max": self._u_max,
            "contamination": self._contamination,
            "counts": self._counts,
            "bandwidth": self._bandwidth,
            "median_mT": self._medians,
            "density": rows(self._raw),
        }
        if self._raw_by_size is not None:  # readers of version 1 use "density" and ignore these
            d["version"] = 2
            d["size_edges_mm2"] = self._edges
            d["density_by_size"] = [rows(band) for band in self._raw_by_size]
        return json.dumps(d, separators=(",", ":"))

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
                size_edges_mm2=d.get("size_edges_mm2") or (),
                density_by_size=np.asarray(d["density_by_size"], np.float64) if "density_by_size" in d else None,
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
        sizes = f"; by size, edges {self._edges} mm²" if self._edges else ""
        return f"FieldLikelihood({parts}{sizes})"


def fuse(
    image_probs: np.ndarray,
    field_mT: float | Sequence[float | None] | np.ndarray | None,
    likelihood: FieldLikelihood | None,
    labels: Sequence[str] | None = None,
    area_mm2: float | Sequence[float | None] | np.ndarray | None = None,
) -> np.ndarray:
    """Posterior class probabilities from the image's and one field reading per piece.

    Args:
        image_probs: (C,) or (N, C) calibrated image probabilities.
        field_mT: the reading of each piece (scalar for (C,), one per row for (N, C)); None/NaN = no reading.
        likelihood: p(|B| | class), classes in the order of the probabilities' columns,
            unless `labels` names that order (then it is reordered to match); None: no fusion
            (a model without field likelihood), the probabilities are returned unchanged.
        labels: the classes of the probabilities' columns, when they may differ from `likelihood.labels`.
        area_mm2: each piece's area (mm²; None/NaN: unknown), for a likelihood conditioned on size.

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
    ll = likelihood.log_likelihood(f, area_mm2)
    w = rows * np.exp(ll - ll.max(axis=1, keepdims=True))
    total = w.sum(axis=1, keepdims=True)
    post = w / np.where(total > 0, total, 1.0)
    out = np.where((np.isfinite(f) & (total[:, 0] > 0))[:, None], post, rows)
    return out[0] if single else out
