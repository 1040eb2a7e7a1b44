"""The HMI server beside the line service: uvicorn on its own thread and event loop.

The service loop starts and stops it (`start()`/`stop()`, like the OPC UA server) and never awaits
it otherwise:

* state: a task on the service loop builds the page's view at `hmi.push_hz` (ViewBuilder, ~0.1 ms)
  and stores it in one attribute; the HMI thread serialises it to JSON and pushes it to every
  browser; camera images are sampled, drawn and JPEG-encoded on the HMI thread (live.py);
* commands: the HMI thread hands them to the service loop with run_coroutine_threadsafe and waits
  for the result on its own loop;
* the listening socket is bound by `start()` on the service side, so "port in use" is an error
  at once (HmiError: an alarm, the line sorts on); uvicorn serves on that socket;
* HTTPS when the config has a certificate (`hmi.certificate`, `hmi.private_key`; tls.py): the TLS
  context is made there too, at every start, so a certificate that cannot be used is an HmiError
  naming the file (the same alarm), and a renewed one is taken at the next start; uvicorn then speaks
  TLS only on that socket (a plain-HTTP request gets no HTTP answer) and the URL says https://. The
  certificate's coming expiry is an alarm of its own (`hmi_certificate`, CERT_WARN_DAYS before);
* if the HMI thread ends on its own (a crash), the watchdog on the service loop logs
  `ALARM hmi down`, the alarm board shows it, and the HMI is started again every RESTART_S. The
  sessions belong to this object, not to the thread: the panels stay logged in across such a restart
  (a restart of the service logs everybody out: sessions.py).

Browsers get one WebSocket each; a slow one only misses intermediate updates (each client holds
the latest state and the latest image per camera, nothing queues up).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
import uvicorn

from sorter.config import HmiConfig, LineConfig
from sorter.core.alarms import Condition
from sorter.core.linestate import LineStats
from sorter.core.messages import LineRequest
from sorter.line.labelling import LabelStore
from sorter.north.hmi.app import create_app
from sorter.north.hmi.clients import Client
from sorter.north.hmi.compare import Comparisons
from sorter.north.hmi.live import CameraView, LiveTap, ViewBuilder, pack_frame
from sorter.north.hmi.sessions import LoginThrottle, SessionStore
from sorter.north.hmi.shadow import ShadowPieces
from sorter.north.hmi.tls import TlsError, server_context

if TYPE_CHECKING:
    from sorter.north.metrics import ServiceMetrics

T = TypeVar("T")
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
RESTART_S = 5.0
COMMAND_TIMEOUT_S = 5.0
SESSION_CLOSE_CODE = 4401  # WebSocket close code the page takes as "log in again"
CERT_WARN_DAYS = 30  # the `hmi_certificate` alarm this long before the HMI's certificate expires


class _ToStructlog(logging.Handler):
    """uvicorn's own warnings and errors (bad requests, shutdown trouble) as the service's structured log lines."""

    def __init__(self, log: Any) -> None:
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.log.warning("hmi server", message=record.getMessage(), logger=record.name)


def _route_uvicorn_logs(log: Any) -> None:
    logger = logging.getLogger("uvicorn")
    for h in list(logger.handlers):
        if isinstance(h, _ToStructlog):
            logger.removeHandler(h)
    logger.addHandler(_ToStructlog(log))
    logger.propagate = False  # never plain text on stderr, where the service writes JSON lines


class _Ticker:
    """Sleeps to the next multiple of `period` (no drift from the work in between: 5 Hz stays 5 Hz)."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.due = time.monotonic()

    async def next(self) -> None:
        self.due += self.period
        now = time.monotonic()
        if self.due < now - self.period:  # fell behind (a busy machine): no burst to catch up
            self.due = now
        await asyncio.sleep(max(0.0, self.due - now))


class HmiError(Exception):
    """The HMI cannot start; str() says why."""


def _given_context(ctx: ssl.SSLContext) -> Callable[[uvicorn.Config, Callable[[], ssl.SSLContext]], ssl.SSLContext]:
    """uvicorn's ssl_context_factory that hands it the context start() made (instead of its own from files)."""
    return lambda _config, _default: ctx


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HmiServer:
    """The operator's web HMI of one line: what it shows comes from the line's published LineStats,
    what it asks goes to the line as requests (`submit`, run on the service loop)."""

    name = "hmi"

    def __init__(
        self,
        cfg: HmiConfig,
        line: LineConfig,
        submit: Callable[[LineRequest], Awaitable[Any]],
        metrics: ServiceMetrics | None = None,
        log: Any = None,
    ) -> None:
        self.cfg = cfg
        self.line = line
        self.submit = submit
        self.metrics = metrics
        self.stats: LineStats | None = None  # the latest the line published (a reference swap)
        self.log = log if log is not None else structlog.get_logger("hmi")
        self.tap = LiveTap()
        self.sessions = SessionStore(cfg.session_idle_s, cfg.session_max_s)
        self.throttle = LoginThrottle()
        self.view: dict[str, Any] | None = None  # replaced whole by the service loop, read by the HMI thread
        self.clients: set[Client] = set()  # HMI thread only
        self.error: str | None = None
        self._builder = ViewBuilder(line)
        self._camera = CameraView(line, cfg.camera_fps)
        self._url = ""
        self._port = 0  # the port bound by the first start
        self._cert_expires: dt.datetime | None = None  # the certificate's notAfter (HTTPS), UTC
        self._svc_loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the HMI thread's
        self._thread: threading.Thread | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._feed: asyncio.Task[None] | None = None
        self._stopping = False
        self._started = False
        self._render: ThreadPoolExecutor | None = None  # pixels off the HMI's event loop (cv2 releases the GIL)
        self._login_lock: asyncio.Lock | None = None
        self._app: Any = None
        self.comparisons = Comparisons(lambda: self.log)  # model comparisons before a swap (technician)
        self.labels: LabelStore | None = None  # the crops technicians label (sorter/line/labelling.py)
        self.shadow = ShadowPieces()  # a shadow tap: the differing pieces of the shadow model (docs/shadow.md)

    # --- service side ---

    def publish(self, stats: LineStats) -> None:
        """The line's latest stats (on the service loop); the view is built from them at hmi.push_hz."""
        self.stats = stats

    @property
    def url(self) -> str:
        return self._url

    @property
    def listening(self) -> bool:
        u = self._uvicorn
        return bool(
            self._thread is not None and self._thread.is_alive() and u is not None and u.started and not u.should_exit
        )

    @property
    def n_clients(self) -> int:
        return len(self.clients)

    async def start(self) -> None:
        """Bind the port and start serving; HmiError if the port cannot be had or uvicorn does not come up.

        The view feed (and the watchdog that restarts a crashed HMI) starts even when this fails.
        """
        self._svc_loop = asyncio.get_running_loop()
        self._stopping = False
        self._started = True
        try:
            await self._spawn()
        finally:  # after the first try: the watchdog must not take a start-up in progress for a failure
            if self._feed is None:
                self._feed = asyncio.create_task(self._feed_loop(), name="hmi-feed")

    async def _spawn(self) -> None:
        await self._join()  # a previous HMI thread that is still ending
        tls = self._tls()
        sock = self._bind()
        self._uvicorn = None
        self._thread = threading.Thread(target=self._thread_main, args=(sock, tls), name="hmi", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.listening:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                await self._join()
                msg = self.error or f"the HMI did not start within {START_TIMEOUT_S:.0f} s"
                self.error = msg
                raise HmiError(msg)
            await asyncio.sleep(0.02)
        self.error = None
        self.log.info("hmi listening", url=self._url, tls=tls is not None)
        if tls is None and not _loopback(self.cfg.host):
            self.log.warning("hmi serves plain HTTP on the network: give it a certificate (hmi.certificate)")

    def _tls(self) -> ssl.SSLContext | None:
        """The TLS context of the configured certificate and key (None: plain HTTP); HmiError if unusable."""
        cfg = self.cfg
        if cfg.certificate is None or cfg.private_key is None:
            return None
        try:
            ctx, cert = server_context(cfg.certificate, cfg.private_key)
        except TlsError as exc:
            self.error = f"HTTPS: {exc} (hmi.certificate / hmi.private_key; `sorter hmi certs`)"
            raise HmiError(self.error) from exc
        self._cert_expires = cert.not_valid_after_utc
        return ctx

    def _bind(self) -> socket.socket:
        host = self.cfg.host
        port = self._port or self.cfg.port  # a restart keeps the port a panel already uses (config port 0)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self.error = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            raise HmiError(self.error) from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart within TIME_WAIT
            sock.bind(addr)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            self.error = f"cannot listen on {host}:{port}: {exc.strerror or exc} (hmi.host / hmi.port)"
            raise HmiError(self.error) from exc
        bound = sock.getsockname()
        self._port = int(bound[1])
        shown = host if host not in ("0.0.0.0", "::", "") else socket.gethostname()
        if ":" in shown:
            shown = f"[{shown}]"
        scheme = "https" if self.cfg.https else "http"
        self._url = f"{scheme}://{shown}:{bound[1]}/"
        return sock

    async def stop(self) -> None:
        """Close every browser's connection and the socket; the thread gets STOP_TIMEOUT_S."""
        self._stopping = True
        self._started = False
        self.comparisons.cancel()  # a comparison still running dies with the HMI
        if self._feed is not None:
            self._feed.cancel()
            await asyncio.gather(self._feed, return_exceptions=True)
            self._feed = None
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        await self._join()
        if self._render is not None:
            self._render.shutdown(wait=False)
            self._render = None
        self.log.info("hmi stopped")

    async def _join(self) -> None:
        t = self._thread
        if t is None:
            return
        await asyncio.to_thread(t.join, STOP_TIMEOUT_S)
        if t.is_alive() and self._uvicorn is not None:
            self._uvicorn.force_exit = True
            await asyncio.to_thread(t.join, STOP_TIMEOUT_S)
        if t.is_alive():
            self.log.error("hmi thread did not stop (left to die with the process)")
        self._thread = None

    def condition(self) -> Condition | None:
        """The alarm condition while the HMI should serve and does not, or while its certificate is about to
        expire (or has: the panels' browsers then refuse the HMI)."""
        if not self._started:
            return None
        if not self.listening:
            return Condition(
                "hmi_down",
                self.error or "the HMI is not serving",
                f"the operator panel is unavailable; check hmi.host/hmi.port ({self.cfg.host}:{self.cfg.port}) "
                "and the log; the HMI restarts by itself",
            )
        expires = self._cert_expires
        if expires is not None:
            # the wall clock, as the browsers judge the certificate by it (a date, never a schedule)
            left = expires - dt.datetime.now(dt.UTC)
            if left < dt.timedelta(days=CERT_WARN_DAYS):
                when = expires.strftime("%Y-%m-%d %H:%M UTC")
                return Condition(
                    "hmi_certificate",
                    f"the HMI's certificate {'expired' if left.total_seconds() <= 0 else 'expires'} on {when}",
                    "make a new one (`sorter hmi certs --force`), trust it on the panels and restart the service; "
                    "browsers refuse an expired certificate",
                )
        return None

    async def _feed_loop(self) -> None:
        tick = _Ticker(1.0 / self.cfg.push_hz)
        next_try: float | None = None
        reported: str | None = None
        while True:
            try:
                if self.stats is not None:
                    self.view = self._builder.build(self.stats, len(self.clients))
            except Exception:  # the page shows the previous view; the line goes on
                self.log.exception("hmi view failed")
            if self.listening or self._stopping:
                next_try = None
            elif next_try is None:
                # it never came up (port in use) or its thread ended: say so once per cause, retry in a while
                # (not at once: a crash loop would cost the line CPU, and the alarm board needs 1 s to show it)
                self.error = self.error or "the HMI stopped serving"
                if self.error != reported:
                    self.log.error("ALARM hmi down: the operator panel is unavailable", error=self.error)
                    reported = self.error
                next_try = time.monotonic() + RESTART_S
            elif time.monotonic() >= next_try:
                next_try = None
                try:
                    await self._spawn()
                    self.log.info("hmi back", url=self._url)
                    reported = None
                except HmiError:
                    pass
            await tick.next()

    # --- the HMI thread ---

    def _thread_main(self, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        try:
            asyncio.run(self._serve(sock, tls))
        except BaseException as exc:  # SystemExit from uvicorn's start-up included: never past this thread
            self.error = f"the HMI stopped: {type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                self.log.error("hmi thread ended", error=self.error)
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            if not self._stopping and self.error is None:
                self.error = "the HMI stopped serving"

    async def _serve(self, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._login_lock = asyncio.Lock()
        self.clients = set()
        if self._render is None:
            self._render = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hmi-render")
        if self._app is None:
            self._app = create_app(self)
        _route_uvicorn_logs(self.log)
        ws_impl = "websockets-sansio" if "websockets-sansio" in uvicorn.config.WS_PROTOCOLS else "websockets"
        config = uvicorn.Config(
            self._app,
            log_config=None,
            access_log=False,
            lifespan="off",
            loop="asyncio",
            ws=ws_impl,
            ws_max_size=64 * 1024,
            ws_ping_interval=20.0,
            ws_ping_timeout=20.0,
            timeout_graceful_shutdown=2,
            proxy_headers=False,
            server_header=False,
            # the context made (and checked) by start(): uvicorn wraps the bound socket in it (uvicorn >= 0.47)
            ssl_context_factory=None if tls is None else _given_context(tls),
        )
        server = uvicorn.Server(config)
        self._uvicorn = server
        pushers = [
            asyncio.create_task(self._push_state(), name="hmi-push-state"),
            asyncio.create_task(self._push_cameras(), name="hmi-push-cameras"),
        ]
        try:
            await server.serve(sockets=[sock])
        finally:
            for p in pushers:
                p.cancel()
            await asyncio.gather(*pushers, return_exceptions=True)

    async def request(self, req: LineRequest, timeout: float = COMMAND_TIMEOUT_S) -> Any:
        """Hand a request to the line (on the service loop) and wait, on the HMI loop, for its answer."""
        loop = self._svc_loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the line service is not running")
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(self.submit(req), loop)  # type: ignore[arg-type]
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except TimeoutError:
            fut.cancel()
            raise

    async def _push_state(self) -> None:
        tick = _Ticker(1.0 / self.cfg.push_hz)
        while True:
            await tick.next()
            if not self.clients:
                continue
            try:
                view = self.view
                text = json.dumps(view, separators=(",", ":")) if view is not None else None
                for c in list(self.clients):
                    if not self.sessions.alive(c.session):
                        c.closing = SESSION_CLOSE_CODE
                    elif text is not None:
                        c.state = text
                    c.wake.set()
            except Exception:
                self.log.exception("hmi state push failed")

    async def _push_cameras(self) -> None:
        tick = _Ticker(1.0 / self.cfg.camera_fps)
        loop = asyncio.get_running_loop()
        while True:
            await tick.next()
            if not self.clients:
                continue
            try:
                frames = await loop.run_in_executor(self._render, self._render_all)
            except Exception:
                self.log.exception("hmi camera render failed")
                continue
            for c in list(self.clients):
                c.frames.update(frames)
                c.wake.set()

    def _render_all(self) -> dict[str, bytes]:
        cam = self._camera
        cam.sample(self.tap)
        cam.update_delay(self.tap)
        out = {}
        for name in cam.cameras:
            r = cam.render(name, self.tap)
            if r is not None:
                out[name] = pack_frame(*r)
        return out

    async def camera_jpeg(self, name: str) -> bytes | None:
        """The camera's live image as a plain JPEG (GET /api/camera/NAME)."""
        if name not in self._camera.cameras:
            return None
        loop = asyncio.get_running_loop()

        def one() -> bytes | None:
            self._camera.sample(self.tap)
            self._camera.update_delay(self.tap)
            r = self._camera.render(name, self.tap)
            return None if r is None else r[1]

        return await loop.run_in_executor(self._render, one)
