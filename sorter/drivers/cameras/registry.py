"""Which driver serves a camera: found by its `source_type`, never registered by hand.

Every module of this package is a candidate; a class with a `source_type` (the config's
`cameras[].source.type`) and a `from_config(camera)` classmethod is the driver of that type.
Adding a camera type = one module here + its source model in the config schema (docs/developing.md).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from functools import cache

import sorter.drivers.cameras as package
from sorter.config import CameraConfig
from sorter.drivers.cameras.base import FrameSource, SourceError


@cache
def _scan() -> tuple[dict[str, type], dict[str, str]]:
    found: dict[str, type] = {}
    broken: dict[str, str] = {}  # module -> why it cannot be imported (a vendor SDK missing, say)
    for info in pkgutil.iter_modules(package.__path__):
        try:
            module = importlib.import_module(f"{package.__name__}.{info.name}")
        except ImportError as exc:  # one driver's missing library must not take the other cameras down
            broken[info.name] = str(exc)
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            kind = cls.__dict__.get("source_type")
            if isinstance(kind, str) and cls.__module__ == module.__name__:
                if kind in found and found[kind] is not cls:
                    raise RuntimeError(f"two camera drivers for source type {kind!r}: {found[kind]} and {cls}")
                found[kind] = cls
    return found, broken


def drivers() -> dict[str, type]:
    """source type -> driver class, from every module of this package that imports."""
    return _scan()[0]


def make_source(cfg: CameraConfig) -> FrameSource:
    """The frame source for one camera, chosen by `cfg.source.type`."""
    kind = cfg.source.type
    found, broken = _scan()
    cls = found.get(kind)
    if cls is None:
        why = "; ".join(f"{m}: {e}" for m, e in broken.items())
        raise SourceError(
            cfg.name,
            f"no driver for source type {kind!r}" + (f" (drivers that failed to import: {why})" if why else ""),
            f"known types: {sorted(found)}; install the camera's library or fix cameras[].source.type",
        )
    source: FrameSource = cls.from_config(cfg)  # type: ignore[attr-defined]
    return source
