"""GigE Vision / USB3 Vision cameras (GenICam) as frame sources, through Aravis (docs/cameras.md).

This module is the only one that imports Aravis (its GObject bindings, `gi.repository.Aravis`): an API
change between Aravis versions touches this file. Without the library the module does not import and the
registry names it in the error of a camera that asks for `type: genicam`; other cameras keep working.

Two layers:

- `GenICamDevice`: one opened camera, synchronous (the SDK blocks): discovery by serial / user ID /
  address, pixel format, exposure, gain, region, trigger, chunks, acquisition, buffers in, frames out. Used by
  the frame source, `sorter cameras grab` and hw.camera_check.
- `GenICamCamera`: the `FrameSource`. Acquisition runs on a thread of its own (`genicam-<camera>`) with a
  small bounded hand-off to the loop (the oldest frame is dropped and counted when the loop is behind, as in
  opencv.py). Each frame carries its unwrapped frame ID (`seq`), the PC time of its exposure and, by the
  configured position method, the encoder count latched in its chunk data (`count`) or its trigger index
  (`trigger_index`, which the service places on the trigger grid, sorter/core/position.py).

Frames the stream could not complete (missing packets after resends, size mismatch) are counted as `torn`
and never passed on; frame-ID gaps (frames that never arrived) are counted as `lost`. A lost control
channel (cable pulled, camera powered off) ends the session with a SourceError, so the capture marks the
camera offline, alarms the line and reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from sorter.config import CameraConfig, GenICamSource
from sorter.core import priority
from sorter.core.messages import Frame
from sorter.core.position import FrameIds, TimestampMap, wrap32
from sorter.drivers.cameras.base import SourceError
from sorter.drivers.cameras.pixels import PIXEL_FORMATS, to_bgr

try:  # Aravis's GObject introspection data (gir1.2-aravis-0.8) through PyGObject
    import gi

    gi.require_version("Aravis", "0.8")
    from gi.repository import Aravis, GLib
except (ImportError, ValueError) as _exc:  # ValueError: PyGObject is there, Aravis 0.8's typelib is not
    raise ImportError(
        f"GenICam cameras need Aravis 0.8 and PyGObject ({_exc}): `make genicam`, or "
        "`apt-get install gir1.2-aravis-0.8` and `pip install -e '.[genicam]'` (docs/cameras.md)"
    ) from _exc

LIBRARY = "aravis"
_JOIN_TIMEOUT_S = 3.0
_POP_TIMEOUT_S = 0.2  # the acquisition thread looks at its stop flag this often
_DEFAULT_SOFTWARE_HZ = 10.0


@dataclass(frozen=True)
class Incomplete:
    """A frame the stream could not complete (packets missing after resends, size mismatch): never passed on."""

    frame_id: int  # its ID on the wire: it arrived, so it is not lost; 0 where the stream never learnt it
    why: str


class GenICamError(Exception):
    """A camera cannot be found, opened or set up; the message says what and what to check."""


@dataclass(frozen=True)
class DeviceInfo:
    """One camera found on the networks and buses (`sorter cameras discover`)."""

    device_id: str  # the library's id for it (Aravis: vendor-model-serial or vendor-serial)
    vendor: str
    model: str
    serial: str
    address: str  # IP address (GigE Vision) or bus address (USB3 Vision)
    protocol: str  # GigEVision / USB3Vision
    physical_id: str  # MAC address (GigE Vision)


@dataclass
class RawFrame:
    """One complete frame as the camera sent it, image converted to BGR."""

    frame_id: int  # the ID on the wire (16-bit GigE Vision 1.x block ID, or 64-bit)
    timestamp_ns: int  # the camera's timestamp of the exposure, ns (0: the camera has none)
    t_received: float  # PC monotonic seconds when the frame was handed over complete
    width: int
    height: int
    pixel_format: str
    image: np.ndarray  # H x W x 3 BGR uint8
    chunks: dict[str, int] = field(default_factory=dict)


def _gerr(exc: BaseException) -> str:
    msg = getattr(exc, "message", None) or str(exc)
    return str(msg).strip()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def discover() -> list[DeviceInfo]:
    """Every GenICam camera the library finds now (GigE Vision broadcast discovery, USB3 Vision enumeration)."""
    Aravis.update_device_list()
    out = []
    for i in range(Aravis.get_n_devices()):
        out.append(
            DeviceInfo(
                device_id=Aravis.get_device_id(i) or "",
                vendor=Aravis.get_device_vendor(i) or "",
                model=Aravis.get_device_model(i) or "",
                serial=Aravis.get_device_serial_nbr(i) or "",
                address=Aravis.get_device_address(i) or "",
                protocol=Aravis.get_device_protocol(i) or "",
                physical_id=Aravis.get_device_physical_id(i) or "",
            )
        )
    return out


def find(device: str, devices: list[DeviceInfo] | None = None) -> DeviceInfo | None:
    """The camera a config's `device` names: its serial, address, library id or MAC address."""
    devices = discover() if devices is None else devices
    for d in devices:
        if device in (d.serial, d.address, d.device_id) or device.lower() == d.physical_id.lower():
            return d
    return None


class GenICamDevice:
    """One opened camera. Synchronous: call it from one thread (the SDK blocks)."""

    def __init__(self, device: str, *, camera: str = "") -> None:
        self.device = device
        self.camera_name = camera or device
        self.info: DeviceInfo | None = None
        self._cam: Any = None
        self._dev: Any = None
        self._stream: Any = None
        self._parser: Any = None
        self._chunk_names: list[str] = []
        self.id_bits = 16
        self.control_lost = threading.Event()
        self.acquiring = False

    # --- open and set up ---
    def open(self) -> DeviceInfo:
        if _is_ip(self.device):
            # by address: no discovery round (a second of waiting for replies), so a reconnect is quick
            try:
                cam = Aravis.Camera.new(self.device)
            except GLib.Error:
                pass  # not answering at that address: discovery below says what it sees instead
            else:
                return self._opened(cam, self._info_of(cam))
        devices = discover()
        info = find(self.device, devices)
        candidates = [info] if info is not None else devices  # a user ID is only known once a camera is open
        errors: list[str] = []
        for cand in candidates:
            try:
                cam = Aravis.Camera.new(cand.device_id)
            except GLib.Error as exc:
                errors.append(f"{cand.device_id}: {_gerr(exc)}")
                continue
            if info is None and self._user_id(cam) != self.device:
                del cam  # not the one: release its control channel now
                continue
            self._opened(cam, cand)
            break
        if self._cam is None:
            if info is None:
                seen = ", ".join(f"{d.serial or d.device_id} at {d.address}" for d in devices) or "none"
                raise GenICamError(
                    f"no GenICam camera {self.device!r} found (cameras found: {seen}); check the cable, the "
                    "camera's power and that it is on this PC's subnet (`sorter cameras discover`)"
                )
            raise GenICamError(
                f"camera {self.device!r} ({info.address}) cannot be opened: {'; '.join(errors)}. Another "
                "program (a viewer, a second `sorter`) may hold its control channel: close it and retry"
            )
        assert self.info is not None
        return self.info

    def _opened(self, cam: Any, info: DeviceInfo) -> DeviceInfo:
        dev = cam.get_device()
        if isinstance(dev, Aravis.GvDevice) and not dev.is_controller():
            # Aravis opens a GigE camera held by another controller read-only, and every write then times out:
            # say it now, plainly
            del cam, dev
            raise GenICamError(
                f"camera {self.device!r} ({info.address}) is busy: another program holds its control channel "
                "(a viewer, a second `sorter`, the line service itself); close it and retry"
            )
        self._cam, self._dev, self.info = cam, dev, info
        dev.connect("control-lost", lambda *_: self.control_lost.set())
        self.id_bits = self._frame_id_bits()
        return info

    def _info_of(self, cam: Any) -> DeviceInfo:
        """What discovery would have said of a camera opened by address, read from its features."""
        dev = cam.get_device()

        def text(name: str) -> str:
            try:
                return str(dev.get_string_feature_value(name)) if dev.is_feature_available(name) else ""
            except GLib.Error:
                return ""

        return DeviceInfo(
            device_id=self.device,
            vendor=text("DeviceVendorName"),
            model=text("DeviceModelName"),
            serial=text("DeviceSerialNumber") or text("DeviceID"),
            address=self.device,
            protocol="GigEVision" if cam.is_gv_device() else "USB3Vision",
            physical_id="",
        )

    def _write(self, name: str, value: str) -> None:
        """Write one feature by its type (GenICam nodes: enumeration/string, integer, float, boolean, command)."""
        dev = self._dev
        if not dev.is_feature_available(name):
            raise GenICamError(f"camera {self.device!r} has no feature {name!r} (or it is not writable now)")
        node = dev.get_feature(name)
        kind = type(node).__name__
        if kind == "GcCommand":
            node.execute()
        elif kind in ("GcIntegerNode", "GcIntReg", "GcMaskedIntReg", "GcConverter", "GcIntConverter"):
            dev.set_integer_feature_value(name, int(value, 0))
        elif kind in ("GcFloatNode", "GcFloatReg", "GcSwissKnife"):
            dev.set_float_feature_value(name, float(value))
        elif kind == "GcBoolean":
            dev.set_boolean_feature_value(name, value.lower() in ("1", "true", "on", "yes"))
        else:  # enumerations and strings take their text
            dev.set_string_feature_value(name, value)

    @staticmethod
    def _user_id(cam: Any) -> str | None:
        try:
            dev = cam.get_device()
            if dev.is_feature_available("DeviceUserID"):
                return str(dev.get_string_feature_value("DeviceUserID"))
        except GLib.Error:
            pass
        return None

    def _frame_id_bits(self) -> int:
        """How wide the frame IDs are: USB3 Vision and GigE Vision 2 extended IDs 64 bits, else 16."""
        if not self._cam.is_gv_device():
            return 64
        dev = self._dev
        if dev.is_feature_available("GevGVSPExtendedIDMode"):
            try:
                if dev.get_string_feature_value("GevGVSPExtendedIDMode") == "On":
                    return 64
            except GLib.Error:
                pass
        return 16

    def _setting(self, what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except GLib.Error as exc:
            raise GenICamError(f"camera {self.device!r} refused {what}: {_gerr(exc)}") from None

    def configure(
        self,
        *,
        width: int | None = None,
        height: int | None = None,
        offset_x: int = 0,
        offset_y: int = 0,
        pixel_format: str | None = None,
        exposure_us: float | None = None,
        gain_db: float | None = None,
        trigger: str = "free",
        trigger_line: str = "Line0",
        trigger_activation: str = "RisingEdge",
        frame_rate_hz: float | None = None,
        chunks: list[str] | None = None,
        settings: list[str] | None = None,
    ) -> None:
        """Set the camera up before acquisition; GenICamError names the setting it refuses."""
        cam, dev = self._cam, self._dev
        for setting in settings or []:
            name, _, value = setting.partition("=")
            self._setting(f"setting {setting!r}", functools.partial(self._write, name.strip(), value.strip()))
        if pixel_format is not None:
            self._setting(f"pixel format {pixel_format}", lambda: cam.set_pixel_format_from_string(pixel_format))
        if width is not None and height is not None:
            self._setting(
                f"region {width}x{height}+{offset_x}+{offset_y}",
                lambda: cam.set_region(offset_x, offset_y, width, height),
            )
            region = cam.get_region()
            got = (region.x, region.y, region.width, region.height)
            if got != (offset_x, offset_y, width, height):
                raise GenICamError(
                    f"camera {self.device!r} refused region {width}x{height}+{offset_x}+{offset_y} (it set "
                    f"{got[2]}x{got[3]}+{got[0]}+{got[1]}): check the sensor size and the width/offset increments"
                )
        if exposure_us is not None:
            self._setting(f"exposure {exposure_us} µs", lambda: cam.set_exposure_time(exposure_us))
        if gain_db is not None:
            self._setting(f"gain {gain_db} dB", lambda: cam.set_gain(gain_db))
        if trigger == "free":
            self._setting("free-running acquisition", cam.clear_triggers)
            if frame_rate_hz is not None:
                self._setting(f"frame rate {frame_rate_hz} Hz", lambda: cam.set_frame_rate(frame_rate_hz))
        elif trigger == "software":
            if not cam.is_software_trigger_supported():
                raise GenICamError(f"camera {self.device!r} has no software trigger")
            self._setting("software trigger", lambda: cam.set_trigger("Software"))
        else:
            sources = cam.dup_available_trigger_sources() or []
            if trigger_line not in sources:
                raise GenICamError(
                    f"camera {self.device!r} has no trigger source {trigger_line!r} (it has {sources}): fix "
                    "trigger_line"
                )
            self._setting(f"FrameStart trigger on {trigger_line}", lambda: cam.set_trigger(trigger_line))
            if dev.is_feature_available("TriggerActivation"):
                self._setting(
                    f"trigger activation {trigger_activation}",
                    lambda: dev.set_string_feature_value("TriggerActivation", trigger_activation),
                )
        self._chunk_names = []
        if chunks:
            if not cam.are_chunks_available():
                raise GenICamError(
                    f"camera {self.device!r} has no chunk data (ChunkModeActive), needed for {chunks}: use "
                    "position `trigger` or a camera with chunk data (docs/cameras.md)"
                )
            self._setting(f"chunks {chunks}", lambda: cam.set_chunks(",".join(chunks)))
            self._parser = cam.create_chunk_parser()
            self._chunk_names = [f"Chunk{c}" for c in chunks]

    def describe(self) -> dict[str, Any]:
        """What the camera is set to (hw.camera_check, `sorter cameras grab`)."""
        cam, dev = self._cam, self._dev
        region = cam.get_region()

        def enum(name: str) -> str | None:
            try:
                return str(dev.get_string_feature_value(name)) if dev.is_feature_available(name) else None
            except GLib.Error:
                return None

        return {
            "pixel_format": cam.get_pixel_format_as_string(),
            "region": [region.x, region.y, region.width, region.height],
            "exposure_us": cam.get_exposure_time() if cam.is_exposure_time_available() else None,
            "gain_db": cam.get_gain() if cam.is_gain_available() else None,
            "trigger_mode": enum("TriggerMode"),
            "trigger_source": enum("TriggerSource"),
            "frame_rate_hz": cam.get_frame_rate() if cam.is_frame_rate_available() else None,
            "chunks_available": bool(cam.are_chunks_available()),
            "frame_id_bits": self.id_bits,
        }

    # --- acquisition ---
    def start(self, buffers: int = 8) -> None:
        cam = self._cam
        try:
            self._stream = cam.create_stream(None, None)
        except GLib.Error as exc:
            raise GenICamError(f"camera {self.device!r}: no stream channel: {_gerr(exc)}") from None
        size = cam.get_payload()
        for _ in range(buffers):
            self._stream.push_buffer(Aravis.Buffer.new_allocate(size))
        self._setting("acquisition start", cam.start_acquisition)
        self.acquiring = True

    def software_trigger(self) -> None:
        self._setting("a software trigger", self._cam.software_trigger)

    def pop(self, timeout_s: float) -> RawFrame | Incomplete | None:
        """The next complete frame; an Incomplete one (its buffer is requeued); None: none within the timeout."""
        buf = self._stream.timeout_pop_buffer(int(timeout_s * 1e6))
        if buf is None:
            return None
        t_rx = time.monotonic()
        try:
            status = buf.get_status()
            frame_id = int(buf.get_frame_id())
            if status != Aravis.BufferStatus.SUCCESS:
                return Incomplete(frame_id, str(status.value_nick))
            if buf.get_payload_type() not in (
                Aravis.BufferPayloadType.IMAGE,
                Aravis.BufferPayloadType.CHUNK_DATA,
                Aravis.BufferPayloadType.EXTENDED_CHUNK_DATA,
            ):
                return Incomplete(frame_id, f"payload {buf.get_payload_type().value_nick}")
            code = buf.get_image_pixel_format()
            fmt = PIXEL_FORMATS.get(code, f"0x{code:08x}")
            width, height = buf.get_image_width(), buf.get_image_height()
            data = buf.get_image_data()
            try:
                image = to_bgr(data, width, height, fmt)
            except ValueError:
                return Incomplete(frame_id, f"unconvertible {fmt} {width}x{height}")
            chunks: dict[str, int] = {}
            if self._chunk_names and self._parser is not None:
                for name in self._chunk_names:
                    try:
                        chunks[name] = int(self._parser.get_integer_value(buf, name))
                    except GLib.Error:
                        return Incomplete(frame_id, f"no {name} in the chunk data")
            return RawFrame(frame_id, buf.get_timestamp(), t_rx, width, height, fmt, image, chunks)
        finally:
            self._stream.push_buffer(buf)

    def stream_stats(self) -> dict[str, int]:
        """The stream's counters (packets missing and resent, frames failed), for the logs and `grab`."""
        out: dict[str, int] = {}
        if self._stream is None:
            return out
        for i in range(self._stream.get_n_infos()):
            name = self._stream.get_info_name(i)
            if name.startswith("n_"):
                out[name[2:]] = int(self._stream.get_info_uint64(i))
        return out

    def stop(self) -> None:
        if self._cam is not None and self.acquiring:
            self.acquiring = False
            with contextlib.suppress(GLib.Error):  # a camera that is gone has stopped too
                self._cam.stop_acquisition()

    def close(self) -> None:
        """Stop acquisition and release the stream and the control channel. Safe to call twice."""
        self.stop()
        self._stream = None
        self._parser = None
        self._dev = None
        self._cam = None  # the last reference: Aravis closes the control channel


class GenICamCamera:
    """FrameSource over a GenICam camera (Aravis)."""

    source_type: ClassVar[str] = "genicam"

    @classmethod
    def from_config(cls, cfg: CameraConfig) -> GenICamCamera:
        src = cfg.source
        assert isinstance(src, GenICamSource)
        return cls(cfg.name, src, width=cfg.width, height=cfg.height, latency_ms=cfg.latency_ms)

    def __init__(
        self,
        name: str,
        src: GenICamSource,
        *,
        width: int,
        height: int,
        latency_ms: float = 0.0,
        handoff: int = 2,
        software_hz: float = _DEFAULT_SOFTWARE_HZ,
    ) -> None:
        self._name = name
        self.src = src
        self.expected = (width, height)
        self.latency_s = latency_ms / 1000.0
        self.software_hz = software_hz
        self._cap = max(1, handoff)
        self._buf: deque[Frame | SourceError] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dropped = 0
        self._torn = 0
        self.ids: FrameIds | None = None
        self.tmap = TimestampMap()
        self._ts0_ns: int | None = None  # device timestamps are taken relative to the first (float precision)
        self.device: GenICamDevice | None = None
        self.delivered = 0  # frames handed over (to the loop's hand-off; some may be dropped there)
        self.incomplete = 0  # frames that arrived torn, in order (in `torn`)
        self.unidentified = 0  # torn buffers without a frame ID (in `torn`)

    @property
    def name(self) -> str:
        return self._name

    @property
    def torn(self) -> int:
        return self._torn

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def lost(self) -> int:
        """Frames the camera's IDs say were sent and never arrived."""
        return 0 if self.ids is None else self.ids.lost

    # --- asyncio side ---
    async def frames(self) -> AsyncIterator[Frame]:
        if self._thread is not None:
            raise RuntimeError(f"camera {self._name}: frames() of a GenICam source can run only once")
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name=f"genicam-{self._name}", daemon=True)
        self._thread.start()
        try:
            while True:
                self._ready.clear()  # before looking: a push after the look sets it again
                with self._lock:
                    item = self._buf.popleft() if self._buf else None
                if item is None:
                    await self._ready.wait()
                    continue
                if isinstance(item, SourceError):
                    raise item
                yield item
        finally:
            await self.close()

    async def close(self) -> None:
        first = not self._stop.is_set()
        self._stop.set()
        t = self._thread
        if first and t is not None and t.is_alive():
            await asyncio.to_thread(t.join, _JOIN_TIMEOUT_S)

    # --- acquisition thread ---
    def _push(self, item: Frame | SourceError) -> None:
        with self._lock:
            if isinstance(item, Frame) and len(self._buf) >= self._cap:
                self._buf.popleft()  # a stale frame is worth less than a fresh one
                self._dropped += 1
            self._buf.append(item)
        assert self._loop is not None and self._ready is not None
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self._stop.set()

    def _error(self, problem: str, check: str) -> SourceError:
        return SourceError(self._name, problem, check)

    def open_device(self) -> GenICamDevice:
        """Open and set the camera up from the config (GenICamError: what it refused)."""
        src = self.src
        dev = GenICamDevice(src.device, camera=self._name)
        try:
            dev.open()
            dev.configure(
                width=self.expected[0],
                height=self.expected[1],
                offset_x=src.offset_x,
                offset_y=src.offset_y,
                pixel_format=src.pixel_format,
                exposure_us=src.exposure_us,
                gain_db=src.gain_db,
                trigger=src.trigger,
                trigger_line=src.trigger_line,
                trigger_activation=src.trigger_activation,
                chunks=[src.chunk] if src.position == "chunk" else None,
                settings=src.settings,
            )
        except BaseException:
            dev.close()
            raise
        return dev

    def _run(self) -> None:
        priority.enter()  # time-critical: keeps pace with the belt (sorter/core/priority.py)
        dev: GenICamDevice | None = None
        try:
            try:
                dev = self.device = self.open_device()
                dev.start(self.src.buffers)
            except GenICamError as exc:
                raise self._error(str(exc), "docs/cameras.md; `sorter cameras discover` lists the cameras") from None
            ids = self.ids = FrameIds(dev.id_bits)
            self.tmap.reset()
            self._ts0_ns = None
            next_trigger = time.monotonic()
            while not self._stop.is_set():
                if dev.control_lost.is_set():
                    raise self._error(
                        "lost the camera's control channel", "check the cable, PoE / power and the network link"
                    )
                if self.src.trigger == "software" and time.monotonic() >= next_trigger:
                    dev.software_trigger()
                    next_trigger = max(next_trigger + 1 / self.software_hz, time.monotonic())
                got = dev.pop(_POP_TIMEOUT_S if self.src.trigger != "software" else min(_POP_TIMEOUT_S, 0.05))
                if got is None:
                    continue
                if isinstance(got, Incomplete):  # never hand a torn frame to the pipeline
                    self._torn += 1
                    # it arrived, torn: not lost. Without an ID it cannot be told which frame it was (its ID
                    # then shows as a gap); a late one was counted in `ids.late`
                    if not got.frame_id:
                        self.unidentified += 1
                    elif ids.add(got.frame_id) is not None:
                        self.incomplete += 1
                    continue
                frame = self._frame(got)
                if frame is not None:
                    self._push(frame)
        except SourceError as exc:
            self._push(exc)
        except GenICamError as exc:
            self._push(self._error(str(exc), "check the camera's settings (docs/cameras.md)"))
        except Exception as exc:  # GLib errors and friends: report through the seam, never die silently
            self._push(self._error(f"acquisition failed: {exc!r}", "see the log"))
        finally:
            if dev is not None:
                dev.close()

    def _frame(self, raw: RawFrame) -> Frame | None:
        """The pipeline's Frame of a complete camera frame, or None (stale ID / no count: counted)."""
        assert self.ids is not None
        seq = self.ids.add(raw.frame_id)
        if seq is None:
            self._torn += 1
            return None
        w, h = raw.image.shape[1], raw.image.shape[0]
        if (w, h) != self.expected:
            raise self._error(
                f"camera delivers {w}x{h} frames but the config says {self.expected[0]}x{self.expected[1]}",
                "fix cameras[].width/height; frames are never resized",
            )
        t_capture = raw.t_received
        if raw.timestamp_ns > 0:
            if self._ts0_ns is None or raw.timestamp_ns < self._ts0_ns:  # (re)started device clock
                self._ts0_ns = raw.timestamp_ns
                self.tmap.reset()
            # ns since the epoch as float seconds would keep only ~0.2 µs: map the time since the first frame
            # the map puts the exposure at or before the arrival; min() keeps rounding from saying otherwise
            mapped = self.tmap.add((raw.timestamp_ns - self._ts0_ns) / 1e9, raw.t_received)
            t_capture = min(mapped, raw.t_received)
        if self.src.position == "arrival" or raw.timestamp_ns <= 0:
            t_capture = raw.t_received
        t_capture -= self.latency_s
        count: int | None = None
        trigger_index: int | None = None
        if self.src.position == "chunk":
            value = raw.chunks.get(f"Chunk{self.src.chunk}")
            if value is None:
                self._torn += 1  # a frame without its count cannot be placed: never guess
                self.incomplete += 1
                return None
            count = wrap32(value)
        elif self.src.position == "trigger":
            trigger_index = seq
        self.delivered += 1
        return Frame(self._name, seq, raw.image, t_capture, count, raw.t_received, trigger_index)


def grab(
    device: str,
    frames: int,
    *,
    trigger: str = "software",
    timeout_s: float = 5.0,
    configure: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Open a camera, grab `frames` complete frames and describe them (`sorter cameras grab`, hw.camera_check).

    Software trigger: one trigger per frame, each awaited, so the frame IDs must rise by exactly one (a gap is
    a frame lost). Free run: the camera's own rate. GenICamError when the camera is absent, busy, refuses a
    setting, or sends nothing for `timeout_s`.
    """
    dev = GenICamDevice(device)
    try:
        info = dev.open()
        dev.configure(trigger=trigger, **(configure or {}))
        settings = dev.describe()
        ids = FrameIds(dev.id_bits)
        dev.start()
        out: list[dict[str, Any]] = []
        incomplete: list[str] = []
        t_start = time.monotonic()
        while len(out) < frames:
            if trigger == "software":
                dev.software_trigger()
            deadline = time.monotonic() + timeout_s
            got: RawFrame | Incomplete | None = None
            while got is None and time.monotonic() < deadline:
                if dev.control_lost.is_set():
                    raise GenICamError(f"lost camera {device!r} while grabbing: check the cable and its power")
                got = dev.pop(min(0.2, timeout_s))
            if got is None:
                hint = "is the trigger wired and firing?" if trigger == "line" else "is the stream reaching this PC?"
                raise GenICamError(
                    f"camera {device!r} sent no frame for {timeout_s:g} s after {len(out)} frames ({hint} a "
                    "firewall dropping its UDP stream, or a packet size above the link's MTU, look the same)"
                )
            if isinstance(got, Incomplete):
                incomplete.append(got.why)
                if got.frame_id:
                    ids.add(got.frame_id)  # it arrived (torn): not a lost frame
                continue
            seq = ids.add(got.frame_id)
            if seq is None:
                incomplete.append("stale frame ID")
                continue
            out.append(
                {
                    "frame_id": seq,
                    "block_id": got.frame_id,
                    "timestamp_ns": got.timestamp_ns,
                    "received_s": round(got.t_received - t_start, 6),
                    "width": got.width,
                    "height": got.height,
                    "pixel_format": got.pixel_format,
                    "mean_level": round(float(got.image.mean()), 2),
                    "chunks": got.chunks,
                }
            )
        return {
            "library": LIBRARY,
            "device": info.__dict__,
            "settings": settings,
            "trigger": trigger,
            "frames": out,
            "incomplete": len(incomplete),
            "incomplete_why": sorted(set(incomplete)),
            "lost": ids.lost,
            "late": ids.late,
            "stream": dev.stream_stats(),
        }
    finally:
        dev.close()


def measure_latency(device: str, triggers: int = 40, *, timeout_s: float = 3.0) -> dict[str, Any]:
    """Trigger → stamp latency of a camera, by software triggers (hw.calibrate_camera writes `latency_ms`).

    Each trigger's PC time is the middle of its write command (the camera executes it within the round trip);
    for each frame, how much later (a) it arrived (`arrival`) and (b) its device timestamp, mapped to PC time by
    the envelope of the arrivals, says it was exposed (`timestamp`). Half the exposure is added to neither: the
    frame's position is that of the trigger, which the encoder fires in production. Returns, per method, the
    median and the spread (p95 − p5, halved: the ± to compare with `timing_jitter_ms`) in ms, and the trigger
    command's own round trip (an upper bound on what (a) and (b) may be off by).
    """
    if triggers < 5:
        raise ValueError("at least 5 triggers are needed for a median and a spread")
    dev = GenICamDevice(device)
    try:
        dev.open()
        dev.configure(trigger="software")
        dev.start()
        tmap = TimestampMap()
        rows: list[tuple[float, float, float]] = []  # (trigger mid, arrival, device s)
        rtts: list[float] = []
        ts0: int | None = None
        while len(rows) < triggers:
            t0 = time.monotonic()
            dev.software_trigger()
            t1 = time.monotonic()
            got = dev.pop(timeout_s)
            if got is None:
                raise GenICamError(f"camera {device!r} sent no frame for a software trigger within {timeout_s:g} s")
            if isinstance(got, Incomplete) or got.timestamp_ns <= 0:
                continue
            ts0 = got.timestamp_ns if ts0 is None else ts0
            device_s = (got.timestamp_ns - ts0) / 1e9
            tmap.add(device_s, got.t_received)
            rows.append(((t0 + t1) / 2, got.t_received, device_s))
            rtts.append(t1 - t0)
            time.sleep(0.02)  # let the camera finish the frame: a trigger during readout may be ignored
    finally:
        dev.close()

    def summary(values: list[float]) -> dict[str, float]:
        a = np.array(values) * 1000.0
        p5, p50, p95 = np.percentile(a, [5, 50, 95])
        return {"median_ms": round(float(p50), 3), "jitter_ms": round(float(p95 - p5) / 2, 3)}

    arrival = [rx - mid for mid, rx, _ in rows]
    # mapped with the final envelope: the offset that the whole run's fastest deliveries pin down
    stamped = [(tmap.to_pc(ds) or rx) - mid for mid, rx, ds in rows]
    return {
        "triggers": len(rows),
        "arrival": summary(arrival),
        "timestamp": summary(stamped),
        "trigger_command_ms": round(float(np.median(rtts)) * 1000.0, 3),
    }
