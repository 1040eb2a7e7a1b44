"""What the service (proxy.py) and the OPC UA server process (process.py) say to each other.

It holds what both sides need, so that process.py never imports proxy.py (proxy.py imports
process.py for the server process's entry point): no import cycle. Classes pickled across the pipes
(ChildSpec, OpcUaServerError) live here, where both processes find them by the same module path.

The two processes meet at two pipes only; what goes through them are tuples of plain values, pickled:

* parent -> child, a list per write: ("snap", LineSnapshot), ("result", id, kind, detail), ("stop",)
* child -> parent, one per write: ("ready", url), ("failed", OpcUaServerError), ("cmd", id, command, user)

Result kinds: "ok", "invalid_state", "timeout", "error", "halted" (the child maps each to a status code).
A batch of snapshots may be coalesced on either side (coalesce): the receiver must not rely on seeing
every snapshot, only every state and every alarm list, in order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sorter.config import OpcUaServerConfig, UserConfig
from sorter.core.linestate import LineSnapshot

# A PackML command only starts a transition; an answer later than this means the service loop is stuck.
# Both sides wait this long: the service for its command function, the server process for the service.
COMMAND_TIMEOUT_S = 5.0
# State/alarm changes waiting on either side of the pipes; past this the oldest go (the reader is stuck).
PENDING_MAX = 1000

Msg = tuple[Any, ...]


class OpcUaServerError(Exception):
    """The server cannot start; str() says why and what to do."""


@dataclass(frozen=True)
class ChildSpec:
    """Everything the server process gets from the service: it is spawned and inherits nothing else."""

    cfg: OpcUaServerConfig
    users: list[UserConfig]
    fractions: list[str]
    log_level: str = "info"
    json_logs: bool = False
    log_context: dict[str, Any] = field(default_factory=dict)
    log_file: str | None = None


def coalesce(pending: deque[LineSnapshot], snap: LineSnapshot) -> None:
    """Queue a snapshot; it replaces the last queued one if that shows the same state and alarms.

    Values are written only as they are at the latest snapshot anyway; what must not be lost is a state
    or alarm list that lasted a single snapshot (subscriptions on State, alarm events).
    """
    if pending and pending[-1].state == snap.state and pending[-1].alarms == snap.alarms:
        pending[-1] = snap
    else:
        pending.append(snap)  # a full deque drops the oldest
