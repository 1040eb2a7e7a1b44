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
