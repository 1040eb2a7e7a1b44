"""Client of the simulated line camera, and the wire protocol both sides share.

Pixels travel through a POSIX shared-memory ring; the TCP socket carries only a
hello and one 32-byte header per frame. A frame is 2.7 MB at 120 frames/s for
two cameras, so copying pixels through a socket would cost more than the
vision stage itself.

Ring layout: slot i starts at i * slot_stride. Each slot begins with a 64-byte
header whose first two u64 are `seq_begin` (written before the pixels) and
`seq_end` (written after them); the pixels (H x W x 3 BGR) follow. The reader
checks `seq_end` before and `seq_begin` after copying: a writer that reused the
slot meanwhile has already changed `seq_begin`, so a torn frame is detected
rather than returned (a per-slot seqlock).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import struct
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import structlog

from sorter.config import CameraConfig, SimCameraSource
from sorter.core import priority
from sorter.core.messages import Frame
from sorter.drivers.cameras.base import SourceError

MAGIC = b"SCAM"
VERSION = 1
SLOT_HEADER = 64  # bytes before each slot's pixels; keeps pixel rows 64-byte aligned

# magic, version, frame header size, slots, width, height, channels, slot stride, shm name, camera name
HELLO = struct.Struct("<4sHHIIIIQ64s32s")
# seq, slot, 32-bit count latched at exposure, t_exposure (monotonic s), width, height
FRAME_HEADER = struct.Struct("<QIIdII")


@dataclass(frozen=True)
class ShmLayout:
    slots: int
    width: int
    height: int
    channels: int = 3

    @property
    def frame_bytes(self) -> int:
        return self.width * self.height * self.channels

    @property
    def slot_stride(self) -> int:
        return SLOT_HEADER + -(-self.frame_bytes // 64) * 64

    @property
    def size(self) -> int:
        return self.slots * self.slot_stride

    def seqs(self, buf: memoryview | mmap.mmap) -> np.ndarray:
        """(slots, 2) u64 view: [:, 0] = seq_begin, [:, 1] = seq_end."""
        return np.ndarray((self.slots, 2), dtype="<u8", buffer=buf, offset=0, strides=(self.slot_stride, 8))

    def pixels(self, buf: memoryview | mmap.mmap) -> np.ndarray:
        """(slots, H, W, C) u8 view of every slot's pixels."""
        shape = (self.slots, self.height, self.width, self.channels)
        strides = (self.slot_stride, self.width * self.channels, self.channels, 1)
        return np.ndarray(shape, dtype=np.uint8, buffer=buf, offset=SLOT_HEADER, strides=strides)


def pack_hello(layout: ShmLayout, shm_name: str, camera: str) -> bytes:
    return HELLO.pack(
        MAGIC,
        VERSION,
        FRAME_HEADER.size,
        layout.slots,
        layout.width,
        layout.height,
        layout.channels,
        layout.slot_stride,
        shm_name.encode(),
        camera.encode()[:32],
    )


def _attach_readonly(shm_name: str) -> tuple[int, mmap.mmap]:
    """Open an existing segment read-only, and map it, without registering it with multiprocessing's
    resource tracker: on Python < 3.13 a tracked attach unlinks the server's segment when the client
    process exits. Returns the open descriptor (the caller closes it) and the mapping."""
    import _posixshmem  # the stdlib's own shm_open wrapper (what SharedMemory uses)

    fd = _posixshmem.shm_open("/" + shm_name, os.O_RDONLY, mode=0o600)
    try:
        return fd, mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise


class _Ring:
    """The client's read-only view of the server's ring.

    The slot headers (the seqlock) are read through the mapping, which so maps one page per slot; the
    pixels are copied out with pread on the segment's descriptor, never through the mapping. A copy
    through the mapping would map every page of the ring into this process (64 slots x 2.7 MB per
    camera: 350 MB of the simulator's memory counted in the service's RSS for two cameras) at no gain:
    pread copies as fast, and the frame the service works with is its own copy either way.
    """

    def __init__(self, fd: int, mm: mmap.mmap, layout: ShmLayout) -> None:
        self.layout = layout
        self.mm: mmap.mmap | None = mm
        self.seqs: np.ndarray | None = layout.seqs(mm)
        self._fd = fd
        self._lock = threading.Lock()  # close() waits for a copy in flight: its descriptor must stay open

    def read(self, slot: int, seq: int) -> np.ndarray | None:
        """A copy of frame `seq` from `slot`, or None if the slot no longer (or not yet) holds it intact."""
        lay = self.layout
        with self._lock:
            if self.seqs is None:
                return None  # closed meanwhile
            if int(self.seqs[slot, 1]) != seq:  # seqlock: complete before the copy ...
                return None
            image = np.empty((lay.height, lay.width, lay.channels), np.uint8)
            got = os.preadv(self._fd, [image.data], slot * lay.slot_stride + SLOT_HEADER)
            if got != lay.frame_bytes or int(self.seqs[slot, 0]) != seq:  # ... and no writer started on it since
                return None
            return image

    def close(self) -> None:
        # Drop our references and let the mapping go with the last one. Never mm.close() here: numpy
        # arrays keep the mmap object itself, not a buffer export, so close() would succeed and unmap
        # the pages under a read still running on the copier thread (a segfault, seen at shutdown).
        with self._lock:
            self.seqs = None
            self.mm = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class SimCameraClient:
    source_type: ClassVar[str] = "sim"
    """FrameSource for a `SimCameraServer` at "host:port"."""

    @classmethod
    def from_config(cls, cfg: CameraConfig) -> SimCameraClient:
        src = cfg.source
        assert isinstance(src, SimCameraSource)
        return cls(cfg.name, src.address, width=cfg.width, height=cfg.height)

    def __init__(
        self,
        name: str,
        address: str,
        *,
        width: int | None = None,
        height: int | None = None,
        connect_timeout_s: float = 2.0,
    ) -> None:
        self._name = name
        self.address = address
        self.expected = (width, height)
        self.connect_timeout_s = connect_timeout_s
        self.received = 0  # headers received
        self._torn = 0
        self._log = structlog.get_logger("sorter").bind(camera=name)
        self._writer: asyncio.StreamWriter | None = None
        self._closing = False
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"copy-{name}", initializer=priority.enter)

    @property
    def name(self) -> str:
        return self._name

    @property
    def torn(self) -> int:
        return self._torn

    @property
    def dropped(self) -> int:
        return 0  # the server's ring is the buffer; a consumer that falls behind shows up as torn

    def _error(self, problem: str, check: str = "is the simulator running and the address right?") -> SourceError:
        return SourceError(self._name, f"sim camera at {self.address}: {problem}", check)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, _, port = self.address.rpartition(":")
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(host or "127.0.0.1", int(port)), self.connect_timeout_s
            )
        except ValueError as exc:
            raise self._error(f"bad address: {exc}", "use host:port") from exc
        except (OSError, TimeoutError) as exc:
            raise self._error(f"cannot connect: {str(exc) or 'timed out'}") from exc

    async def _hello(self, reader: asyncio.StreamReader) -> tuple[ShmLayout, str]:
        try:
            data = await asyncio.wait_for(reader.readexactly(HELLO.size), self.connect_timeout_s)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise self._error(f"no hello from server: {str(exc) or 'timed out'}") from exc
        magic, version, hdr_size, slots, width, height, channels, stride, shm, _cam = HELLO.unpack(data)
        if magic != MAGIC or version != VERSION or hdr_size != FRAME_HEADER.size:
            raise self._error(
                f"not a sim camera stream v{VERSION} (magic {magic!r}, version {version})",
                "is the address a camera port of the same software version?",
            )
        layout = ShmLayout(slots, width, height, channels)
        if stride != layout.slot_stride or channels != 3:
            raise self._error(f"unsupported ring layout (stride {stride}, {channels} channels)")
        ew, eh = self.expected
        if (ew is not None and ew != width) or (eh is not None and eh != height):
            raise SourceError(
                self._name,
                f"sim camera sends {width}x{height} frames but the config says {ew}x{eh}",
                "fix cameras[].width/height or the simulator's camera",
            )
        return layout, shm.rstrip(b"\0").decode()

    async def frames(self) -> AsyncIterator[Frame]:
        reader, writer = await self._connect()
        self._writer = writer
        ring: _Ring | None = None
        try:
            layout, shm_name = await self._hello(reader)
            try:
                fd, mm = _attach_readonly(shm_name)
            except OSError as exc:
                raise self._error(
                    f"cannot map shared memory {shm_name!r}: {exc}", "client and simulator must run on the same machine"
                ) from exc
            if len(mm) < layout.size:
                mm.close()
                os.close(fd)
                raise self._error(f"shared memory {shm_name!r} is smaller than its layout")
            ring = _Ring(fd, mm, layout)
            torn_run = False
            while True:
                try:
                    data = await reader.readexactly(FRAME_HEADER.size)
                except (OSError, asyncio.IncompleteReadError) as exc:
                    if self._closing:  # we hung up ourselves: just end
                        return
                    raise self._error("connection closed by the server", "was the simulator stopped?") from exc
                t_received = time.monotonic()
                self.received += 1
                seq, slot, count, t_exp, width, height = FRAME_HEADER.unpack(data)
                if slot >= layout.slots or (width, height) != (layout.width, layout.height):
                    raise self._error(f"corrupt frame header (slot {slot}, {width}x{height})")
                # 2.7 MB out of shared memory costs milliseconds (cold caches across processes); the
                # copy releases the GIL, so it runs on a thread and the event loop stays free
                image = await asyncio.get_running_loop().run_in_executor(self._copier, ring.read, slot, seq)
                if image is None:  # overwritten before we got to it: the consumer is too slow
                    self._torn += 1
                    if not torn_run:  # once per run of torn frames: which side was late tells the cause
                        self._log.warning(
                            "frames torn: the ring was overwritten before the copy",
                            seq=seq,
                            # late header: the simulator sent it late or this loop read it late
                            header_late_ms=round((t_received - t_exp) * 1000, 1),
                            # late copy: the copy thread was held up
                            copy_late_ms=round((time.monotonic() - t_received) * 1000, 1),
                            ring_slots=layout.slots,
                        )
                    torn_run = True
                    continue
                torn_run = False
                yield Frame(self._name, seq, image, t_exp, count, t_received)
        finally:
            if ring is not None:
                ring.close()
            writer.close()
            self._writer = None

    async def close(self) -> None:
        # the generator's own `finally` releases everything; this covers a generator
        # that was never iterated to its end (e.g. abandoned while waiting)
        self._closing = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._copier.shutdown(wait=False)
