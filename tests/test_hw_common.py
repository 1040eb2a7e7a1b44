"""hw/common.py: config changes shown, validated, backed up, written atomically, logged; comments kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hw.common import Change, HwError, history_path, write_changes
from sim.config import load_sim_config

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "line.yaml"
    shutil.copy(ROOT / "config" / "sim.yaml", path)
    return path


def test_changes_are_written_with_backup_history_and_comments_kept(config: Path, capsys) -> None:
    before = config.read_text()
    changes = [
        Change("belt.counts_per_mm", 20.07),
        Change("cameras[1].mapping.mm_per_px", 0.2513),
        Change("magnetometer.offsets_mT", [0.5] * 48),
    ]
    assert write_changes(config, changes, script="test", yes=True, residuals={"rms_mm": 0.1})
    text = config.read_text()
    assert "# the Hall-sensor bar under the belt" in text  # comments survive
    cfg = load_sim_config(config)
    assert cfg.belt.counts_per_mm == 20.07 and cfg.cameras[1].mapping.mm_per_px == 0.2513
    assert cfg.magnetometer is not None and cfg.magnetometer.offsets_mT == [0.5] * 48
    backups = list(config.parent.glob("line.yaml.*.bak"))
    assert len(backups) == 1 and backups[0].read_text() == before
    (entry,) = [json.loads(line) for line in history_path(config).read_text().splitlines()]
    assert entry["script"] == "test" and entry["residuals"] == {"rms_mm": 0.1}
    assert entry["changes"][0] == {"key": "belt.counts_per_mm", "old": 20, "new": 20.07}
    assert entry["changes"][2]["old"] is None
    assert "-  counts_per_mm: 20" in capsys.readouterr().err  # the diff was shown


def test_an_invalid_result_is_refused_and_nothing_is_written(config: Path) -> None:
    before = config.read_text()
    with pytest.raises(HwError, match="would make the config invalid"):
        write_changes(config, [Change("belt.counts_per_mm", -1)], script="test", yes=True)
    assert config.read_text() == before
    assert not history_path(config).exists() and not list(config.parent.glob("*.bak"))
    assert sorted(p.name for p in config.parent.iterdir()) == ["line.yaml"]  # no temp file left


def test_declined_changes_leave_the_config_untouched(config: Path, monkeypatch) -> None:
    before = config.read_text()
    monkeypatch.setattr("typer.confirm", lambda *a, **k: False)
    assert not write_changes(config, [Change("belt.counts_per_mm", 20.1)], script="test", yes=False)
    assert config.read_text() == before and not history_path(config).exists()
