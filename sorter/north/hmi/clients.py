"""One browser on the HMI: its WebSocket, session, and what waits to be sent to it (coalesced)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.websockets import WebSocket

from sorter.north.hmi.sessions import Session


@dataclass(eq=False)
class Client:
    """One browser's WebSocket: the latest state and images waiting to be sent, coalesced."""

    ws: WebSocket
    session: Session
    address: str
    state: str | None = None
    frames: dict[str, bytes] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closing: int | None = None
    bad_messages: int = 0
    sent_states: int = 0
    sent_frames: int = 0
