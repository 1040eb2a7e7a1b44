"""What every commissioning script shares: clear errors, prompts, and writing results into the config.

A script measures, prints what it found with its uncertainty, then `write_changes()`
shows the config change as a diff and writes it only on confirmation (`--yes` for
unattended runs). The config is edited round-trip (comments, order and layout kept),
the result is validated by the line's own config loader before it replaces the file,
the old file is kept as a timestamped backup, and a line goes into the calibration
history (JSON lines beside the config: when, what, old -> new, residuals).
Nothing is written before the confirmation, so an interrupted script leaves the
config untouched.
"""

from __future__ import annotations

import difflib
import inspect
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from sorter.config import ConfigError, LineConfig, load_config

console = Console(stderr=True, highlight=False)


class HwError(Exception):
    """A device or input problem a technician can fix: says what failed and what to check."""

    def __init__(self, what: str, check: str = "") -> None:
        super().__init__(f"{what}" + (f"\n  check: {check}" if check else ""))


def fail(exc: BaseException, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code)


@contextmanager
def script_errors() -> Iterator[None]:
    """Wrap a script's body: HwError/ConfigError become a message and exit 2, Ctrl-C exit 130; no tracebacks."""
    try:
        yield
    except (HwError, ConfigError) as exc:
        fail(exc)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: the config is untouched[/]")
        raise typer.Exit(130) from None


def load(path: Path) -> LineConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise HwError(str(exc), "fix the config first: `sorter check-config FILE`") from None


def prompt(text: str, yes: bool) -> None:
    """An instruction the technician confirms with Enter (skipped, but still shown, with --yes)."""
    console.print(f"[bold cyan]>[/] {text}")
    if not yes:
        typer.prompt("press Enter when done", default="", show_default=False)


def show_measurement(name: str, value: float, uncertainty: float | None, unit: str, digits: int = 4) -> None:
    pm = f" ± {uncertainty:.{digits}g}" if uncertainty is not None else ""
    console.print(f"  {name}: [bold]{value:.{digits}g}[/]{pm} {unit}")


# --- config changes ---
@dataclass(frozen=True)
class Change:
    key: str  # dotted path with list indices: "cameras[0].mapping.mm_per_px"
    new: Any
    old: Any = None  # filled in by write_changes


_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parts(key: str) -> list[str | int]:
    parts: list[str | int] = []
    for name, index in _PART.findall(key):
        parts.append(int(index) if index else name)
    if not parts:
        raise ValueError(f"empty config key {key!r}")
    return parts


def _plain(v: Any) -> Any:
    if isinstance(v, CommentedMap | dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, CommentedSeq | list | tuple):
        return [_plain(x) for x in v]
    return v


def _set(doc: Any, key: str, value: Any) -> Any:
    """Set doc[key path] = value, creating missing mappings; returns the old value (None if absent)."""
    node = doc
    parts = _parts(key)
    for part in parts[:-1]:
        if isinstance(part, int):
            node = node[part]
        else:
            if node.get(part) is None:
                node[part] = CommentedMap()
            node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        old = node[last]
        node[last] = value
        return _plain(old)
    old = node.get(last)
    if isinstance(value, list | tuple):
        seq = CommentedSeq(value)
        seq.fa.set_flow_style()  # one line, like the rest of a hand-written config
        value = seq
    node[last] = value
    return _plain(old)


def _yaml() -> YAML:
    y = YAML()  # round-trip: comments, key order and flow style survive
    y.preserve_quotes = True
    y.width = 120
    # ruamel writes None as an empty value; keep the explicit `null` a config may already have
    y.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def history_path(config: Path) -> Path:
    return config.with_name(f"{config.stem}.calibration-history.jsonl")


def write_changes(
    config: Path,
    changes: list[Change],
    *,
    script: str,
    yes: bool,
    residuals: dict[str, Any] | None = None,
    measured: dict[str, Any] | None = None,
) -> bool:
    """Show the changes as a diff; on confirmation back up, write (validated, atomically) and log them.

    Returns True if the config was written.
    """
    y = _yaml()
    text = config.read_text()
    doc = y.load(text)
    done = [Change(c.key, c.new, _set(doc, c.key, c.new)) for c in changes]
    buf = io.StringIO()
    y.dump(doc, buf)
    new_text = buf.getvalue()
    if new_text == text:
        console.print("the config already holds these values: nothing to write")
        return False
    diff = difflib.unified_diff(
        text.splitlines(keepends=True), new_text.splitlines(keepends=True), str(config), f"{config} (new)"
    )
    console.print("".join(diff), markup=False, highlight=False)
    # never write a config the service would refuse: validate the new text where the file lives
    fd, tmp_name = tempfile.mkstemp(prefix=f".{config.name}.", suffix=".new", dir=config.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new_text)
        try:
            load_config(tmp)
        except ConfigError as exc:
            raise HwError(f"the new values would make the config invalid:\n{exc}", "report this as a bug") from None
        if not yes and not typer.confirm(f"write these changes to {config}?", default=False):
            console.print("[yellow]not written: the config is untouched[/]")
            return False
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = config.with_name(f"{config.name}.{stamp}.bak")
        shutil.copy2(config, backup)
        os.replace(tmp, config)
    finally:
        tmp.unlink(missing_ok=True)
    entry = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "script": script,
        "config": str(config),
        "backup": str(backup),
        "changes": [{"key": c.key, "old": c.old, "new": _plain(c.new)} for c in done],
        "residuals": residuals or {},
        "measured": measured or {},
    }
    with history_path(config).open("a") as f:
        f.write(json.dumps(entry) + "\n")
    console.print(f"[green]written[/] {config} (backup {backup.name}; history {history_path(config).name})")
    return True


def config_option(help_text: str = "the line config to calibrate") -> Any:
    return typer.Option(..., "--config", exists=True, dir_okay=False, help=help_text)


def yes_option() -> Any:
    return typer.Option(False, "--yes", help="unattended: skip the prompts and write the result without asking")


def help_paragraphs(doc: str | None) -> str:
    """A docstring as --help text: typer's rich help keeps single line breaks, so each paragraph becomes one
    line (blank lines separate paragraphs; put list items in paragraphs of their own)."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc or "").split("\n\n"))


def run_app(fn: Callable[..., Any]) -> None:
    """`python -m hw.<script>` entry point: one typer command, no tracebacks for device trouble."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(fn)
    app(prog_name=f"python -m {fn.__module__}" if fn.__module__ != "__main__" else Path(sys.argv[0]).stem)
