"""Loading a line config from YAML: errors name the file, the key path and the line.

Unknown keys are errors, because a technician editing YAML at a panel PC needs to find them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import ValidationError

from sorter.config.schema import LineConfig

C = TypeVar("C", bound=LineConfig)

# sections of the same file that other programs read: the service skips them unread
RESERVED_SECTIONS = {"simulator": "the simulated line (sim/config.py)"}


class ConfigError(Exception):
    """An invalid configuration; str() names the file, key path, line and problem."""


def _line_of(node: yaml.Node | None, path: tuple[int | str, ...]) -> int | None:
    for key in path:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        if node is None:
            return None
    return node.start_mark.line + 1 if node is not None else None


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


def load_config(path: str | Path, schema: type[C] = LineConfig) -> C:  # type: ignore[assignment]
    """Load and validate a line config; relative paths are relative to the file.

    `schema` may extend LineConfig with sections of its own (the simulator's `sim/config.py`); a
    reserved section that the schema does not know (`simulator:` for the service) is skipped unread.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
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
            line = _line_of(root, loc)
            at = f" (line {line})" if line else ""
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: {_key_path(loc)}{at}: {msg}")
        raise ConfigError("\n".join(problems)) from exc
    base = path.resolve().parent
    return cfg.model_copy(update=cfg.paths_resolved(base))
