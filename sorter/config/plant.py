"""Plant strictness: the settings a real plant's line must not run with (`sorter check-config --plant`, and the
service at start when the config says `plant: true`).

Each is fine in the demo (config/sim.yaml) and a hole at a plant:

- the demo's users: their passwords are published (in config/sim.yaml), whatever their names;
- anonymous OPC UA access and the None security policy on the line's OPC UA server: anyone on the network
  reads the line, with None unsigned and unencrypted, and None channels are where client certificates are
  not checked;
- an HMI without TLS: operators' passwords and session cookies in plain text on the plant network;
- a Modbus TCP PLC on an address outside the private ranges: Modbus has no authentication at all, so the PLC
  that fires the valves must sit on the line's own network (RFC 1918, loopback, link-local; IPv6 unique-local);
- a Sparkplug edge node talking to its broker without TLS (the broker's password and the line's state in plain
  text), and a password written into the plant database's URL (it belongs in ~/.pgpass or PGPASSFILE).

check_plant() returns every problem found, each with the key path to change; the caller decides what to do
(the CLI prints them and exits 2, the service refuses to start: sorter/app.py).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from sorter.config.schema import LineConfig

# The demo users of config/sim.yaml, with the passwords its comment publishes (tests/test_plant_config.py keeps
# this in step with the file). A plant user with one of these hashes, or a demo name with its demo password
# hashed anew, is refused.
DEMO_USERS: dict[str, tuple[str, str]] = {
    "operator": (
        "demo-operator",
        "$argon2id$v=19$m=65536,t=3,p=4$jb+emqQZFRmzqftjeKv/1Q$Fm/jMit7mDilSeeWgnrxUZXoRXw0CtCD0XjuFu+4J4E",
    ),
    "viewer": (
        "demo-viewer",
        "$argon2id$v=19$m=65536,t=3,p=4$xhVQPujMdL9rQ4EPqU9qYg$S1Ib7FP3mMx1VepvCUoFpGbhF/ByGLJZ1NRNyornw74",
    ),
    "technician": (
        "demo-technician",
        "$argon2id$v=19$m=65536,t=3,p=4$xmlAO+2TuJa176EhsuJt7A$4NRoHWaJ47t8BfD0Mp6DJHS6258nIFDCzDKPEleEKWs",
    ),
}

# where a Modbus PLC may be: the private ranges of RFC 1918, loopback and link-local (and their IPv6 kin)
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "::1/128",
        "fe80::/10",
        "fc00::/7",
    )
)


@dataclass(frozen=True)
class PlantProblem:
    """One demo-only setting: the key path to change and what is wrong with it."""

    key: str
    problem: str

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}"


def check_plant(cfg: LineConfig) -> list[PlantProblem]:
    """Every setting of `cfg` that a plant must not run with (empty: none)."""
    return [*_users(cfg), *_opcua_server(cfg), *_hmi(cfg), *_plc(cfg), *_plant_data(cfg)]


def _users(cfg: LineConfig) -> list[PlantProblem]:
    demo_hashes = {h: name for name, (_, h) in DEMO_USERS.items()}
    out = []
    for i, user in enumerate(cfg.users):
        if user.password_hash in demo_hashes:
            out.append(
                PlantProblem(
                    f"users[{i}].password_hash",
                    f"user `{user.name}` has the demo user `{demo_hashes[user.password_hash]}`'s password hash "
                    "(its password is published in config/sim.yaml): `sorter opcua hash-password` makes a new one",
                )
            )
        elif user.name in DEMO_USERS and _verifies(user.password_hash, DEMO_USERS[user.name][0]):
            out.append(
                PlantProblem(
                    f"users[{i}].password_hash",
                    f"user `{user.name}` has the demo password of config/sim.yaml: give it a new one "
                    "(`sorter opcua hash-password`)",
                )
            )
    return out


def _verifies(password_hash: str, password: str) -> bool:
    try:
        return PasswordHasher().verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _opcua_server(cfg: LineConfig) -> list[PlantProblem]:
    srv = cfg.opcua_server
    if srv is None or not srv.enabled:
        return []
    out = []
    if srv.allow_anonymous:
        out.append(
            PlantProblem(
                "opcua_server.allow_anonymous",
                "anonymous OPC UA access is on: set it false and give SCADA a user (viewer role)",
            )
        )
    if srv.allow_none_security:
        out.append(
            PlantProblem(
                "opcua_server.allow_none_security",
                "the None security policy (unsigned, unencrypted, client certificates unchecked) is offered: set "
                "it false (Basic256Sha256 Sign / SignAndEncrypt only)",
            )
        )
    return out


def _hmi(cfg: LineConfig) -> list[PlantProblem]:
    hmi = cfg.hmi
    if hmi is None or not getattr(hmi, "enabled", True):
        return []
    # the HMI's TLS settings (hmi.certificate, hmi.private_key): read with getattr, so that this check is right
    # whether or not the schema has them yet; no certificate configured means plain HTTP
    missing = [k for k in ("certificate", "private_key") if getattr(hmi, k, None) in (None, "")]
    if not missing:
        return []
    key = "hmi.tls" if getattr(hmi, "tls", None) is False else f"hmi.{missing[0]}"
    return [
        PlantProblem(
            key,
            "the HMI is served without TLS (plain HTTP: passwords and session cookies readable on the network): "
            "give it hmi.certificate and hmi.private_key (`sorter hmi certs`)",
        )
    ]


def _plc(cfg: LineConfig) -> list[PlantProblem]:
    plc = cfg.plc
    if plc.protocol != "modbus":
        return []
    host = plc.host.strip().strip("[]")
    if host.lower() == "localhost":
        return []
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return [
            PlantProblem(
                "plc.host",
                f"the Modbus PLC is given by name ({plc.host!r}): give its IP address, which must be private "
                "(RFC 1918, loopback or link-local): Modbus TCP has no authentication",
            )
        ]
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if any(addr in net for net in PRIVATE_NETWORKS if net.version == addr.version):
        return []
    return [
        PlantProblem(
            "plc.host",
            f"the Modbus PLC is on {addr}, not a private address (RFC 1918, loopback or link-local): Modbus TCP "
            "has no authentication, the PLC that fires the valves must be on the line's own network",
        )
    ]


def _plant_data(cfg: LineConfig) -> list[PlantProblem]:
    out = []
    spb = cfg.sparkplug
    if spb is not None and spb.enabled and not spb.tls:
        out.append(
            PlantProblem(
                "sparkplug.tls",
                "the edge node talks to the MQTT broker without TLS (its user's password and the line's data in "
                "plain text): tls: true, with the broker's CA in sparkplug.ca_file",
            )
        )
    db = cfg.plant_db
    if db is not None and db.enabled and re.match(r"^postgres(?:ql)?://[^/@]*:[^/@]*@", db.url):
        out.append(
            PlantProblem(
                "plant_db.url",
                "the URL holds a password: keep it in ~/.pgpass (or PGPASSFILE) of the service's user instead",
            )
        )
    return out
