"""The line configuration's reference (docs/config.md), generated from the schema.

    .venv/bin/python -m sorter.config.reference            # print it
    .venv/bin/python -m sorter.config.reference --write    # rewrite docs/config.md (from the repository root)

One heading per section (nested sections, list items, map values and each variant of a union chosen by
its `type` get their own), each with a table `key | type | default | description` taken from the pydantic
models: what a field says in `description=` is what the technician reads, so it is edited there, never
in the generated file (tests/test_config_reference.py checks that the file is up to date).
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from sorter.config.schema import LineConfig

COMMAND = ".venv/bin/python -m sorter.config.reference --write"
DOC_PATH = Path("docs/config.md")

HEADER = f"""# Line configuration reference

_Generated from `sorter/config/schema.py` by `{COMMAND}`: change the schema's descriptions, not this file._

The line service (`sorter run --config FILE`) reads one YAML file with the sections below. Unknown keys
are errors (each error names the file, the key path and the line); relative paths are relative to the
file. The `simulator:` section of the same file is read by the simulator only and is documented in
[docs/simulator.md](simulator.md); the service skips it.
"""


@dataclass
class _Section:
    heading: str  # the key path as a technician writes it (`plc.opcua.security`), and which variant
    model: type[BaseModel]
    parent: str  # the heading of the section holding the key ("" for the top level)
    name: str  # the key in the parent section
    intro: list[str] = field(default_factory=list)

    @property
    def top(self) -> bool:
        return not self.parent


# --- types ----------------------------------------------------------------------------------------------


def _strip(tp: Any) -> Any:
    """The type without Annotated metadata."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _without_none(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None was allowed)."""
    tp = _strip(tp)
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True  # noqa: UP007
    return tp, False


def _models_of(tp: Any) -> list[type[BaseModel]]:
    tp = _strip(tp)
    if _is_model(tp):
        return [tp]
    if _is_union(tp):
        return [m for a in get_args(tp) for m in _models_of(a)]
    return []


def _type_name(tp: Any) -> str:
    """A type as a technician reads it: float, path, one of `a`, `b`, list of float, map of str to str."""
    tp, nullable = _without_none(tp)
    name = _plain_type_name(tp)
    return f"{name} or null" if nullable else name


def _plain_type_name(tp: Any) -> str:
    tp = _strip(tp)
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return "any"
    if origin is Literal:
        return "one of " + ", ".join(f"`{_inline(a)}`" for a in args)
    if _is_model(tp):
        return "section"
    if _is_union(tp):
        if all(_is_model(_strip(a)) for a in args):
            return "section, by `type`"
        return " or ".join(_plain_type_name(a) for a in args)
    if origin in (list, set, frozenset):
        return f"list of {_plural(args[0])}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_plural(args[0])}"
        return "[" + ", ".join(_plain_type_name(a) for a in args) + "]"
    if origin is dict:
        return f"map of {_plain_type_name(args[0])} to {_plural(args[1])}"
    if isinstance(tp, type) and issubclass(tp, Path):
        return "path"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(f"`{m.value}`" for m in tp)
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    return "sections" if _models_of(tp) else _plain_type_name(tp)


_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "≤"),
)


def _bounds(info: FieldInfo, text: bool) -> list[str]:
    """A field's validation bounds: "> 0", "≤ 1", "at least 1 item"."""
    out = []
    for meta in info.metadata:
        for kind, attr, sign in _BOUNDS:
            if isinstance(meta, kind):
                out.append(f"{sign} {_inline(getattr(meta, attr))}")
        unit = "character" if text else "item"
        if isinstance(meta, annotated_types.MinLen) and meta.min_length:
            out.append(f"at least {meta.min_length} {unit}{'s' if meta.min_length > 1 else ''}")
        if isinstance(meta, annotated_types.MaxLen):
            out.append(f"at most {meta.max_length} {unit}s")
    return out


# --- values ---------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A default as YAML would hold it."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _inline(value: Any) -> str:
    """A value in YAML flow style, on one line."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, allow_unicode=True, width=1 << 30, sort_keys=False)
    return text.strip().removesuffix("...").strip()


def _block(value: Any) -> str:
    return yaml.safe_dump(_plain(value), default_flow_style=False, allow_unicode=True, sort_keys=False).rstrip()


def _default(info: FieldInfo) -> tuple[bool, Any]:
    """(whether the field has a default, the default)."""
    if info.default_factory is not None:
        return True, info.default_factory()  # type: ignore[call-arg]
    if info.default is PydanticUndefined:
        return False, None
    return True, info.default


# --- sections -------------------------------------------------------------------------------------------


def _doc(model: type[BaseModel]) -> str:
    """A model's own docstring, its paragraphs unwrapped."""
    doc = model.__dict__.get("__doc__")
    if not doc:
        return ""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return text[:1].upper() + text[1:] + "." if text else ""


def _sections(model: type[BaseModel], prefix: str, heading: str) -> Iterator[_Section]:
    """The sections nested in `model`'s fields, depth first, in field order (the model itself excluded).

    `prefix` is the model's key path, `heading` its section's heading (the key path and its variant)."""
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        at = (heading, name)
        tp, nullable = _without_none(info.annotation)
        tp = _strip(tp)
        origin, args = get_origin(tp), get_args(tp)
        has_default, default = _default(info)
        lead = (
            ["Optional: leave the section out (or null) where there is none."]
            if nullable and has_default and default is None
            else []
        )
        if _is_model(tp):
            yield from _section(key, key, tp, info, lead, [], at)
        elif origin in (list, tuple, set, frozenset) and _models_of(args[0]):
            tail = [f"Default:\n\n```yaml\n{_block(default)}\n```"] if has_default and default else []
            yield from _members(f"{key}[]", args[0], info, lead, tail, at)
        elif origin is dict and _models_of(args[1]):
            tail = [f"Default (a map given here replaces all of it):\n\n```yaml\n{_block(default)}\n```"]
            yield from _members(f"{key}.<key>", args[1], info, lead, tail if has_default and default else [], at)
        elif _is_union(tp) and _models_of(tp):
            yield from _members(key, tp, info, lead, [], at)


def _members(
    key: str, tp: Any, info: FieldInfo, lead: list[str], tail: list[str], at: tuple[str, str]
) -> Iterator[_Section]:
    """The section(s) of a list item or map value: one, or one per variant of a union (tagged by `type`)."""
    models = _models_of(tp)
    if len(models) == 1:
        yield from _section(key, key, models[0], info, lead, tail, at)
        return
    tag = info.discriminator if isinstance(info.discriminator, str) else "type"
    for m in models:
        tag_info = m.model_fields.get(tag)
        values = get_args(_strip(tag_info.annotation)) if tag_info is not None else ()
        label = f"{tag}: {values[0]}" if values else m.__name__
        what = f"With `{label}`" + (f": {tag_info.description}" if tag_info and tag_info.description else "")
        yield from _section(key, f"{key} ({label})", m, info, lead, [_sentence(what), *tail], at)


def _section(
    key: str,
    heading: str,
    model: type[BaseModel],
    info: FieldInfo,
    lead: list[str],
    tail: list[str],
    at: tuple[str, str],
) -> Iterator[_Section]:
    """A model's section (its docstring, else the description of the key holding it), then the ones below it."""
    about = _doc(model) or _sentence(info.description or "")
    yield _Section(heading, model, at[0], at[1], [p for p in (*lead, about, *tail) if p])
    yield from _sections(model, key, heading)


def _summary(tp: Any) -> str:
    """The first paragraph of the docstring of a field's section, if it holds one."""
    models = _models_of(_without_none(tp)[0])
    return _doc(models[0]).split("\n\n")[0] if len(models) == 1 else ""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _is_own_default(value: BaseModel) -> bool:
    """Whether a section's default is its model's defaults."""
    try:
        return value == type(value)()
    except ValidationError:  # the model has required keys
        return False


def _row(name: str, info: FieldInfo, child: str | None) -> str:
    kind = _type_name(info.annotation)
    bounds = _bounds(info, _without_none(info.annotation)[0] is str)
    if bounds:
        kind += ", " + ", ".join(bounds)
    has_default, default = _default(info)
    if not has_default:
        shown = "required"
    elif isinstance(default, BaseModel):
        shown = "its defaults" if _is_own_default(default) else f"`{_inline(default)}`"
    elif child is not None and default:
        shown = "see below"
    else:
        shown = f"`{_inline(default)}`"
    key = f"[`{name}`](#{_slug(child)})" if child else f"`{name}`"
    desc = info.description or _summary(info.annotation)
    return f"| {key} | {_cell(kind)} | {_cell(shown)} | {_cell(desc)} |"


def _table(model: type[BaseModel], heading: str, links: dict[tuple[str, str], str]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        lines.append(_row(name, info, links.get((heading, name))))
    return lines


def render(root: type[BaseModel] = LineConfig) -> str:
    """docs/config.md: the reference of `root`'s keys (the line config by default)."""
    sections = list(_sections(root, "", ""))
    links: dict[tuple[str, str], str] = {}  # (section heading, key) -> the heading of the key's (first) section
    for s in sections:
        links.setdefault((s.parent, s.name), s.heading)
    out = [HEADER.rstrip(), "", "## Top level", ""]
    out += _table(root, "", links)
    for s in sections:
        heading = s.heading.replace("<", "\\<").replace(">", "\\>")  # not an HTML tag
        out += ["", f"{'##' if s.top else '###'} {heading}", ""]
        for para in s.intro:
            out += [para, ""]
        out += _table(s.model, s.heading, links)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sorter.config.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {DOC_PATH} instead of printing")
    parser.add_argument("--out", type=Path, default=DOC_PATH, help="with --write: the file to write (%(default)s)")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
