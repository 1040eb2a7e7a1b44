"""How far off along the belt a camera's frames are placed, by position method, and the check against the
eject margins that makes the service refuse a camera too imprecise to eject by (docs/cameras.md).

A frame's belt position comes from one of:

- `latched`: the simulator's camera stream carries the encoder count latched at exposure;
- `chunk`: a GenICam camera's chunk data carries the encoder count it latched at exposure;
- `trigger`: a GenICam camera triggered every N encoder counts; frame k is at anchor + k·N;
- `timestamp`: the camera's timestamp, mapped to PC time, then to counts through the clock model;
- `arrival`: the time the frame reached the PC (OpenCV devices and streams), through the clock model.

The expected error (±, mm) is one encoder count of quantisation plus the belt's travel during the timing
jitter of the method. A constant latency is calibrated out (`cameras[].latency_ms`); its jitter cannot be.
The typical jitters below are what docs/cameras.md derives; a camera measured better (hw.camera_check) sets
its own `timing_jitter_ms`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from sorter.config.schema import CameraConfig, LineConfig

Method = Literal["latched", "chunk", "trigger", "timestamp", "arrival"]

# ±ms of timing jitter, by method (docs/cameras.md, "What each method costs"):
TYPICAL_JITTER_MS: dict[str, float] = {
    # the camera latches the count (or is fired by the count) in hardware: opto-coupled trigger input delay
    # jitter is around a microsecond on industrial cameras; 10 µs leaves room for a slow input filter
    "latched": 0.01,
    "chunk": 0.01,
    "trigger": 0.01,
    # the device timestamp is exact to µs, but its offset to PC time is fitted from arrivals (the envelope of
    # the fastest deliveries: ~0.5 ms of host receive jitter) and the clock model maps PC time to counts from
    # PLC polls (±1-2 ms over Modbus/OPC UA at 20 ms polling)
    "timestamp": 2.0,
    # delivery through a network stack or RTSP decoder: 10-60 ms measured on the simulated cameras (README),
    # worse over RTSP (encoder GOP buffering); ±25 ms is the spread of that range around a calibrated mean
    "arrival": 25.0,
}

DESCRIPTION: dict[str, str] = {
    "latched": "encoder count latched at exposure, sent with the frame",
    "chunk": "encoder count latched by the camera, read from the frame's chunk data",
    "trigger": "frame ID × counts per trigger, from encoder-triggered exposures",
    "timestamp": "device timestamp mapped to PC time, then to counts by the clock model",
    "arrival": "the frame's arrival time at the PC, then to counts by the clock model",
}


def method_of(camera: CameraConfig) -> Method:
    """The position method a camera's config implies."""
    src = camera.source
    if src.type == "sim":
        return "latched"
    if src.type == "genicam":
        return src.position
    return "arrival"  # OpenCV: devices, files and streams carry no count and no device timestamp


def error_mm(method: str, speed_mm_s: float, counts_per_mm: float, jitter_ms: float | None = None) -> float:
    """Expected along-belt error (±mm) of a frame's position: one count plus the travel during the jitter."""
    jitter = TYPICAL_JITTER_MS[method] if jitter_ms is None else jitter_ms
    return 1.0 / counts_per_mm + speed_mm_s * jitter / 1000.0


def position_report(cfg: LineConfig) -> list[dict[str, object]]:
    """Per camera: its position method and expected along-belt error at the belt's speed (logged at start)."""
    margin = min(cfg.ejection.margin_lead_mm, cfg.ejection.margin_trail_mm)
    out: list[dict[str, object]] = []
    for cam in cfg.cameras:
        method = method_of(cam)
        jitter = TYPICAL_JITTER_MS[method] if cam.timing_jitter_ms is None else cam.timing_jitter_ms
        err = error_mm(method, cfg.belt.nominal_speed_mm_s, cfg.belt.counts_per_mm, jitter)
        out.append(
            {"camera": cam.name, "method": method, "error_mm": round(err, 3), "margin_mm": margin, "ok": err <= margin}
        )
    return out


def position_problems(cfg: LineConfig) -> list[tuple[tuple[int | str, ...], str]]:
    """Every camera whose frames would be placed worse than the eject margins allow, as (key path, problem)."""
    margin = min(cfg.ejection.margin_lead_mm, cfg.ejection.margin_trail_mm)
    speed, cpm = cfg.belt.nominal_speed_mm_s, cfg.belt.counts_per_mm
    out: list[tuple[tuple[int | str, ...], str]] = []
    for i, cam in enumerate(cfg.cameras):
        method = method_of(cam)
        jitter = TYPICAL_JITTER_MS[method] if cam.timing_jitter_ms is None else cam.timing_jitter_ms
        err = error_mm(method, speed, cpm, jitter)
        if err > margin:
            out.append(
                (
                    ("cameras", i, "source"),
                    f"camera `{cam.name}`: position method `{method}` ({DESCRIPTION[method]}) is expected to be off "
                    f"by ±{err:.1f} mm along the belt at {speed:g} mm/s (timing jitter ±{jitter:g} ms, 1 count = "
                    f"{1 / cpm:.3g} mm), more than the eject margin of {margin:g} mm (ejection.margin_lead_mm / "
                    "margin_trail_mm): the valves would miss pieces. Use a GenICam camera with `position: chunk` "
                    "or `trigger` (docs/cameras.md)",
                )
            )
        src = cam.source
        if src.type == "genicam" and src.position == "trigger" and src.counts_per_trigger is not None:
            # the first frame is anchored on the trigger grid from its timestamp: that estimate must land
            # within half a step of the right grid point, or every frame is a step off
            anchor_err = error_mm("timestamp", speed, cpm, None)
            step_mm = src.counts_per_trigger / cpm
            if anchor_err >= step_mm / 2:
                out.append(
                    (
                        ("cameras", i, "source", "counts_per_trigger"),
                        f"camera `{cam.name}`: counts_per_trigger {src.counts_per_trigger} ({step_mm:.1f} mm) is "
                        f"too fine to anchor the first frame from its timestamp (±{anchor_err:.1f} mm at "
                        f"{speed:g} mm/s needs a step over {2 * anchor_err:.1f} mm)",
                    )
                )
    return out


def position_errors(cfg: LineConfig) -> str | None:
    """The problems of position_problems as one message (for configs built in code), or None."""
    problems = position_problems(cfg)
    if not problems:
        return None
    return "\n".join(f"{_key_path(loc)}: {msg}" for loc, msg in problems)


def _key_path(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else ("." if i else "") + p for i, p in enumerate(loc))
