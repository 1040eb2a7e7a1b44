"""Per-piece decisions: fuse the class probabilities of a piece's views, then route."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sorter.config import RoutingConfig
from sorter.messages import Decision, Piece


def fuse_views(probs: np.ndarray) -> np.ndarray:
    """Combine the views of one piece: mean log-probability, renormalised.

    A geometric mean lets one confident, consistent view set dominate while a
    single view that disagrees strongly pulls the confidence down.
    """
    logp = np.log(np.clip(probs, 1e-6, 1.0)).mean(axis=0)
    p = np.exp(logp - logp.max())
    return p / p.sum()


def decide(piece: Piece, probs: np.ndarray | None, labels: Sequence[str], routing: RoutingConfig) -> Decision:
    """Route one piece; a piece with no usable view or low confidence goes to the default fraction."""
    if probs is None or len(probs) == 0:
        return Decision(piece, {}, "unknown", 0.0, routing.default_fraction)
    fused = fuse_views(probs)
    k = int(fused.argmax())
    cls, conf = labels[k], float(fused[k])
    fraction = (
        routing.classes.get(cls, routing.default_fraction)
        if conf >= routing.min_confidence
        else routing.default_fraction
    )
    return Decision(piece, {lab: float(p) for lab, p in zip(labels, fused, strict=True)}, cls, conf, fraction)
