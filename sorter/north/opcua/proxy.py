"""The line's own OPC UA server as the service sees it: state, counts, alarms for SCADA/MES; PackML commands back.

LineOpcUaServer is what the service uses; the server itself runs in its own process (process.py,
multiprocessing "spawn"), at a lower OS priority (nice +10), with its own asyncio loop and its own
heap: a client that floods reads, holds many subscriptions or sends garbage costs that process's
CPU time - which the OS gives it only when the sorting loop does not need it - and never holds the
service's GIL. asyncua's address space (~400 000 objects) lives there too, not in the service's
heap. The two processes meet at two pipes only (messages: protocol.py):

* parent -> child: snapshots from `publish(snapshot)`, the results of PackML commands, "stop".
  The service loop never writes to the pipe itself: `publish` puts the snapshot in `_Outbox` (a
  lock held for microseconds) and a sender thread does the (possibly blocking) write. While the
  child does not read (busy, stopped), snapshots pile up in the outbox coalesced: one that shows
  the same state and alarms as the one before it replaces it (counts, rate, purity: only the
  latest matters), so every state and every alarm list still reaches the server in order (alarm
  events for an alarm that came and went meanwhile) and the outbox stays small.
* child -> parent: "ready"/"failed" at start, then PackML command requests (id, command, user).
  The parent reads them with `loop.add_reader` on the pipe (never a blocking read on the service
  loop), runs `command(Command(name), user)` there and sends the result back; the child maps it
  to the method's status code (5 s without an answer: BadTimeout).

If the process dies, the parent sees the pipe's end-of-file, logs `ALARM OPC UA server process
died` once and `listening` turns False; the line keeps sorting, `publish` does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import pickle
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import structlog

from sorter.config import OpcUaServerConfig, UserConfig
from sorter.core.linestate import LineSnapshot
from sorter.core.packml import Command, InvalidState
from sorter.north.opcua.process import child_main
from sorter.north.opcua.protocol import COMMAND_TIMEOUT_S, PENDING_MAX, ChildSpec, Msg, OpcUaServerError, coalesce

__all__ = ["LineOpcUaServer", "OpcUaServerError"]

CommandFn = Callable[[Command, str], Coroutine[Any, Any, object]]  # the result is not used

START_TIMEOUT_S = 60.0  # spawn + imports + address space take a few s; far longer means it hangs
STOP_TIMEOUT_S = 10.0  # to close the sessions and the socket; then the process is killed


class LineOpcUaServer:
    """The line's OPC UA server, in its own process; see the module docstring. Used from the service loop."""

    # tests: the server process writes its log as JSON lines to this file instead of stderr
    _child_log_file: Path | None = None

    def __init__(
        self,
        cfg: OpcUaServerConfig,
        users: list[UserConfig],
        fractions: list[str],
        command: CommandFn,
        log: Any = None,
    ) -> None:
        self.cfg = cfg
        self.users = list(users)
        self.fractions = list(dict.fromkeys(fractions))
        self._command = command
        self.log = log if log is not None else structlog.get_logger("opcua_server")
        self._url = cfg.endpoint
        self._outbox = _Outbox()  # snapshots published before start() wait here
        self._proc: BaseProcess | None = None
        self._from_child: Connection | None = None
        self._sender: threading.Thread | None = None
        self._service_loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[str] | None = None
        self._listening = False
        self._stopping = False
        self._commands: set[asyncio.Task[None]] = set()

    @property
    def endpoint_url(self) -> str:
        """The URL clients connect to: the configured one with the port really bound (config port 0 picks one)."""
        return self._url

    @property
    def listening(self) -> bool:
        """True from a successful start() until stop() or the server process's death."""
        return self._listening

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs."""
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the server process and wait until it listens; OpcUaServerError if it cannot."""
        if self._proc is not None:
            raise RuntimeError("the OPC UA server is already running")
        loop = self._service_loop = asyncio.get_running_loop()
        self._stopping = False
        level, json_logs, context = _log_settings(self.log)
        spec = ChildSpec(
            cfg=self.cfg,
            users=self.users,
            fractions=self.fractions,
            log_level=level,
            json_logs=json_logs,
            log_context=context,
            log_file=str(self._child_log_file) if self._child_log_file is not None else None,
        )
        # spawn, not fork: the service has threads (onnxruntime, cameras) whose locks a fork would copy held
        ctx = multiprocessing.get_context("spawn")
        child_in, to_child = ctx.Pipe(duplex=False)
        from_child, child_out = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child_main, args=(spec, child_in, child_out), name="opcua-server", daemon=True)
        try:
            proc.start()
        except BaseException:
            to_child.close()
            from_child.close()
            raise
        finally:
            # the child has its own copies now; closing ours lets each side see the other's end-of-file
            child_in.close()
            child_out.close()
        self._proc, self._from_child = proc, from_child
        self._ready = loop.create_future()
        loop.add_reader(from_child.fileno(), self._on_child_message)
        self._sender = threading.Thread(
            target=_send_loop, args=(to_child, self._outbox, self.log), name="opcua-sender", daemon=True
        )
        self._sender.start()
        try:
            url = await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT_S)
        except TimeoutError:
            await self.stop()
            raise OpcUaServerError(f"the OPC UA server process did not start within {START_TIMEOUT_S:.0f} s") from None
        except BaseException:
            await self.stop()
            raise
        self._url = url
        self._listening = True
        self.log.info(
            "opcua server listening",
            endpoint=self.endpoint_url,
            none_security=self.cfg.allow_none_security,
            anonymous=self.cfg.allow_anonymous,
            pid=proc.pid,
        )

    async def stop(self) -> None:
        """Close all sessions and the listening socket, and end the server process (killed if it hangs)."""
        proc = self._proc
        if proc is None:
            return
        self._stopping = True
        self._listening = False
        self._outbox.put(("stop",))
        self._outbox.close()  # the sender thread writes what is queued, "stop" last, and ends
        self._drop_reader()
        await asyncio.to_thread(proc.join, STOP_TIMEOUT_S)
        if proc.exitcode is None:
            self.log.warning("opcua server process did not stop; killing it", pid=proc.pid)
            proc.kill()
            await asyncio.to_thread(proc.join, 5.0)
        if self._sender is not None:  # its write fails at once now that the reading end is gone
            await asyncio.to_thread(self._sender.join, 5.0)
            self._sender = None
        if self._ready is not None and self._ready.done() and not self._ready.cancelled():
            self._ready.exception()  # raised by start() already, if any
        self._ready = None
        with contextlib.suppress(ValueError):  # closed already
            proc.close()
        self._proc = None
        self._outbox = _Outbox()  # for a later start(); publish() meanwhile only queues
        self.log.info("opcua server stopped")

    def publish(self, snap: LineSnapshot) -> None:
        """Show a new snapshot: values that changed, alarm events. Never blocks, never raises (see _Outbox)."""
        try:
            self._outbox.add_snapshot(snap)
        except Exception:  # the line must go on whatever happens here
            with contextlib.suppress(Exception):
                self.log.exception("opcua publish failed")

    # --- the child's messages, on the service loop ---

    def _on_child_message(self, *_: Any) -> None:
        conn = self._from_child
        if conn is None:
            return
        try:
            while conn.poll():  # only whole, small messages come this way: recv() returns at once
                self._handle(conn.recv())
        except (EOFError, OSError):
            self._child_gone()
        except Exception:
            self.log.exception("opcua server message not understood")

    def _handle(self, msg: Msg) -> None:
        kind = msg[0]
        if kind == "cmd":
            _, req_id, name, user = msg
            task = asyncio.get_running_loop().create_task(self._run_command(req_id, name, user))
            self._commands.add(task)
            task.add_done_callback(self._commands.discard)
        elif kind in ("ready", "failed") and self._ready is not None and not self._ready.done():
            if kind == "ready":
                self._ready.set_result(str(msg[1]))
            else:
                exc = msg[1]
                self._ready.set_exception(exc if isinstance(exc, OpcUaServerError) else OpcUaServerError(str(exc)))

    async def _run_command(self, req_id: int, name: str, user: str) -> None:
        kind, detail = "ok", ""
        try:
            cmd = Command(name)
            await asyncio.wait_for(self._command(cmd, user), COMMAND_TIMEOUT_S)
        except InvalidState as exc:
            kind, detail = "invalid_state", str(exc)
        except TimeoutError:
            kind, detail = "timeout", f"the line service did not answer within {COMMAND_TIMEOUT_S} s"
        except Exception as exc:
            self.log.exception("opcua command failed", command=name, user=user)
            kind, detail = "error", f"{type(exc).__name__}: {exc}"
        self._outbox.put(("result", req_id, kind, detail))

    def _drop_reader(self) -> None:
        conn, self._from_child = self._from_child, None
        if conn is None:
            return
        loop = self._service_loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_reader(conn.fileno())
        conn.close()

    def _child_gone(self) -> None:
        """The child's pipe reached end-of-file: the server process has ended (or is ending)."""
        was_listening = self._listening
        self._listening = False
        self._outbox.close()  # publish() is a no-op from now on
        self._drop_reader()
        proc = self._proc
        if self._ready is not None and not self._ready.done():
            code = proc.exitcode if proc is not None else None
            self._ready.set_exception(
                OpcUaServerError(f"the OPC UA server process ended while starting (exit code {code})")
            )
        if was_listening and not self._stopping and proc is not None:
            task = asyncio.get_running_loop().create_task(self._report_death(proc))
            self._commands.add(task)
            task.add_done_callback(self._commands.discard)

    async def _report_death(self, proc: BaseProcess) -> None:
        # reap it (exitcode polls waitpid without blocking) and say how it ended, once
        pid = proc.pid
        for _ in range(50):
            if self._proc is not proc or proc.exitcode is not None:
                break
            await asyncio.sleep(0.02)
        code = None
        with contextlib.suppress(ValueError):  # stop() closed it meanwhile
            code = proc.exitcode
        self.log.error(
            "ALARM OPC UA server process died",
            pid=pid,
            exitcode=code,
            action="SCADA cannot see or command the line; restart the service to bring the server back",
        )


class _Outbox:
    """What the service has for the server process, until the sender thread writes it to the pipe.

    Snapshots are coalesced (protocol.coalesce): while the pipe is full they collapse to one per state/alarm
    change. Results and "stop" are kept as they are. Once closed (stop, or the process died) it takes nothing.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._snaps: deque[LineSnapshot] = deque(maxlen=PENDING_MAX)
        self._msgs: list[Msg] = []
        self._closed = False

    def add_snapshot(self, snap: LineSnapshot) -> None:
        with self._cond:
            if not self._closed:
                coalesce(self._snaps, snap)
                self._cond.notify()

    def put(self, msg: Msg) -> None:
        with self._cond:
            if not self._closed:
                self._msgs.append(msg)
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def take(self) -> tuple[list[Msg], bool]:
        """Wait for something to send; returns it all and whether the outbox is closed (nothing more comes)."""
        with self._cond:
            while not (self._snaps or self._msgs or self._closed):
                self._cond.wait()
            batch: list[Msg] = [("snap", s) for s in self._snaps]
            batch += self._msgs
            self._snaps.clear()
            self._msgs = []
            return batch, self._closed


def _send_loop(conn: Connection, outbox: _Outbox, log: Any) -> None:
    """The sender thread: outbox -> pipe. Only this thread ever blocks on a full pipe, never the service loop."""
    try:
        while True:
            batch, closed = outbox.take()
            if batch:
                try:
                    data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception:  # one bad snapshot must not end publishing
                    log.exception("opcua publish failed")
                else:
                    conn.send_bytes(data)
            if closed:
                return
    except OSError:  # the server process is gone: the parent sees it on the other pipe
        outbox.close()
    finally:
        conn.close()


def _log_settings(log: Any) -> tuple[str, bool, dict[str, Any]]:
    """The service's structlog level and format, and the logger's bound context, for the server process.

    A spawned process starts with structlog unconfigured; it configures itself the same way
    (sorter.logs.setup_logging) and binds the same context (e.g. part=opcua), so its lines look like the
    service's own on the same stderr.
    """
    config = structlog.get_config()
    level = "info"
    get_level = getattr(config.get("wrapper_class"), "get_effective_level", None)
    if callable(get_level):
        with contextlib.suppress(Exception):
            name = str(logging.getLevelName(int(get_level(None))))
            if name in logging.getLevelNamesMapping():
                level = name.lower()
    json_logs = any(isinstance(p, structlog.processors.JSONRenderer) for p in config.get("processors", []))
    try:
        bound = dict(structlog.get_context(log))
    except Exception:  # not a structlog logger
        bound = {}
    context = {k: v for k, v in bound.items() if v is None or isinstance(v, str | int | float | bool)}
    return level, json_logs, context
