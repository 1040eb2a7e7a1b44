"""The HMI's model comparison before a swap: the new model against the running one on the latest clip.

`sorter replay CLIP --compare RUNNING.onnx NEW.onnx --json` (sorter/replay.py) runs in a child process at
the lowest OS priority (`nice -n 19`): a replay is CPU-heavy for as long as it takes, and the line's
service, at its normal (or real-time) priority, keeps the cores it needs to sort meanwhile. One
comparison at a time; the result (compare.json, compare.html) goes into the clip's folder, where
`sorter replay` puts it too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sorter.line.recording import FORMAT, RecordingError
from sorter.line.recording import Recording as _Recording

NICE = 19  # the lowest priority: the line's own threads always come first
TIMEOUT_S = 1800.0  # a comparison that runs longer is stopped (a clip of hours: compare it with `sorter replay`)


def latest_clip(folder: Path) -> Path | None:
    """The newest complete clip under `folder` (records.recordings_dir): a closed recording of level frames."""
    best: tuple[float, Path] | None = None
    if not folder.is_dir():
        return None
    for d in folder.iterdir():
        m = d / "manifest.json"
        if not m.is_file():
            continue
        try:
            man = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        if man.get("format") != FORMAT or man.get("level") != "frames" or man.get("state") != "closed":
            continue
        if not (man.get("counts") or {}).get("frames"):
            continue
        t = float(man.get("started_wall") or 0)
        if best is None or t > best[0]:
            best = (t, d)
    return None if best is None else best[1]


def compare_command(clip: Path, running: Path, new: Path, out: Path) -> list[str]:
    """The child's command line: the product's own `sorter replay --compare`, at the lowest priority."""
    cmd = [sys.executable, "-m", "sorter", "replay", str(clip), "--compare", str(running), str(new)]
    cmd += ["--json", "--out", str(out)]
    nice = shutil.which("nice")
    return [nice, "-n", str(NICE), *cmd] if nice else cmd


@dataclass
class CompareJob:
    """One comparison: started by a technician, running, then done (its result) or failed (why)."""

    id: str
    user: str
    clip: Path
    running: Path  # the model the line runs (A)
    new: Path  # the model it would swap to (B)
    out: Path
    state: str = "running"  # running | done | failed | cancelled
    error: str | None = None
    result: dict[str, Any] | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    proc: subprocess.Popen[bytes] | None = None

    def summary(self) -> dict[str, Any]:
        """What the page shows: per fraction counts and estimated purity A -> B, the decisions that change."""
        out: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "user": self.user,
            "clip": self.clip.name,
            "running": str(self.running),
            "new": str(self.new),
            "error": self.error,
            "elapsed_s": round((self.finished or time.monotonic()) - self.started, 1),
        }
        r = self.result
        if r is not None:
            out |= {
                "model_a": r.get("model_a"),
                "model_b": r.get("model_b"),
                "pieces_a": r.get("pieces_a"),
                "pieces_b": r.get("pieces_b"),
                "fractions": r.get("fractions", {}),
                "changed": len(r.get("changed", [])),
                "changed_fraction": r.get("changed_fraction", 0),
                "page": "/api/model/compare/page",
            }
        return out


class Comparisons:
    """The HMI's comparison jobs: at most one running; the latest kept for its page."""

    def __init__(self, log: Callable[[], Any]) -> None:
        self._log = log  # the HMI's log as it is now (tests give the HMI another)
        self.job: CompareJob | None = None
        self._lock = threading.Lock()
        self._n = 0

    @property
    def log(self) -> Any:
        return self._log()

    def start(self, user: str, clip: Path, running: Path, new: Path) -> CompareJob:
        try:
            _Recording(clip)
        except RecordingError as exc:
            raise ValueError(str(exc)) from None
        with self._lock:
            if self.job is not None and self.job.state == "running":
                raise RuntimeError("a comparison is running already: wait for it or cancel it")
            self._n += 1
            out = clip / time.strftime(f"compare-%Y%m%d-%H%M%S-{self._n}")
            job = self.job = CompareJob(str(self._n), user, clip, running, new, out)
        threading.Thread(target=self._run, args=(job,), name="hmi-compare", daemon=True).start()
        self.log.info("hmi model comparison started", user=user, clip=str(clip), running=str(running), new=str(new))
        return job

    def cancel(self) -> CompareJob | None:
        job = self.job
        if job is not None and job.state == "running":
            job.state = "cancelled"
            if job.proc is not None and job.proc.poll() is None:
                job.proc.terminate()
        return job

    def _run(self, job: CompareJob) -> None:
        cmd = compare_command(job.clip, job.running, job.new, job.out)
        try:
            # the child's own output only: its logs go to stderr (kept for the error), the JSON to stdout
            job.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
            stdout, stderr = job.proc.communicate(timeout=TIMEOUT_S)
            rc = job.proc.returncode
        except subprocess.TimeoutExpired:
            assert job.proc is not None
            job.proc.kill()
            job.proc.communicate()
            self._end(job, "failed", f"the comparison took longer than {TIMEOUT_S:g} s")
            return
        except OSError as exc:
            self._end(job, "failed", f"cannot run the comparison: {exc}")
            return
        if job.state == "cancelled":
            self._end(job, "cancelled", None)
            return
        if rc != 0:
            lines = [ln for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
            self._end(job, "failed", (lines[-1] if lines else f"exit status {rc}")[:500])
            return
        try:
            job.result = json.loads(stdout.decode("utf-8").strip().splitlines()[-1])
        except (ValueError, IndexError):
            self._end(job, "failed", "the comparison printed no result")
            return
        self._end(job, "done", None)

    def _end(self, job: CompareJob, state: str, error: str | None) -> None:
        job.state, job.error, job.finished = state, error, time.monotonic()
        log = self.log.info if state == "done" else self.log.warning
        log(
            "hmi model comparison " + state,
            user=job.user,
            clip=str(job.clip),
            error=error,
            changed=None if job.result is None else len(job.result.get("changed", [])),
            wall_s=round(job.finished - job.started, 1),
        )
