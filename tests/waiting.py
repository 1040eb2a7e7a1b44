"""Moved to tests/conftest.py (import `wait_until` from there). This alias stays only until the last modules
that import it from here (tests/test_hmi.py, tests/test_control.py) do; then delete this file."""

from tests.conftest import wait_until

__all__ = ["wait_until"]
