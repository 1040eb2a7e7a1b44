"""`sorter` as a process, as an operator or systemd starts it: what it says and its exit code when it cannot
start (an invalid config, a missing model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.wire

ROOT = Path(__file__).resolve().parents[1]


def _bad(tmp_path: Path, old: str, new: str) -> Path:
    text = (ROOT / "config/sim.yaml").read_text()
    assert old in text
    p = tmp_path / "bad.yaml"
    p.write_text(text.replace(old, new, 1))
    return p


def test_cli_exits_2_on_invalid_config(tmp_path):
    bad = _bad(tmp_path, "  min_confidence: 0.9", "  min_confidence: 1.5")
    r = subprocess.run([sys.executable, "-m", "sorter", "check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "routing.min_confidence" in r.stderr and "bad.yaml" in r.stderr and "line" in r.stderr


def test_missing_model_is_reported_at_start(tmp_path):
    text = (ROOT / "config/sim.yaml").read_text().replace("../models/sorter-cnn.onnx", str(tmp_path / "nope.onnx"))
    cfg = tmp_path / "line.yaml"
    cfg.write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "sorter", "run", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert r.returncode == 2
    assert "nope.onnx" in r.stderr
