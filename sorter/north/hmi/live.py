"""What the HMI shows of the running line: the state view and the live camera images.

Two sides, two threads:

* The service loop (sorter/line/service.py) only hands over references: `LiveTap.frame()` keeps the
  latest (frame, count, blobs) of each camera - the frame the vision thread has just segmented,
  no copy - and `LiveTap.decided()` a small record per decided piece (its belt box, class,
  confidence, fraction). `ViewBuilder.build()` turns the line's state into a plain dict of plain
  values at `hmi.push_hz`, on the service loop, where reading the service's state is safe (~0.1 ms).
* The HMI thread does every pixel: `CameraView.sample()` shrinks each camera's latest frame into
  a small preview ring, `render()` draws the piece outlines and encodes the JPEG (cv2 releases the
  GIL for all of it).

Outline colours: a piece is decided only after it has left the cameras' field (plus the settle
distance and the Hall bar), so the newest frame shows pieces not decided yet. The live view
therefore shows the newest preview that is older than the time the line needs to decide a piece
(measured: 90th percentile over the recent decisions of first capture -> decision, at most
MAX_DELAY_S), and finds each blob's piece by belt position: the blob's centre in belt-fixed
coordinates (count at exposure minus its along-belt offset, as tracking does) inside a decided
piece's box. Outline colour = the fraction the piece was sent to (bank colours; the default
fraction grey), thickness 1-3 px by confidence, a label "class 97%"; a piece below its
threshold is drawn thin with "?" - it went to the default fraction. A blob with no decided piece
(not decided yet, or a partial view the tracker dropped) is drawn thin white.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from sorter.config import LineConfig
from sorter.core.geometry import camera_geometries
from sorter.core.linestate import LineStats
from sorter.core.messages import Decision, Frame
from sorter.vision.segment import Blob

PREVIEW_WIDTH = 640  # px of the live images (the panel shows two side by side)
JPEG_QUALITY = 70
MAX_DELAY_S = 1.5  # the live view never lags the belt by more than this
MIN_DELAY_S = 0.15
DECIDED_KEEP = 2048  # decided pieces remembered for colouring (a few seconds of a busy line)
RATE_WINDOW_S = 60.0

# BGR outline colours and the same as CSS hex for the page: banks in order, the default fraction grey
PALETTE = [(70, 190, 60), (230, 140, 40), (40, 150, 240), (200, 80, 200), (200, 200, 40), (60, 60, 230)]
DEFAULT_COLOUR = (150, 150, 150)
UNDECIDED_COLOUR = (255, 255, 255)


def fraction_colours(cfg: LineConfig) -> dict[str, tuple[int, int, int]]:
    banks = list(dict.fromkeys(b.fraction for b in cfg.ejection.banks))
    out = {f: PALETTE[i % len(PALETTE)] for i, f in enumerate(banks)}
    out[cfg.routing.default_fraction] = DEFAULT_COLOUR
    return out


def css(bgr: tuple[int, int, int]) -> str:
    b, g, r = bgr
    return f"#{r:02x}{g:02x}{b:02x}"


@dataclass(frozen=True, slots=True)
class Decided:
    """What the live view needs of one decided piece (no reference to its crops or frames)."""

    u: float
    u_lead: float
    u_trail: float
    x0: float
    x1: float
    cls: str
    confidence: float
    threshold: float
    fraction: str
    lag_s: float  # first capture -> decided


class LiveTap:
    """The service loop's side: references to the latest frame per camera, small records of decisions."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[Frame, int, list[Blob]]] = {}
        self.decided_pieces: deque[Decided] = deque(maxlen=DECIDED_KEEP)
        self.frames_tapped = 0

    def frame(self, camera: str, frame: Frame, count: int, blobs: list[Blob]) -> None:
        self.latest[camera] = (frame, count, blobs)  # one dict store: the previous frame may go
        self.frames_tapped += 1

    def decided(self, decisions: list[Decision]) -> None:
        now = time.monotonic()
        self.decided_pieces.extend(
            Decided(
                d.piece.u,
                d.piece.u_lead,
                d.piece.u_trail,
                d.piece.x0,
                d.piece.x1,
                d.cls,
                d.confidence,
                d.threshold,
                d.fraction,
                now - d.piece.t_first_capture,
            )
            for d in decisions
        )


@dataclass(slots=True)
class _Preview:
    seq: int
    t_capture: float
    image: np.ndarray  # BGR, PREVIEW_WIDTH wide
    scale: float  # preview px per frame px
    blobs: list[tuple[float, float, tuple[int, int, int, int]]]  # belt (u counts, x mm), preview box


class CameraView:
    """The HMI thread's side: preview rings and the rendered JPEGs (see the module docstring)."""

    def __init__(self, cfg: LineConfig, camera_fps: float) -> None:
        self.cameras = [c.name for c in cfg.cameras]
        self.geoms = camera_geometries(cfg)
        self.cpm = cfg.belt.counts_per_mm
        self.threshold = cfg.vision.threshold
        self.colours = fraction_colours(cfg)
        n = math.ceil(MAX_DELAY_S * camera_fps) + 2
        self.rings: dict[str, deque[_Preview]] = {c: deque(maxlen=n) for c in self.cameras}
        self.delay_s = MIN_DELAY_S

    def sample(self, tap: LiveTap) -> None:
        """Shrink each camera's latest frame into its preview ring (once per frame)."""
        for cam in self.cameras:
            entry = tap.latest.get(cam)
            if entry is None:
                continue
            frame, count, blobs = entry
            ring = self.rings[cam]
            if ring and ring[-1].seq == frame.seq:
                continue
            h, w = frame.image.shape[:2]
            scale = min(1.0, PREVIEW_WIDTH / w)
            small = (
                cv2.resize(frame.image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
                if scale < 1.0
                else frame.image.copy()
            )
            geom = self.geoms[cam]
            placed = []
            if blobs:
                xs, ys = geom.px_to_mm(np.array([b.cu for b in blobs]), np.array([b.cv for b in blobs]))
                for b, x, y in zip(blobs, xs, ys, strict=True):
                    box = (
                        max(0, math.floor(b.u0 * scale)),
                        max(0, math.floor(b.v0 * scale)),
                        math.ceil((b.u1 + 1) * scale),
                        math.ceil((b.v1 + 1) * scale),
                    )
                    placed.append((count - float(y) * self.cpm, float(x), box))
            ring.append(_Preview(frame.seq, frame.t_capture, small, scale, placed))

    def update_delay(self, tap: LiveTap) -> float:
        recent = list(tap.decided_pieces)[-200:]
        if not recent:
            self.delay_s = MIN_DELAY_S
        else:
            lag = float(np.percentile([d.lag_s for d in recent], 90))
            self.delay_s = min(MAX_DELAY_S, max(MIN_DELAY_S, lag + 0.05))
        return self.delay_s

    def render(self, camera: str, tap: LiveTap, now: float | None = None) -> tuple[dict[str, Any], bytes] | None:
        """(header, JPEG) of the camera's delayed preview with outlines; None before its first frame."""
        ring = list(self.rings.get(camera, ()))
        if not ring:
            return None
        now = time.monotonic() if now is None else now
        old = [p for p in ring if p.t_capture <= now - self.delay_s]
        p = old[-1] if old else ring[0]
        img = p.image.copy()
        decided = _near(tap, p)
        n_decided = 0
        for u, x, (bx0, by0, bx1, by1) in p.blobs:
            d = _match(decided, u, x, 2.0 * self.cpm)
            colour = UNDECIDED_COLOUR if d is None else self.colours.get(d.fraction, DEFAULT_COLOUR)
            thick = 1 if d is None else 1 + round(2 * max(0.0, min(1.0, d.confidence)))
            roi = img[by0:by1, bx0:bx1]
            if roi.size == 0:
                continue
            mask = (roi.max(axis=2) > self.threshold).astype(np.uint8)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            big = [c for c in contours if cv2.contourArea(c) >= 4] or contours
            if big:
                cv2.drawContours(img, big, -1, colour, thick, lineType=cv2.LINE_AA, offset=(bx0, by0))
            else:
                cv2.rectangle(img, (bx0, by0), (bx1, by1), colour, thick)
            if d is not None:
                n_decided += 1
                sure = d.confidence >= d.threshold
                label = f"{d.cls} {100 * d.confidence:.0f}%" + ("" if sure else " ?")
                ty = by0 - 4 if by0 > 14 else by1 + 12
                cv2.putText(img, label, (bx0, ty), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA)
        ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            return None
        header = {
            "camera": camera,
            "seq": p.seq,
            "age_s": round(now - p.t_capture, 3),
            "pieces": len(p.blobs),
            "decided": n_decided,
        }
        return header, jpg.tobytes()


def _near(tap: LiveTap, p: _Preview) -> list[Decided]:
    if not p.blobs:
        return []
    lo = min(u for u, _, _ in p.blobs)
    hi = max(u for u, _, _ in p.blobs)
    span = hi - lo + 1
    return [d for d in list(tap.decided_pieces) if d.u_trail >= lo - span and d.u_lead <= hi + span]


def _match(decided: list[Decided], u: float, x: float, tol_counts: float) -> Decided | None:
    best, best_du = None, math.inf
    for d in decided:
        if d.u_lead - tol_counts <= u <= d.u_trail + tol_counts and d.x0 - 2.0 <= x <= d.x1 + 2.0:
            du = abs(u - d.u)
            if du < best_du:
                best, best_du = d, du
    return best


def pack_frame(header: dict[str, Any], jpeg: bytes) -> bytes:
    """A camera image as one binary WebSocket message: 2-byte header length, JSON header, JPEG."""
    h = json.dumps(header, separators=(",", ":")).encode()
    return len(h).to_bytes(2, "big") + h + jpeg


class ViewBuilder:
    """The line's state as the page shows it; built on the service loop (see the module docstring)."""

    COMMANDS = ("Start", "Stop", "Hold", "Unhold", "Reset", "Abort", "Clear")

    def __init__(self, line: LineConfig) -> None:
        self.colours = {f: css(c) for f, c in fraction_colours(line).items()}
        self.protocol = line.plc.protocol
        self._history: deque[tuple[float, dict[str, int]]] = deque()

    def _rates(self, counts: dict[str, int], now: float) -> dict[str, float]:
        h = self._history
        h.append((now, dict(counts)))
        while len(h) > 2 and h[1][0] <= now - RATE_WINDOW_S:
            h.popleft()
        t0, c0 = h[0]
        span = max(now - t0, 5.0)
        return {f: max(0, n - c0.get(f, 0)) * 60.0 / span for f, n in counts.items()}

    def build(self, s: LineStats, clients: int = 0) -> dict[str, Any]:
        """The page's view of the line from its latest stats."""
        rates = self._rates(s.fraction_counts, time.monotonic())
        st = s.plc
        bar = s.hallbar
        return {
            "type": "state",
            "t": time.time(),
            "line": s.line,
            "run_id": s.run_id,
            "state": s.state.label,
            "state_code": int(s.state),
            "allowed": [c for c in self.COMMANDS if c in s.allowed],
            "fractions": [
                {
                    "name": f,
                    "count": int(n),
                    "rate_per_min": round(rates.get(f, 0.0), 1),
                    "purity": None if math.isnan(p := s.purity.get(f, math.nan)) else round(p, 4),
                    "colour": self.colours.get(f, css(DEFAULT_COLOUR)),
                    "default": f == s.default_fraction,
                }
                for f, n in s.fraction_counts.items()
            ],
            "pieces": s.counters.pieces,
            "pieces_per_minute": round(s.pieces_per_minute, 1),
            "latency_ms_p99": s.latency_ms_p99,
            "belt_mm_s": round(st.speed_mm_s, 1),
            "plc": {
                "online": st.online,
                "protocol": s.plc_protocol,
                "belt_running": st.belt_running,
                "air_ok": st.air_ok,
                "estop": st.estop,
                "rtt_ms": round(st.rtt_ms, 1),
                "last_error": None if st.online else st.last_error,
                "alarms": list(st.alarms),
            },
            "cameras": [
                {"name": c.name, "online": c.online, "reason": c.reason, "captured": c.captured, "dropped": c.dropped}
                for c in s.cameras
            ],
            "magnetometer": None if bar is None else {"online": bar.online, "reason": bar.reason},
            "model": {"version": s.model_version, "provider": s.model_provider},
            "clip": None
            if s.clip is None
            else {
                "name": Path(s.clip.folder).name,
                "active": s.clip.active,
                "started_by": s.clip.started_by,
                "mb": round(s.clip.bytes / 1024**2, 1),
                "max_mb": round(s.clip.max_bytes / 1024**2),
                "frames": s.clip.frames,
                "stopped_by": s.clip.stopped_by,
                "stopped_early": s.clip.stopped_early,
                "change": s.clip.change,
            },
            "routing": {
                "min_confidence": s.min_confidence,
                "fallback_min_confidence": s.fallback_min_confidence,
            },
            "alarms": [
                {
                    "name": a.name,
                    "cause": a.cause,
                    "action": a.action,
                    "raised_at": a.raised_at,
                    "cleared_at": a.cleared_at,
                    "acked_by": a.acked_by,
                    "active": a.active,
                }
                for a in s.alarms_shown
            ],
            "clients": clients,
        }
