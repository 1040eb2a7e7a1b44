"""`sorter bench-plant`: do the Sparkplug edge node and the plant database forwarder cost the line anything?

Two demo runs of the same seed and length at the config's feed and frame rate (the default demo: 32
pieces/s, 60 frames/s): one without them, one with both on, publishing to a local mosquitto and writing
to a local PostgreSQL on this machine (which take CPU from it, as a broker and a database on their own
servers would not: the ratio is an upper bound). The figures are the ratios with/without of decision
latency p99 and of frames dropped. The runs alternate (off, on, off, on ...) with `repeat` pairs; the
p99 is pooled over the runs of each kind, as single runs vary.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from sim.config import SimLineConfig
from sim.plantenv import Broker, Postgres, mosquitto_missing, postgres_missing
from sorter.config import PlantDbConfig, SparkplugConfig


async def run_bench_plant(
    cfg: SimLineConfig, duration: float, seed: int, run_dir: Path, repeat: int = 1
) -> dict[str, Any]:
    from sim.demo import run_demo
    from sorter.line.records import load_pieces

    for why in (mosquitto_missing(), postgres_missing()):
        if why:
            raise RuntimeError(why)
    run_dir = run_dir.resolve()
    base = cfg.model_copy(update={"hmi": None, "opcua_server": None, "sparkplug": None, "plant_db": None})
    broker = Broker(Path(tempfile.mkdtemp(prefix="bench-plant-mqtt-")))
    db = Postgres(run_dir / "pg")
    lat: dict[str, list[float]] = {"off": [], "on": []}
    dropped: dict[str, int] = {"off": 0, "on": 0}
    runs: list[dict[str, Any]] = []
    try:
        broker.start()
        db.init()
        on = base.model_copy(
            update={
                "sparkplug": SparkplugConfig(port=broker.port, group_id="bench"),
                "plant_db": PlantDbConfig(url=db.url),
            }
        )
        for i in range(repeat):
            for kind, c in (("off", base), ("on", on)):
                rep = await run_demo(c, duration, seed, run_dir / f"{kind}-{i}")
                records = load_pieces(Path(rep["run_dir"]) / "records.sqlite")
                lat[kind] += [r["latency_ms"] for r in records if r["latency_ms"] is not None]
                dropped[kind] += int(rep["frames_dropped"] or 0)
                runs.append(
                    {
                        "kind": kind,
                        "pieces": len(records),
                        "p99_ms": rep["decision_latency_ms"]["p99"],
                        "frames_dropped": rep["frames_dropped"],
                    }
                )
        with psycopg.connect(db.url) as conn:
            row = conn.execute("SELECT count(*) FROM plant.pieces").fetchone()
            in_db = int(row[0]) if row else 0
    finally:
        broker.stop()
        db.cleanup()
    p99 = {k: float(np.percentile(v, 99)) if v else None for k, v in lat.items()}
    return {
        "runs": runs,
        "p99_ms": {k: round(v, 1) if v is not None else None for k, v in p99.items()},
        "p99_ratio": round(p99["on"] / p99["off"], 3) if p99["on"] and p99["off"] else None,
        "frames_dropped": dropped,
        "frames_dropped_ratio": round(dropped["on"] / dropped["off"], 3) if dropped["off"] else None,
        "pieces_in_plant_db": in_db,
        "duration_s": duration,
        "seed": seed,
        "repeat": repeat,
    }
