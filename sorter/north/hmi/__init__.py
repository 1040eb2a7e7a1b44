"""The operator's web HMI, served by the line service on its own thread (docs/hmi.md)."""

from sorter.north.hmi.server import HmiError, HmiServer

__all__ = ["HmiError", "HmiServer"]
