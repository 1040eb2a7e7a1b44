"""The serial link to the Hall bar: one daemon thread reads, parses, times and corrects its lines.

The service's asyncio loop must never wait on a serial port, so everything
that touches the port runs on the reader thread; the loop only reads the
counters and state, and the readings reach it through `on_reading` (called on
the reader thread: `FieldMap.add` is thread-safe).

The thread owns the connection: it opens `cfg.port` (re-resolved on every
attempt, since a udev or simulator symlink may point to a new device after a
replug), reads, and on a port error or when no valid data line arrived for
`stall_timeout_s` closes the port, reports offline and reopens with
exponential backoff (`reconnect_min_s`..`reconnect_max_s`). It never raises for
connection trouble.

Each data line's values become mT: (raw - offset) * gain from the config
(`hw.calibrate_magnetometer` fills them), then minus the channel's running
baseline: the median of its last `baseline_lines` readings. The belt is empty
over a sensor most of the time, and pieces read both polarities, so the median
is the channel's empty-belt reading, whatever the offsets did (uncalibrated
offsets and slow thermal drift both vanish). It absorbs a field that stays
over a sensor for longer than half the window (a piece parked over the bar on
a stopped belt), which is harmless: nothing is decided while the belt stands.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import serial
import structlog
from structlog.typing import FilteringBoundLogger

from sorter.config import MagnetometerConfig
from sorter.core import priority
from sorter.drivers.hallbar.protocol import (
    SEQ_MOD,
    DataLine,
    InfoLine,
    LineError,
    LineSplitter,
    parse_line,
    wire_seconds,
)
from sorter.drivers.hallbar.sync import BoardClock

READ_TIMEOUT_S = 0.02  # how quickly the reader notices stop() and stalls when nothing arrives
JOIN_TIMEOUT_S = 2.0
PITCH_TOLERANCE_UM = 1

State = Literal["connecting", "online", "offline", "stopped"]


@dataclass(frozen=True, slots=True)
class BarReading:
    """One data line, corrected and placed in PC time."""

    seq: int
    t_start: float | None  # PC time the line's interval began (the previous line's t_end); None after a gap
    t_end: float  # PC time the board latched the line (its t_us)
    values: np.ndarray  # float32 mT per channel: offsets, gains and baseline applied
    raw: tuple[int, ...]  # as received
    t_rx: float  # PC time the line was read


class Baseline:
    """Per-channel running median of the last `lines` readings, recomputed every `every` lines."""

    def __init__(self, channels: int, lines: int = 500, every: int = 25) -> None:
        self._ring = np.zeros((lines, channels), dtype=np.float32)
        self._n = 0
        self._every = every
        self.value = np.zeros(channels, dtype=np.float32)

    def update(self, values: np.ndarray) -> np.ndarray:
        ring = self._ring
        ring[self._n % len(ring)] = values
        self._n += 1
        filled = min(self._n, len(ring))
        if self._n <= self._every or self._n % self._every == 0:  # every line at first: converge at once
            self.value = np.median(ring[:filled], axis=0).astype(np.float32)
        return self.value


class HallBar:
    def __init__(
        self,
        cfg: MagnetometerConfig,
        log: FilteringBoundLogger | None = None,
        on_reading: Callable[[BarReading], None] | None = None,
        *,
        track_baseline: bool = True,
        baseline_lines: int = 500,
        clock: Callable[[], float] = time.monotonic,
        own_port: bool = True,
    ) -> None:
        self.cfg = cfg
        # False: no serial port and no reader thread; the bytes come through receive() from whoever
        # carries them (the lockstep simulation's wire, sim/lockstep.py)
        self.own_port = own_port
        self.log = (log or structlog.get_logger("hallbar")).bind(hallbar=cfg.port)
        self.on_reading = on_reading
        # who wants the bar's raw bytes with their arrival time (the recorder, sorter/line/recording.py): called
        # on the reader thread (or receive()'s caller) before parsing; must not block
        self.chunk_taps: list[Callable[[bytes, float], None]] = []
        n = cfg.channels
        self._offsets = np.asarray(cfg.offsets_mT if cfg.offsets_mT is not None else np.zeros(n), dtype=np.float32)
        self._gains = np.asarray(cfg.gains if cfg.gains is not None else np.ones(n), dtype=np.float32)
        self._baseline = Baseline(n, baseline_lines) if track_baseline else None
        self._clock = clock
        self.sync = BoardClock()
        self._splitter = LineSplitter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # state (written by the reader thread only)
        self._state: State = "connecting"
        self.offline_reason: str | None = None
        self.info: InfoLine | None = None
        self.latest: BarReading | None = None
        self._last_valid: float | None = None
        self._prev_seq: int | None = None
        self._prev_end: float | None = None
        self._warned: set[str] = set()  # per-session one-time warnings
        # counters
        self.lines_ok = 0
        self.lines_corrupt = 0  # failed checksum or format, cut short, or not matching the config's channels
        self.lines_lost = 0  # data lines missing from the sequence numbers (lost or corrupt on the wire)
        self.reconnects = 0  # successful re-opens after the port was lost
        self.info_lines = 0
        self.info_mismatch = 0
        self.board_restarts = 0  # sequence/clock discontinuities: the bar restarted within a session
        self.sink_errors = 0
        self._rejects: dict[str, int] = {}

    # --- control (any thread) ---
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("HallBar already started")
        if not self.own_port:
            self._begin_session()
            return
        self._thread = threading.Thread(target=self._run, name="hallbar", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
        self._state = "stopped"

    @property
    def state(self) -> State:
        return self._state

    @property
    def online(self) -> bool:
        return self._state == "online"

    def counters(self) -> dict[str, Any]:
        with self._lock:
            rejects = dict(self._rejects)
        return {
            "state": self._state,
            "online": self.online,
            "lines_ok": self.lines_ok,
            "lines_corrupt": self.lines_corrupt,
            "lines_lost": self.lines_lost,
            "reconnects": self.reconnects,
            "info_lines": self.info_lines,
            "info_mismatch": self.info_mismatch,
            "board_restarts": self.board_restarts,
            "sink_errors": self.sink_errors,
            "rejects": rejects,
            "board_ppm": round(self.sync.ppm, 1),
            "offline_reason": self.offline_reason,
        }

    def baseline(self) -> np.ndarray:
        """Current per-channel baseline (mT, after offsets and gains)."""
        return self._baseline.value.copy() if self._baseline else np.zeros(self.cfg.channels, dtype=np.float32)

    # --- the reader thread ---
    def _run(self) -> None:
        priority.enter()  # time-critical: keeps pace with the belt (sorter/core/priority.py)
        cfg = self.cfg
        backoff = cfg.reconnect_min_s
        opened = False
        while not self._stop.is_set():
            try:
                port = serial.Serial(cfg.port, cfg.baudrate, timeout=READ_TIMEOUT_S)
            except (serial.SerialException, OSError, ValueError) as exc:
                self._offline(f"open failed: {exc}")
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, cfg.reconnect_max_s)
                continue
            if opened:
                self.reconnects += 1
            opened = True
            self._begin_session()
            try:
                reason = self._session(port)
            finally:
                try:
                    port.close()
                except (serial.SerialException, OSError) as exc:
                    self.log.debug("closing the serial port failed", error=repr(exc))
            if reason is None:
                break
            if self._last_valid is not None:
                backoff = cfg.reconnect_min_s  # the session worked: this is a new fault, start the backoff over
            self._offline(reason)
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, cfg.reconnect_max_s)

    def _begin_session(self) -> None:
        # A reconnect may reach a replugged (restarted) bar: nothing carries over.
        self.sync.reset()
        self._splitter.reset()
        self._last_valid = None
        self._prev_seq = None
        self._prev_end = None
        self._warned.clear()

    def _session(self, port: serial.Serial) -> str | None:
        """Read until stopped (None) or the link fails (the reason)."""
        t_open = self._clock()
        while not self._stop.is_set():
            try:
                chunk = port.read(port.in_waiting or 1)
            except (serial.SerialException, OSError) as exc:
                return f"port failed: {exc}"
            now = self._clock()
            if chunk:
                self._feed(chunk, now)
            last = self._last_valid if self._last_valid is not None else t_open
            if now - last > self.cfg.stall_timeout_s:
                return f"no valid data line for {self.cfg.stall_timeout_s:g} s"
        return None

    def receive(self, chunk: bytes, now: float) -> None:
        """Bytes that arrived at `now` (the line's monotonic clock), on a bar that does not own its port."""
        self._feed(chunk, now)

    def _feed(self, chunk: bytes, now: float) -> None:
        for tap in self.chunk_taps:
            tap(chunk, now)
        for kind, data in self._splitter.feed(chunk):
            if kind == "fragment":
                self._reject("truncated")
                continue
            try:
                msg = parse_line(data)
            except LineError as exc:
                self._reject(exc.reason)
                continue
            if isinstance(msg, InfoLine):
                self._on_info(msg)
            else:
                self._on_data(msg, now, len(data))

    def _reject(self, reason: str) -> None:
        self.lines_corrupt += 1
        with self._lock:
            self._rejects[reason] = self._rejects.get(reason, 0) + 1

    def _warn_once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.log.error(event, **fields)

    def _on_info(self, msg: InfoLine) -> None:
        self.info_lines += 1
        self.info = msg
        pitch_um = round(self.cfg.pitch_mm * 1000)
        if msg.channels != self.cfg.channels or abs(msg.pitch_um - pitch_um) > PITCH_TOLERANCE_UM:
            self.info_mismatch += 1
            self._warn_once(
                "info",
                "hallbar does not match the config",
                bar_channels=msg.channels,
                bar_pitch_um=msg.pitch_um,
                cfg_channels=self.cfg.channels,
                cfg_pitch_um=pitch_um,
                fw=msg.fw,
            )

    def _on_data(self, msg: DataLine, now: float, nbytes: int) -> None:
        if len(msg.values) != self.cfg.channels:
            self._reject("channels")
            self._warn_once(
                "channels", "hallbar data line has the wrong channel count", got=len(msg.values), want=self.cfg.channels
            )
            return
        ext, stepped = self.sync.add(msg.t_us, now, wire_seconds(nbytes, self.cfg.baudrate))
        t_end = self.sync.to_pc(ext)
        contiguous = False
        if self._prev_seq is not None:
            missing = (msg.seq - self._prev_seq - 1) % SEQ_MOD
            if stepped or missing >= SEQ_MOD // 2:  # the bar restarted (or a line came twice): not a loss
                self.board_restarts += 1
                self.log.warning("hallbar sequence or clock jumped", seq=msg.seq, prev_seq=self._prev_seq)
            else:
                self.lines_lost += missing
                contiguous = missing == 0
        t_start = self._prev_end if contiguous else None
        self._prev_seq, self._prev_end = msg.seq, t_end
        values = (np.asarray(msg.values, dtype=np.float32) - self._offsets) * self._gains
        if self._baseline is not None:
            values = values - self._baseline.update(values)
        reading = BarReading(msg.seq, t_start, t_end, values, msg.values, now)
        self.latest = reading
        self.lines_ok += 1
        self._last_valid = now
        if self._state != "online":
            self.log.info("hallbar online", after=self.offline_reason, fw=self.info.fw if self.info else None)
            self._state = "online"
        if self.on_reading is not None:
            try:
                self.on_reading(reading)
            except Exception:  # a failing consumer must not kill the reader: logged and counted
                self.sink_errors += 1
                self.log.exception("hallbar reading consumer failed")

    def _offline(self, reason: str) -> None:
        if self._state != "offline":
            self.log.warning("hallbar offline", reason=reason)
        self._state = "offline"
        self.offline_reason = reason
