"""A small client of the line's HMI API, for the command line (`sorter clip start|stop|status`).

The running service's only control channel a technician reaches from a shell is its HMI: the same login,
role, session and CSRF checks as at a panel (sorter/north/hmi/app.py), so a clip started from the CLI is
logged with the technician's name like one started from the panel. Standard library only (urllib).
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sorter.config import HmiConfig


class HmiClientError(Exception):
    """The HMI refused or could not be reached; the message says why (the HMI's own reason where it gave one)."""


def hmi_url(cfg: HmiConfig) -> str:
    """The HMI of this line PC, as the config serves it (a listen-all address is reached on loopback)."""
    host = cfg.host if cfg.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if cfg.https else 'http'}://{host}:{cfg.port}"


class HmiClient:
    def __init__(self, url: str, *, cafile: Path | None = None, timeout: float = 130.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        handlers: list[Any] = [urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())]
        if self.url.startswith("https://"):
            ctx = ssl.create_default_context(cafile=str(cafile) if cafile is not None else None)
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        self._opener = urllib.request.build_opener(*handlers)
        self.csrf = ""

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        if self.csrf:
            req.add_header("x-csrf-token", self.csrf)
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("detail")
            except (ValueError, AttributeError):
                detail = None
            raise HmiClientError(f"{exc.code}: {detail or exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise HmiClientError(f"cannot reach the HMI at {self.url}: {reason}") from None

    def login(self, user: str, password: str) -> dict[str, Any]:
        info: dict[str, Any] = self.request("POST", "/api/login", {"user": user, "password": password})
        self.csrf = str(info.get("csrf", ""))
        return info

    def logout(self) -> None:
        with contextlib.suppress(HmiClientError):
            self.request("POST", "/api/logout")
