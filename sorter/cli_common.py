"""Options and helpers shared by the `sorter` commands (sorter/cli.py) and the ones plugins add (sim/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="line config (YAML)")]
LogOpt = Annotated[str, typer.Option("--log-level", help="debug, info, warning, error")]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` to stderr; raise the returned Exit (status 2: bad input)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def stderr_console() -> Any:
    """A rich console on stderr (progress bars that keep stdout for JSON)."""
    from rich.console import Console

    return Console(stderr=True)


RecordOpt = Annotated[
    Path | None,
    typer.Option(
        "--record",
        help="record the line into this new folder for `sorter replay` (docs/recording.md)",
    ),
]
RecordLevelOpt = Annotated[
    str,
    typer.Option(
        "--record-level",
        help="frames: every camera frame (PNG), encoder polls, Hall bar bytes, PLC status, decisions (for replay); "
        "pieces: each decided piece's crops and decision, small enough to run continuously",
    ),
]
RecordMaxMbOpt = Annotated[
    int,
    typer.Option("--record-max-mb", min=1, help="stop recording (with a warning; the line goes on) at this size"),
]

RecordFramesOpt = Annotated[
    str,
    typer.Option(
        "--record-frames",
        help="how frames are stored, both lossless: npy (raw, ~1 ms a frame: keeps up with 2 cameras at 60 fps) "
        "or png (~45 %% smaller, but 60-160 ms of CPU a frame: clips of slow lines)",
    ),
]

RecordBufferMbOpt = Annotated[
    int,
    typer.Option(
        "--record-buffer-mb",
        min=16,
        help="RAM for frames waiting to be written; when it is full the recording (never the line) loses frames",
    ),
]


def record_options(folder: Path | None, level: str, max_mb: int, frames: str = "npy", buffer_mb: int = 1024) -> Any:
    """The RecordOptions the --record options ask for (None without --record); exit 2 on a bad value."""
    if folder is None:
        return None
    from sorter.line.recording import FRAME_FORMATS, LEVELS, RecordOptions

    if level not in LEVELS:
        raise fail(f"--record-level must be one of {', '.join(LEVELS)}, not {level!r}")
    if frames not in FRAME_FORMATS:
        raise fail(f"--record-frames must be one of {', '.join(FRAME_FORMATS)}, not {frames!r}")
    if (folder / "manifest.json").exists():
        raise fail(f"{folder}: already holds a recording; --record needs a new folder")
    return RecordOptions(folder, level, max_mb * 1024**2, frames, buffer_mb * 1024**2)  # type: ignore[arg-type]


ShadowModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--shadow-model",
        help="run this candidate ONNX model beside the live one, decisions recorded and compared, never acted on "
        "(overrides classifier.shadow_model; docs/shadow.md)",
    ),
]


def with_shadow_model(cfg: Any, path: Path | None) -> Any:
    """The config with classifier.shadow_model set from --shadow-model (as given: relative to the working folder)."""
    if path is None:
        return cfg
    return cfg.model_copy(update={"classifier": cfg.classifier.model_copy(update={"shadow_model": path.resolve()})})
