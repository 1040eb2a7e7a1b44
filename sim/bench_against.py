"""`sorter bench --against REV`: this code and another revision's, benched alternately in one run.

The machines we measure on are shared and their speed drifts from minute to minute, so a figure of
today's code beside last week's figure of the old code says little. Here the other revision is
unpacked from git into a temporary folder and both run `sorter bench --json` as child processes with
the same interpreter, taking turns (new-old, old-new, ...) so that drift hits both alike; the result
holds every run, the medians and the ratios new / old. Each tree benches its own `config/sim.yaml`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = Path("config/sim.yaml")
RUN_TIMEOUT_S = 1800


class AgainstError(RuntimeError):
    """The other revision cannot be unpacked or its bench failed; the message says which and why."""


def unpack(rev: str, into: Path, repo: Path = ROOT) -> str:
    """The revision's files (git archive) in `into`; returns the full commit id."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar", commit], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        detail = err.decode(errors="replace").strip() if isinstance(err, bytes) else str(err).strip()
        raise AgainstError(f"cannot unpack revision {rev!r} from {repo}: {detail or exc}") from exc
    return commit


def bench_tree(tree: Path, frames: int) -> dict[str, Any]:
    """`sorter bench --json` of the code in `tree` (its own packages first on the path), parsed."""
    env = {**os.environ, "PYTHONPATH": str(tree)}  # before the editable install's finder: this tree's code runs
    code = "import sys; from sorter.cli import main; sys.argv = ['sorter', *sys.argv[1:]]; main()"
    cmd = [sys.executable, "-c", code, "bench", "--json", "--frames", str(frames), "-c", str(CONFIG)]
    try:
        res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise AgainstError(f"the bench of {tree} took more than {RUN_TIMEOUT_S} s") from exc
    if res.returncode != 0:
        raise AgainstError(f"the bench of {tree} failed (exit {res.returncode}):\n{res.stderr.strip()[-2000:]}")
    try:
        out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise AgainstError(f"the bench of {tree} printed no JSON result: {res.stdout[-500:]!r}") from exc
    return out


def figures(run: dict[str, Any]) -> dict[str, float]:
    """The figures compared: highest sustainable feed, and CPU and wall ms per frame at each feed rate."""
    out: dict[str, float] = {}
    if run.get("max_feed_rate_per_s") is not None:
        out["max_feed_rate_per_s"] = float(run["max_feed_rate_per_s"])
    nominal = run["at_nominal_feed"]
    out["nominal_whole_ms_per_frame"] = float(nominal["whole_ms_per_frame"])
    for rate, m in run["by_feed_rate"].items():
        out[f"cpu_ms_per_frame_at_{rate}"] = float(m["whole_cpu_ms_per_frame"])
    return out


def compare(
    rev: str,
    frames: int = 240,
    repeat: int = 3,
    bench: Callable[[Path, int], dict[str, Any]] = bench_tree,
    progress: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """`repeat` pairs of benches of this tree (new) and of `rev` (old), alternating which goes first."""
    with tempfile.TemporaryDirectory(prefix="bench-against-") as tmp:
        old_tree = Path(tmp)
        commit = unpack(rev, old_tree)
        runs: dict[str, list[dict[str, float]]] = {"new": [], "old": []}
        for i in range(repeat):
            order = ("new", "old") if i % 2 == 0 else ("old", "new")
            for which in order:
                progress(f"pair {i + 1}/{repeat}: {which}")
                runs[which].append(figures(bench(ROOT if which == "new" else old_tree, frames)))
    keys = sorted(set.intersection(*(set(r) for r in runs["new"] + runs["old"])))
    median = {w: {k: round(statistics.median(r[k] for r in runs[w]), 3) for k in keys} for w in runs}
    ratio = {k: round(median["new"][k] / median["old"][k], 3) for k in keys if median["old"][k]}
    return {
        "old": {"rev": rev, "commit": commit},
        "frames_per_camera": frames,
        "pairs": repeat,
        "median": median,
        "ratio_new_over_old": ratio,
        "runs": runs,
        "note": "alternating child processes on this machine; CPU and wall per frame: lower is better, "
        "max_feed_rate_per_s: higher is better",
    }
