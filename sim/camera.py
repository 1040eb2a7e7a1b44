"""A simulated encoder-triggered line camera, served like the real thing.

Industrial line cameras expose on an encoder trigger (every `trigger_counts`
counts), latch the count at exposure and deliver the frame some milliseconds
later, in order. This server does the same against the simulated `Belt`:

- a trigger thread waits for the belt to reach each trigger count (predicting
  the time from the belt's current speed, re-checking often so stops and speed
  changes are followed) and renders the frame at the exact trigger position
  straight into a slot of a shared-memory ring;
- a sender thread sends each frame's 32-byte header at exposure + a jittered
  delivery delay, never letting a later frame overtake an earlier one;
- with the trigger switched off (`free_run_fps` set, as a technician does for commissioning with the
  belt stopped) the trigger thread exposes on a timer instead, latching whatever count the encoder shows;
- an accept thread serves one client at a time (a new connection replaces the
  old one, so a client that reconnects after a stall is never locked out).

The wire protocol and ring layout live in `sorter.drivers.cameras.simcam`, the
service's side of this seam.
"""

from __future__ import annotations

import asyncio
import csv
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import IO, Any, NamedTuple

import cv2
import numpy as np
import structlog

from sim.belt import Belt
from sorter.core import priority
from sorter.core.geometry import wrap32
from sorter.drivers.cameras.simcam import FRAME_HEADER, ShmLayout, pack_hello

_MAX_WAIT_S = 0.02  # re-predict the trigger time at least this often: the belt may stop or change speed
_ACCEPT_POLL_S = 0.1  # how quickly the accept thread notices stop()
_SEND_TIMEOUT_S = 2.0  # a client that does not read for this long is dropped
_JOIN_TIMEOUT_S = 5.0

Render = Callable[[np.ndarray, float], None]


class _Pending(NamedTuple):
    send_at: float
    seq: int
    header: bytes


class SimCameraServer:
    """One simulated camera: renders into a shared-memory ring, sends headers over TCP."""

    def __init__(
        self,
        name: str,
        width: int,
        height: int,
        trigger_counts: int,
        belt: Belt,
        render: Render,
        delay_ms: tuple[float, float],
        seed: int,
        host: str,
        port: int,
        slots: int = 64,  # ~1 s at 60 fps, like a GigE camera driver's stream buffers (Aravis: n_buffers)
        record: Path | None = None,
        rt_priority: int | None = None,  # its threads' real-time level (simulator.camera_rt_priority); None: inherited
    ) -> None:
        if trigger_counts <= 0:
            raise ValueError("trigger_counts must be positive")
        if slots < 2:
            raise ValueError("the ring needs at least 2 slots")
        if not 0 <= delay_ms[0] <= delay_ms[1]:
            raise ValueError(f"delay_ms must be (min, max) with 0 <= min <= max, got {delay_ms}")
        self.name = name
        self.rt_priority = rt_priority
        self.width = width
        self.height = height
        self.trigger_counts = trigger_counts
        self.belt = belt
        self.render = render
        self.delay_ms = delay_ms
        self.host = host
        self.port = port  # the bound port after start() (pass 0 for a free one)
        self.slots = slots
        self.record = Path(record) if record is not None else None
        self.layout = ShmLayout(slots, width, height)
        self.log = structlog.get_logger("sim.camera").bind(camera=name)
        self._rng = random.Random(seed)

        self.frames_triggered = 0
        self.frames_sent = 0
        self.frames_skipped = 0  # triggered but never delivered: no client, ring overrun, render error
        self._counter_lock = threading.Lock()  # the trigger and sender threads both count skips

        self._stop = threading.Event()
        self._cond = threading.Condition()  # guards _pending
        self._pending: deque[_Pending] = deque()
        self._client_lock = threading.Lock()
        self._client: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._shm: SharedMemory | None = None
        self._seqs: np.ndarray | None = None
        self._pixels: np.ndarray | None = None
        self._seq = 0  # seq 0 marks a never-written slot
        self._last_t_exp = 0.0
        self._last_send_at = 0.0
        # free-run (trigger mode off): expose on the camera's own timer at this rate, belt moving or not,
        # as an industrial camera does when its trigger is switched off for commissioning
        self.free_run_fps: float | None = None
        # fault injection: a hung camera (firmware, driver) stays connected and triggered but delivers nothing;
        # its frame seq runs on, so the gap shows when it delivers again
        self.stalled = False
        self._next_free_run = 0.0
        self._video: cv2.VideoWriter | None = None
        self._csv_file: IO[str] | None = None
        self._csv: Any = None

    # --- public ---
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def shm_name(self) -> str | None:
        return self._shm.name if self._shm is not None else None

    @property
    def client_connected(self) -> bool:
        return self._client is not None

    def stats(self) -> dict[str, int]:
        with self._counter_lock:
            return {"triggered": self.frames_triggered, "sent": self.frames_sent, "skipped": self.frames_skipped}

    async def start(self) -> None:
        if self._threads:
            raise RuntimeError(f"sim camera {self.name} already started")
        self._stop.clear()
        if self.record is not None:
            self._open_recording(self.record)
        try:
            self._listener = socket.create_server((self.host, self.port))  # SO_REUSEADDR: a restart rebinds at once
            self._listener.settimeout(_ACCEPT_POLL_S)
            self.port = self._listener.getsockname()[1]
            self._shm = SharedMemory(create=True, size=self.layout.size)
        except OSError:
            await self.stop()
            raise
        buf = self._shm.buf
        assert buf is not None
        self._seqs, self._pixels = self.layout.seqs(buf), self.layout.pixels(buf)
        for target, role in ((self._trigger_loop, "trigger"), (self._send_loop, "send"), (self._accept_loop, "accept")):
            t = threading.Thread(target=self._at_priority(target), name=f"simcam-{self.name}-{role}", daemon=True)
            t.start()
            self._threads.append(t)
        self.log.info(
            "sim camera serving",
            address=self.address,
            shm=self._shm.name,
            slots=self.slots,
            shape=(self.height, self.width, 3),
            trigger_counts=self.trigger_counts,
        )

    def _at_priority(self, target: Callable[[], None]) -> Callable[[], None]:
        """The thread's work at the cameras' own real-time level: on a plant a camera renders and sends on its
        own hardware, so here it must yield the cores to the line service's threads (simulator.camera_rt_priority)."""
        if self.rt_priority is None:
            return target
        level = self.rt_priority

        def run() -> None:
            priority.enter(inherited=True, rt_priority=level)
            target()

        return run

    async def stop(self) -> None:
        """Stop the threads, drop the client, close the recording, unlink the ring. Idempotent."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        threads, self._threads = self._threads, []
        await asyncio.to_thread(self._join, threads)
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._cond:
            self._skip(len(self._pending))  # triggered but never sent: keeps triggered == sent + skipped
            self._pending.clear()
        self._close_recording()
        if self._shm is not None:
            self._seqs = self._pixels = None  # numpy views pin the buffer; drop them before closing
            try:
                self._shm.close()
            except BufferError:  # the render function kept a view; unlink anyway, the GC unmaps later
                self.log.warning("shared memory still referenced at stop")
            self._shm.unlink()
            self._shm = None
        self.log.info("sim camera stopped", **self.stats())

    # --- threads ---
    def _join(self, threads: list[threading.Thread]) -> None:
        for t in threads:
            t.join(_JOIN_TIMEOUT_S)
            if t.is_alive():
                self.log.error("thread did not stop", thread=t.name)

    def _skip(self, n: int = 1) -> None:
        with self._counter_lock:
            self.frames_skipped += n

    def _trigger_loop(self) -> None:
        belt, trig = self.belt, self.trigger_counts
        # triggers sit on multiples of trigger_counts, as from a hardware encoder divider
        next_count = (belt.count() // trig + 1) * trig
        try:
            while not self._stop.is_set():
                if self.free_run_fps is not None:
                    self._free_run_tick(self.free_run_fps)
                    next_count = (belt.count() // trig + 1) * trig  # back on the divider when triggers resume
                    continue
                pos = belt.position_at_count(next_count)
                now = time.monotonic()
                if belt.position_mm(now) < pos:
                    t = belt.time_at_position(pos)
                    self._stop.wait(_MAX_WAIT_S if t is None else min(max(t - now, 0.0), _MAX_WAIT_S))
                    continue
                behind = (belt.count(now) - next_count) // trig
                if behind >= self.slots and self._video is None:
                    # (a recording keeps every frame instead: its timeline must stay continuous)
                    # starved for longer than the ring holds: such frames could never be delivered
                    # intact, so count them and catch up instead of rendering a burst of stale frames
                    with self._counter_lock:
                        self.frames_triggered += behind
                        self.frames_skipped += behind
                    self._seq += behind
                    next_count += behind * trig
                    self.log.warning("trigger thread fell behind; frames skipped", frames=behind)
                    continue
                t_exp = belt.time_at_position(pos)
                if t_exp is None or t_exp > now:  # stopped right after passing pos: best estimate is now
                    t_exp = now
                t_exp = max(t_exp, self._last_t_exp)
                self._last_t_exp = t_exp
                self._expose(next_count, pos, t_exp)
                next_count += trig
        except Exception:
            self.log.exception("trigger thread failed")
            raise

    def _free_run_tick(self, fps: float) -> None:
        now = time.monotonic()
        if now < self._next_free_run:
            self._stop.wait(min(self._next_free_run - now, _MAX_WAIT_S))
            return
        # keep the cadence, but never burst to catch up after a stall
        self._next_free_run = max(self._next_free_run + 1.0 / fps, now + 0.5 / fps)
        t_exp = max(now, self._last_t_exp)
        self._last_t_exp = t_exp
        self._expose(self.belt.count(t_exp), self.belt.position_mm(t_exp), t_exp)

    def _expose(self, count: int, pos_mm: float, t_exp: float) -> None:
        assert self._seqs is not None and self._pixels is not None
        self._seq += 1
        seq, slot = self._seq, self._seq % self.slots
        with self._counter_lock:
            self.frames_triggered += 1
        if self.stalled:
            self._skip()
            return
        connected = self._client is not None
        if not connected and self._video is None:
            self._skip()  # nobody to deliver to: do not spend CPU rendering
            return
        with self._cond:
            # a header still waiting for this slot would point at overwritten pixels (only when sends stall)
            while self._pending and self._pending[0].seq <= seq - self.slots:
                self._pending.popleft()
                self._skip()
        self._seqs[slot, 0] = seq  # seqlock: begin ...
        try:
            self.render(self._pixels[slot], pos_mm)
        except Exception:
            self.log.exception("render failed", seq=seq)
            self._skip()
            return
        self._seqs[slot, 1] = seq  # ... end: the slot holds frame `seq` intact
        if self._video is not None:
            self._video.write(np.ascontiguousarray(self._pixels[slot]))
            self._csv.writerow((seq, wrap32(count), f"{t_exp:.6f}"))
        if not connected:
            self._skip()
            return
        lo, hi = self.delay_ms
        send_at = max(t_exp + self._rng.uniform(lo, hi) / 1000.0, self._last_send_at)  # FIFO
        self._last_send_at = send_at
        header = FRAME_HEADER.pack(seq, slot, wrap32(count), t_exp, self.width, self.height)
        with self._cond:
            self._pending.append(_Pending(send_at, seq, header))
            self._cond.notify()

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop.is_set() and not self._pending:
                    self._cond.wait()
                if self._stop.is_set():
                    return
                head = self._pending[0]
                dt = head.send_at - time.monotonic()
                if dt > 0:
                    self._cond.wait(dt)
                    continue
                self._pending.popleft()
            self._send(head.header)

    def _send(self, header: bytes) -> None:
        with self._client_lock:
            sock = self._client
            if sock is None:
                self._skip()
                return
            try:
                sock.sendall(header)
            except OSError as exc:
                self.log.info("client gone", error=str(exc) or type(exc).__name__)
                sock.close()
                self._client = None
                self._skip()
                return
        with self._counter_lock:
            self.frames_sent += 1

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._shm is not None
        hello = pack_hello(self.layout, self._shm.name, self.name)
        while not self._stop.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._stop.is_set():
                    self.log.warning("accept failed", error=str(exc))
                    self._stop.wait(_ACCEPT_POLL_S)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # 32-byte headers must not wait for Nagle
            sock.settimeout(_SEND_TIMEOUT_S)
            with self._client_lock:
                if self._client is not None:
                    self.log.info("client replaced by a new connection", peer=str(peer))
                    self._client.close()
                    self._client = None
                try:
                    sock.sendall(hello)
                except OSError as exc:
                    self.log.info("client left before hello", error=str(exc))
                    sock.close()
                    continue
                self._client = sock
            self.log.info("client connected", peer=str(peer))

    # --- recording ---
    def _open_recording(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fps = self.belt.setpoint_mm_s * self.belt.counts_per_mm / self.trigger_counts  # nominal, not measured
        video = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (self.width, self.height))
        if not video.isOpened():
            raise OSError(f"sim camera {self.name}: cannot open {path} for MJPG recording")
        self._video = video
        self._csv_file = path.with_suffix(".csv").open("w", newline="")
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(("seq", "count", "t_exposure"))

    def _close_recording(self) -> None:
        if self._video is not None:
            self._video.release()
            self._video = None
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None
            self._csv = None
