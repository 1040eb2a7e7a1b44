"""A stand-in for the structlog logger that keeps what was logged, for tests that check the log."""

from __future__ import annotations

import threading
from typing import Any


class RecLog:
    """Keeps (level, event, fields), from any thread."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def _add(self, level: str, event: str, **kw: Any) -> None:
        with self._lock:
            self.records.append((level, event, kw))

    def debug(self, event: str, **kw: Any) -> None:
        self._add("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._add("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._add("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._add("error", event, **kw)

    def exception(self, event: str, **kw: Any) -> None:
        self._add("exception", event, **kw)

    def all_records(self) -> list[tuple[str, str, dict[str, Any]]]:
        with self._lock:
            return list(self.records)

    def find(self, event: str, **match: Any) -> list[dict[str, Any]]:
        """The fields of each record of `event` whose fields include `match`."""
        return [kw for _, e, kw in self.all_records() if e == event and all(kw.get(k) == v for k, v in match.items())]

    def text(self) -> str:
        return repr(self.all_records())
