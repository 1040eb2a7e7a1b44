"""Shadow mode's pure part: a candidate model's decision for a piece the live model decided, and the running
comparison of the two (docs/shadow.md).

The shadow decision uses the same piece (its cut crops), the same field reading and the same routing as the
live one; only the model's view probabilities and its own field likelihood differ, so any difference is the
model's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sorter.core.decide import decide
from sorter.core.messages import Decision, ShadowDecision

if TYPE_CHECKING:
    from sorter.config import RoutingConfig
    from sorter.core.fusion import FieldLikelihood


def shadow_decisions(
    live: Sequence[Decision],
    probs: Sequence[np.ndarray | None],
    labels: Sequence[str],
    routing: RoutingConfig,
    likelihood: FieldLikelihood | None,
    model: str,
) -> list[tuple[Decision, ShadowDecision]]:
    """Each live decision with the shadow model's decision for the same piece (`probs`: its views' probabilities
    by the shadow model, in `labels` order)."""
    out = []
    for d, pr in zip(live, probs, strict=True):
        s = decide(d.piece, pr, labels, routing, d.field, likelihood, model)
        out.append(
            (
                d,
                ShadowDecision(
                    piece_id=d.piece.id,
                    live_cls=d.cls,
                    live_fraction=d.fraction,
                    live_confidence=round(d.confidence, 6),
                    cls=s.cls,
                    fraction=s.fraction,
                    confidence=round(s.confidence, 6),
                    model=model,
                    live_model=d.model,
                ),
            )
        )
    return out


@dataclass
class ShadowSummary:
    """The running comparison: how many pieces were compared and skipped, how many agreed, live × shadow counts."""

    model: str = ""
    compared: int = 0
    skipped: int = 0
    agree: int = 0
    confusion: Counter[tuple[str, str]] = field(default_factory=Counter)  # (live class, shadow class) -> pieces
    fractions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (live fraction, shadow fraction)

    def add(self, decisions: Iterable[ShadowDecision]) -> None:
        for s in decisions:
            self.compared += 1
            self.agree += s.agrees
            self.confusion[s.live_cls, s.cls] += 1
            self.fractions[s.live_fraction, s.fraction] += 1

    def skip(self, pieces: int) -> None:
        self.skipped += pieces

    def as_dict(self) -> dict[str, Any]:
        return summary_dict(self.model, self.compared, self.skipped, self.confusion, self.fractions)


def summary_dict(
    model: str,
    compared: int,
    skipped: int,
    confusion: Counter[tuple[str, str]],
    fractions: Counter[tuple[str, str]],
) -> dict[str, Any]:
    """The comparison as JSON-ready figures: agreement overall and by live class, the confusion and the
    fraction changes as nested {live: {shadow: pieces}}."""
    agree = sum(n for (a, b), n in confusion.items() if a == b)
    by_live: Counter[str] = Counter()
    agree_by: Counter[str] = Counter()
    for (a, b), n in confusion.items():
        by_live[a] += n
        agree_by[a] += n if a == b else 0
    return {
        "model": model,
        "compared": compared,
        "skipped": skipped,
        "agree": agree,
        "agreement": round(agree / compared, 4) if compared else None,
        "by_class": {
            c: {"pieces": by_live[c], "agree": agree_by[c], "agreement": round(agree_by[c] / by_live[c], 4)}
            for c in sorted(by_live)
        },
        "confusion": _nest(confusion),
        "fraction_changes": _nest(Counter({k: n for k, n in fractions.items() if k[0] != k[1]})),
    }


def _nest(pairs: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (a, b), n in sorted(pairs.items()):
        out.setdefault(a, {})[b] = n
    return out


def accuracy(rows: Iterable[tuple[str, str, str]]) -> dict[str, Any]:
    """Both models' accuracy on pieces whose true class is known: rows of (truth, live class, shadow class)."""
    n = live = shadow = 0
    for truth, a, b in rows:
        n += 1
        live += a == truth
        shadow += b == truth
    return {
        "pieces": n,
        "live_correct": live,
        "shadow_correct": shadow,
        "live_accuracy": round(live / n, 4) if n else None,
        "shadow_accuracy": round(shadow / n, 4) if n else None,
    }
