"""Per-piece decisions: fuse the class probabilities of a piece's views, then the
Hall-sensor bar's field where there is one, then route.

A piece decided on the camera alone although the line has a bar (bar offline, or
no complete reading for that piece) is held to the stricter fallback threshold:
the field is what separates black-epoxy NdFeB from ferrite and plated NdFeB from
steel, so without it only very confident pieces may go into a product.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from sorter.core.fusion import FieldLikelihood, fuse
from sorter.core.messages import NO_BAR, Decision, FieldReading, Piece

if TYPE_CHECKING:
    from sorter.config import RoutingConfig


def fuse_views(probs: np.ndarray) -> np.ndarray:
    """Combine the views of one piece: mean log-probability, renormalised.

    A geometric mean lets one confident, consistent view set dominate while a
    single view that disagrees strongly pulls the confidence down.
    """
    logp = np.log(np.clip(probs, 1e-6, 1.0)).mean(axis=0)
    p = np.exp(logp - logp.max())
    return p / p.sum()


def threshold_for(reading: FieldReading, routing: RoutingConfig, fused_with_field: bool) -> float:
    if fused_with_field or reading.state == "no_bar":
        return routing.min_confidence
    return max(routing.min_confidence, routing.fallback_min_confidence)


def decide(
    piece: Piece,
    probs: np.ndarray | None,
    labels: Sequence[str],
    routing: RoutingConfig,
    reading: FieldReading = NO_BAR,
    likelihood: FieldLikelihood | None = None,
    model: str = "",
) -> Decision:
    """Route one piece; a piece with no usable view or too low a confidence goes to the default fraction."""
    if probs is None or len(probs) == 0:
        return Decision(piece, {}, "unknown", 0.0, routing.default_fraction, field=reading, model=model)
    image = fuse_views(probs)
    use_field = reading.state == "ok" and reading.field_mT is not None and likelihood is not None
    final = fuse(image, reading.field_mT, likelihood, area_mm2=piece.area_mm2) if use_field else image
    threshold = threshold_for(reading, routing, use_field)
    k = int(final.argmax())
    cls, conf = labels[k], float(final[k])
    fraction = routing.classes.get(cls, routing.default_fraction) if conf >= threshold else routing.default_fraction
    return Decision(
        piece,
        {lab: float(p) for lab, p in zip(labels, final, strict=True)},
        cls,
        conf,
        fraction,
        image_probs={lab: float(p) for lab, p in zip(labels, image, strict=True)},
        field=reading,
        threshold=threshold,
        model=model,
    )
