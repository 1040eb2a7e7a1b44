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
def drivers() -> dict[str, type]:
    """source type -> driver class, from every module of this package."""
    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            kind = cls.__dict__.get("source_type")
            if isinstance(kind, str) and cls.__module__ == module.__name__:
                if kind in found and found[kind] is not cls:
                    raise RuntimeError(f"two camera drivers for source type {kind!r}: {found[kind]} and {cls}")
                found[kind] = cls
    return found


def make_source(cfg: CameraConfig) -> FrameSource:
    """The frame source for one camera, chosen by `cfg.source.type`."""
    kind = cfg.source.type
    cls = drivers().get(kind)
    if cls is None:
        raise SourceError(cfg.name, f"no driver for source type {kind!r}", f"known: {sorted(drivers())}")
    source: FrameSource = cls.from_config(cfg)  # type: ignore[attr-defined]
    return source
