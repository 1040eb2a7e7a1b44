"""Live decisions against replayed ones (sorter/replay.py agreement): matched by place, differences listed."""

from __future__ import annotations

from pathlib import Path

import pytest

from sorter.config import load_config
from sorter.replay import agreement

pytestmark = pytest.mark.fast

CFG = load_config(Path(__file__).resolve().parents[1] / "config" / "sim.yaml")


def _row(id_: int, count: int, cls: str | None, fraction: str, confidence: float | None, outcome: str) -> dict:
    return {
        "id": id_,
        "count": count,
        "x_mm": 100.0,
        "cls": cls,
        "fraction": fraction,
        "confidence": confidence,
        "outcome": outcome,
    }


def test_a_piece_decided_without_a_classification_is_listed_not_a_crash() -> None:
    # a live piece decided into residue without a class (no crop could be classified): no confidence
    live = [_row(1, 10_000, "ndfeb", "ndfeb", 0.98, "accepted"), _row(2, 30_000, None, "residue", None, "held")]
    replayed = [
        _row(11, 10_010, "ndfeb", "ndfeb", 0.97, "accepted"),
        _row(12, 30_005, "ferrite", "ferrite_smco", 0.9, "accepted"),
    ]
    got = agreement(CFG, live, replayed)
    assert got["matched"] == 2 and got["same_decision"] == 1 and got["agreement"] == 0.5
    [d] = got["differ"]
    assert (d["live_id"], d["replay_id"]) == (2, 12)
    assert d["live"] == "None -> residue (-)" and d["replay"] == "ferrite -> ferrite_smco (0.900)"
    assert got["differ_held"] == 1
