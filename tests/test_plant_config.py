"""Plant strictness (sorter/config/plant.py): `sorter check-config --plant` and `plant: true` refuse each demo-only
setting (the demo's users, anonymous or None-policy OPC UA, an HMI without TLS, a Modbus PLC on a public
address) and name its key path; the plant template passes, the demo config does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sorter.config import ConfigError, LineConfig, UserConfig, load_config
from sorter.config.plant import DEMO_USERS, PlantProblem, check_plant
from sorter.north.users import hash_password, verify_password

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
SIM = ROOT / "config" / "sim.yaml"
PLANT = ROOT / "config" / "line.example.yaml"


@pytest.fixture(scope="module")
def plant() -> LineConfig:
    return load_config(PLANT)


def keys(problems: list[PlantProblem]) -> list[str]:
    return [p.key for p in problems]


def changed(cfg: LineConfig, section: str, **update: Any) -> LineConfig:
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=update)})


def with_users(cfg: LineConfig, *users: UserConfig) -> LineConfig:
    return cfg.model_copy(update={"users": list(users)})


def test_the_plant_template_passes(plant: LineConfig) -> None:
    assert plant.plant is True  # the template says what it is: the service refuses demo-only settings at start
    assert check_plant(plant) == []


def test_the_demo_config_names_each_demo_only_setting() -> None:
    problems = check_plant(load_config(SIM))
    assert keys(problems) == [
        "users[0].password_hash",
        "users[1].password_hash",
        "users[2].password_hash",
        "opcua_server.allow_anonymous",
        "opcua_server.allow_none_security",
        "hmi.tls",
    ]
    assert all(str(p).startswith(f"{p.key}: ") for p in problems)
    assert "demo user `operator`" in problems[0].problem


def test_demo_users_are_those_of_the_demo_config() -> None:
    """DEMO_USERS must follow config/sim.yaml: its names and hashes, and the passwords its comment publishes."""
    demo = {u.name: u.password_hash for u in load_config(SIM).users}
    assert demo == {name: h for name, (_, h) in DEMO_USERS.items()}
    for name, (password, h) in DEMO_USERS.items():
        assert verify_password(h, password), name
        assert password in SIM.read_text()


def test_demo_hash_under_any_name_is_refused(plant: LineConfig) -> None:
    hash_of_viewer = DEMO_USERS["viewer"][1]
    cfg = with_users(
        plant,
        UserConfig(name="shift-a", role="operator", password_hash=hash_password("a real one")),
        UserConfig(name="scada", role="viewer", password_hash=hash_of_viewer),
    )
    problems = check_plant(cfg)
    assert keys(problems) == ["users[1].password_hash"]
    assert "`scada`" in problems[0].problem and "`viewer`" in problems[0].problem


def test_demo_user_with_its_demo_password_hashed_anew_is_refused(plant: LineConfig) -> None:
    rehashed = hash_password("demo-operator")  # a new salt: not the demo hash, the same published password
    cfg = with_users(plant, UserConfig(name="operator", role="operator", password_hash=rehashed))
    assert keys(check_plant(cfg)) == ["users[0].password_hash"]
    # the demo's user names themselves are fine with a password of the plant's own
    own = with_users(plant, UserConfig(name="operator", role="operator", password_hash=hash_password("x7!plant")))
    assert check_plant(own) == []


def test_anonymous_opcua_is_refused(plant: LineConfig) -> None:
    assert keys(check_plant(changed(plant, "opcua_server", allow_anonymous=True))) == ["opcua_server.allow_anonymous"]


def test_none_security_policy_is_refused(plant: LineConfig) -> None:
    problems = check_plant(changed(plant, "opcua_server", allow_none_security=True))
    assert keys(problems) == ["opcua_server.allow_none_security"]
    assert "None security policy" in problems[0].problem


def test_a_disabled_opcua_server_offers_nothing(plant: LineConfig) -> None:
    cfg = changed(plant, "opcua_server", enabled=False, allow_anonymous=True, allow_none_security=True)
    assert check_plant(cfg) == []


def test_hmi_without_tls_is_refused(plant: LineConfig) -> None:
    assert plant.hmi is not None
    plain = plant.hmi.model_copy(update={"certificate": None, "private_key": None, "tls": None})
    problems = check_plant(plant.model_copy(update={"hmi": plain}))
    assert keys(problems) == ["hmi.certificate"] and "without TLS" in problems[0].problem
    explicit = plant.hmi.model_copy(update={"certificate": None, "private_key": None, "tls": False})
    assert keys(check_plant(plant.model_copy(update={"hmi": explicit}))) == ["hmi.tls"]
    assert check_plant(plant.model_copy(update={"hmi": None})) == []  # no HMI served: nothing to protect


def test_hmi_tls_is_read_from_any_hmi_section(plant: LineConfig) -> None:
    """The check reads hmi.certificate / private_key with getattr: an HMI section without those keys is plain."""

    class OldHmi:  # the shape of the HMI section before it had TLS settings
        enabled = True
        host = "0.0.0.0"

    cfg = plant.model_copy(update={"hmi": OldHmi()})
    assert keys(check_plant(cfg)) == ["hmi.certificate"]


@pytest.mark.parametrize(
    ("host", "refused"),
    [
        ("10.20.0.13", False),
        ("172.16.4.2", False),
        ("172.31.255.254", False),
        ("192.168.10.20", False),
        ("127.0.0.1", False),
        ("localhost", False),
        ("169.254.7.1", False),
        ("fe80::1", False),
        ("fd12:3456::20", False),
        ("::1", False),
        ("172.32.0.1", True),  # just past 172.16.0.0/12
        ("8.8.8.8", True),
        ("100.64.0.1", True),  # carrier-grade NAT: shared, not the line's own network
        ("2001:db8::1", True),
        ("::ffff:8.8.8.8", True),
        ("plc-1.plant.local", True),  # a name: cannot be checked to be private
    ],
)
def test_modbus_plc_must_be_on_a_private_address(plant: LineConfig, host: str, refused: bool) -> None:
    cfg = changed(plant, "plc", protocol="modbus", host=host)
    problems = check_plant(cfg)
    assert keys(problems) == (["plc.host"] if refused else [])
    if refused:
        assert "Modbus" in problems[0].problem


def test_a_public_address_is_fine_for_an_opcua_plc(plant: LineConfig) -> None:
    """Only Modbus TCP (no authentication at all) is held to private addresses."""
    assert check_plant(changed(plant, "plc", protocol="opcua", host="8.8.8.8")) == []


def test_every_problem_at_once(plant: LineConfig) -> None:
    assert plant.hmi is not None and plant.opcua_server is not None
    cfg = with_users(plant, UserConfig(name="operator", role="operator", password_hash=DEMO_USERS["operator"][1]))
    cfg = changed(cfg, "opcua_server", allow_anonymous=True, allow_none_security=True)
    cfg = changed(cfg, "plc", protocol="modbus", host="203.0.113.5")
    cfg = cfg.model_copy(update={"hmi": plant.hmi.model_copy(update={"certificate": None, "private_key": None})})
    assert keys(check_plant(cfg)) == [
        "users[0].password_hash",
        "opcua_server.allow_anonymous",
        "opcua_server.allow_none_security",
        "hmi.certificate",
        "plc.host",
    ]


# --- where it is applied ---


def test_check_config_plant_cli() -> None:
    from sorter.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["check-config", "--plant", str(PLANT)])
    assert ok.exit_code == 0, ok.output
    assert "ok" in ok.stdout and "plant settings" in ok.stdout

    bad = runner.invoke(app, ["check-config", "--plant", str(SIM)])
    assert bad.exit_code == 2
    lines = [line for line in bad.stderr.splitlines() if line.startswith(f"{SIM}: ")]
    named = [line.removeprefix(f"{SIM}: ").split(":")[0] for line in lines]
    assert named[:6] == [
        "users[0].password_hash",
        "users[1].password_hash",
        "users[2].password_hash",
        "opcua_server.allow_anonymous",
        "opcua_server.allow_none_security",
        "hmi.tls",
    ]
    assert "6 demo-only setting(s)" in bad.stderr
    assert "Traceback" not in bad.output

    # without --plant the demo config is a valid config: the demo runs with it
    demo = runner.invoke(app, ["check-config", str(SIM)])
    assert demo.exit_code == 0, demo.output


def test_plant_true_makes_check_config_strict(tmp_path: Path) -> None:
    from sorter.cli import app

    text = SIM.read_text().replace("line: demo-line\n", "line: demo-line\nplant: true\n", 1)
    path = tmp_path / "sim-as-plant.yaml"
    path.write_text(text)  # check-config opens none of the files the config names
    res = CliRunner().invoke(app, ["check-config", str(path)])
    assert res.exit_code == 2 and "opcua_server.allow_anonymous" in res.stderr


def test_the_service_refuses_to_start_a_plant_line_with_demo_settings() -> None:
    from sorter.app import build_line

    cfg = load_config(SIM).model_copy(update={"plant": True})
    with pytest.raises(ConfigError) as err:
        build_line(cfg)  # refused before anything is opened: no model loaded, no PLC, no port
    text = str(err.value)
    assert text.startswith("plant: true")
    for key in ("users[0].password_hash", "opcua_server.allow_anonymous", "opcua_server.allow_none_security"):
        assert f"  {key}: " in text
