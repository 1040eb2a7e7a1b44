"""`sorter bench-opcua`: does a hostile or greedy OPC UA client stall the sorting loop?

Two demo runs of the same seed and length: one quiet, one while other processes
flood the line's OPC UA server - one client reading every variable of the line in
a tight loop, one connecting again and again and sending garbage. The figure is
the ratio of decision latency p99 flooded / quiet (same machine, same run, so
noise cancels as far as it can). The flooding processes run on this machine and
take CPU from it, which a SCADA client on its own computer would not: the ratio
is an upper bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from sim.config import SimLineConfig
from sim.report import headline


async def _read_flood(url: str, seconds: float) -> int:
    from asyncua import Client

    reads = 0
    deadline = time.monotonic() + seconds
    async with Client(url, timeout=5) as client:
        idx = await client.get_namespace_index("urn:magnet-sorter:line")
        line = await client.nodes.objects.get_child([f"{idx}:SortingLine"])
        nodes = [n for n in await line.get_children() if (await n.read_node_class()).name == "Variable"]
        while time.monotonic() < deadline:
            await client.read_values(nodes)
            reads += len(nodes)
    return reads


def _garbage_flood(host: str, port: int, seconds: float) -> int:
    sent = 0
    deadline = time.monotonic() + seconds
    junk = os.urandom(4096)
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                # a plausible header first, so the server parses rather than drops at once
                s.sendall(b"HELF" + (8192).to_bytes(4, "little") + junk)
                s.sendall(junk)
                sent += 1
        except OSError:
            time.sleep(0.01)
    return sent


def flood_main() -> None:
    """python -m sim.bench_opcua MODE URL SECONDS: one flooding process; prints what it did as JSON."""
    mode, url, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if mode == "read":
        out = {"reads": asyncio.run(_read_flood(url, seconds))}
    else:
        host, _, port = url.removeprefix("opc.tcp://").rpartition(":")
        out = {"garbage_connections": _garbage_flood(host, int(port), seconds)}
    print(json.dumps(out))


async def _flood(line: Any, sim: Any, seconds: float, into: dict[str, Any]) -> None:
    while line.scada is None or not line.scada.listening:
        await asyncio.sleep(0.1)
    url = line.scada.endpoint_url
    procs = [
        await asyncio.create_subprocess_exec(
            "nice",
            "-n",
            "19",
            sys.executable,
            "-m",
            "sim.bench_opcua",
            mode,
            url,
            str(seconds),
            stdout=asyncio.subprocess.PIPE,
        )
        for mode in ("read", "garbage")
    ]
    for p in procs:
        out, _ = await p.communicate()
        into.update(json.loads(out or b"{}"))


async def run_bench_opcua(cfg: SimLineConfig, duration: float, seed: int, run_dir: Path) -> dict[str, Any]:
    from sim.demo import run_demo

    quiet = await run_demo(cfg, duration, seed, run_dir / "quiet")
    flood: dict[str, Any] = {}
    flooded = await run_demo(
        cfg, duration, seed, run_dir / "flooded", during=lambda svc, sim: _flood(svc, sim, duration, flood)
    )

    q, f = quiet["decision_latency_ms"]["p99"], flooded["decision_latency_ms"]["p99"]
    return {
        "quiet": headline(quiet),
        "flooded": {**headline(flooded), **flood},
        "p99_ratio": round(f / q, 3) if q else None,
        "duration_s": duration,
        "seed": seed,
    }


if __name__ == "__main__":
    flood_main()
