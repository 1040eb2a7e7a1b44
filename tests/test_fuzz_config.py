"""Fuzzing `sorter check-config` with broken configs (issue 15, item 6).

Hypothesis edits config/sim.yaml and config/line.example.yaml: as data (keys deleted, values of the wrong
type, unknown keys, numbers out of range or not finite, huge and odd strings, a root that is not a mapping)
and as text (YAML syntax broken: stray indicators, tabs, anchors and aliases, cut files, bytes that are not
UTF-8, control characters). Each result goes through `sorter check-config FILE` in-process (click's
CliRunner on the command typer makes of `sorter.cli.app`). What must hold:

- the exit status is 0 or 2, never a traceback (any other exception, or exit 1, is a bug);
- 2 comes with an `error: ` line on stderr that names the file, and any `(line N)` it cites is a line of
  the file;
- 0 only for a config the loader accepts, and never for one with a key the schema does not know (outside
  the reserved `simulator:` section), a root that is not a mapping, or a number that is NaN or infinite.

Time bound: one check-config costs a few ms (parsing the YAML twice and validating); `max_examples` of
250 and 150 keep the tests at about 3-8 s each on the 2-core machine (a plant config with a user named
like a demo user costs one argon2 verify, ~0.1 s). `deadline=None`: a generated huge string or deep
nesting makes single examples legitimately slower.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import click.testing
import pytest
import typer.main
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from sorter.cli import app
from sorter.config import RESERVED_SECTIONS, load_config

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
BASES = {name: (ROOT / "config" / name).read_text() for name in ("sim.yaml", "line.example.yaml")}
BASE_DATA = {name: yaml.safe_load(text) for name, text in BASES.items()}
runner = click.testing.CliRunner()  # typer's CliRunner, minus rebuilding the command on every invoke:
# it turns the app into a click command each time (~30 ms of signature parsing), once is enough here
COMMAND = typer.main.get_command(app)

Path_ = tuple[str | int, ...]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a folder beside a `models` folder, like config/: the configs' relative paths mean the same there
    d = tmp_path_factory.mktemp("fuzzcfg") / "config"
    d.mkdir()
    return d


# --- what check-config must do with a file ---


def check(path: Path, *, unknown_key: bool = False, not_mapping: bool = False) -> int:
    """Run `sorter check-config path` and check its contract; returns the exit code."""
    res = runner.invoke(COMMAND, ["check-config", str(path)])
    err = res.stderr
    assert res.exit_code in (0, 2), f"exit {res.exit_code}: {res.exception!r}\n{res.output[-3000:]}"
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    if res.exit_code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert errors and str(path) in errors[0], err[-2000:]
        n_lines = path.read_bytes().count(b"\n") + 1
        for cited in re.findall(r"\(line (\d+)\)", err):
            assert 1 <= int(cited) <= n_lines, (cited, n_lines, err[-2000:])
        return 2
    assert not unknown_key, f"an unknown key was accepted: {res.output}"
    assert not not_mapping, f"a root that is not a mapping was accepted: {res.output}"
    cfg = load_config(path)  # what check-config accepted loads
    bad = [p for p, v in _floats(cfg) if not math.isfinite(v)]
    assert not bad, f"accepted non-finite numbers at {bad}"
    return 0


def _floats(obj: Any, path: str = "") -> list[tuple[str, float]]:
    if isinstance(obj, BaseModel):
        return [x for k in type(obj).model_fields for x in _floats(getattr(obj, k), f"{path}.{k}")]
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _floats(v, f"{path}.{k}")]
    if isinstance(obj, list | tuple):
        return [x for i, v in enumerate(obj) for x in _floats(v, f"{path}[{i}]")]
    if isinstance(obj, float):
        return [(path, obj)]
    return []


# --- edits of the data ---

huge_strings = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=4), st.integers(1_000, 4_000))
odd_strings = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "~", "null", "yes", "no", "on", "0x1F", "1_000", "1e400", ".nan", "-.inf", "\t", "é"]),
    huge_strings,
)
odd_numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 0.0, -0.0, 1e308, -1e308, 2**63, 65536, 1e-320, math.nan, math.inf, -math.inf]),
    st.sampled_from(["nan", "inf", "-Infinity"]),  # strings pydantic turns into floats
)
scalars = st.one_of(st.none(), st.booleans(), odd_numbers, odd_strings)
odd_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def paths_of(node: Any, path: Path_ = ()) -> list[Path_]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths_of(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths_of(v, (*path, i))
    return out


def get(node: Any, path: Path_) -> Any:
    for k in path:
        node = node[k]
    return node


def reserved(path: Path_) -> bool:
    return bool(path) and path[0] in RESERVED_SECTIONS


@st.composite
def edited_configs(draw: st.DrawFn) -> tuple[str, Any, bool]:
    """(base name, edited data, whether an unknown key was added where the service reads)."""
    name = draw(st.sampled_from(sorted(BASES)))
    data = copy.deepcopy(BASE_DATA[name])
    added: list[tuple[Path_, Any, str]] = []  # (where, the mapping, the unknown key put in it)
    for _ in range(draw(st.integers(1, 3))):
        paths = paths_of(data)
        path = draw(st.sampled_from(paths))
        node = get(data, path)
        op = draw(st.sampled_from(["delete", "replace", "unknown_key", "number", "wrap"]))
        if op == "delete" and path:
            parent = get(data, path[:-1])
            del parent[path[-1]]
        elif op == "unknown_key" and isinstance(node, dict):
            key = draw(st.text(min_size=1, max_size=12).filter(lambda k, n=node: k not in n))
            node[key] = draw(odd_values)
            if not (reserved(path) or (not path and key in RESERVED_SECTIONS)):
                added.append((path, node, key))
        elif op == "number" and isinstance(node, int | float) and not isinstance(node, bool) and path:
            get(data, path[:-1])[path[-1]] = draw(odd_numbers)
        elif op == "wrap" and path:  # the right value, one level too deep or as a list
            get(data, path[:-1])[path[-1]] = draw(st.sampled_from([[node], {"value": node}]))
        elif path:
            get(data, path[:-1])[path[-1]] = draw(odd_values)
    # an unknown key counts only if a later edit left it where it was (a delete or replace may have
    # removed the mapping it was put in, or the key itself)
    unknown = any(_holds(data, path, node, key) for path, node, key in added)
    return name, data, unknown


def _holds(data: Any, path: Path_, node: Any, key: str) -> bool:
    try:
        return get(data, path) is node and key in node
    except (KeyError, IndexError, TypeError):
        return False


def edit(name: str, *changes: tuple[Path_, Any]) -> tuple[str, Any, bool]:
    """A base config with values replaced (an explicit example)."""
    data = copy.deepcopy(BASE_DATA[name])
    for path, value in changes:
        get(data, path[:-1])[path[-1]] = value
    return name, data, False


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edited=edited_configs(), unicode=st.booleans())
@example(edited=("sim.yaml", BASE_DATA["sim.yaml"], False), unicode=False)  # the base files are valid
@example(edited=("line.example.yaml", BASE_DATA["line.example.yaml"], False), unicode=False)
# bugs found: numbers that are not finite were accepted
@example(edited=edit("sim.yaml", (("belt", "counts_per_mm"), math.inf)), unicode=False)
@example(edited=edit("sim.yaml", (("plc", "timeout_s"), "inf")), unicode=False)
@example(edited=edit("line.example.yaml", (("cameras", 0, "mapping", "centre_mm", 0), math.nan)), unicode=False)
# bug found: line breaks other than LF inside a string (U+2028, NEL) pushed every later line number past the file's end
@example(edited=edit("line.example.yaml", (("line",), "\u2028\x85" * 200), (("plant",), "maybe")), unicode=True)
@example(edited=edit("sim.yaml", (("line",), "ä" * 50_000)), unicode=True)  # a huge string
def test_check_config_on_edited_data(workdir: Path, edited: tuple[str, Any, bool], unicode: bool) -> None:
    name, data, unknown = edited
    path = workdir / name
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=unicode), encoding="utf-8")
    check(path, unknown_key=unknown)


@settings(max_examples=60, deadline=None)
@given(root=st.one_of(scalars, st.lists(scalars, max_size=3)))
def test_check_config_on_a_root_that_is_not_a_mapping(workdir: Path, root: Any) -> None:
    path = workdir / "root.yaml"
    path.write_text(yaml.safe_dump(root), encoding="utf-8")
    assert check(path, not_mapping=True) == 2


# --- edits of the text ---

YAML_BITS = [
    ":", ": ", "-", "- ", "[", "]", "{", "}", ",", "?", "? ", "&a ", "*a", "*nope", "!!str ", "!!binary ",
    "!!python/object:os.system ", "%YAML 1.1\n", "\t", "#", "|", ">", "'", '"', "\\", "@", "`", "\n", "\n  ",
    "\n---\n", "\n...\n", "<<: *a\n", "\x00", "\x07", "\ufeff", "\u2028", "é", "\r",
]  # fmt: skip
RAW_BYTES = [b"\xff", b"\xc3", b"\xe9", b"\x80\x80", b"\xed\xa0\x80"]  # not UTF-8 (a Latin-1 editor's "é")


@st.composite
def broken_texts(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(BASES)))
    raw = BASES[name].encode("utf-8")
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["insert", "insert", "delete", "cut", "raw", "dup_line", "indent"]))
        if op == "insert":
            raw = raw[:i] + draw(st.sampled_from(YAML_BITS) | st.text(max_size=6)).encode("utf-8") + raw[i:]
        elif op == "delete":
            raw = raw[:i] + raw[i + draw(st.integers(1, 30)) :]
        elif op == "cut":
            raw = raw[:i]
        elif op == "raw":
            raw = raw[:i] + draw(st.sampled_from(RAW_BYTES) | st.binary(min_size=1, max_size=4)) + raw[i:]
        elif op == "dup_line":
            lines = raw.split(b"\n")
            j = i % len(lines)
            lines.insert(j, lines[j])
            raw = b"\n".join(lines)
        else:
            lines = raw.split(b"\n")
            j = i % len(lines)
            lines[j] = draw(st.sampled_from([b" ", b"  ", b"\t", b"   "])) + lines[j]
            raw = b"\n".join(lines)
    return name, raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(broken=broken_texts())
@example(broken=("sim.yaml", b"line: demo-line\n\xff\n"))  # not UTF-8
@example(broken=("sim.yaml", b"line: " + b"[" * 5000 + b"\n"))  # nested deeper than the YAML parser recurses
def test_check_config_on_broken_text(workdir: Path, broken: tuple[str, bytes]) -> None:
    name, raw = broken
    path = workdir / f"text-{name}"
    path.write_bytes(raw)
    check(path)
