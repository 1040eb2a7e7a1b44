"""The operator's web HMI: login and roles, bad input that changes nothing, and a real headless browser
driving the simulated line (Start, counts rising, live view, Hold, an alarm from a pulled PLC cable
acknowledged; a viewer without buttons and refused by the endpoints; the HMI down, the line sorting on).

API tests talk real HTTP(S) and WebSocket to the HMI of a LineService that is built but not run (its
PackML machine and alarm board are real; its loop is the test's). HTTPS tests serve a certificate made
by `sorter hmi certs` and trust exactly it. Browser tests use Debian's Chromium through Playwright
(`make browser` installs it; in CI a missing browser fails the tests).

Tiers: each test carries its own marker, as one module-level `wire` would give the browser test on the
running line (`line`) two tiers: the API tests are `wire`, the config test `fast`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import shutil
import socket
import ssl
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import ValidationError
from typer.testing import CliRunner
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from sim.bench_hmi import CHROMIUM as BROWSER
from sim.bench_hmi import CHROMIUM_ARGS, panel_browser
from sim.config import load_sim_config
from sorter.app import Line as BuiltLine
from sorter.app import build_line
from sorter.cli import app as sorter_cli
from sorter.config import HmiConfig, LineConfig, load_config
from sorter.core.alarms import Condition
from sorter.core.packml import State
from sorter.north.hmi.app import COOKIE
from sorter.north.hmi.server import CERT_WARN_DAYS, RESTART_S
from sorter.north.hmi.tls import CERT_FILE, KEY_FILE, fingerprint, make_server_certificate
from tests.conftest import LineRun, skip_or_fail_in_ci, wait_until
from tests.reclog import RecLog

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "sorter-cnn.onnx"
CHROMIUM = Path(BROWSER)
PASSWORD = {u: f"demo-{u}" for u in ("viewer", "operator", "technician")}  # config/sim.yaml's demo users


def line_config(tmp_path: Path, **hmi: Any) -> LineConfig:
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    return cfg.model_copy(
        update={
            "records": cfg.records.model_copy(update={"path": tmp_path / "records.sqlite"}),
            "opcua_server": None,
            "hmi": HmiConfig(**{"host": "127.0.0.1", "port": 0, **hmi}),
        }
    )


class Line:
    """A built (not running) line service with its HMI serving, and HTTP helpers (over HTTPS: trusting exactly
    the HMI's certificate, as a panel does)."""

    def __init__(self, built: BuiltLine, log: RecLog) -> None:
        self.svc = built.service
        assert built.hmi is not None
        self.hmi = built.hmi
        self.log = log
        self.url = built.hmi.url.rstrip("/")
        cert = built.hmi.cfg.certificate
        self.tls = ssl.create_default_context(cafile=str(cert)) if cert is not None else None

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10, verify=self.tls or True, **kw)

    @property
    def ws_kw(self) -> dict[str, Any]:
        """websockets' connect() arguments for this HMI (wss: its certificate)."""
        return {"origin": Origin(self.url), **({"ssl": self.tls} if self.tls is not None else {})}

    async def login(self, c: httpx.AsyncClient, user: str) -> str:
        r = await c.post("/api/login", json={"user": user, "password": PASSWORD[user]})
        assert r.status_code == 200, r.text
        assert r.json()["role"] == user
        return str(r.json()["csrf"])

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http") + "/ws"


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **hmi: Any) -> AsyncIterator[Line]:
    built = build_line(line_config(tmp_path, **hmi), auto_start=False)
    svc, log = built.service, RecLog()
    assert built.hmi is not None
    built.hmi.log = log
    try:
        await built.hmi.start()
        svc._publish()  # the line is built, not run: its first stats, as run() would publish them
        yield Line(built, log)
    finally:
        await svc.control.shutdown()
        await built.hmi.stop()
        svc.close_workers()
        svc.records.close()


@pytest_asyncio.fixture
async def line(tmp_path: Path) -> AsyncIterator[Line]:
    async with serving(tmp_path) as ln:
        yield ln


def hmi_certs(out: Path, *args: str) -> Any:
    """`sorter hmi certs --out OUT ARGS...`, in this process."""
    return CliRunner().invoke(sorter_cli, ["hmi", "certs", "--out", str(out), *args])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fresh certificate and key for the HMI, made by `sorter hmi certs` (names: this host, localhost, 127.0.0.1)."""
    out = tmp_path_factory.mktemp("pki")
    r = hmi_certs(out)
    assert r.exit_code == 0, r.output
    return {"certificate": out / CERT_FILE, "private_key": out / KEY_FILE}


# --- login, sessions, roles, forged requests ---


@pytest.mark.wire
async def test_wrong_password_and_malformed_logins_change_nothing_and_are_logged(line: Line) -> None:
    async with line.client() as c:
        for body in ({"user": "operator", "password": "nope"}, {"user": "nobody", "password": "demo-operator"}):
            r = await c.post("/api/login", json=body)
            assert r.status_code == 401 and COOKIE not in r.cookies
        r = await c.post(
            "/api/login",
            content=b"user=operator&password=secret-typo",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 401
        r = await c.post("/api/login", json={"user": "operator", "password": "hunter2", "role": "technician"})
        assert r.status_code == 422  # unknown field: refused, not ignored
        r = await c.post("/api/login", content=b"{not json")
        assert r.status_code == 422
        assert (await c.get("/api/state")).status_code == 401  # still nobody
    refused = line.log.find("hmi login refused")
    assert [r["reason"] for r in refused] == ["wrong user or password"] * 3 + ["malformed"] * 2
    assert {r.get("user") for r in refused[:3]} == {"operator", "nobody"}
    for secret in ("nope", "secret-typo", "hunter2", "demo-operator"):
        assert secret not in line.log.text()  # no password ever reaches the log
    assert line.svc.control.state is State.STOPPED


@pytest.mark.wire
async def test_a_form_login_works_too_and_guessing_is_throttled(line: Line) -> None:
    async with line.client() as c:
        r = await c.post("/api/login", data={"user": "viewer", "password": "demo-viewer"})
        assert r.status_code == 200 and r.json()["role"] == "viewer"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert "secure" not in cookie and "strict-transport-security" not in r.headers  # plain HTTP (the demo's)
        for _ in range(5):
            assert (await c.post("/api/login", json={"user": "operator", "password": "guess"})).status_code == 401
        r = await c.post("/api/login", json={"user": "operator", "password": "demo-operator"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0  # even the right password waits now
    assert line.log.find("hmi login refused", reason="throttled")


@pytest.mark.wire
async def test_viewer_sees_the_line_but_every_control_endpoint_refuses_403(line: Line) -> None:
    svc = line.svc
    svc.alarm_board.update([Condition("plc_offline", "no answer", "check the cable")], now=0.0)
    svc.alarm_board.update([Condition("plc_offline", "no answer", "check the cable")], now=2.0)
    svc._publish()
    routing_before = svc.cfg.routing
    hmi = line.hmi
    # the HMI builds its view from the published stats at hmi.push_hz
    await wait_until(lambda: hmi.view is not None and bool(hmi.view["alarms"]), 5, "the alarm in the view")
    async with line.client() as c:
        csrf = await line.login(c, "viewer")
        state = (await c.get("/api/state")).json()
        assert state["state"] == "Stopped" and state["alarms"][0]["name"] == "plc_offline"
        h = {"X-CSRF-Token": csrf}
        for method, path, body in (
            ("POST", "/api/command/Reset", None),
            ("POST", "/api/command/Abort", None),
            ("POST", "/api/alarms/plc_offline/ack", None),
            ("PUT", "/api/routing/thresholds", {"min_confidence": 0.5}),
            ("POST", "/api/model", {"path": str(MODEL)}),
            ("GET", "/api/models", None),
            ("GET", "/api/labels", None),
            ("POST", "/api/labels/undo", None),
        ):
            r = await c.request(method, path, json=body, headers=h)
            assert r.status_code == 403, (path, r.status_code, r.text)
        r = await c.get("/api/camera/cam0")  # no frame yet on a line that does not run
        assert r.status_code == 404
        assert (await c.get("/api/camera/../../etc/passwd")).status_code == 404
    async with line.client() as c:  # Prometheus scrapes without a session (sorter/north/metrics.py)
        r = await c.get("/metrics")
        assert r.status_code == 200 and "sorter_" in r.text
    assert svc.control.state is State.STOPPED
    assert svc.alarm_board.shown[0].acked_by is None
    assert svc.cfg.routing is routing_before
    assert len(line.log.find("hmi request refused", reason="role", role="viewer")) == 8


@pytest.mark.wire
async def test_operator_commands_need_the_csrf_token_and_the_same_origin(line: Line) -> None:
    svc = line.svc
    async with line.client() as c:
        csrf = await line.login(c, "operator")
        assert (await c.post("/api/command/Abort")).status_code == 403  # no token
        assert (await c.post("/api/command/Abort", headers={"X-CSRF-Token": "forged"})).status_code == 403
        # a page on another site making the operator's browser post (cookie sent, token even guessed right)
        r = await c.post("/api/command/Abort", headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"})
        assert r.status_code == 403
        r = await c.post("/api/command/Abort", headers={"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403
        assert svc.control.state is State.STOPPED  # nothing changed
        assert (await c.post("/api/command/Launch", headers={"X-CSRF-Token": csrf})).status_code == 404
        r = await c.post("/api/command/Start", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 409 and "not allowed in state Stopped" in r.json()["detail"]
        r = await c.post("/api/command/Abort", headers={"X-CSRF-Token": csrf, "Origin": line.url})
        assert r.status_code == 200 and r.json()["state"] in ("Aborting", "Aborted")
    await wait_until(lambda: svc.control.state is State.ABORTED, 5, "aborted")
    reasons = [r["reason"] for r in line.log.find("hmi request refused")]
    assert reasons[:4] == ["csrf", "csrf", "cross_site", "cross_site"]
    assert line.log.find("hmi command", user="operator", command="Abort")


@pytest.mark.wire
async def test_sessions_expire_when_idle_and_after_their_maximum_and_at_logout(tmp_path: Path) -> None:
    from sorter.north.hmi.sessions import SessionStore

    idle_s, max_s = 60.0, 300.0
    now = [1000.0]  # the sessions' clock, moved by hand: expiry judged exactly, whatever the machine's load
    async with serving(tmp_path, session_idle_s=idle_s, session_max_s=max_s) as line:
        line.hmi.sessions = SessionStore(idle_s, max_s, clock=lambda: now[0])
        async with line.client() as c:
            csrf = await line.login(c, "operator")
            now[0] += idle_s - 0.1
            assert (await c.get("/api/session")).status_code == 200  # idle not quite long enough; touched
            now[0] += idle_s + 0.1  # idle longer than session_idle_s
            r = await c.post("/api/command/Abort", headers={"X-CSRF-Token": csrf})
            assert r.status_code == 401 and "expired" in r.json()["detail"]
            assert (await c.get("/api/state")).status_code == 401  # gone for good
        async with line.client() as c:
            await line.login(c, "viewer")
            for _ in range(5):  # active all along, 295 s ...
                now[0] += idle_s - 1.0
                assert (await c.get("/api/session")).status_code == 200
            now[0] += 5.1
            assert (await c.get("/api/session")).status_code == 401  # ... but past session_max_s
        async with line.client() as c:
            csrf = await line.login(c, "operator")
            token = c.cookies[COOKIE]
            assert (await c.post("/api/logout", headers={"X-CSRF-Token": csrf})).status_code == 200
        async with line.client(cookies={COOKIE: token}) as c:  # the old cookie, replayed
            assert (await c.post("/api/command/Abort", headers={"X-CSRF-Token": csrf})).status_code == 401
        assert line.svc.control.state is State.STOPPED
        assert len(line.log.find("hmi request refused", reason="session_expired")) >= 2
        assert line.log.find("hmi request refused", reason="session_unknown")


@pytest.mark.wire
async def test_websocket_pushes_state_and_ignores_malformed_messages(line: Line) -> None:
    svc = line.svc
    async with line.client() as c:
        await line.login(c, "operator")
        cookie = f"{COOKIE}={c.cookies[COOKIE]}"
    headers = {"Cookie": cookie}
    async with ws_connect(line.ws_url, additional_headers=headers, **line.ws_kw) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 3))
        assert first["type"] == "state" and first["state"] == "Stopped"
        assert "Reset" in first["allowed"] and "Start" not in first["allowed"]
        for junk in (
            "not json",
            "[1, 2, 3]",
            '{"type": "command", "name": "Abort"}',  # commands never come this way
            '{"type": "activity", "extra": 1}',
            b"\x00\x01binary",
            "x" * 10_000,
        ):
            await ws.send(junk)
        await ws.send('{"type": "activity"}')  # the one message the page sends: fine, not logged
        t0, states = time.monotonic(), 0
        while time.monotonic() - t0 < 1.0:  # still pushed at hmi.push_hz
            msg = await asyncio.wait_for(ws.recv(), 2)
            states += isinstance(msg, str) and json.loads(msg)["type"] == "state"
        assert states >= 3  # ~5 in a second (a busy machine may stretch a tick)
    ignored = line.log.find("hmi websocket message ignored")
    assert [i["reason"] for i in ignored] == [
        "not JSON",
        "not an object",
        "unknown message",
        "unknown message",
        "binary message",
    ]  # the 6th (too long) is counted; the log shows the first 5 of a connection, then every 100th
    assert svc.control.state is State.STOPPED
    # no session, or another site's page: no live data
    async with ws_connect(line.ws_url, origin=Origin(line.url)) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 3)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(line.ws_url, additional_headers=headers, origin=Origin("http://evil.example")):
            pass
    assert refused.value.response.status_code == 403


@pytest.mark.wire
async def test_technician_changes_thresholds_and_swaps_models_through_the_check(line: Line, tmp_path: Path) -> None:
    svc = line.svc
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(MODEL.read_bytes()[:5000])
    version = svc.classifier.version
    async with line.client() as c:
        op = await line.login(c, "operator")
        r = await c.put("/api/routing/thresholds", json={"min_confidence": 0.8}, headers={"X-CSRF-Token": op})
        assert r.status_code == 403
    async with line.client() as c:
        h = {"X-CSRF-Token": await line.login(c, "technician")}
        r = await c.put("/api/routing/thresholds", json={"min_confidence": 0.8}, headers=h)
        assert r.status_code == 200 and r.json() == {"min_confidence": 0.8, "fallback_min_confidence": 0.97}
        assert svc.cfg.routing.min_confidence == 0.8 and svc.cfg.routing.fallback_min_confidence == 0.97
        bad: Any
        for bad in ({"min_confidence": 1.5}, {"classes": {}}, {}, [0.5]):
            r = await c.put("/api/routing/thresholds", json=bad, headers=h)
            assert r.status_code == 422, (bad, r.text)
        assert svc.cfg.routing.min_confidence == 0.8
        listed = (await c.get("/api/models")).json()
        assert str(MODEL) in listed["models"]
        r = await c.post("/api/model", json={"path": str(broken)}, headers=h)
        assert r.status_code == 422 and r.json()["detail"].startswith("model refused:")
        r = await c.post("/api/model", json={"path": str(ROOT / "README.md")}, headers=h)
        assert r.status_code == 422
        assert svc.classifier.version == version  # the refusals changed nothing
        r = await c.post("/api/model", json={"path": str(MODEL)}, headers=h)
        assert r.status_code == 200 and r.json()["version"] == version
    assert line.log.find("hmi model refused", user="technician")
    assert line.log.find("hmi routing thresholds", user="technician", min_confidence=0.8)


@pytest.mark.wire
async def test_sorter_clip_starts_and_stops_a_clip_through_the_hmi(line: Line, monkeypatch: pytest.MonkeyPatch) -> None:
    def clip(*args: str) -> Any:
        cmd = ["clip", *args, "-c", str(ROOT / "config" / "sim.yaml"), "--hmi", line.url, "--json"]
        return CliRunner().invoke(sorter_cli, cmd)

    def answer(r: Any) -> Any:  # the command's JSON line (the served line logs to the same captured stdout)
        return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])

    monkeypatch.setenv("SORTER_HMI_PASSWORD", PASSWORD["technician"])
    r = await asyncio.to_thread(clip, "start", "--max-mb", "16")
    assert r.exit_code == 0, r.output
    started = answer(r)
    assert started["active"] and started["max_bytes"] == 16 * 1024**2
    r = await asyncio.to_thread(clip, "start")
    assert r.exit_code == 1 and "409" in r.output and "already" in r.output
    r = await asyncio.to_thread(clip, "status")
    assert r.exit_code == 0 and answer(r)["clip"]["active"]
    r = await asyncio.to_thread(clip, "stop")
    assert r.exit_code == 0, r.output
    stopped = answer(r)
    assert stopped["folder"] == started["folder"] and not stopped["active"] and stopped["stopped_by"] == "technician"
    monkeypatch.setenv("SORTER_HMI_PASSWORD", PASSWORD["operator"])
    r = await asyncio.to_thread(clip, "start", "--user", "operator")
    assert r.exit_code == 1 and "403" in r.output
    assert line.log.find("hmi clip started", user="technician") and line.log.find("hmi clip stopped")


@pytest.mark.wire
async def test_a_port_in_use_is_an_alarm_and_the_hmi_comes_up_when_it_is_free(tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    built = build_line(line_config(tmp_path, port=port), auto_start=False)
    svc, hmi = built.service, built.hmi
    assert hmi is not None and hmi in svc.parts.companions
    hmi.log = RecLog()
    try:
        await svc._start_companion(hmi)  # logged, not raised: the line would sort on
        cond = hmi.condition()  # what the service's alarm board gets from its companions
        assert cond is not None and cond.name == "hmi_down" and "in use" in cond.cause
        blocker.close()
        await wait_until(lambda: hmi.listening, RESTART_S + 3, "HMI up once the port is free")
        assert hmi.url.endswith(f":{port}/") and hmi.condition() is None
        async with httpx.AsyncClient(base_url=hmi.url) as c:
            assert (await c.get("/")).status_code == 200
    finally:
        blocker.close()
        await hmi.stop()
        svc.records.close()


@pytest.mark.wire
async def test_a_crashed_hmi_raises_an_alarm_and_restarts_on_the_same_port_keeping_its_sessions(
    tmp_path: Path, certs: dict[str, Path]
) -> None:
    async with serving(tmp_path, **certs) as line:
        hmi = line.hmi
        async with line.client() as c:
            csrf = await line.login(c, "operator")
            cookie = c.cookies[COOKIE]
        assert hmi._uvicorn is not None
        url = hmi.url
        hmi._uvicorn.should_exit = True  # uvicorn ends as if it had failed
        await wait_until(lambda: not hmi.listening, 5, "HMI down")
        await wait_until(lambda: hmi.listening, RESTART_S + 5, "HMI back")
        assert hmi.url == url and url.startswith("https://")  # same port, TLS again
        assert line.log.find("ALARM hmi down: the operator panel is unavailable")
        # the panel reconnects with the cookie it has: still logged in, its CSRF token still good
        async with line.client(cookies={COOKIE: cookie}) as c:
            r = await c.get("/api/session")
            assert r.status_code == 200 and r.json()["user"] == "operator" and r.json()["csrf"] == csrf
            r = await c.post("/api/command/Abort", headers={"X-CSRF-Token": csrf})
            assert r.status_code == 200, r.text
        async with ws_connect(line.ws_url, additional_headers={"Cookie": f"{COOKIE}={cookie}"}, **line.ws_kw) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 3))["type"] == "state"
        assert not line.log.find("hmi request refused")


@pytest.mark.wire
async def test_a_service_restart_logs_everybody_out_and_the_page_is_told_why(
    tmp_path: Path, certs: dict[str, Path]
) -> None:
    async with serving(tmp_path, **certs) as before:
        async with before.client() as c:
            csrf = await before.login(c, "operator")
            cookie = c.cookies[COOKIE]
        port = urlsplit(before.url).port
    # the service again (as systemd restarts it: a new HMI and session store), on the same address
    async with serving(tmp_path, port=port, **certs) as after:
        assert after.url == before.url
        async with after.client(cookies={COOKIE: cookie}) as c:
            for method, path, headers in (
                ("GET", "/api/session", {}),
                ("GET", "/api/state", {}),
                ("POST", "/api/command/Abort", {"X-CSRF-Token": csrf}),
            ):
                r = await c.request(method, path, headers=headers)
                assert r.status_code == 401, (path, r.status_code)
                assert r.json()["detail"] == "the line service was restarted, log in again"
        async with ws_connect(after.ws_url, additional_headers={"Cookie": f"{COOKIE}={cookie}"}, **after.ws_kw) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 3)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401  # the page shows the login ...
        assert closed.value.rcvd.reason == "the line service was restarted, log in again"  # ... and says why
        assert after.svc.control.state is State.STOPPED  # the old session changed nothing
        assert len(after.log.find("hmi request refused", reason="session_restarted")) == 4
        # a cookie that never was a session is just "not logged in"
        async with after.client(cookies={COOKIE: "forged"}) as c:
            assert (await c.get("/api/state")).json()["detail"] == "not logged in"
        async with after.client() as c:  # logging in again is all it takes
            h = {"X-CSRF-Token": await after.login(c, "operator")}
            assert (await c.post("/api/command/Abort", headers=h)).status_code == 200


# --- HTTPS ---


@pytest.mark.fast
def test_the_config_says_when_the_hmi_speaks_plain_http() -> None:
    tls = {"certificate": Path("hmi-cert.pem"), "private_key": Path("hmi-key.pem")}
    assert not HmiConfig().https and not HmiConfig(tls=False).https
    assert HmiConfig(**tls).https and HmiConfig(tls=True, **tls).https
    bad: dict[str, Any]
    for bad, why in (
        ({"tls": True}, "needs certificate and private_key"),
        ({"certificate": Path("hmi-cert.pem")}, "go together"),
        ({"private_key": Path("hmi-key.pem")}, "go together"),
        ({"tls": False, **tls}, "serves plain HTTP"),
    ):
        with pytest.raises(ValidationError, match=why):
            HmiConfig(**bad)
    # the demo says it is plain HTTP; the plant template serves HTTPS, its files relative to the config
    demo = load_sim_config(ROOT / "config" / "sim.yaml").hmi
    assert demo is not None and demo.tls is False and not demo.https
    plant = load_config(ROOT / "config" / "line.example.yaml").hmi
    assert plant is not None and plant.tls is True and plant.https
    assert plant.certificate == ROOT / "pki" / CERT_FILE and plant.private_key == ROOT / "pki" / KEY_FILE


@pytest.mark.wire
def test_hmi_certs_writes_a_server_certificate_for_the_panels_and_a_private_key(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    r = hmi_certs(out, "--host", "line-pc", "--host", "10.0.0.5", "--days", "400")
    assert r.exit_code == 0, r.output
    cert_file, key_file = out / CERT_FILE, out / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600  # the key: the service's user only
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"line-pc", socket.gethostname(), "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("10.0.0.5", "127.0.0.1", "::1")
    }
    assert cert.issuer == cert.subject  # self-signed ...
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca  # ... end-entity (Firefox)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=399) < left <= dt.timedelta(days=400)
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert fingerprint(cert) in r.stdout and f"certificate: {cert_file.resolve()}" in r.stdout
    # never replaced by accident: the panels trust this one
    first = cert_file.read_bytes()
    r = hmi_certs(out)
    assert r.exit_code == 2 and "--force" in r.stderr and cert_file.read_bytes() == first
    r = hmi_certs(out, "--force")
    assert r.exit_code == 0 and cert_file.read_bytes() != first
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


@pytest.mark.wire
async def test_https_with_the_made_certificate_secure_cookies_and_hsts(tmp_path: Path, certs: dict[str, Path]) -> None:
    async with serving(tmp_path, **certs) as line:
        assert line.url.startswith("https://127.0.0.1:")
        async with line.client() as c:  # trusts exactly the certificate `sorter hmi certs` made
            r = await c.get("/")
            assert r.status_code == 200 and r.headers["strict-transport-security"] == "max-age=31536000"
            r = await c.get("/api/state")
            assert r.status_code == 401 and "strict-transport-security" in r.headers  # on refusals too
            r = await c.post("/api/login", json={"user": "operator", "password": PASSWORD["operator"]})
            assert r.status_code == 200
            flags = {a.strip().lower() for a in r.headers["set-cookie"].split(";")[1:]}
            assert {"secure", "httponly", "samesite=strict", "path=/"} <= flags
            csrf = r.json()["csrf"]
            assert (await c.get("/api/session")).status_code == 200  # the cookie goes back over https
            # a page served over plain http is not this HMI's own
            r = await c.post(
                "/api/command/Abort", headers={"X-CSRF-Token": csrf, "Origin": "http" + line.url.removeprefix("https")}
            )
            assert r.status_code == 403
            r = await c.post("/api/command/Abort", headers={"X-CSRF-Token": csrf, "Origin": line.url})
            assert r.status_code == 200
            ws_headers = {"Cookie": f"{COOKIE}={c.cookies[COOKIE]}"}
            async with ws_connect(line.ws_url, additional_headers=ws_headers, **line.ws_kw) as ws:  # wss://
                assert json.loads(await asyncio.wait_for(ws.recv(), 3))["type"] == "state"
            r = await c.post("/api/logout", headers={"X-CSRF-Token": csrf})
            assert r.status_code == 200 and "secure" in r.headers["set-cookie"].lower()
        # a client that does not trust the certificate gets no connection at all
        async with httpx.AsyncClient(verify=ssl.create_default_context()) as c:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await c.get(line.url + "/")
    assert line.log.find("hmi request refused", reason="cross_site")


@pytest.mark.wire
async def test_plain_http_gets_no_answer_when_tls_is_configured(tmp_path: Path, certs: dict[str, Path]) -> None:
    async with serving(tmp_path, **certs) as line:
        port = urlsplit(line.url).port
        assert port is not None
        async with httpx.AsyncClient(timeout=5) as c:
            with pytest.raises(httpx.TransportError):
                await c.get(f"http://127.0.0.1:{port}/")
        # on the wire: an HTTP request on the HMI's port is answered by TLS (an alert, or the connection closed)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /api/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(4096), 5)
        except ConnectionResetError:
            answer = b""  # closed with a reset: no answer either
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        assert not answer.startswith(b"HTTP/"), answer[:80]
        assert line.hmi.listening
        async with line.client() as c:  # https on the same port goes on
            assert (await c.get("/")).status_code == 200


@pytest.mark.wire
async def test_an_unusable_certificate_is_an_alarm_and_a_renewed_one_is_taken(
    tmp_path: Path, certs: dict[str, Path]
) -> None:
    cert, key = tmp_path / CERT_FILE, tmp_path / KEY_FILE
    make_server_certificate(cert, key, hostnames=["127.0.0.1"], days=CERT_WARN_DAYS - 5)
    shutil.copy(certs["private_key"], key)  # the key of another certificate
    built = build_line(line_config(tmp_path, certificate=cert, private_key=key), auto_start=False)
    svc, hmi = built.service, built.hmi
    assert hmi is not None
    hmi.log = RecLog()
    try:
        await svc._start_companion(hmi)  # logged, not raised: the line would sort on
        cond = hmi.condition()
        assert cond is not None and cond.name == "hmi_down"
        assert "does not belong to the certificate" in cond.cause and str(cert) in cond.cause
        # a new pair on disk (`sorter hmi certs --force`): taken at the next try, no restart of the service
        make_server_certificate(cert, key, hostnames=["127.0.0.1"], days=CERT_WARN_DAYS - 5, overwrite=True)
        await wait_until(lambda: hmi.listening, RESTART_S + 3, "HMI up with the renewed certificate")
        assert hmi.url.startswith("https://")
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert))) as c:
            assert (await c.get(hmi.url)).status_code == 200
        # ... which expires within CERT_WARN_DAYS: an alarm of its own while the HMI serves
        cond = hmi.condition()
        assert cond is not None and cond.name == "hmi_certificate" and "expires on" in cond.cause
    finally:
        await hmi.stop()
        svc.records.close()


# --- a real browser on the running simulated line ---


def _require_browser() -> None:
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "the playwright package is not installed (pip install -e '.[dev]')"
    if problem is None and not CHROMIUM.exists():
        problem = f"no Chromium at {CHROMIUM}: `make browser` installs Debian's chromium"
    if problem is not None:
        skip_or_fail_in_ci(problem)


def _run_browser(url: str, loop: asyncio.AbstractEventLoop, sim: Any, out: dict[str, Any]) -> None:
    """What an operator and a viewer do at their panels (sync Playwright, on a thread of its own)."""
    from playwright.sync_api import expect, sync_playwright

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(15)

    def count(page: Any, fraction: str) -> int:
        return int(page.inner_text(f"#count-{fraction}"))

    def frames(page: Any) -> dict[str, int]:
        return dict(page.evaluate("window.hmiStats.frames"))

    def wait_js(page: Any, expr: str, arg: Any = None, timeout: float = 10.0) -> None:
        # polled from here: Playwright's wait_for_function evaluates strings in the page, which the HMI's
        # Content-Security-Policy (script-src 'self', no eval) rightly refuses
        t0 = time.monotonic()
        while not page.evaluate(expr, arg):
            assert time.monotonic() - t0 < timeout, f"{expr} not within {timeout} s"
            time.sleep(0.1)

    with sync_playwright() as p:
        # at low priority, as the stand-in for panel PCs it is (sim.bench_hmi.panel_browser)
        browser = p.chromium.launch(executable_path=str(panel_browser(out["dir"])), args=CHROMIUM_ARGS)
        try:
            op = browser.new_context(viewport={"width": 1280, "height": 800}, has_touch=True).new_page()
            op.goto(url)
            op.fill("#login-user", "operator")
            op.fill("#login-password", "demo-wrong")
            op.click("#login-submit")
            expect(op.locator("#login-message")).to_contain_text("wrong user name or password")
            op.fill("#login-password", PASSWORD["operator"])
            op.click("#login-submit")
            state = op.locator("#state")
            expect(state).to_have_text("Execute", timeout=10_000)
            # Stop, Reset, Start: only the buttons the state allows are enabled
            op.click("#btn-Stop")
            expect(state).to_have_text("Stopped", timeout=10_000)
            expect(op.locator("#btn-Start")).to_be_disabled()
            expect(op.locator("#btn-Hold")).to_be_disabled()
            op.click("#btn-Reset")
            expect(state).to_have_text("Idle", timeout=10_000)
            expect(op.locator("#btn-Start")).to_be_enabled()
            seen = count(op, "ndfeb")
            f0 = frames(op)
            op.click("#btn-Start")
            expect(state).to_have_text("Execute", timeout=20_000)
            # the counts rise and the live view moves on
            wait_js(op, "n => Number(document.querySelector('#count-ndfeb').textContent) > n", seen + 5, 20)
            wait_js(op, "f => Object.entries(window.hmiStats.frames).every(([k, v]) => v >= (f[k] || 0) + 8)", f0)
            out["seqs"] = [op.get_attribute(f"#cam-{c} img", "data-seq") for c in ("cam0", "cam1")]
            out["decided_caption"] = op.inner_text("#cam-cam0 figcaption")
            out["counts"] = (seen, count(op, "ndfeb"))
            op.screenshot(path=str(out["dir"] / "operator.png"))
            # Hold and Unhold
            op.click("#btn-Hold")
            expect(state).to_have_text("Held", timeout=10_000)
            expect(op.locator("#btn-Unhold")).to_be_enabled()
            op.click("#btn-Unhold")
            expect(state).to_have_text("Execute", timeout=10_000)
            # pull the PLC's cable: the line holds itself, the alarm shows with cause and action
            on_loop(sim.send(cmd="plc_link", on=False))
            alarm = op.locator('#alarms li[data-alarm="plc_offline"]')
            expect(alarm).to_be_visible(timeout=10_000)
            expect(alarm.locator(".action")).to_contain_text("network cable")
            expect(state).to_have_text("Held", timeout=10_000)
            on_loop(sim.send(cmd="plc_link", on=True))
            expect(state).to_have_text("Execute", timeout=20_000)
            expect(alarm).to_have_attribute("data-active", "false", timeout=10_000)  # cleared, still listed
            alarm.locator("button.ack").click()
            expect(alarm).to_have_count(0, timeout=5_000)
            # a viewer at another panel: sees the line, has no buttons, and the endpoints refuse
            vw = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            vw.goto(url)
            vw.fill("#login-user", "viewer")
            vw.fill("#login-password", PASSWORD["viewer"])
            vw.click("#login-submit")
            expect(vw.locator("#state")).to_have_text("Execute", timeout=10_000)
            wait_js(vw, "() => window.hmiStats.states > 3")
            out["viewer_buttons"] = vw.locator("#controls button, #alarms button, #technician:not([hidden])").count()
            out["viewer_status"] = vw.evaluate(
                """async () => {
                    const s = await (await fetch('/api/session')).json();
                    const post = (p) => fetch(p, {method: 'POST', headers: {'X-CSRF-Token': s.csrf}});
                    return [(await post('/api/command/Hold')).status, (await post('/api/command/Stop')).status,
                            (await post('/api/alarms/plc_offline/ack')).status];
                }"""
            )
            out["viewer_state"] = vw.inner_text("#state")
            vw.screenshot(path=str(out["dir"] / "viewer.png"))
            out["operator_states"] = op.evaluate("window.hmiStats.states")
            op.click("#logout")
            expect(op.locator("#login")).to_be_visible()
        finally:
            browser.close()


@pytest.mark.line
@pytest.mark.timeout(240)
async def test_operator_and_viewer_in_a_headless_browser_on_the_running_line(tmp_path: Path) -> None:
    _require_browser()
    out: dict[str, Any] = {"dir": tmp_path}
    after: dict[str, Any] = {}

    async def panels(built: BuiltLine, sim: Any) -> None:
        svc, hmi = built.service, built.hmi
        assert hmi is not None and hmi.listening
        await asyncio.to_thread(_run_browser, hmi.url, asyncio.get_running_loop(), sim, out)
        # the HMI goes down: the line sorts on, the alarm shows, the HMI comes back by itself
        assert hmi._uvicorn is not None
        pieces = svc.counters.pieces
        hmi._uvicorn.should_exit = True
        await wait_until(lambda: not hmi.listening, 5, "HMI down")
        await wait_until(lambda: "hmi_down" in [a.name for a in svc.alarm_board.active], 5, "hmi_down alarm")
        after["pieces_while_down"] = svc.counters.pieces - pieces
        after["state_while_down"] = svc.control.state
        await wait_until(lambda: hmi.listening, RESTART_S + 5, "HMI back")
        after["acked"] = [a for a in svc.alarm_board.history if a.name == "plc_offline"]

    report = await run_demo_with(tmp_path, panels)
    print("browser:", {k: v for k, v in out.items() if k != "dir"}, after)
    keys = (
        "pieces_fed",
        "pieces_binned",
        "pieces_accounted",
        "records",
        "frames_captured",
        "frames_dropped",
        "ejects_late",
        "merged_views",
        "decision_latency_ms",
        "pieces_fed_late",
    )
    print("report:", {k: report.get(k) for k in keys})
    assert out["counts"][1] > out["counts"][0]
    assert all(s for s in out["seqs"])
    assert out["viewer_buttons"] == 0
    assert out["viewer_status"] == [403, 403, 403]
    assert out["viewer_state"] == "Execute"
    assert out["operator_states"] >= 5 * 10  # pushed at 5 Hz over the scenario's tens of seconds
    assert after["acked"] and after["acked"][-1].acked_by == "operator"
    assert after["pieces_while_down"] > 0 and after["state_while_down"] is State.EXECUTE
    # the line sorted on through it all, the HMI going down included: every piece has its record, or a
    # counted fault (frames dropped while two Chromium tabs share the 2 cores, say) explains it
    LineRun(report, tmp_path / "run").assert_every_piece_accounted()


async def run_demo_with(tmp_path: Path, during: Any) -> dict[str, Any]:
    from sim.demo import run_demo

    cfg = load_sim_config(ROOT / "config" / "sim.yaml").model_copy(update={"opcua_server": None})
    return await run_demo(cfg, duration=6, seed=11, run_dir=tmp_path / "run", during=during)
