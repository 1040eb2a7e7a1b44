"""Config: the shipped configs load; errors name file, key path and line; the CLI exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.config import load_sim_config
from sorter.config import ConfigError, load_config

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_loads():
    cfg = load_sim_config(ROOT / "config/sim.yaml")
    assert cfg.fractions == ["ndfeb", "ferrite_smco", "residue"]
    assert cfg.classifier.model.is_absolute()
    assert cfg.simulator is not None and cfg.simulator.encoder_start > 2**32 - 10**6


def test_the_service_skips_the_simulators_section_unread():
    """The same file drives both sides; the service's schema has no `simulator` and never validates it."""
    cfg = load_config(ROOT / "config/sim.yaml")
    assert not hasattr(cfg, "simulator")
    assert cfg.fractions == ["ndfeb", "ferrite_smco", "residue"]


def _bad(tmp_path: Path, old: str, new: str) -> Path:
    text = (ROOT / "config/sim.yaml").read_text()
    assert old in text
    p = tmp_path / "bad.yaml"
    p.write_text(text.replace(old, new, 1))
    return p


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("distance_mm: 1000", "distance_mm: -5", "ejection.banks[0].distance_mm"),
        ("counts_per_mm: 20", "counts_per_mm: 20\n  colour: red", "belt.colour"),
        (
            "mm_per_px: 0.25, rotation_deg: 0.0}\n  - name: cam1",
            "mm_per_px: zero, rotation_deg: 0.0}\n  - name: cam1",
            "cameras[0].mapping.mm_per_px",
        ),
    ],
)
def test_errors_name_file_key_and_line(tmp_path, old, new, where):
    bad = _bad(tmp_path, old, new)
    marker = new.split("\n")[-1] if "colour" in new else new.split("\n")[0]
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if marker.strip() in text)
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert "bad.yaml" in str(exc.value) and f"{where} (line {line})" in str(exc.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("belt: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_plant_template_is_secure_by_default() -> None:
    """The production template loads, and its OPC UA server offers no None policy and no anonymous access."""
    cfg = load_config(Path(__file__).parent.parent / "config" / "line.example.yaml")
    assert not hasattr(cfg, "simulator") and cfg.opcua_server is not None
    assert not cfg.opcua_server.allow_none_security and not cfg.opcua_server.allow_anonymous
    sec = cfg.plc.opcua.security
    assert cfg.plc.protocol == "opcua" and sec.mode == "SignAndEncrypt" and sec.password_env


def test_opcua_security_must_be_consistent(tmp_path: Path) -> None:
    from sorter.config import OpcUaSecurity

    with pytest.raises(ValueError, match="needs certificate and private_key"):
        OpcUaSecurity(policy="Basic256Sha256", mode="SignAndEncrypt")
    with pytest.raises(ValueError, match="username and password_env go together"):
        OpcUaSecurity(username="sorter")


def test_users_need_a_password_hash_not_a_password() -> None:
    from sorter.config import UserConfig

    with pytest.raises(ValueError, match="argon2 hash"):
        UserConfig(name="op", role="operator", password_hash="secret")


def test_conflict_value_names_served_fractions_and_is_not_negative(tmp_path: Path) -> None:
    # a value for the residue (no bank ejects it) or a negative value would be silently meaningless
    for new in ("conflict_value: {residue: 1.0}", "conflict_value: {ndfeb: -1.0}"):
        with pytest.raises(ConfigError, match="conflict_value"):
            load_config(_bad(tmp_path, "conflict_value: {}", new))
    cfg = load_config(_bad(tmp_path, "conflict_value: {}", "conflict_value: {ndfeb: 0.5}"))
    assert cfg.ejection.conflict_value == {"ndfeb": 0.5}
