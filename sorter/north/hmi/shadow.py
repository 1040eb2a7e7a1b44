"""The HMI's view of shadow mode (docs/shadow.md): the latest pieces where the shadow model and the live one differ,
with their crops, for the model swap panel. A shadow tap fills it on the service loop; the HMI thread reads it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from sorter.core.messages import ShadowDecision

KEEP = 48  # differing pieces kept for the panel (a crop is about 10 kB): the newest, the oldest go first


class ShadowPieces:
    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self._items: OrderedDict[int, ShadowDecision] = OrderedDict()
        self._lock = threading.Lock()  # added to on the service loop, read on the HMI thread

    def add(self, decisions: list[ShadowDecision]) -> None:
        with self._lock:
            for s in decisions:
                if s.agrees:
                    continue
                self._items[s.piece_id] = s
                self._items.move_to_end(s.piece_id)
                while len(self._items) > self.keep:
                    self._items.popitem(last=False)

    def differing(self) -> list[dict[str, Any]]:
        """The kept differing pieces, newest first (without their crops: GET /api/shadow/crop/{id})."""
        with self._lock:
            items = list(self._items.values())
        return [
            {
                "piece_id": s.piece_id,
                "model": s.model,
                "live_cls": s.live_cls,
                "live_confidence": s.live_confidence,
                "cls": s.cls,
                "confidence": s.confidence,
                "has_crop": s.crop_png is not None,
            }
            for s in reversed(items)
        ]

    def crop(self, piece_id: int) -> bytes | None:
        with self._lock:
            s = self._items.get(piece_id)
        return None if s is None else s.crop_png
