"""The central schema's versioned SQL migrations (migrations/NNNN_name.sql), applied in order, once each.

Every forwarder runs `migrate()` when it connects, so a new release brings its schema change with it;
an advisory lock makes the lines that start together apply each migration once. A migration is one
transaction: it is there whole or not at all. A database with a version newer than this release knows
is refused (an older forwarder must not write into a schema it does not understand).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

SCHEMA = "plant"
_LOCK = 0x736F7274  # pg_advisory_lock key of the migrations ("sort")
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class PlantDbError(Exception):
    """The central database cannot be used (unreachable, refused, or a schema this release does not know)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The migrations shipped with this release, in version order."""
    out = []
    for f in resources.files("sorter.north.plantdb").joinpath("migrations").iterdir():
        m = _NAME.match(f.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), f.read_text(encoding="utf-8")))
    out.sort(key=lambda m: m.version)
    versions = [m.version for m in out]
    if versions != list(range(1, len(out) + 1)):
        raise PlantDbError(f"migrations must be numbered 1, 2, 3... without gaps, found {versions}")
    return out


def migrate(conn: psycopg.Connection[Any]) -> list[int]:
    """Bring the schema up to this release; returns the versions applied now. `conn` in autocommit mode."""
    known = migrations()
    applied: list[int] = []
    conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK,))
    try:
        with conn.transaction():
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_migrations ("
                "version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        row = conn.execute(f"SELECT coalesce(max(version), 0) FROM {SCHEMA}.schema_migrations").fetchone()
        current = int(row[0]) if row else 0
        if current > len(known):
            raise PlantDbError(
                f"the plant database's schema is at version {current}, this release knows up to {len(known)}: "
                "update the line's software"
            )
        for m in known:
            if m.version <= current:
                continue
            with conn.transaction():
                conn.execute(m.sql.encode())  # no parameters: several statements in one go
                conn.execute(
                    f"INSERT INTO {SCHEMA}.schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name)
                )
            applied.append(m.version)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK,))
    return applied
