"""Writing private keys (the OPC UA server's, the HMI's): readable by the service's user only."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes, overwrite: bool) -> None:
    """Write a key file with mode 0600 from the start (no window in which another user could open it).

    Without `overwrite`, O_EXCL keeps the "never overwrite" promise even if the file appeared since a check.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an overwritten file keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)
