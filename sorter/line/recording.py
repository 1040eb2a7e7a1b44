"""Recording a line: what its sensors delivered and what it decided, for replay (docs/recording.md).

A recording is a folder of plain files: `manifest.json`, the line's `config.yaml`, JSON-lines streams
(`frames.jsonl`, `polls.jsonl`, `plc_status.jsonl`, `hallbar.jsonl`, `decisions.jsonl`) and, at level
`frames`, every camera frame losslessly (numpy .npy or PNG) under `frames/<camera>/`. Level `pieces` keeps no whole
frames: each decided piece's crops and its decision, small enough to run continuously.

The recorder is fed by taps the wiring (sorter/app.py) attaches: a wrapper around each frame source (every
frame as the camera delivered it, before the capture queue could drop it), the PLC link's poll tap (each
encoder poll as the clock model gets it), the Hall bar's chunk tap (the raw bytes with their arrival
time), the service's decision tap; at the end it copies the decisions with their outcomes from the
records. The taps only hand a reference to a bounded queue: encoding and writing happen on the
recorder's own thread, never on the service loop. When the queue is full the *recording* loses the
frame (counted in the manifest), never the line. A size bound (`max_bytes`) and a floor of free disk
space stop the recording with a warning; the line goes on.

In virtual time (the lockstep simulation) the recorder writes in place, at once, so a lockstep recording
is complete and the same every run.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import math
import os
import queue
import shutil
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np
import structlog
import yaml

from sorter.core.linestate import ClipStatus
from sorter.core.messages import Decision, Frame, Outcome
from sorter.drivers.cameras.base import FrameSource
from sorter.drivers.plc.base import PlcStatus, StatusBit

FORMAT = "sorter-recording"
FORMAT_VERSION = 1
Level = Literal["frames", "pieces"]
LEVELS: tuple[str, ...] = ("frames", "pieces")
# How whole frames are stored, both lossless. npy (numpy's documented array file: a small header, then the
# raw BGR bytes) costs ~1 ms per 1280x720 frame; png saves ~45 % of the disk on the simulator's noisy frames
# but costs 60-160 ms of CPU per frame on a 2-core PC (measured), far more than 2 cameras at 60 fps allow:
# png is for clips of slow lines, npy what keeps up with the demo line.
FrameFormat = Literal["npy", "png"]
FRAME_FORMATS: tuple[str, ...] = ("npy", "png")
MIN_FREE_BYTES = 512 * 1024**2  # never leave less than this free on the recording's disk
PARTS = 8  # level pieces: the size bound is kept in this many parts, the oldest deleted first
FREE_CHECK_EVERY = 64  # writes between two looks at the free disk space
PNG_COMPRESSION = 1  # the fastest zlib level: lossless all the same
# frames waiting to be written, by their bytes (references to the line's own arrays, 2.8 MB each at 1280x720),
# by default: a GiB absorbs ~3 s of 2 cameras at 60 fps while the disk or the CPU is busy elsewhere
FRAME_QUEUE_BYTES = 1024**3
SMALL_QUEUE = 200_000  # polls, bar chunks, decisions waiting to be written


def status_word(st: PlcStatus) -> int:
    """The PLC's status register as the link read it (docs/plc-interface.md), from the decoded status."""
    bits = {
        StatusBit.BELT_RUNNING: st.belt_running,
        StatusBit.AIR_OK: st.air_ok,
        StatusBit.ESTOP: st.estop,
        StatusBit.WATCHDOG_TRIPPED: st.watchdog_tripped,
        StatusBit.QUEUE_OVERFLOW: st.queue_overflow,
    }
    return sum(1 << int(b) for b, on in bits.items() if on)


@dataclass(frozen=True)
class RecordOptions:
    """What `--record DIR --record-level L --record-max-mb N` asks for."""

    folder: Path
    level: Level = "frames"
    max_bytes: int = 4 * 1024**3
    frame_format: FrameFormat = "npy"
    buffer_bytes: int | None = None  # frames waiting to be written, at most (None: FRAME_QUEUE_BYTES)


class RecordingError(Exception):
    """A recording folder that cannot be started or read; the message says which and why."""


class Recorder:
    def __init__(
        self,
        opts: RecordOptions,
        *,
        config: dict[str, Any],
        run_id: str,
        model_version: str,
        now: Callable[[], float],
        wall: Callable[[], float],
        in_place: bool = False,
        log: Any = None,
        extra: dict[str, Any] | None = None,
        clip: bool = False,
    ) -> None:
        if opts.level not in LEVELS:
            raise RecordingError(f"recording level must be one of {', '.join(LEVELS)}, not {opts.level!r}")
        if opts.frame_format not in FRAME_FORMATS:
            raise RecordingError(f"frame format must be one of {', '.join(FRAME_FORMATS)}, not {opts.frame_format!r}")
        self.opts = opts
        self.folder = opts.folder
        if (self.folder / "manifest.json").exists():
            raise RecordingError(f"{self.folder}: already holds a recording (manifest.json); choose a new folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RecordingError(f"{self.folder}: cannot create the recording folder: {exc}") from None
        self.log = (log or structlog.get_logger("recording")).bind(recording=str(self.folder))
        self._now, self._wall = now, wall
        self.run_id = run_id
        self.in_place = in_place
        self._lock = threading.Lock()  # counters: taps on the loop and the bar's thread, the writer thread
        self.bytes = 0
        self.full: str | None = None  # why the recording stopped early, if it did
        self.counts: dict[str, int] = {
            "frames": 0,
            "frames_dropped_queue": 0,
            "frames_dropped_full": 0,
            "frames_processed": 0,
            "polls": 0,
            "plc_status_changes": 0,
            "hallbar_chunks": 0,
            "hallbar_bytes": 0,
            "pieces": 0,
            "crops": 0,
            "small_dropped": 0,
            "decisions": 0,
            "parts_rotated_out": 0,
        }
        self.frames_by_camera: dict[str, int] = {}
        # level pieces runs continuously: it writes into parts of max_bytes / PARTS and, at the bound, deletes
        # the oldest part (rotation by size) instead of stopping; level frames is one folder that stops
        self._rotating = opts.level == "pieces"
        self._part = ""  # the folder (under the recording's) that streams and crops go to now
        self._part_limit = max(1, opts.max_bytes // PARTS)
        self._parts: list[dict[str, Any]] = []
        self.rotated_out: list[str] = []
        self._writes = 0
        self._last_status: tuple[Any, ...] | None = None
        self._files: dict[str, Any] = {}
        self._frames_q: queue.Queue[Frame | None] = queue.Queue()  # bounded by bytes: _frames_queued
        self._frames_queued = 0
        self._npy_fds: dict[str, int] = {}
        self._npy_offsets: dict[str, int] = {}
        self._npy_headers: dict[tuple[Any, str], bytes] = {}
        self._small_q: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(SMALL_QUEUE)
        self.manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "level": opts.level,
            "frame_format": opts.frame_format,
            "state": "recording",
            "run_id": run_id,
            "line": config.get("line"),
            "model_version": model_version,
            "model_file": str(config.get("classifier", {}).get("model")),
            "started_wall": wall(),
            "started_monotonic": now(),
            "max_bytes": opts.max_bytes,
            "buffer_bytes": opts.buffer_bytes or FRAME_QUEUE_BYTES,
            **(extra or {}),
        }
        # a clip starts and stops while the line runs: its decisions.jsonl keeps the pieces seen while it recorded
        self.clip = clip
        (self.folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self._write_manifest()
        self._closed = False
        self._threads: list[threading.Thread] = []
        if not in_place:
            self._threads = [
                threading.Thread(target=self._frame_writer, name="record-frames", daemon=True),
                threading.Thread(target=self._small_writer, name="record", daemon=True),
            ]
            for t in self._threads:
                t.start()
        self.log.info("recording", level=opts.level, max_mb=opts.max_bytes // 1024**2)

    # --- taps (the loop, the bar's reader thread): hand over a reference, never wait ---
    def frame(self, frame: Frame) -> None:
        if self.opts.level != "frames":
            return
        if self.full is not None:
            with self._lock:
                self.counts["frames_dropped_full"] += 1
            return
        if self.in_place:
            self._write_frame(frame)
            return
        n = frame.image.nbytes
        with self._lock:
            if self._frames_queued + n > (self.opts.buffer_bytes or FRAME_QUEUE_BYTES):
                # the disk or the CPU is behind: the recording loses this frame, the line does not
                self.counts["frames_dropped_queue"] += 1
                return
            self._frames_queued += n
        self._frames_q.put_nowait(frame)

    def poll(self, t_req: float, t_resp: float, count32: int, st: PlcStatus) -> None:
        word = status_word(st)
        self._small(
            "polls",
            {
                "t_request": t_req,
                "t_response": t_resp,
                "count32": count32,
                "speed_mm_s": st.speed_mm_s,
                "status": word,
                "queue_free": st.queue_free,
                "last_seq": st.last_seq,
            },
        )
        key = (word, st.online)
        if key != self._last_status:
            self._last_status = key
            self._small("plc_status", {"t": t_resp, "status": word, "online": st.online, "alarms": list(st.alarms)})

    def processed(self, camera: str, frame: Frame) -> None:
        """The service's taken tap: the pipeline takes this frame now (it was not dropped by a full capture
        queue); so a replay can give the pipeline the frames the live line took, when it took them
        (docs/recording.md)."""
        if self.opts.level == "frames":
            self._small("processed", {"camera": camera, "seq": frame.seq, "t": self._now()})

    def bar_chunk(self, data: bytes, t: float) -> None:
        # latin-1 maps each byte to one code point: JSON carries any byte, and decoding back is exact
        self._small("hallbar", {"t": t, "data": data.decode("latin-1")})

    def decided(self, decisions: list[Decision]) -> None:
        """Level `pieces`: each decided piece, its crops and field (the service's decision tap)."""
        if self.opts.level != "pieces":
            return
        for d in decisions:
            p = d.piece
            # the crops (or their cutters) go to the writer as they are: cutting and encoding are its work
            crops = [(f"crops/{p.id:08d}-{i}.png", crop) for i, crop in enumerate(p.crops)]  # in the piece's part
            self._small(
                "pieces",
                {
                    "id": p.id,
                    "u": p.u,
                    "u_lead": p.u_lead,
                    "u_trail": p.u_trail,
                    "x_mm": p.x,
                    "x0_mm": p.x0,
                    "x1_mm": p.x1,
                    "area_mm2": p.area_mm2,
                    "t_last_capture": p.t_last_capture,
                    "cls": d.cls,
                    "confidence": d.confidence,
                    "fraction": d.fraction,
                    "field_mT": d.field.field_mT,
                    "field_state": d.field.state.value,
                    "crops": [name for name, _ in crops],
                    "_images": crops,
                },
            )

    def wrap_source(self, source: FrameSource) -> FrameSource:
        return RecordingSource(source, self)

    # --- writing (the writer threads, or in place) ---
    def _small(self, stream: str, row: dict[str, Any]) -> None:
        if self.full is not None:
            return
        if self.in_place:
            self._write_small(stream, row)
            return
        try:
            self._small_q.put_nowait((stream, row))
        except queue.Full:
            with self._lock:
                self.counts["small_dropped"] += 1

    def _frame_writer(self) -> None:
        # whatever is queued is written in one go: on a busy PC every wake-up of this thread waits for the
        # GIL, so the fewer Python steps per frame, the more frames per second it keeps up with
        while True:
            batch = [self._frames_q.get()]
            while not self._frames_q.empty():
                batch.append(self._frames_q.get_nowait())
            frames = [f for f in batch if f is not None]
            try:
                self._write_frames(frames)
            except Exception as exc:  # a failed disk ends the recording, never the line
                self._stop_recording(f"writing frames failed: {exc}")
            finally:
                with self._lock:
                    self._frames_queued -= sum(f.image.nbytes for f in frames)
            if len(frames) < len(batch):
                return

    def _small_writer(self) -> None:
        while (item := self._small_q.get()) is not None:
            try:
                self._write_small(*item)
            except Exception as exc:
                self._stop_recording(f"writing {item[0]} failed: {exc}")

    def _write_frame(self, frame: Frame) -> None:
        self._write_frames([frame])

    def _write_frames(self, frames: list[Frame]) -> None:
        rows: list[dict[str, Any]] = []
        for frame in frames:
            if self.full is not None:
                with self._lock:
                    self.counts["frames_dropped_full"] += len(frames) - len(rows)
                break
            row = self._write_png(frame) if self.opts.frame_format == "png" else self._write_npy(frame)
            if row is None:
                with self._lock:
                    self.counts["frames_dropped_full"] += 1
                continue
            rows.append(row)
        if not rows:
            return
        # the index lines only after their frames are written: every line of frames.jsonl names a frame on disk
        self._append_lines("frames", "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
        with self._lock:
            self.counts["frames"] += len(rows)
            for r in rows:
                self.frames_by_camera[r["camera"]] = self.frames_by_camera.get(r["camera"], 0) + 1

    def _index_row(self, frame: Frame, file: str, offset: int | None) -> dict[str, Any]:
        row = {
            "camera": frame.camera,
            "seq": frame.seq,
            "count32": frame.count,
            "t_capture": frame.t_capture,
            "t_received": frame.t_received,
            "file": file,
        }
        if offset is not None:
            row["offset"] = offset
        return row

    def _write_npy(self, frame: Frame) -> dict[str, Any] | None:
        """Append the frame to its camera's stream of .npy records: one writev, header and pixels."""
        image = frame.image if frame.image.flags.c_contiguous else np.ascontiguousarray(frame.image)
        header = self._npy_headers.get((image.shape, image.dtype.str))
        if header is None:
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                buf, {"descr": image.dtype.str, "fortran_order": False, "shape": image.shape}
            )
            header = self._npy_headers[(image.shape, image.dtype.str)] = buf.getvalue()
        if not self._room(len(header) + image.nbytes):
            return None
        name = f"frames/{frame.camera}.npys"
        fd = self._npy_fds.get(frame.camera)
        if fd is None:
            (self.folder / "frames").mkdir(exist_ok=True)
            fd = self._npy_fds[frame.camera] = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            self._npy_offsets[frame.camera] = os.fstat(fd).st_size
        offset = self._npy_offsets[frame.camera]
        data = image.data.cast("B")  # the pixels as they lie in memory (C order), no copy
        n = os.writev(fd, [header, data])
        while n < len(header) + len(data):  # a short write (signal, full pipe): the rest, then on
            n += os.write(fd, (header + bytes(data))[n:])
        self._npy_offsets[frame.camera] = offset + n
        return self._index_row(frame, name, offset)

    def _write_png(self, frame: Frame) -> dict[str, Any] | None:
        ok, png = cv2.imencode(".png", frame.image, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
        if not ok:
            raise RecordingError(f"camera {frame.camera} frame {frame.seq}: PNG encoding failed")
        if not self._room(len(png)):
            return None
        name = f"frames/{frame.camera}/{frame.seq:08d}.png"
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png.tobytes())
        return self._index_row(frame, name, None)

    def _write_small(self, stream: str, row: dict[str, Any]) -> None:
        images = row.pop("_images", None)
        written = self._append(stream, row) if images is None else self._write_piece(stream, row, images)
        if not written:
            return
        key = {
            "polls": "polls",
            "plc_status": "plc_status_changes",
            "pieces": "pieces",
            "processed": "frames_processed",
        }.get(stream)
        with self._lock:
            if key is not None:
                self.counts[key] += 1
            elif stream == "hallbar":
                self.counts["hallbar_chunks"] += 1
                self.counts["hallbar_bytes"] += len(row["data"])

    def _write_piece(self, stream: str, row: dict[str, Any], images: list[tuple[str, Any]]) -> bool:
        """A piece's crops and its line, all in one part (room is taken for all of them at once)."""
        pngs = []
        for name, crop in images:
            img = crop() if callable(crop) else crop
            ok, png = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
            if ok:
                pngs.append((name, png.tobytes()))
        row["crops"] = [name for name, _ in pngs]
        line = json.dumps(row, separators=(",", ":")) + "\n"
        if not self._room(len(line) + sum(len(b) for _, b in pngs)):
            return False
        part = self.folder / self._part
        if pngs:
            (part / "crops").mkdir(parents=True, exist_ok=True)
        for name, data in pngs:
            (part / name).write_bytes(data)
        self.counts["crops"] += len(pngs)
        self._append_lines(stream, line)
        return True

    def _append(self, stream: str, row: dict[str, Any]) -> bool:
        line = json.dumps(row, separators=(",", ":")) + "\n"
        if not self._room(len(line)):
            return False
        self._append_lines(stream, line)
        return True

    def _append_lines(self, stream: str, line: str) -> None:
        with self._lock:
            f = self._files.get(stream)
            if f is None:
                path = self.folder / self._part / f"{stream}.jsonl"
                f = self._files[stream] = open(path, "a", encoding="utf-8")  # noqa: SIM115
            f.write(line)

    def _new_part(self) -> None:
        """Level pieces: close the part's streams and go on in a new part folder (the lock is held)."""
        for f in self._files.values():
            f.close()
        self._files.clear()
        n = int(self._parts[-1]["name"].split("-")[1]) + 1 if self._parts else 1
        self._part = f"part-{n:05d}"
        (self.folder / self._part).mkdir(parents=True, exist_ok=True)
        self._parts.append({"name": self._part, "bytes": 0})

    def _rotate(self, n: int) -> None:
        """Level pieces: a new part when this one is full; the oldest parts deleted while the bound needs it."""
        if not self._parts or (self._parts[-1]["bytes"] > 0 and self._parts[-1]["bytes"] + n > self._part_limit):
            self._new_part()
        while self.bytes + n > self.opts.max_bytes and len(self._parts) > 1:
            old = self._parts.pop(0)
            shutil.rmtree(self.folder / old["name"], ignore_errors=True)
            self.bytes -= old["bytes"]
            self.rotated_out.append(old["name"])
            self.counts["parts_rotated_out"] += 1

    def _room(self, n: int) -> bool:
        """Count n more bytes, or stop the recording if they would pass the size bound or fill the disk
        (level pieces: rotate first, so that only a single item larger than a part stops it)."""
        with self._lock:
            if self.full is not None:
                return False
            if self._rotating:
                self._rotate(n)
            if self.bytes + n > self.opts.max_bytes:
                reason = f"size bound reached ({self.opts.max_bytes // 1024**2} MB)"
            else:
                self._writes += 1
                free = None
                if self._writes % FREE_CHECK_EVERY == 1:
                    free = shutil.disk_usage(self.folder).free
                if free is not None and free - n < MIN_FREE_BYTES:
                    reason = f"disk nearly full ({free // 1024**2} MB free)"
                else:
                    self.bytes += n
                    if self._rotating:
                        self._parts[-1]["bytes"] += n
                    return True
        self._stop_recording(reason)
        return False

    def _stop_recording(self, reason: str) -> None:
        with self._lock:
            if self.full is not None:
                return
            self.full = reason
        self.log.warning("recording stopped, the line goes on", reason=reason, bytes=self.bytes)

    # --- the end ---
    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"bytes": self.bytes, "stopped": self.full, **self.counts}

    def close(self, records: Path | None = None) -> None:
        """Drain the queues, add the decisions with their outcomes from the records, write the manifest.
        Blocks (writes the rest): call it off the loop (the service's closers are)."""
        if self._closed:
            return
        self._closed = True
        if not self.in_place:
            self._frames_q.put(None)
            self._small_q.put(None)
            for t in self._threads:
                t.join()
        if records is not None and not self._rotating:  # level pieces: pieces.jsonl holds the decisions
            self._copy_decisions(records, self.manifest["started_monotonic"] if self.clip else None)
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
            for fd in self._npy_fds.values():
                os.close(fd)
            self._npy_fds.clear()
        self.manifest |= {
            "state": "closed",
            "stopped_wall": self._wall(),
            "stopped_monotonic": self._now(),
            "stopped_early": self.full,
            "bytes": self.bytes,
            "counts": dict(self.counts),
            "frames_by_camera": dict(self.frames_by_camera),
        }
        if self._rotating:
            self.manifest |= {"parts": [p["name"] for p in self._parts], "parts_rotated_out": self.rotated_out}
        self._write_manifest()
        self.log.info("recording closed", **self.stats())

    def _copy_decisions(self, records: Path, since: float | None = None) -> None:
        """decisions.jsonl: every piece the live line decided in this run (a clip: those last seen since it
        started), with what became of it. A piece still undecided when the recording closed (its first-seen
        row: a clip stopped while the line runs) has no decision to compare a replay against: left out."""
        if not records.exists():
            return
        db = sqlite3.connect(f"file:{records}?mode=ro", uri=True)
        try:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT id, t_capture, count, count32, x_mm, x0_mm, x1_mm, area_mm2, cls, confidence, fraction,"
                " probs, field_mT, field_state, model, outcome, bank, seq, open_at FROM pieces WHERE run_id = ?"
                " AND t_capture >= ? AND outcome != ? ORDER BY id",
                (self.run_id, -math.inf if since is None else since, Outcome.SEEN.value),
            ).fetchall()
        finally:
            db.close()
        full, self.full = self.full, None  # the decisions are small and what a replay is compared against
        for r in rows:
            row = dict(r)
            row["probs"] = json.loads(row["probs"]) if row["probs"] else None
            self._append_unbounded("decisions", row)
        self.full = full
        self.counts["decisions"] = len(rows)

    def _append_unbounded(self, stream: str, row: dict[str, Any]) -> None:
        line = json.dumps(row, separators=(",", ":")) + "\n"
        with self._lock:
            f = self._files.get(stream)
            if f is None:
                f = self._files[stream] = open(self.folder / f"{stream}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            f.write(line)
            self.bytes += len(line)

    def _write_manifest(self) -> None:
        tmp = self.folder / "manifest.json.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=2) + "\n")
        tmp.replace(self.folder / "manifest.json")  # never a half-written manifest


class FrameSink(Protocol):
    def frame(self, frame: Frame) -> None: ...


class RecordingHub:
    """The taps the wiring attaches once, for the whole run: each hands what it gets to the recorders running now
    (none; the continuous one of `--record`; a clip a technician started). Without a recorder a tap costs a loop
    over an empty tuple. The tuple is replaced whole, never changed, so the bar's thread never sees half of it."""

    def __init__(self) -> None:
        self.recorders: tuple[Recorder, ...] = ()

    def add(self, rec: Recorder) -> None:
        self.recorders = (*self.recorders, rec)

    def remove(self, rec: Recorder) -> None:
        self.recorders = tuple(r for r in self.recorders if r is not rec)

    def frame(self, frame: Frame) -> None:
        for r in self.recorders:
            r.frame(frame)

    def poll(self, t_req: float, t_resp: float, count32: int, st: PlcStatus) -> None:
        for r in self.recorders:
            r.poll(t_req, t_resp, count32, st)

    def processed(self, camera: str, frame: Frame) -> None:
        for r in self.recorders:
            r.processed(camera, frame)

    def bar_chunk(self, data: bytes, t: float) -> None:
        for r in self.recorders:
            r.bar_chunk(data, t)

    def decided(self, decisions: list[Decision]) -> None:
        for r in self.recorders:
            r.decided(decisions)

    def wrap_source(self, source: FrameSource) -> FrameSource:
        return RecordingSource(source, self)


class ClipError(Exception):
    """A clip that cannot start (one runs already, a bad bound, an unwritable folder) or stop (none runs)."""


class Clips:
    """Clips on the running line (docs/recording.md): a technician starts a recording of level frames into a new
    folder under records.recordings_dir and stops it; a clip stops itself at its size bound. One at a time.

    start() and detach() run on the service loop (quick: a folder, the manifest, two writer threads started);
    the recorder's close (draining its queues, the decisions) is the caller's, off the loop."""

    def __init__(
        self,
        hub: RecordingHub,
        folder: Path,
        *,
        default_max_mb: float,
        run_id: str,
        now: Callable[[], float],
        wall: Callable[[], float],
        in_place: bool = False,
        log: Any = None,
    ) -> None:
        self.hub = hub
        self.folder = folder
        self.default_max_mb = default_max_mb
        self.run_id = run_id
        self._now, self._wall = now, wall
        self.in_place = in_place
        self.log = log or structlog.get_logger("recording")
        self.current: Recorder | None = None
        self.last: ClipStatus | None = None
        self._started_by = ""
        self.changes = 0  # starts and stops so far (ClipStatus.change)

    def start(self, user: str, max_mb: float | None, *, config: dict[str, Any], model_version: str) -> ClipStatus:
        if self.current is not None:
            raise ClipError(f"a clip is recording already ({self.current.folder.name}): stop it first")
        mb = self.default_max_mb if max_mb is None else max_mb
        if not (isinstance(mb, int | float) and math.isfinite(mb) and 1 <= mb <= 1024**2):
            raise ClipError(f"a clip's size bound must be 1 to {1024**2} MB, not {mb!r}")
        # named by the line's own wall clock (the Timebase's: a virtual one in lockstep)
        stamp = datetime.datetime.fromtimestamp(self._wall()).strftime("clip-%Y%m%d-%H%M%S")
        folder, n = self.folder / stamp, 1
        while folder.exists():
            n += 1
            folder = self.folder / f"{stamp}-{n}"
        try:
            rec = Recorder(
                RecordOptions(folder, "frames", int(mb * 1024**2)),
                config=config,
                run_id=self.run_id,
                model_version=model_version,
                now=self._now,
                wall=self._wall,
                in_place=self.in_place,
                log=self.log,
                extra={"clip": {"started_by": user}},
                clip=True,
            )
        except (RecordingError, OSError) as exc:
            raise ClipError(str(exc)) from None
        self.current, self._started_by = rec, user
        self.changes += 1
        self.hub.add(rec)
        status = self.status()
        assert status is not None
        return status

    def stopped_itself(self) -> str | None:
        """Why the running clip stopped writing (its size bound, a full disk, a failed write), or None."""
        return None if self.current is None else self.current.full

    def detach(self) -> Recorder:
        """The running clip's recorder, taken off the taps (nothing more reaches it): close it off the loop."""
        rec = self.current
        if rec is None:
            raise ClipError("no clip is recording")
        self.hub.remove(rec)
        self.current = None
        self.changes += 1
        return rec

    def closed(self, rec: Recorder, stopped_by: str) -> ClipStatus:
        """The status of a clip whose recorder is closed (the last clip, until the next starts)."""
        self.last = self._status_of(rec, active=False, stopped_by=stopped_by)
        return self.last

    def status(self) -> ClipStatus | None:
        """The running clip, else the last one (None: none since the service started)."""
        if self.current is not None:
            return self._status_of(self.current, active=True, stopped_by=None)
        return self.last

    def _status_of(self, rec: Recorder, *, active: bool, stopped_by: str | None) -> ClipStatus:
        st = rec.stats()
        return ClipStatus(
            folder=str(rec.folder),
            active=active,
            started_by=str(rec.manifest.get("clip", {}).get("started_by", self._started_by)),
            started_wall=float(rec.manifest["started_wall"]),
            bytes=int(st["bytes"]),
            max_bytes=rec.opts.max_bytes,
            frames=int(st["frames"]),
            stopped_by=stopped_by,
            stopped_early=st["stopped"],
            change=self.changes,
        )

    def close_all(self, records: Path | None) -> None:
        """At the service's end (a closer, off the loop): a clip still recording is completed."""
        if self.current is not None:
            rec = self.detach()
            rec.close(records)
            self.closed(rec, "shutdown")


class RecordingSource:
    """A frame source that hands each frame it yields to the recorder too (sorter's FrameSource)."""

    def __init__(self, inner: FrameSource, recorder: FrameSink) -> None:
        self.inner = inner
        self._rec = recorder

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def torn(self) -> int:
        return self.inner.torn

    @property
    def dropped(self) -> int:
        return self.inner.dropped

    async def frames(self) -> AsyncIterator[Frame]:
        it = self.inner.frames()
        try:
            async for frame in it:
                self._rec.frame(frame)
                yield frame
        finally:
            close = getattr(it, "aclose", None)
            if close is not None:
                await close()

    async def close(self) -> None:
        await self.inner.close()


# --- reading a recording (sorter replay; anyone else may read the plain files directly) ---
def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of one stream; a last line cut short by a crash is left out (it was never complete)."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RecordingError(f"{path}:{n}: not a JSON line ({exc})") from None
    return rows


class Recording:
    """A recording folder, checked: its manifest, config and streams (docs/recording.md)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        mpath = folder / "manifest.json"
        if not mpath.exists():
            raise RecordingError(f"{folder}: not a recording (no manifest.json)")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise RecordingError(f"{mpath}: not valid JSON ({exc})") from None
        if self.manifest.get("format") != FORMAT:
            raise RecordingError(f"{mpath}: format {self.manifest.get('format')!r}, not {FORMAT!r}")
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise RecordingError(f"{mpath}: format version {version}; this sorter reads version {FORMAT_VERSION}")
        self.level: str = self.manifest["level"]
        self.config_path = folder / "config.yaml"
        self.truth_path: Path | None = folder / "truth.sqlite" if (folder / "truth.sqlite").exists() else None

    @property
    def closed(self) -> bool:
        """False for a recording whose line did not stop cleanly (its streams end where the writing stopped)."""
        return bool(self.manifest.get("state") == "closed")

    def frames(self) -> list[dict[str, Any]]:
        return _jsonl(self.folder / "frames.jsonl")

    def polls(self) -> list[dict[str, Any]]:
        return _jsonl(self.folder / "polls.jsonl")

    def plc_status(self) -> list[dict[str, Any]]:
        return _jsonl(self.folder / "plc_status.jsonl")

    def hallbar(self) -> list[tuple[float, bytes]]:
        return [(r["t"], r["data"].encode("latin-1")) for r in _jsonl(self.folder / "hallbar.jsonl")]

    def processed(self) -> dict[tuple[str, int], float] | None:
        """(camera, seq) -> when the live pipeline took the frame off its capture queue, for each frame it
        took; None where the recording does not say."""
        path = self.folder / "processed.jsonl"
        if not path.exists():
            return None
        return {(r["camera"], r["seq"]): r["t"] for r in _jsonl(path)}

    def decisions(self) -> list[dict[str, Any]]:
        return _jsonl(self.folder / "decisions.jsonl")

    def load_image(self, row: dict[str, Any]) -> np.ndarray:
        path = self.folder / row["file"]
        image: np.ndarray | None
        if path.suffix == ".npys":  # a stream of .npy records: the frame's starts at its offset
            with open(path, "rb") as f:
                f.seek(row["offset"])
                image = np.load(f, allow_pickle=False)
        else:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None or image.ndim != 3:
            raise RecordingError(f"{path}: missing or not an image")
        return np.ascontiguousarray(image)


class ReplaySource:
    """A frame source that delivers one camera's recorded frames at their recorded times (`at`: the frame's
    delivery time, its t_received where the row has no `t_deliver`), on the replay's virtual clock, then
    ends, as a video file does (sorter's FrameSource)."""

    def __init__(self, recording: Recording, camera: str, rows: list[dict[str, Any]], now: Callable[[], float]):
        self.recording = recording
        self._name = camera
        self.rows = sorted(rows, key=lambda r: r.get("t_deliver", r["t_received"]))
        self._now = now
        self.delivered = 0
        self.done = not self.rows

    @property
    def name(self) -> str:
        return self._name

    @property
    def torn(self) -> int:
        return 0

    @property
    def dropped(self) -> int:
        return 0

    async def frames(self) -> AsyncIterator[Frame]:
        try:
            for row in self.rows[self.delivered :]:
                wait = row.get("t_deliver", row["t_received"]) - self._now()
                if wait > 0:
                    await asyncio.sleep(wait)
                image = self.recording.load_image(row)
                self.delivered += 1
                yield Frame(self._name, row["seq"], image, row["t_capture"], row["count32"], row["t_received"])
        finally:
            if self.delivered >= len(self.rows):
                self.done = True

    async def close(self) -> None:
        return None
