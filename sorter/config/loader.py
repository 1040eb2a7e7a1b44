"""Loading a line config from YAML: errors name the file, the key path and the line.

Unknown keys are errors, because a technician editing YAML at a panel PC needs to find them. So are numbers
that are not finite (`.nan`, `.inf`, or the strings "nan", "inf"): pydantic takes them for any float, and no
length, time or speed of a line is infinite.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from sorter.config.precision import position_problems
from sorter.config.schema import LineConfig

C = TypeVar("C", bound=LineConfig)

# sections of the same file that other programs read: the service skips them unread
RESERVED_SECTIONS = {"simulator": "the simulated line (sim/config.py)"}


class ConfigError(Exception):
    """An invalid configuration; str() names the file, key path, line and problem."""


def _line(text: str, mark: yaml.Mark) -> int:
    """The 1-based line of a YAML mark as an editor counts lines (LF only). PyYAML's own `mark.line` also
    counts CR, NEL and U+2028/U+2029 inside strings as line breaks, and then points past the real line."""
    return text.count("\n", 0, mark.index) + 1


def _line_of(node: yaml.Node | None, path: tuple[int | str, ...], text: str) -> int | None:
    # pydantic puts the camera source's `type` tag after `source` in its paths: not a key of the YAML
    path = tuple(k for i, k in enumerate(path) if not (i > 0 and path[i - 1] == "source"))
    for key in path:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        if node is None:
            return None
    return _line(text, node.start_mark) if node is not None else None


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and loc[i - 1] == "source":  # pydantic names the camera source's `type` tag here: not a key
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _non_finite(value: Any, loc: tuple[int | str, ...] = ()) -> Iterator[tuple[tuple[int | str, ...], float]]:
    """Where a validated config holds NaN or an infinity (key path, value)."""
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _non_finite(getattr(value, name), (*loc, name))
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _non_finite(v, (*loc, k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _non_finite(v, (*loc, i))
    elif isinstance(value, float) and not math.isfinite(value):
        yield loc, value


def load_config(path: str | Path, schema: type[C] = LineConfig) -> C:  # type: ignore[assignment]
    """Load and validate a line config; relative paths are relative to the file.

    `schema` may extend LineConfig with sections of its own (the simulator's `sim/config.py`); a
    reserved section that the schema does not know (`simulator:` for the service) is skipped unread.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")  # what YAML files are; not the locale's encoding
    except UnicodeDecodeError as exc:
        at_line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path} (line {at_line}): not UTF-8 text (byte {raw[exc.start]:#04x}): save the file as UTF-8"
        ) from exc
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {_line(text, mark)})" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    except RecursionError as exc:  # the YAML parser recurses once per level of nesting
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, got {type(data).__name__}")
    for key in RESERVED_SECTIONS.keys() - schema.model_fields.keys():
        data.pop(key, None)
    try:
        cfg = schema.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = _line_of(root, loc, text)
            at = f" (line {line})" if line else ""
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: {_key_path(loc)}{at}: {msg}")
        raise ConfigError("\n".join(problems)) from exc
    if bad := list(_non_finite(cfg)):
        problems = []
        for loc, value in bad:
            line = _line_of(root, loc, text)
            at = f" (line {line})" if line else ""
            problems.append(f"{path}: {_key_path(loc)}{at}: must be a finite number, not {value}")
        raise ConfigError("\n".join(problems))
    if isinstance(cfg, LineConfig) and (imprecise := position_problems(cfg)):
        # a camera whose frames land further off than the eject margins: the valves would miss (docs/cameras.md)
        problems = []
        for loc, msg in imprecise:
            line = _line_of(root, loc, text)
            at = f" (line {line})" if line else ""
            problems.append(f"{path}: {_key_path(loc)}{at}: {msg}")
        raise ConfigError("\n".join(problems))
    base = path.resolve().parent
    return cfg.model_copy(update=cfg.paths_resolved(base))
