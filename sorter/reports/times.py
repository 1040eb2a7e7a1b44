"""The reports' times: ISO 8601 in (`--from`, `--to`), ISO 8601 in this machine's local time out."""

from __future__ import annotations

from datetime import UTC, datetime

from sorter.reports.errors import ReportError


def parse_time(text: str, what: str) -> float:
    """ISO 8601 date or date-time (naive: this machine's local time) -> unix time."""
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(f"{what} {text!r} is not an ISO 8601 date or time (e.g. 2026-11-28T06:00)") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # local time
    return dt.timestamp()


def iso(t: float | None) -> str:
    """A unix time as ISO 8601 in local time, to the second; "-" for none."""
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).astimezone().isoformat(timespec="seconds")
