"""The HMI's web application (FastAPI): login, the live page's WebSocket, control endpoints.

Every request that changes something passes four checks, in this order, and a refusal changes
nothing and is logged (`hmi request refused`, with the reason, never a password or token):

1. same origin: a browser's Origin (or Sec-Fetch-Site) must be this server - a page elsewhere
   cannot drive the line through an operator's browser;
2. a live session: the HttpOnly, SameSite=Strict session cookie (Secure over HTTPS), not idle for
   `hmi.session_idle_s` and younger than `hmi.session_max_s` (401);
3. the role: operator or technician for PackML commands and alarm acknowledgement, technician
   for routing thresholds, models, clips, model comparisons and labelling (403);
4. the CSRF token of the session in the X-CSRF-Token header (403).

Over HTTPS (`hmi.certificate`, server.py) every response also carries HSTS: a browser that has once
seen the HMI over a certificate it trusts will only ever use https:// for this host.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from sorter.core.messages import (
    AckAlarm,
    LineRequest,
    PackMLRequest,
    SetThresholds,
    StartClip,
    StartShadow,
    StopClip,
    StopShadow,
    SwapModel,
)
from sorter.core.packml import Command, InvalidState
from sorter.line.labelling import DISCARD, Candidate, LabelError, LabelStore
from sorter.line.recording import ClipError
from sorter.north.hmi.clients import Client
from sorter.north.hmi.compare import latest_clip
from sorter.north.hmi.live import ViewBuilder
from sorter.north.hmi.sessions import Session
from sorter.north.users import authenticate, may_configure, may_operate
from sorter.vision.classify import ModelError

if TYPE_CHECKING:
    from sorter.north.hmi.server import HmiServer

COOKIE = "sorter_hmi"
CSRF_HEADER = "x-csrf-token"
STATIC = Path(__file__).parent / "static"
COMMANDS = {c.lower(): Command(c) for c in ViewBuilder.COMMANDS}
MAX_BODY = 8192
MAX_WS_TEXT = 4096
LABEL_HEAD = 3  # queued crops sent with each answer: the page shows the first and preloads the others
BAD_WS_CLOSE = 200  # malformed messages on one WebSocket before it is closed (1008)
ROLES = ("viewer", "operator", "technician")
# a year: the browser keeps to https:// for this host (every port) that long after its last visit; no
# includeSubDomains (other machines under the line PC's name are not ours to decide for)
HSTS = (b"strict-transport-security", b"max-age=31536000")
# what the page shows when a session is gone (the 401's detail, the WebSocket's close reason)
SESSION_GONE = {
    "expired": "session expired, log in again",
    "restarted": "the line service was restarted, log in again",
}

CSP = b"content-security-policy"
# the comparison's page (sorter/replay.py compare_html): one self-contained file, its crops inline PNGs and its
# style inline; no script, no fetch, no form may run in it
PAGE_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
_HEADERS = [
    (
        CSP,
        b"default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; style-src 'self'; "
        b"script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class _SecurityHeaders:
    """Headers on every HTTP response: no framing (a hidden frame cannot trick a touch), no caching; over
    HTTPS also HSTS (Strict-Transport-Security)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        extra = [*_HEADERS, HSTS] if scope.get("scheme") == "https" else _HEADERS

        async def send_with_headers(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                own = msg.get("headers", [])
                # a response with its own (stricter) policy keeps it: the comparison's page (no scripts at all)
                add = extra if not any(k.lower() == CSP for k, _ in own) else [h for h in extra if h[0] != CSP]
                msg = {**msg, "headers": [*own, *add]}
            await send(msg)

        await self.app(scope, receive, send_with_headers)


class LoginBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


class ThresholdsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_confidence: float | None = Field(None, ge=0, le=1)
    fallback_min_confidence: float | None = Field(None, ge=0, le=1)


BodyT = TypeVar("BodyT", bound=BaseModel)


class ModelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=4096)


class LabelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cls: str = Field(alias="class", min_length=1, max_length=64)


class ClipBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_mb: float | None = Field(None, ge=1, le=1024**2)


def printable(text: object, limit: int = 64) -> str:
    """Client-chosen text, safe for a log line."""
    s = str(text)
    out = "".join(c if c.isprintable() else "?" for c in s[:limit])
    return out + ("..." if len(s) > limit else "")


def _client(conn: Request | WebSocket) -> str:
    return conn.client.host if conn.client else "?"


def same_origin(conn: Request | WebSocket, https: bool) -> bool:
    """A browser's request from this server's own page (requests without Origin: not a browser's cross-site one).

    Over HTTPS only an https:// origin is this server's; a plain-HTTP HMI also takes https:// (a TLS reverse
    proxy in front of it that passes the browser's Host on)."""
    h = conn.headers
    if h.get("sec-fetch-site") == "cross-site":
        return False
    origin = h.get("origin")
    if origin is None:
        return True
    host = h.get("host", "")
    return origin == f"https://{host}" or (not https and origin == f"http://{host}")


def create_app(hmi: HmiServer) -> FastAPI:
    line = hmi.line
    https = hmi.cfg.https
    app = FastAPI(title="magnet-sorter HMI", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def refuse(conn: Request | WebSocket, status: int, reason: str, detail: str, **kw: Any) -> HTTPException:
        hmi.log.warning(
            "hmi request refused",
            reason=reason,
            status=status,
            method=getattr(conn, "method", "WS"),
            path=printable(conn.url.path, 120),
            client=_client(conn),
            **kw,
        )
        return HTTPException(status, detail)

    def guard(request: Request, need: str = "viewer", csrf: bool = True) -> Session:
        """The checks of the module docstring; touches the session (activity) when they pass."""
        unsafe = request.method not in ("GET", "HEAD")
        if unsafe and not same_origin(request, https):
            raise refuse(request, 403, "cross_site", "cross-site request refused", origin=request.headers.get("origin"))
        sess, why = hmi.sessions.get(request.cookies.get(COOKIE))
        if sess is None and why == "none" and request.url.path == "/api/session":
            raise HTTPException(401, "not logged in")  # the page asking on load whether it has a session
        if sess is None:
            raise refuse(request, 401, f"session_{why}", SESSION_GONE.get(why, "not logged in"))
        allowed = {"viewer": True, "operator": may_operate(sess.role), "technician": may_configure(sess.role)}[need]
        if not allowed:
            raise refuse(request, 403, "role", f"a {sess.role} may not do this", user=sess.user, role=sess.role)
        if unsafe and csrf and not sess.csrf_ok(request.headers.get(CSRF_HEADER)):
            raise refuse(request, 403, "csrf", "missing or wrong CSRF token", user=sess.user, role=sess.role)
        hmi.sessions.touch(sess)
        return sess

    def secure(request: Request) -> bool:
        """The cookie's Secure flag: whenever the HMI serves TLS (and behind a TLS proxy that says https)."""
        return https or request.url.scheme == "https"

    async def body_json(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise refuse(request, 413, "too_large", "request too large")
        try:
            return json.loads(raw or b"null")
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes ("[" * 2000)
            raise refuse(request, 400, "not_json", "the body must be JSON") from None

    def invalid(request: Request, exc: ValidationError, **kw: Any) -> HTTPException:
        # field names and messages only: the input itself may hold what should not be logged
        errors = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        hmi.log.warning(
            "hmi request refused",
            reason="invalid",
            status=422,
            method=request.method,
            path=printable(request.url.path, 120),
            client=_client(request),
            errors=errors[:5],
            **kw,
        )
        return HTTPException(422, "; ".join(errors[:5]))

    async def on_service(request: Request, req: LineRequest, timeout: float = 5.0) -> Any:
        """Hand `req` to the line and return its answer; 504 / 503 when the line does not answer."""
        try:
            return await hmi.request(req, timeout)
        except TimeoutError:
            raise refuse(request, 504, "timeout", f"the line service did not answer within {timeout:g} s") from None
        except RuntimeError as exc:
            if "not running" in str(exc):
                raise refuse(request, 503, "service_down", "the line service is not running") from None
            raise

    # --- pages ---

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    # --- sessions ---

    @app.post("/api/login")
    async def login(request: Request) -> Response:
        client = _client(request)
        if not same_origin(request, https):
            raise refuse(request, 403, "cross_site", "cross-site request refused", origin=request.headers.get("origin"))
        wait = hmi.throttle.locked(client)
        if wait > 0:
            hmi.log.warning("hmi login refused", reason="throttled", client=client, wait_s=round(wait, 1))
            raise HTTPException(
                429, f"too many wrong passwords: wait {math.ceil(wait)} s", {"Retry-After": str(math.ceil(wait))}
            )
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise refuse(request, 413, "too_large", "request too large")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if ctype == "application/x-www-form-urlencoded":
                form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
                data: Any = {k: v[0] for k, v in form.items()}
            else:
                data = json.loads(raw or b"null")
            body = LoginBody.model_validate(data)
        except (ValueError, RecursionError, ValidationError):  # RecursionError: JSON nested too deep
            # the body may carry a password: its content is never logged
            hmi.log.warning("hmi login refused", reason="malformed", client=client, content_type=printable(ctype))
            raise HTTPException(422, "send user and password") from None
        assert hmi._login_lock is not None
        async with hmi._login_lock:  # one argon2 verification at a time (CPU the sorting line needs)
            user = await asyncio.get_running_loop().run_in_executor(
                None, authenticate, line.users, body.user, body.password
            )
        if user is None:
            hmi.throttle.failed(client)
            hmi.log.warning(
                "hmi login refused", reason="wrong user or password", user=printable(body.user), client=client
            )
            raise HTTPException(401, "wrong user name or password")
        hmi.throttle.succeeded(client)
        sess = hmi.sessions.create(user.name, user.role)
        hmi.log.info("hmi login", user=user.name, role=user.role, client=client)
        resp = JSONResponse(_session_info(sess))
        resp.set_cookie(COOKIE, sess.token, httponly=True, samesite="strict", secure=secure(request), path="/")
        return resp

    def _session_info(sess: Session) -> dict[str, Any]:
        return {
            "user": sess.user,
            "role": sess.role,
            "csrf": sess.csrf,
            "may_operate": may_operate(sess.role),
            "may_configure": may_configure(sess.role),
            "idle_s": hmi.sessions.idle_s,
            "max_s": hmi.sessions.max_s,
            "line": line.line,
            "cameras": [c.name for c in line.cameras],
            "commands": list(ViewBuilder.COMMANDS),
        }

    @app.get("/api/session")
    async def session(request: Request) -> dict[str, Any]:
        return _session_info(guard(request))

    @app.post("/api/logout")
    async def logout(request: Request) -> Response:
        sess = guard(request)
        hmi.sessions.drop(sess.token)
        hmi.log.info("hmi logout", user=sess.user, client=_client(request))
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=secure(request))
        return resp

    # --- what the page shows ---

    @app.get("/api/state")
    async def state(request: Request) -> Any:
        guard(request)
        if hmi.view is None:
            raise HTTPException(503, "no state yet")
        return hmi.view

    @app.get("/api/camera/{name}")
    async def camera(request: Request, name: str) -> Response:
        guard(request)
        jpg = await hmi.camera_jpeg(name)
        if jpg is None:
            raise HTTPException(404, f"no image of camera {printable(name)}")
        return Response(jpg, media_type="image/jpeg")

    # --- control ---

    @app.post("/api/command/{name}")
    async def command(request: Request, name: str) -> dict[str, Any]:
        sess = guard(request, "operator")
        cmd = COMMANDS.get(name.lower())
        if cmd is None:
            raise refuse(request, 404, "unknown_command", f"no command {printable(name)}", user=sess.user)
        try:
            new = await on_service(request, PackMLRequest(cmd.value, sess.user))
        except InvalidState as exc:
            hmi.log.warning("hmi command refused", user=sess.user, role=sess.role, command=cmd.value, error=str(exc))
            raise HTTPException(409, str(exc)) from None
        hmi.log.info("hmi command", user=sess.user, role=sess.role, command=cmd.value, state=new.label)
        return {"command": cmd.value, "state": new.label}

    @app.post("/api/alarms/{name}/ack")
    async def acknowledge(request: Request, name: str) -> dict[str, Any]:
        sess = guard(request, "operator")
        a = await on_service(request, AckAlarm(name, sess.user))
        if a is None:
            raise refuse(request, 404, "no_alarm", f"no alarm {printable(name)} on the board", user=sess.user)
        hmi.log.info("hmi alarm acknowledged", user=sess.user, alarm=a.name, active=a.active)
        return {"alarm": a.name, "acked_by": a.acked_by, "active": a.active}

    async def technician_body(request: Request, schema: type[BodyT]) -> tuple[Session, BodyT]:
        """A technician's request and its JSON body checked against `schema` (401/403/422 otherwise)."""
        sess = guard(request, "technician")
        try:
            return sess, schema.model_validate(await body_json(request))
        except ValidationError as exc:
            raise invalid(request, exc, user=sess.user) from None

    @app.put("/api/routing/thresholds")
    async def thresholds(request: Request) -> dict[str, Any]:
        sess, body = await technician_body(request, ThresholdsBody)
        changes = body.model_dump(exclude_none=True)
        if not changes:
            raise refuse(request, 422, "invalid", "give min_confidence and/or fallback_min_confidence", user=sess.user)
        try:
            routing = await on_service(request, SetThresholds(sess.user, tuple(changes.items())))
        except ValueError as exc:
            raise refuse(request, 422, "invalid", str(exc), user=sess.user) from None
        hmi.log.info("hmi routing thresholds", user=sess.user, **changes)
        return {
            "min_confidence": routing.min_confidence,
            "fallback_min_confidence": routing.fallback_min_confidence,
        }

    @app.get("/api/models")
    async def models(request: Request) -> dict[str, Any]:
        guard(request, "technician")
        folder = Path(line.classifier.model).parent
        files = sorted(str(p) for p in folder.glob("*.onnx") if p.is_file()) if folder.is_dir() else []
        return {"folder": str(folder), "models": files, "version": hmi.stats.model_version if hmi.stats else None}

    @app.post("/api/model")
    async def swap_model(request: Request) -> dict[str, Any]:
        sess, path = await technician_model(request)
        try:
            version = await on_service(request, SwapModel(path, sess.user), timeout=120.0)
        except ModelError as exc:
            hmi.log.warning("hmi model refused", user=sess.user, path=str(path), error=str(exc))
            raise HTTPException(422, f"model refused: {exc}") from None
        hmi.log.info("hmi model swapped", user=sess.user, path=str(path), version=version)
        return {"version": version, "path": str(path)}

    async def technician_model(request: Request) -> tuple[Session, Path]:
        """A technician's request naming a model: the session and the file (401/403/422 otherwise)."""
        sess, body = await technician_body(request, ModelBody)
        return sess, model_file(request, sess, body.path)

    def model_file(request: Request, sess: Session, text: str) -> Path:
        """A client-named model: an .onnx file on the line PC (422 otherwise)."""
        path = Path(text)
        try:
            ok = path.suffix.lower() == ".onnx" and path.is_file()
        except OSError:  # a name too long for the file system, a folder we may not read: no model file either
            ok = False
        if not ok:
            raise refuse(
                request,
                422,
                "no_model_file",
                f"{printable(text, 200)} is not an .onnx file on the line PC",
                user=sess.user,
            )
        return path

    # --- clips (technician): a recording of level frames started and stopped on the running line ---

    def clip_json(st: Any) -> dict[str, Any]:
        return {
            "folder": st.folder,
            "name": Path(st.folder).name,
            "active": st.active,
            "started_by": st.started_by,
            "bytes": st.bytes,
            "max_bytes": st.max_bytes,
            "frames": st.frames,
            "stopped_by": st.stopped_by,
            "stopped_early": st.stopped_early,
            "change": st.change,
        }

    @app.post("/api/clip/start")
    async def clip_start(request: Request) -> dict[str, Any]:
        sess = guard(request, "technician")
        try:
            body = ClipBody.model_validate(await body_json(request) or {})
        except ValidationError as exc:
            raise invalid(request, exc, user=sess.user) from None
        try:
            st = await on_service(request, StartClip(sess.user, body.max_mb))
        except ClipError as exc:
            raise refuse(request, 409, "clip", str(exc), user=sess.user) from None
        hmi.log.info("hmi clip started", user=sess.user, folder=st.folder, max_bytes=st.max_bytes)
        return clip_json(st)

    @app.post("/api/clip/stop")
    async def clip_stop(request: Request) -> dict[str, Any]:
        sess = guard(request, "technician")
        try:
            st = await on_service(request, StopClip(sess.user), timeout=120.0)  # drains the clip's queue
        except ClipError as exc:
            raise refuse(request, 409, "clip", str(exc), user=sess.user) from None
        hmi.log.info("hmi clip stopped", user=sess.user, folder=st.folder, bytes=st.bytes, frames=st.frames)
        return clip_json(st)

    @app.get("/api/clip")
    async def clip_status(request: Request) -> dict[str, Any]:
        guard(request, "technician")
        st = hmi.stats.clip if hmi.stats is not None else None
        latest = await asyncio.to_thread(latest_clip, line.records.clips_folder())  # reads manifests: off the loop
        return {
            "clip": None if st is None else clip_json(st),
            "latest": None if latest is None else str(latest),
            "folder": str(line.records.clips_folder()),
        }

    # --- shadow mode (technician): a candidate model beside the live one, never acted on (docs/shadow.md) ---

    @app.post("/api/shadow/start")
    async def shadow_start(request: Request) -> dict[str, Any]:
        sess, path = await technician_model(request)
        try:
            version = await on_service(request, StartShadow(path, sess.user), timeout=120.0)  # loads and checks
        except ModelError as exc:
            hmi.log.warning("hmi shadow model refused", user=sess.user, path=str(path), error=str(exc))
            raise HTTPException(422, f"shadow model refused: {exc}") from None
        hmi.log.info("hmi shadow model started", user=sess.user, path=str(path), version=version)
        return {"version": version, "path": str(path)}

    @app.post("/api/shadow/stop")
    async def shadow_stop(request: Request) -> dict[str, Any]:
        sess = guard(request, "technician")
        summary = await on_service(request, StopShadow(sess.user), timeout=60.0)  # drains its last batches
        hmi.log.info("hmi shadow model stopped", user=sess.user)
        return {"shadow": summary}

    @app.get("/api/shadow")
    async def shadow_status(request: Request) -> dict[str, Any]:
        guard(request, "technician")
        return {
            "shadow": hmi.stats.shadow if hmi.stats is not None else None,
            "differing": hmi.shadow.differing(),
        }

    @app.get("/api/shadow/crop/{piece_id}")
    async def shadow_crop(request: Request, piece_id: int) -> Response:
        guard(request, "technician")
        png = hmi.shadow.crop(piece_id)
        if png is None:
            raise HTTPException(404, f"no crop of piece {piece_id} among the latest differing pieces")
        return Response(png, media_type="image/png")

    # --- a model swap with a comparison first (technician) ---

    @app.post("/api/model/compare")
    async def compare_start(request: Request) -> dict[str, Any]:
        sess, new = await technician_model(request)
        running = Path(hmi.stats.model_path) if hmi.stats is not None and hmi.stats.model_path else None
        if running is None or not running.is_file():
            raise refuse(request, 503, "no_running_model", "the running model's file is not known yet", user=sess.user)
        clip = await asyncio.to_thread(latest_clip, line.records.clips_folder())
        if clip is None:
            raise refuse(
                request,
                409,
                "no_clip",
                "no clip recorded yet: record one (Start clip, Stop clip) first",
                user=sess.user,
            )
        try:
            job = await asyncio.to_thread(hmi.comparisons.start, sess.user, clip, running, new)
        except ValueError as exc:
            raise refuse(request, 422, "bad_clip", str(exc), user=sess.user) from None
        except RuntimeError as exc:
            raise refuse(request, 409, "busy", str(exc), user=sess.user) from None
        return job.summary()

    @app.get("/api/model/compare")
    async def compare_status(request: Request) -> dict[str, Any]:
        guard(request, "technician")
        job = hmi.comparisons.job
        return {"state": "none"} if job is None else job.summary()

    @app.post("/api/model/compare/cancel")
    async def compare_cancel(request: Request) -> dict[str, Any]:
        sess = guard(request, "technician")
        job = hmi.comparisons.cancel()
        hmi.log.info("hmi model comparison cancelled", user=sess.user)
        return {"state": "none"} if job is None else job.summary()

    @app.get("/api/model/compare/page")
    async def compare_page(request: Request) -> Response:
        guard(request, "technician")
        job = hmi.comparisons.job
        page = None if job is None or job.state != "done" else job.out / "compare.html"
        if page is None or not page.is_file():
            raise HTTPException(404, "no comparison page: run a comparison first")
        html = await asyncio.to_thread(page.read_bytes)
        return Response(html, media_type="text/html", headers={"content-security-policy": PAGE_CSP})

    # --- labelling (technician): the queue of crops to confirm or correct (sorter/line/labelling.py) ---

    def label_store(request: Request, sess: Session) -> LabelStore:
        if hmi.labels is None:
            why = "labelling is off on this line (labelling.enabled)"
            raise refuse(request, 404, "labelling_off", why, user=sess.user)
        return hmi.labels

    def candidate_json(c: Candidate) -> dict[str, Any]:
        return {
            "id": c.name,
            "crop": f"/api/labels/crop/{c.name}",
            "guess": c.guess,
            "confidence": c.confidence,
            "image_guess": c.image_guess,
            "image_confidence": c.image_confidence,
            "field_mT": c.field_mT,
            "area_mm2": c.area_mm2,
            "reason": c.reason,
            "shadow": c.shadow,
        }

    def labels_json(store: LabelStore, user: str) -> dict[str, Any]:
        st = store.stats()
        return {
            "queue": [candidate_json(c) for c in store.head(LABEL_HEAD)],
            "pending": st["pending"],
            "labelled": st["labelled"],
            "dropped": st["dropped"],
            "classes": list(store.classes()),
            "folder": str(store.root),
            "undo": store.can_undo(user),
        }

    @app.get("/api/labels")
    async def labels_queue(request: Request) -> dict[str, Any]:
        sess = guard(request, "technician")
        return labels_json(label_store(request, sess), sess.user)

    @app.get("/api/labels/crop/{name}")
    async def label_crop(request: Request, name: str) -> Response:
        sess = guard(request, "technician")
        path = label_store(request, sess).crop_file(name)
        try:
            data = None if path is None else await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:  # labelled meanwhile on another panel
            data = None
        if data is None:
            raise HTTPException(404, f"no crop {printable(name)} waiting for a label")
        return Response(data, media_type="image/png")

    async def give_label(request: Request, sess: Session, name: str, cls: str) -> dict[str, Any]:
        store = label_store(request, sess)
        try:
            await asyncio.to_thread(store.label, name, cls, sess.user)
        except LookupError:
            why = f"no crop {printable(name)} waiting for a label"
            raise refuse(request, 404, "no_crop", why, user=sess.user) from None
        except LabelError as exc:
            raise refuse(request, 422, "invalid", str(exc), user=sess.user) from None
        except OSError as exc:
            raise refuse(
                request, 503, "labels_disk", f"the label could not be written: {exc}", user=sess.user
            ) from None
        return labels_json(store, sess.user)

    @app.post("/api/labels/undo")
    async def label_undo(request: Request) -> dict[str, Any]:
        sess = guard(request, "technician")
        store = label_store(request, sess)
        try:
            await asyncio.to_thread(store.undo, sess.user)
        except LabelError as exc:
            raise refuse(request, 409, "nothing_to_undo", str(exc), user=sess.user) from None
        except OSError as exc:
            why = f"the undo could not be written: {exc}"
            raise refuse(request, 503, "labels_disk", why, user=sess.user) from None
        return labels_json(store, sess.user)

    @app.post("/api/labels/{name}/discard")
    async def label_discard(request: Request, name: str) -> dict[str, Any]:
        sess = guard(request, "technician")
        return await give_label(request, sess, name, DISCARD)

    @app.post("/api/labels/{name}")
    async def label_give(request: Request, name: str) -> dict[str, Any]:
        sess, body = await technician_body(request, LabelBody)
        return await give_label(request, sess, name, body.cls)

    _mount_metrics(app, hmi)

    # --- live updates ---

    @app.websocket("/ws")
    async def live(ws: WebSocket) -> None:
        if not same_origin(ws, https):
            refuse(ws, 403, "cross_site", "cross-site WebSocket refused", origin=ws.headers.get("origin"))
            await ws.close(code=1008)  # before accept: the handshake is answered 403
            return
        sess, why = hmi.sessions.get(ws.cookies.get(COOKIE))
        await ws.accept()
        if sess is None:
            reason = SESSION_GONE.get(why, "not logged in")
            refuse(ws, 401, f"session_{why}", reason)
            await ws.close(code=4401, reason=reason)
            return
        c = Client(ws, sess, _client(ws))
        if hmi.view is not None:
            c.state = json.dumps(hmi.view, separators=(",", ":"))
            c.wake.set()
        hmi.clients.add(c)
        hmi.log.info("hmi browser connected", user=sess.user, client=c.address, clients=len(hmi.clients))
        sender = asyncio.create_task(_send_loop(c))
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                if not _handle(hmi, c, msg) and c.bad_messages >= BAD_WS_CLOSE:
                    await ws.close(code=1008, reason="too many malformed messages")
                    break
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            hmi.clients.discard(c)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            hmi.log.info("hmi browser disconnected", user=sess.user, client=c.address, clients=len(hmi.clients))

    return app


async def _send_loop(c: Client) -> None:
    ws = c.ws
    try:
        while True:
            await c.wake.wait()
            c.wake.clear()
            if c.closing is not None:
                await ws.close(code=c.closing, reason=SESSION_GONE["expired"])
                return
            if c.state is not None:
                text, c.state = c.state, None
                await ws.send_text(text)
                c.sent_states += 1
            frames, c.frames = c.frames, {}
            for data in frames.values():
                await ws.send_bytes(data)
                c.sent_frames += 1
    except (WebSocketDisconnect, RuntimeError, OSError):
        return  # gone: the receive side ends the connection
    except Exception as exc:  # e.g. uvicorn's ClientDisconnected
        if type(exc).__name__ != "ClientDisconnected":
            raise


def _handle(hmi: HmiServer, c: Client, msg: Mapping[str, Any]) -> bool:
    """A message from the page: only {"type": "activity"} (a touch on the panel) means anything."""
    text = msg.get("text")
    reason = None
    if text is None:
        reason = "binary message"
    elif len(text) > MAX_WS_TEXT:
        reason = "too long"
    else:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            data = None
            reason = "not JSON"
        if reason is None:
            if not isinstance(data, dict):
                reason = "not an object"
            elif data.get("type") == "activity" and len(data) == 1:
                if hmi.sessions.alive(c.session):
                    hmi.sessions.touch(c.session)
                return True
            else:
                reason = "unknown message"
    c.bad_messages += 1
    if c.bad_messages <= 5 or c.bad_messages % 100 == 0:
        size = len(text) if text is not None else len(msg.get("bytes") or b"")
        hmi.log.warning(
            "hmi websocket message ignored",
            reason=reason,
            user=c.session.user,
            client=c.address,
            size=size,
            count=c.bad_messages,
        )
    return False


def _mount_metrics(app: FastAPI, hmi: HmiServer) -> None:
    """GET /metrics (Prometheus text format) of the line's metrics; rendered off the HMI's loop."""
    metrics = hmi.metrics
    if metrics is None:
        return

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        body, ctype = await asyncio.to_thread(metrics.render)
        return Response(body, media_type=ctype)
