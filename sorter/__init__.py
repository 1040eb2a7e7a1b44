"""Control software for magnet-scrap sorting lines."""

__version__ = "0.1.0"
