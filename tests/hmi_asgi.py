"""The HMI's FastAPI app of a built line, served in process through httpx's ASGI transport: the fast tier's way
to send it what a browser sends (sessions, CSRF tokens, origins) without a socket."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from sorter.north.hmi.app import create_app
from sorter.north.hmi.server import HmiServer
from tests.reclog import RecLog
from tests.test_hmi import PASSWORD

Endpoint = tuple[str, str, Any]  # method, path, JSON body (None: none)


class HmiClient:
    def __init__(self, hmi: HmiServer) -> None:
        """Call on the loop the line's requests are handled on (the test's): the HMI hands them over to it."""
        self.log = hmi.log = RecLog()
        hmi._svc_loop = asyncio.get_running_loop()
        hmi._login_lock = asyncio.Lock()
        self.transport = httpx.ASGITransport(app=create_app(hmi))

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport, base_url="http://hmi.test")

    async def login(self, c: httpx.AsyncClient, user: str) -> dict[str, str]:
        """Log `c` in as one of the demo users; the headers that carry its CSRF token."""
        r = await c.post("/api/login", json={"user": user, "password": PASSWORD[user]})
        assert r.status_code == 200, r.text
        return {"X-CSRF-Token": r.json()["csrf"]}

    async def refused_but_to_technicians(self, endpoints: list[Endpoint]) -> None:
        """Each endpoint answers a viewer and an operator 403 (with their CSRF token) and no session 401."""
        for user in ("viewer", "operator"):
            async with self.client() as c:
                h = await self.login(c, user)
                for method, path, body in endpoints:
                    r = await c.request(method, path, json=body, headers=h)
                    assert r.status_code == 403, (user, path, r.status_code)
        async with self.client() as c:
            for method, path, body in endpoints:  # no session at all
                assert (await c.request(method, path, json=body)).status_code == 401, path
