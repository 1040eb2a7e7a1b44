"""`sorter run` under systemd: SIGTERM stops it gracefully, and it logs JSON when not on a terminal.

The service runs as a subprocess against the simulator (as deploy/magnet-sorter.line.service runs it against
the plant), its stderr a pipe like journald's. After SIGTERM: exit code 0, a `service stopped` JSON line,
the records flushed (a `stop` event, every piece recorded) and the PLC told to stop the belt.

Real time: the service is a process of its own, started and signalled by the OS as systemd does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from sim.demo import make_server_certificate
from tests.conftest import wait_until
from tests.hwsim import ROOT, simulated_line

pytestmark = pytest.mark.line


class JsonLog:
    """Reads the subprocess's stderr line by line: JSON objects, and whatever else (there should be none)."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.stream = stream
        self.entries: list[dict[str, Any]] = []
        self.other: list[str] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while line := await self.stream.readline():
            text = line.decode(errors="replace").rstrip("\n")
            try:
                obj = json.loads(text)
            except ValueError:
                if text.strip():
                    self.other.append(text)
                continue
            if isinstance(obj, dict):
                self.entries.append(obj)
            else:
                self.other.append(text)

    async def wait_for(self, pred: Any, timeout: float, what: str) -> dict[str, Any]:
        """The first log entry `pred` accepts; fails, showing the last lines, when none came (or the log ended)."""
        found: list[dict[str, Any]] = []

        def logged() -> bool:
            found[:] = [e for e in self.entries if pred(e)][:1]
            return bool(found) or self.task.done()

        with contextlib.suppress(AssertionError):
            await wait_until(logged, timeout, what, poll_s=0.1)
        if found:
            return found[0]
        tail = "\n".join([json.dumps(e) for e in self.entries[-15:]] + self.other[-15:])
        raise AssertionError(f"no log line {what} within {timeout} s; last lines:\n{tail}")


async def test_sigterm_stops_the_line_gracefully(tmp_path):
    async with simulated_line(tmp_path / "run") as line:
        if line.cfg.opcua_server is not None and line.cfg.opcua_server.enabled:
            make_server_certificate(line.cfg.opcua_server)  # as `sorter opcua certs` does for a plant
        env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PY_COLORS")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sorter",
            "run",
            "--config",
            str(line.config),
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stderr is not None
        log = JsonLog(proc.stderr)
        try:
            await log.wait_for(
                lambda e: e.get("event") == "state" and e.get("new") == "Execute", 90, "state -> Execute"
            )
            st = await line.send(cmd="status")
            assert st["belt_mm_s"] > 0
            await line.send(cmd="feed", on=True)
            await log.wait_for(lambda e: e.get("event") == "line" and e.get("pieces", 0) > 0, 30, "with pieces")
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(proc.wait(), 30)
            await asyncio.wait_for(log.task, 5)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            with contextlib.suppress(Exception):
                await line.send(cmd="feed", on=False)

        assert rc == 0, "\n".join(log.other[-20:])
        stopped = await log.wait_for(lambda e: e.get("event") == "service stopped", 1, "service stopped")
        assert stopped["level"] == "info" and "timestamp" in stopped and stopped["pieces"] > 0
        # every line on stderr was JSON (journald keeps them as they are; jq can read them)
        assert log.other == [], log.other[:10]
        events = [e["event"] for e in log.entries]
        assert "service stopping" in events
        assert events.index("service stopping") < events.index("service stopped")
        assert any(e.get("event") == "state" and e.get("new") == "Stopped" for e in log.entries)

        # the records were flushed: a stop event with the service's counters, every counted piece a row
        db = sqlite3.connect(line.cfg.records.path)
        kinds = [r[0] for r in db.execute("SELECT kind FROM events ORDER BY t_wall")]
        (detail,) = [json.loads(r[0]) for r in db.execute("SELECT detail FROM events WHERE kind='stop'")]
        (rows,) = db.execute("SELECT COUNT(*) FROM pieces").fetchone()
        (pending,) = db.execute("SELECT COUNT(*) FROM pieces WHERE outcome='pending'").fetchone()
        db.close()
        assert kinds[0] == "start" and kinds[-1] == "stop"
        assert rows == detail["pieces"] == stopped["pieces"] > 0
        assert pending == 0  # every command answered, or recorded cancelled

        # no process of the service outlives it (the line's OPC UA server runs in a child process)
        for e in log.entries:
            if e.get("event") == "opcua server listening" and isinstance(e.get("pid"), int):
                assert not Path(f"/proc/{e['pid']}").exists() or "zombie" in _proc_state(e["pid"]), e

        # the PLC was told: belt stopped
        async def belt_stopped() -> bool:
            return (await line.send(cmd="status"))["belt_mm_s"] == 0

        await wait_until(belt_stopped, 5, "the belt stopped by the PLC", poll_s=0.2)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"  # gone meanwhile
