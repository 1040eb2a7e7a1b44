"""Fuzzing the operator HMI's HTTP API (issue 15, item 6) with schemathesis over the app's own OpenAPI schema.

The panel's app is built with `openapi_url=None` (no schema served to anyone); the schema is taken in this
process from `app.openapi()` and completed here with what FastAPI cannot see: the request bodies that the
handlers read themselves (login, thresholds, model), the routes left out of it (`/`, `/metrics`, `/static`),
and the names that matter for the path parameters (the PackML commands, the alarms on the board) beside any
string. Half the requests are raw bodies no schema describes instead (JSON nested deeper than the parser goes,
NaN, broken UTF-8, file names too long for the file system, more than MAX_BODY). Each request is sent over
real HTTP to the HMI of a built (not running) line service, as in
tests/test_hmi.py, with a credential variant drawn beside it.

Properties:

1. no response is a 5xx, for any request, with every credential variant (none, a viewer's, an operator's and a
   technician's session with the right CSRF token, wrong tokens, another site's Origin);
2. no request changes the line's state (PackML state, routing thresholds, model version, alarm
   acknowledgements) unless it carries an operator's or technician's live session, that session's CSRF token
   and the same origin: every generated request is sent without a session, with a viewer's (and its token),
   with an operator's or technician's and a wrong or missing token, or with their right token from another
   site, and the state is compared before and after it.

Bounds: `max_examples` (300) keeps each property near 10-15 s on the 2-core machine (a request is a few ms, a
refused login's argon2 check ~50 ms); the `deadline` of 10 s is twice the HMI's own 5 s limit for an answer
from the line, so an example that hangs fails instead of stalling the suite.

The calls are synchronous (requests, through schemathesis) on a worker thread: the test's event loop is the
line service's, and it must stay free to answer the HMI's requests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from websockets.asyncio.client import connect as ws_connect

from sorter.core.alarms import Condition
from sorter.north.hmi.app import COOKIE, LoginBody, ModelBody, ThresholdsBody, create_app
from tests.test_hmi import MODEL, Line, serving

pytestmark = pytest.mark.wire

EXAMPLES = 300
DEADLINE_MS = 10_000
ALARMS = ("plc_offline", "camera_stalled")


def api_schema(ln: Line) -> dict[str, Any]:
    """The app's OpenAPI schema, completed with what the handlers read by hand."""
    app = ln.hmi._app if getattr(ln.hmi, "_app", None) is not None else create_app(ln.hmi)
    raw: dict[str, Any] = app.openapi()
    raw = {**raw, "paths": {k: dict(v) for k, v in raw["paths"].items()}}
    paths = raw["paths"]

    def any_or(*values: str) -> dict[str, Any]:
        return {"anyOf": [{"enum": list(values)}, {"type": "string"}]}

    def body(model_schema: dict[str, Any], *examples: Any) -> dict[str, Any]:
        choices = [model_schema, {}]  # the model's shape, or any JSON at all
        if examples:
            choices.insert(0, {"enum": list(examples)})
        return {"required": False, "content": {"application/json": {"schema": {"anyOf": choices}}}}

    def plain(m: type) -> dict[str, Any]:
        s = dict(m.model_json_schema())  # type: ignore[attr-defined]
        s.pop("title", None)
        return s

    paths["/api/login"]["post"] = {
        **paths["/api/login"]["post"],
        "requestBody": body(plain(LoginBody), {"user": "operator", "password": "wrong"}),
    }
    paths["/api/routing/thresholds"]["put"] = {
        **paths["/api/routing/thresholds"]["put"],
        "requestBody": body(plain(ThresholdsBody), {"min_confidence": 0.5}, {"fallback_min_confidence": 0.1}),
    }
    paths["/api/model"]["post"] = {
        **paths["/api/model"]["post"],
        "requestBody": body(plain(ModelBody), {"path": str(MODEL)}),
    }
    for path, param, names in (
        ("/api/command/{name}", "name", COMMAND_NAMES),
        ("/api/alarms/{name}/ack", "name", list(ALARMS)),
    ):
        for op in paths[path].values():
            op["parameters"] = [
                {**p, "schema": any_or(*names)} if p["name"] == param else p for p in op.get("parameters", [])
            ]
    ok = {"200": {"description": "OK"}}
    paths["/"] = {"get": {"responses": ok}}
    paths["/metrics"] = {"get": {"responses": ok}}
    paths["/static/{file}"] = {
        "get": {
            "parameters": [
                {"name": "file", "in": "path", "required": True, "schema": any_or("app.js", "../app.py", "style.css")}
            ],
            "responses": ok,
        }
    }
    return raw


COMMAND_NAMES = ["Start", "Stop", "Hold", "Unhold", "Reset", "Abort", "Clear", "suspend", "abort"]


def snapshot(ln: Line) -> tuple[Any, ...]:
    svc = ln.svc
    board = svc.alarm_board
    return (
        svc.control.state,
        svc.cfg.routing,
        svc.classifier.version,
        tuple((a.name, a.acked_by, a.acked_at, a.active) for a in board.shown),
        len(board.history),
    )


class Credentials:
    """The credential variants of a request: the cookie and headers to send with it."""

    def __init__(self, ln: Line) -> None:
        self.ln = ln

    def get(self, variant: str) -> tuple[dict[str, str], dict[str, str]]:
        if variant == "none":
            return {}, {}
        if variant == "forged_cookie":
            return {COOKIE: f"{self.ln.hmi.sessions.instance}.forged"}, {"X-CSRF-Token": "forged"}
        role, _, how = variant.partition(":")
        sess = self.ln.hmi.sessions.create(role, role)  # type: ignore[arg-type]
        cookies = {COOKIE: sess.token}
        headers = {
            "right": {"X-CSRF-Token": sess.csrf},
            "no_csrf": {},
            "wrong_csrf": {"X-CSRF-Token": sess.csrf[:-1] + ("A" if sess.csrf[-1] != "A" else "B")},
            "other_csrf": {"X-CSRF-Token": self.ln.hmi.sessions.create(role, role).csrf},  # type: ignore[arg-type]
            "cross_origin": {"X-CSRF-Token": sess.csrf, "Origin": "http://evil.example"},
            "cross_site": {"X-CSRF-Token": sess.csrf, "Sec-Fetch-Site": "cross-site"},
            "http_origin_of_other_port": {"X-CSRF-Token": sess.csrf, "Origin": "http://127.0.0.1:1"},
        }[how]
        return cookies, headers


# may change the line: a live operator/technician session, its token, same origin
PRIVILEGED = ["operator:right", "technician:right"]
# must change nothing
UNPRIVILEGED = [
    "none",
    "forged_cookie",
    "viewer:right",
    "viewer:wrong_csrf",
    *(
        f"{role}:{how}"
        for role in ("operator", "technician")
        for how in ("no_csrf", "wrong_csrf", "other_csrf", "cross_origin", "cross_site", "http_origin_of_other_port")
    ),
]


@pytest_asyncio.fixture
async def fuzz_line(tmp_path: Path) -> AsyncIterator[Line]:
    async with serving(tmp_path) as ln:
        board = ln.svc.alarm_board
        conditions = [Condition(n, "fuzz", "none") for n in ALARMS]
        board.update(conditions, now=0.0)
        board.update(conditions, now=2.0)  # raised (the board's delay), not acknowledged
        ln.svc._publish()
        ln.hmi.throttle.locked = lambda client: 0.0  # type: ignore[method-assign]  # the fuzzer guesses passwords
        yield ln


def cases(ln: Line) -> st.SearchStrategy[Any]:
    schema = schemathesis.openapi.from_dict(api_schema(ln))
    ops = [r.ok() for r in schema.get_all_operations()]
    return st.one_of(
        *(
            op.as_strategy(generation_mode=mode)
            for op in ops
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        )
    )


@dataclass
class RawCase:
    """A request whose body is bytes that no JSON schema describes: nesting deeper than the parser goes, NaN,
    broken UTF-8, file names longer than the file system takes, more than MAX_BODY."""

    method: str
    formatted_path: str
    body: bytes
    content_type: str | None

    def call(self, base_url: str, session: requests.Session, headers: dict[str, str], **kw: Any) -> Any:
        h = {**headers, **({"Content-Type": self.content_type} if self.content_type else {})}
        return session.request(self.method, base_url + self.formatted_path, data=self.body, headers=h, **kw)


def _nested(depth: int, opener: bytes) -> bytes:
    closer = b"]" if opener == b"[" else b"0}"
    return opener * depth + closer * depth


RAW_BODIES = st.one_of(
    st.builds(_nested, st.integers(900, 3000), st.sampled_from([b"[", b'{"a":'])),
    st.builds(_nested, st.one_of(st.sampled_from([2, 999, 1000, 1500, 8000]), st.integers(1, 8000)), st.just(b"[")),
    st.builds(_nested, st.sampled_from([500, 1200, 2000]), st.just(b'{"a":')),
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"NaN",
            b'{"min_confidence": NaN}',
            b'{"fallback_min_confidence": -Infinity}',
            b'{"min_confidence": 1e400}',
            b'{"min_confidence": -0.0}',
            b'{"user": "operator", "password": NaN}',
            b'{"path": "\\ud800.onnx"}',
            b'{"path": "a\\u0000.onnx"}',
            b" " * 9000,
        ]
    ),
    st.builds(
        lambda folder, name: json.dumps({"path": f"{folder}{name}.onnx"}).encode(),
        st.sampled_from(["", "/", "/tmp/", "/proc/self/", "/root/", "/nonexistent/", "../"]),
        st.one_of(st.text(max_size=300), st.integers(200, 400).map(lambda n: "a" * n)),
    ),
)
RAW_CASES = st.builds(
    RawCase,
    st.just("POST"),
    st.sampled_from(["/api/login", "/api/model"]),
    RAW_BODIES,
    st.sampled_from(["application/json", "application/x-www-form-urlencoded", None]),
) | st.builds(
    RawCase, st.just("PUT"), st.just("/api/routing/thresholds"), RAW_BODIES, st.sampled_from(["application/json", None])
)


def requests_of(ln: Line) -> st.SearchStrategy[Any]:
    """Schemathesis' cases of every operation (valid and invalid against the schema), or as many raw bodies."""
    schema_cases = cases(ln)
    return st.booleans().flatmap(lambda raw: RAW_CASES if raw else schema_cases)


def send(ln: Line, http: requests.Session, case: Any, cookies: dict[str, str], headers: dict[str, str]) -> Any:
    http.cookies.clear()
    return case.call(base_url=ln.url, session=http, cookies=cookies, headers=headers, timeout=15)


async def run_fuzz(prop: Callable[[], None]) -> float:
    t0 = time.monotonic()
    await asyncio.to_thread(prop)
    return time.monotonic() - t0


@pytest.mark.timeout(300)
async def test_no_request_is_answered_with_a_5xx(fuzz_line: Line) -> None:
    ln = fuzz_line
    creds = Credentials(ln)
    http = requests.Session()
    seen: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=DEADLINE_MS,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
        database=None,
    )
    @given(case=requests_of(ln), variant=st.sampled_from(PRIVILEGED * 4 + UNPRIVILEGED))
    def prop(case: Any, variant: str) -> None:
        cookies, headers = creds.get(variant)
        r = send(ln, http, case, cookies, headers)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (variant, case.method, case.formatted_path, case.body, r.status_code, r.text)

    took = await run_fuzz(prop)
    print(f"5xx property: {sum(seen.values())} requests in {took:.1f} s, statuses {sorted(seen.items())}")
    assert not ln.log.find("hmi state push failed")


@pytest.mark.timeout(300)
async def test_no_request_without_an_operator_session_csrf_token_and_same_origin_changes_the_line(
    fuzz_line: Line,
) -> None:
    ln = fuzz_line
    creds = Credentials(ln)
    http = requests.Session()
    seen: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=DEADLINE_MS,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
        database=None,
    )
    @given(case=requests_of(ln), variant=st.sampled_from(UNPRIVILEGED))
    def prop(case: Any, variant: str) -> None:
        cookies, headers = creds.get(variant)
        before = snapshot(ln)
        r = send(ln, http, case, cookies, headers)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (variant, case.method, case.formatted_path, r.status_code, r.text)
        after = snapshot(ln)
        assert after == before, (variant, case.method, case.formatted_path, case.body, r.status_code, r.text)
        if case.method != "GET" and case.formatted_path not in ("/api/login", "/api/logout"):
            assert r.status_code >= 400, (variant, case.method, case.formatted_path, r.status_code, r.text)

    took = await run_fuzz(prop)
    print(f"state property: {sum(seen.values())} requests in {took:.1f} s, statuses {sorted(seen.items())}")


# --- regressions: what the fuzzer found ---


async def test_json_nested_deeper_than_the_parser_goes_is_refused_not_a_500(fuzz_line: Line) -> None:
    ln = fuzz_line
    before = snapshot(ln)
    sess = ln.hmi.sessions.create("technician", "technician")
    deep = b"[" * 3000 + b"]" * 3000
    async with ln.client(cookies={COOKIE: sess.token}) as c:
        h = {"X-CSRF-Token": sess.csrf, "Content-Type": "application/json"}
        assert (await c.post("/api/login", content=deep, headers=h)).status_code == 422
        assert (await c.put("/api/routing/thresholds", content=deep, headers=h)).status_code == 400
        assert (await c.post("/api/model", content=deep, headers=h)).status_code == 400
    assert snapshot(ln) == before


async def test_a_model_path_the_file_system_refuses_is_no_model_file_not_a_500(fuzz_line: Line) -> None:
    ln = fuzz_line
    before = snapshot(ln)
    sess = ln.hmi.sessions.create("technician", "technician")
    async with ln.client(cookies={COOKIE: sess.token}) as c:
        r = await c.post(
            "/api/model", json={"path": "/tmp/" + "a" * 300 + ".onnx"}, headers={"X-CSRF-Token": sess.csrf}
        )
        assert r.status_code == 422 and "is not an .onnx file" in r.json()["detail"]  # ENAMETOOLONG
    assert snapshot(ln) == before


async def test_a_websocket_message_nested_too_deep_is_ignored_and_the_connection_stays(fuzz_line: Line) -> None:
    ln = fuzz_line
    sess = ln.hmi.sessions.create("operator", "operator")
    async with ws_connect(ln.ws_url, additional_headers={"Cookie": f"{COOKIE}={sess.token}"}, **ln.ws_kw) as ws:
        await asyncio.wait_for(ws.recv(), 3)  # the first state
        await ws.send("[" * 2000 + "]" * 2000)
        await ws.send('{"type": "activity"}')
        msg = await asyncio.wait_for(ws.recv(), 3)  # still pushed: the connection was not dropped
        assert isinstance(msg, str) and json.loads(msg)["type"] == "state"
    assert [i["reason"] for i in ln.log.find("hmi websocket message ignored")] == ["not JSON"]
