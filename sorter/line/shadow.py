"""Shadow mode on the running line: a candidate model decides each batch the live model decided, on its own
thread, and its decisions are handed to the shadow taps (records, HMI) — never to the planner (docs/shadow.md).

It must never delay a live decision, so it gets what the live path leaves: one worker thread at a lower OS
priority than the line's threads (nice +10; the time-critical ones may be real-time), fed by a bounded queue
of whole batches. When `max_pending` batches are already waiting or running, a new batch is skipped whole and
its pieces counted (`skipped`): under load the shadow compares a subset of the pieces, never a backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from sorter.core.messages import Decision, ShadowDecision
from sorter.core.shadow import ShadowSummary, shadow_decisions

if TYPE_CHECKING:
    from sorter.config import RoutingConfig
    from sorter.vision.classify import Classifier

MAX_PENDING = 2  # batches waiting or running on the shadow thread; beyond: skipped whole
SHADOW_NICE = 10  # the shadow thread's niceness increment: the line's own work comes first


def _lower_priority() -> None:
    # best effort: on Linux a thread's niceness is its own (setpriority on its thread id)
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICE)


def shadow_thread(name: str) -> Executor:
    """The shadow model's one worker: normal policy (never real-time: priority.enter is not called), nice +10."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_lower_priority)


def _png(piece_crops: list[Any]) -> bytes | None:
    for c in piece_crops:
        if isinstance(c, np.ndarray) and c.size:
            ok, buf = cv2.imencode(".png", c)
            return buf.tobytes() if ok else None
    return None


class ShadowRunner:
    """One shadow model at work: `offer()` each batch of live decisions (on the loop), results to `taps` (on the
    loop, in batch order)."""

    def __init__(
        self,
        classifier: Classifier,
        executor: Executor,
        taps: list[Callable[[list[ShadowDecision]], None]],
        *,
        max_pending: int = MAX_PENDING,
        on_error: Callable[[BaseException], None] | None = None,
        on_time: Callable[[str, float], None] | None = None,
    ) -> None:
        self.classifier = classifier
        self.version = classifier.version
        self.path = getattr(classifier, "path", None)
        self._executor = executor
        self._taps = taps
        self.max_pending = max_pending
        self._on_error = on_error
        self._on_time = on_time  # the shadow's own work per batch (stage `shadow`: its cost, in the stage times)
        self._pending: set[asyncio.Future[list[ShadowDecision]]] = set()
        self.summary = ShadowSummary(model=classifier.version)
        self.failed = 0  # batches whose shadow classification raised (counted, the line goes on)

    def offer(self, decisions: list[Decision], routing: RoutingConfig) -> None:
        """Hand one batch of live decisions (pieces with their cut crops) to the shadow thread, or skip it."""
        if not decisions:
            return
        if len(self._pending) >= self.max_pending:
            self.summary.skip(len(decisions))
            return
        fut = asyncio.wrap_future(self._executor.submit(self._run, decisions, routing))
        self._pending.add(fut)
        fut.add_done_callback(self._done)

    def _run(self, decisions: list[Decision], routing: RoutingConfig) -> list[ShadowDecision]:
        """On the shadow thread: the same crops through the shadow model, fused with the same field readings."""
        t0 = time.perf_counter()
        clf = self.classifier
        crops = [c for d in decisions for c in d.piece.crops if isinstance(c, np.ndarray)]
        probs = clf.predict(crops) if crops else np.zeros((0, len(clf.labels)))
        per: list[np.ndarray | None] = []
        i = 0
        for d in decisions:
            n = sum(isinstance(c, np.ndarray) for c in d.piece.crops)
            per.append(probs[i : i + n] if n else None)
            i += n
        out = []
        for live, s in shadow_decisions(decisions, per, clf.labels, routing, clf.field_model, clf.version):
            if not s.agrees:  # the crop only where they differ: what a technician looks at
                s = replace(s, crop_png=_png(list(live.piece.crops)))
            out.append(s)
        if self._on_time is not None:
            self._on_time("shadow", time.perf_counter() - t0)
        return out

    def _done(self, fut: asyncio.Future[list[ShadowDecision]]) -> None:
        self._pending.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self.failed += 1
            if self._on_error is not None:
                self._on_error(exc)
            return
        result = fut.result()
        self.summary.add(result)
        for tap in self._taps:
            try:
                tap(result)
            except Exception as e:  # a broken subscriber must not stop the comparison
                if self._on_error is not None:
                    self._on_error(e)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def drain(self) -> None:
        """Wait for the batches handed over (at shutdown or a stop: their results still reach the taps)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
            await asyncio.sleep(0)  # the done callbacks run

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def stats(self) -> dict[str, Any]:
        return self.summary.as_dict() | {"failed": self.failed, "pending": self.pending}

    def brief(self) -> dict[str, Any]:
        """The comparison in four figures (events, the log)."""
        s = self.summary
        return {"model": s.model, "compared": s.compared, "skipped": s.skipped, "agreement": s.as_dict()["agreement"]}


def check_labels(shadow: Classifier, live: Classifier) -> None:
    """A shadow model must have the live model's classes, in its order: its decisions are compared class by class
    (ModelError naming both otherwise)."""
    if tuple(shadow.labels) != tuple(live.labels):
        from sorter.vision.classify import ModelError

        raise ModelError(
            f"shadow model {getattr(shadow, 'path', '?')} (version {shadow.version}) has classes "
            f"{list(shadow.labels)}, the live model {getattr(live, 'path', '?')} (version {live.version}) has "
            f"{list(live.labels)}: a shadow model must have the live model's classes in the same order"
        )
