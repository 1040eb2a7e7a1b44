"""docs/config.md is generated from the schema (sorter/config/reference.py) and kept up to date."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from sorter.config import LineConfig
from sorter.config.reference import COMMAND, main, render

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "config.md"


def _models(tp: object) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _models(a)]


def _every_model(model: type[BaseModel], seen: dict[type[BaseModel], None] | None = None) -> list[type[BaseModel]]:
    seen = {} if seen is None else seen
    if model not in seen:
        seen[model] = None
        for info in model.model_fields.values():
            for m in _models(info.annotation):
                _every_model(m, seen)
    return list(seen)


@pytest.mark.fast
def test_docs_config_md_is_up_to_date():
    assert DOC.exists(), f"docs/config.md is missing: generate it with `{COMMAND}`"
    assert DOC.read_text(encoding="utf-8") == render(), (
        f"docs/config.md is stale (the schema changed): regenerate it with `{COMMAND}` from the repository root"
    )


@pytest.mark.fast
def test_every_key_of_the_line_config_is_described():
    missing = [
        f"{m.__name__}.{name}"
        for m in _every_model(LineConfig)
        for name, info in m.model_fields.items()
        if not info.description
    ]
    assert not missing, f"give these fields a description= in sorter/config/schema.py: {missing}"


@pytest.mark.fast
def test_every_section_and_key_has_its_place():
    text = render()
    headings = re.findall(r"^#{2,3} (.+)$", text, flags=re.M)
    for heading in (
        "belt",
        "cameras[]",
        "cameras[].source (type: sim)",  # a discriminated union: one section per variant
        "cameras[].source (type: opencv)",
        "cameras[].mapping",
        "vision",
        "ejection.banks[]",
        "plc.opcua.security",
        "magnetometer",
        "users[]",
    ):
        assert heading in headings, heading
    vision = text.split("\n## vision\n")[1].split("\n## ")[0]
    for key, default in (("neck_sure", "0.45"), ("hole_colour_step", "56.0"), ("cut_depth_mm", "1.0")):
        assert re.search(rf"^\| `{key}` \| float, > 0[^|]* \| `{default}` \| \w", vision, flags=re.M), key
    assert "| `uri` | str or int | required |" in text
    assert "| [`magnetometer`](#magnetometer) | section or null | `null` |" in text
    # the simulator's own section is not the service's: it is documented elsewhere
    assert "## simulator" not in text and "docs/simulator.md" in text


@pytest.mark.wire  # `python -m sorter.config.reference` as a process
def test_write_and_print(tmp_path):
    out = tmp_path / "config.md"
    assert main(["--write", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render()
    printed = subprocess.run(
        [sys.executable, "-m", "sorter.config.reference"], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert printed.stdout == render()
