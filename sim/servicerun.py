"""Run the line service (`sorter ...`) with a wall clock that a fault run can step: `python -m sim.servicerun`.

    python -m sim.servicerun --wall-clock-file F -- run --config run/config.yaml

The service is the product's own command line (`sorter.cli`, the very code `sorter run` runs); the
only thing added is the wall clock it sees: `time.time()` returns the real time plus the offset in
seconds written in F (a number such as `+3600`), re-read every 0.1 s on a thread. A fault run steps
the wall clock of this one process that way, as NTP or an operator setting the time would, without
touching the clock of the machine (shared with other processes) and without a hook in the product.
Monotonic time is not touched, as a wall-clock step never touches it.

Why not libfaketime (Debian's `libfaketime`)? With its wall-clock-only mode
(FAKETIME_DONT_FAKE_MONOTONIC=1) version 0.9.10 makes Python 3.11's `time.sleep` fail with EINVAL
(it intercepts clock_nanosleep on the monotonic clock), so the service could not run under it.
What this does not step: C-level wall-clock reads (`datetime.now()`, SQLite's own `now`); the
product reads the wall clock only through `time.time()` for record and alarm timestamps
(tests/test_faults.py checks that nothing else in `sorter/` reads it).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

POLL_S = 0.1


class SteppableWallClock:
    """time.time() + an offset read from a file; installed over time.time for the whole process."""

    def __init__(self, path: Path, real: object = time.time) -> None:
        self.path = path
        self._real = real
        self.offset = 0.0
        self._stop = threading.Event()

    def __call__(self) -> float:
        return float(self._real()) + self.offset  # type: ignore[operator]

    def read(self) -> None:
        """Take the offset from the file; a missing, empty or unreadable file leaves it as it is."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return
        if text:
            try:
                self.offset = float(text)
            except ValueError:
                print(f"servicerun: {self.path}: not a number of seconds: {text[:40]!r}", file=sys.stderr)

    def watch(self) -> None:
        while not self._stop.wait(POLL_S):
            self.read()


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--wall-clock-file" or argv[2] != "--":
        raise SystemExit("usage: python -m sim.servicerun --wall-clock-file FILE -- <sorter arguments>")
    clock = SteppableWallClock(Path(argv[1]))
    clock.read()
    time.time = clock  # type: ignore[assignment]
    threading.Thread(target=clock.watch, name="wall-clock-file", daemon=True).start()
    from sorter.cli import app

    app(argv[3:], prog_name="sorter")


if __name__ == "__main__":
    main(sys.argv[1:])
