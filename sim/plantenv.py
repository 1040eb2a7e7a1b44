"""A plant's MQTT broker and PostgreSQL on loopback, for the plant demo and the wire tests.

Debian's `mosquitto` and PostgreSQL 15 (`make plant-tools` installs them), each in a temp folder on a free
port, stopped and started again at will (the demo's outages). PostgreSQL refuses to run as root: as root
the cluster belongs to `nobody` and its commands run through `runuser`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path(os.environ.get("SORTER_PG_BIN", "/usr/lib/postgresql/15/bin"))
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class PlantEnvError(Exception):
    pass


def mosquitto_missing() -> str | None:
    """Why the broker cannot be run here (None: it can)."""
    if not Path(MOSQUITTO).exists():
        return "no mosquitto: `make plant-tools` (or apt-get install --no-install-recommends mosquitto)"
    return None


def postgres_missing() -> str | None:
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        return f"no PostgreSQL 15 in {PG_BIN}: `make plant-tools` (or apt-get install postgresql)"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without runuser: PostgreSQL cannot be started"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise PlantEnvError(f"the server on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise PlantEnvError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Broker:
    """mosquitto on 127.0.0.1:port; with `users` ({name: password}) anonymous clients are refused."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """`tls`: (certificate, key) PEM files: the listener speaks TLS only."""
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        conf = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stderr", "log_type error"]
        if os.geteuid() == 0:  # stay root: the default drops to user `mosquitto`, who cannot read a 0700 folder
            conf.append("user root")
        if tls is not None:
            conf += [f"certfile {tls[0]}", f"keyfile {tls[1]}"]
        if users:
            pw = self.dir / "passwd"
            pw.write_text("")
            for name, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), name, password], check=True, capture_output=True)
            pw.chmod(0o644)
            conf += ["allow_anonymous false", f"password_file {pw}"]
        else:
            conf.append("allow_anonymous true")
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(conf) + "\n")

    def start(self) -> None:
        log = (self.dir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        _wait_port(self.port, 10, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Postgres:
    """A PostgreSQL cluster in `workdir` on 127.0.0.1:port with a database `plant`, trust auth (loopback)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.user = "nobody" if os.geteuid() == 0 else None
        # as root the cluster lives in a folder of its own under the system's temp dir: `nobody` cannot
        # enter the caller's (pytest's temp folders are 0700); cleanup() removes it
        self.dir = Path(tempfile.mkdtemp(prefix="sorter-pg-")) if self.user else workdir
        self.port = port or free_port()
        self.data = self.dir / "data"
        self.sock = self.dir / "sock"
        self.role = "plant"  # the database user the lines and the reports log in as

    @property
    def url(self) -> str:
        return f"postgresql://{self.role}@127.0.0.1:{self.port}/plant"

    def _run(self, *cmd: str, timeout: float = 60) -> None:
        argv = [*cmd]
        if self.user:
            argv = ["runuser", "-u", self.user, "--", *argv]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")
        if r.returncode != 0:
            raise PlantEnvError(f"{' '.join(cmd)} failed: {r.stdout}{r.stderr}")

    def init(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if self.user:
            shutil.chown(self.dir, self.user)
            shutil.chown(self.sock, self.user)
            self.dir.chmod(0o755)
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        )
        self.start()
        for sql in (f"CREATE ROLE {self.role} LOGIN", f"CREATE DATABASE plant OWNER {self.role}"):
            self._run(
                str(PG_BIN / "psql"),
                "-h",
                str(self.sock),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            )

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off -c shared_buffers=16MB"
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "pg.log"),
            "-o",
            opts,
            "-w",
            "-t",
            "30",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def cleanup(self) -> None:
        """Stop the server and remove the cluster."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
