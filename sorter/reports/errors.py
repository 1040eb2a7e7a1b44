"""The reports' one exception: bad input, with a message that says what to fix."""

from __future__ import annotations


class ReportError(Exception):
    """Bad input for a report: the message says what to fix (the CLI exits 2)."""
