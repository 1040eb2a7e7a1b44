"""The simulated Hall-sensor bar: a board streaming docs/hall-bar.md over a pseudo-terminal.

The service opens it with pyserial like the real bar's USB serial port: the
simulator opens a pty and points a symlink (`link_path`, like socat's `link=`)
at its slave side, so the service's `magnetometer.port` names the link.

The board, as firmware would do it: it samples every channel at `SAMPLE_HZ`,
holds each channel's peak (the sample of largest |B|), and every `period_ms`
(later while the UART is still busy with the previous line: lines take
len*10/baud on the wire) latches the peaks into a data line stamped with its
own microsecond clock and starts a new interval. Nothing is missed between
lines; only lines lost on the wire are. The line reaches the pty when its last
byte would have left the UART, so the byte rate never exceeds baud/10.

What a sensor reads: for each piece the field at its closest approach to the
sensor during the interval (`sim.magnet.field_at_mT`; the strongest piece wins
where two fields meet, they are not summed), times the channel's true gain,
plus its true offset, plus Gaussian noise on every sample. The true gains and
offsets are drawn from the seed and are not in the service's config: that is
what calibration has to find (raw = true_gain * B + true_offset, so the ideal
config gain is 1 / true_gain).

Faults: `drop_rate` of lines vanish, `corrupt_rate` are garbled (a flipped
bit, a replaced byte, cut short, junk inserted); each garbled line is exactly
one bad line for the receiver. `set_plugged(False)` pulls the cable (the pty
closes, the symlink goes); `set_plugged(True)` plugs it back: a new pty, the
link re-pointed, and the board restarts (sequence 0, a new clock start), as a
USB-powered board does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import threading
import time
import tty
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from sim.belt import Belt
from sim.config import SimHallBarConfig, SimLineConfig
from sim.feed import SimPiece
from sim.magnet import field_at_mT
from sorter.config import MagnetometerConfig
from sorter.drivers.hallbar.protocol import SEQ_MOD, T_MOD, VALUE_MAX, VALUE_MIN, format_data, format_info, wire_seconds

FW = "sim-1.0"
SAMPLE_HZ = 1000.0  # the board's per-channel sampling rate
PEAK_SAMPLES = 2  # samples a passing piece's peak field lasts (noise picks the highest of them)
REACH_LIFTOFFS = 10.0  # beyond radius + 10 lift-offs a piece's field is < 0.1 % of its peak: skipped
INFO_PERIOD_S = 1.0
WRAP_AFTER_S = (5.0, 60.0)  # the board clock starts this long before its uint32 wrap: runs exercise it
_FORBIDDEN = frozenset(b"$*\r\n")  # bytes that would change the framing, not just the content
_PRINTABLE = bytes(c for c in range(0x20, 0x7F) if c not in _FORBIDDEN)
_UNPLUGGED_POLL_S = 0.05
_JOIN_TIMEOUT_S = 2.0


def garble(line: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A line as noise on the wire leaves it: never valid, never two lines, never merged with the next.

    Only bytes between `$` and `*` are touched and framing bytes never appear, so the
    checksum (or a missing LF, for a cut line) always gives it away.
    """
    star = line.rindex(b"*")
    kind = rng.choice(("flip", "replace", "truncate", "junk"))
    b = bytearray(line)
    if kind == "flip":
        while True:
            i = rng.randrange(1, star)
            v = b[i] ^ (1 << rng.randrange(8))
            if v not in _FORBIDDEN:
                b[i] = v
                return bytes(b), kind
    if kind == "replace":
        i = rng.randrange(1, star)
        b[i] = rng.choice([c for c in _PRINTABLE if c != b[i]])
        return bytes(b), kind
    if kind == "truncate":
        return bytes(b[: rng.randrange(2, len(b) - 1)]), kind  # the LF is always lost
    while True:  # junk whose XOR is 0 would slip past the checksum
        junk = bytes(rng.choice(_PRINTABLE) for _ in range(rng.randint(1, 8)))
        x = 0
        for c in junk:
            x ^= c
        if x:
            i = rng.randrange(1, star)
            return bytes(b[:i] + junk + b[i:]), kind


class SimHallBar:
    def __init__(
        self,
        cfg: SimLineConfig,
        belt: Belt,
        pieces_fn: Callable[[], Sequence[SimPiece]],
        link_path: Path | str,
        seed: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.link_path = Path(link_path)
        geo = cfg.magnetometer or MagnetometerConfig(port=str(link_path))  # the true geometry is the config's
        self.hb: SimHallBarConfig = cfg.simulator.hallbar if cfg.simulator else SimHallBarConfig()
        self.channels = geo.channels
        self.pitch_mm = geo.pitch_mm
        self.distance_mm = geo.distance_mm
        self.baudrate = geo.baudrate
        self.channel_x_mm = geo.first_channel_x_mm + geo.pitch_mm * np.arange(geo.channels)
        self.belt = belt
        self._pieces = pieces_fn
        self._clock = clock
        self.log = structlog.get_logger("sim").bind(part="hallbar")
        rng = np.random.default_rng([seed, 0x48414C4C])
        self.true_offsets_mT = rng.normal(0.0, self.hb.offset_sigma_mT, self.channels)
        self.true_gains = 1.0 + rng.normal(0.0, self.hb.gain_sigma, self.channels)
        self._noise = np.random.default_rng([seed, 1])
        self._faults = random.Random(seed + 2)
        self._boot_rng = random.Random(seed + 3)
        self.drop_rate = self.hb.drop_rate  # may be changed at run time (tests)
        self.corrupt_rate = self.hb.corrupt_rate
        # a field source that is not a piece on the belt: (sensor x, t0, t1) -> each sensor's peak true field
        # over [t0, t1] (sim/refmagnet.py: the reference magnet a technician passes along the bar)
        self.reference: Callable[[np.ndarray, float, float], np.ndarray] | None = None
        self._lock = threading.Lock()  # guards the pty fds and the counters
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._master: int | None = None
        self._slave: int | None = None  # kept open: the pty lives (and stays raw) while no one listens
        self.device: str | None = None
        self._generation = 0  # +1 per plug-in; the board loop restarts when it changes
        self._plugged = False
        # board state
        self._seq = 0
        self._boot_t = 0.0
        self._start_us = 0
        self._latched = (0.0, 0.0)  # (t, belt position) of the last latch: the next line's interval starts there
        self.last_clean_seq: int | None = None  # newest data line written intact
        # counters
        self.lines_sent = 0  # written to the pty (garbled ones included)
        self.data_lines = 0  # data lines latched (sent or not)
        self.info_lines = 0
        self.dropped = 0  # lost on the wire (data and info)
        self.corrupted = 0  # garbled on the wire (data and info)
        self.lost_data = 0  # data lines the receiver cannot have: dropped or garbled
        self.overflow = 0  # not (fully) written: nobody read the pty and its buffer was full
        self.replugs = 0

    # --- control ---
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("SimHallBar already started")
        self._stop.clear()
        self.set_plugged(True)
        self._thread = threading.Thread(target=self._run, name="sim-hallbar", daemon=True)
        self._thread.start()
        self.log.info("sim hallbar started", link=str(self.link_path), device=self.device)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT_S)
            self._thread = None
        self.set_plugged(False)

    @property
    def plugged(self) -> bool:
        return self._plugged

    def set_plugged(self, on: bool) -> None:
        """Plug the bar in (a new pty, the link pointing to it, the board restarts) or pull it out."""
        with self._lock:
            if on == self._plugged:
                return
            if on:
                master, slave = os.openpty()
                tty.setraw(slave)  # no echo, no CR/LF translation, whoever opens it first
                fcntl.fcntl(master, fcntl.F_SETFL, fcntl.fcntl(master, fcntl.F_GETFL) | os.O_NONBLOCK)
                try:
                    self._point_link(os.ttyname(slave))
                except BaseException:
                    os.close(master)
                    os.close(slave)
                    raise
                self._master, self._slave, self.device = master, slave, os.ttyname(slave)
                self._generation += 1
                if self._generation > 1:
                    self.replugs += 1
            else:
                self._unlink()
                for fd in (self._master, self._slave):
                    if fd is not None:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                self._master = self._slave = None
                self.device = None
            self._plugged = on
        self.log.info("sim hallbar plugged" if on else "sim hallbar unplugged", device=self.device)

    def _point_link(self, target: str) -> None:
        link = self.link_path
        if (link.exists() or link.is_symlink()) and not link.is_symlink():
            raise FileExistsError(f"{link} exists and is not a symlink: not replacing it")
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)  # atomic: a reader never finds the link missing during a re-point

    def _unlink(self) -> None:
        with contextlib.suppress(OSError):
            if self.device is not None and os.readlink(self.link_path) == self.device:
                self.link_path.unlink()

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {
                "plugged": self._plugged,
                "device": self.device,
                "lines_sent": self.lines_sent,
                "data_lines": self.data_lines,
                "info_lines": self.info_lines,
                "dropped": self.dropped,
                "corrupted": self.corrupted,
                "lost_data": self.lost_data,
                "overflow": self.overflow,
                "replugs": self.replugs,
            }

    # --- the board ---
    def board_us(self, t: float) -> int:
        """The board clock (uint32 microseconds, running clock_ppm fast) at PC time t."""
        return (self._start_us + int((t - self._boot_t) * (1.0 + self.hb.clock_ppm * 1e-6) * 1e6)) % T_MOD

    def readings(self, pos0_mm: float, pos1_mm: float, dt_s: float) -> list[int]:
        """One data line's values: each channel's peak while the belt moved from pos0 to pos1."""
        lift = self.hb.lift_off_mm
        xs = self.channel_x_mm
        signal = np.zeros(self.channels)
        for p in self._pieces():
            # along offset of the sensor row from the centroid; the belt moved it from hi down to lo
            hi, lo = self.distance_mm - (pos0_mm - p.s_mm), self.distance_mm - (pos1_mm - p.s_mm)
            dy = 0.0 if lo <= 0.0 <= hi else (lo if lo > 0.0 else hi)
            reach = p.radius_mm + REACH_LIFTOFFS * lift
            if abs(dy) > reach:
                continue
            for ch in np.flatnonzero(np.abs(xs - p.x_mm) <= reach):
                b = field_at_mT(p, float(xs[ch] - p.x_mm), dy, lift)
                if abs(b) > abs(signal[ch]):
                    signal[ch] = b
        if self.reference is not None:
            t1 = self._clock()
            ref = self.reference(xs, t1 - dt_s, t1)
            signal = np.where(np.abs(ref) > np.abs(signal), ref, signal)  # the strongest field wins, as above
        n = max(PEAK_SAMPLES, round(dt_s * SAMPLE_HZ))
        samples = self.true_offsets_mT + self._noise.normal(0.0, self.hb.noise_mT, (n, self.channels))
        samples[:PEAK_SAMPLES] += self.true_gains * signal
        peak = samples[np.argmax(np.abs(samples), axis=0), np.arange(self.channels)]
        return [int(v) for v in np.clip(np.rint(peak), VALUE_MIN, VALUE_MAX)]

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                gen = self._generation
                if not self._plugged:
                    self._stop.wait(_UNPLUGGED_POLL_S)
                    continue
                self._board(gen)
        except Exception:  # a dead simulator thread must be loud
            self.log.exception("sim hallbar failed")
            raise

    def boot(self, t: float) -> bytes:
        """The board powers up at PC time t (a new clock start, sequence 0); returns its info line."""
        self._boot_t = t
        self._start_us = T_MOD - int(self._boot_rng.uniform(*WRAP_AFTER_S) * 1e6)
        self._seq = 0
        self._latched = (t, self.belt.position_mm(t))
        return format_info(self.channels, round(self.pitch_mm * 1000), FW)

    def latch(self, t: float) -> tuple[int, bytes]:
        """Latch the peaks held since the last line into a data line stamped t: (its seq, the line)."""
        prev_t, prev_pos = self._latched
        pos = self.belt.position_mm(t)
        values = self.readings(prev_pos, pos, t - prev_t)
        self._latched = (t, pos)
        seq = self._seq
        self._seq = (seq + 1) % SEQ_MOD
        return seq, format_data(seq, self.board_us(t), values)

    def _board(self, gen: int) -> None:
        """One power-up of the board, on the pty: runs until stopped, unplugged or replugged."""
        t = self._clock()
        info = self.boot(t)  # sent again every INFO_PERIOD_S
        wire_free = self._send(info, t, data=False)
        next_info = t + INFO_PERIOD_S
        next_latch = t + self.hb.period_ms / 1000
        while not self._stop.is_set() and self._generation == gen and self._plugged:
            if self._stop.wait(max(0.0, max(next_latch, wire_free) - self._clock())):
                return
            now = self._clock()
            seq, line = self.latch(now)
            next_latch = now + self.hb.period_ms / 1000
            wire_free = self._send(line, now, data=True, seq=seq)
            if wire_free >= next_info:
                wire_free = self._send(info, wire_free, data=False)
                next_info += INFO_PERIOD_S

    def _send(self, line: bytes, start: float, *, data: bool, seq: int = 0) -> float:
        """Put `line` on the wire from `start`; it reaches the pty when its last byte would. Returns that time."""
        done = start + wire_seconds(len(line), self.baudrate)
        if self._stop.wait(max(0.0, done - self._clock())):
            return done
        u = self._faults.random()
        drop = u < self.drop_rate
        corrupt = not drop and u < self.drop_rate + self.corrupt_rate
        if corrupt:
            line, _ = garble(line, self._faults)
        with self._lock:
            if data:
                self.data_lines += 1
            else:
                self.info_lines += 1
            self.dropped += drop
            self.corrupted += corrupt
            if data and (drop or corrupt):
                self.lost_data += 1
            if drop or self._master is None:
                return done
            try:
                if os.write(self._master, line) < len(line):
                    self.overflow += 1
            except BlockingIOError:  # nobody reads: a real UART's bytes go nowhere too
                self.overflow += 1
                return done
            except OSError as exc:
                self.log.warning("sim hallbar write failed", error=repr(exc))
                return done
            self.lines_sent += 1
            if data and not corrupt:
                self.last_clean_seq = seq
        return done
