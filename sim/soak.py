"""`sorter soak`: the simulated line sorted for a long run, with its RSS, CPU and decision latency over time.

The demo (sim/demo.py) with a sampler beside the feed: every `every_s` seconds the service's RSS (this
process: the demo runs the service in it), the simulator's RSS (its own process), each one's CPU in cores
over the interval, the line's decision latency p99 (over its latest commands), pieces decided and frames
dropped. Written as `soak.csv` and `soak.png` in the run folder, and summed up in the report's `soak`:
the RSS growth from minute 5 (the buffers have filled by then) to the end is the figure a leak shows in.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from sim.config import SimLineConfig
from sim.demo import SimProcess, run_demo
from sorter.app import Line
from sorter.line.memory import read_rss

SETTLED_S = 300.0  # buffers and caches have filled by minute 5: growth after it is what a leak looks like
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class SoakSample:
    t_s: float
    service_rss_mb: float | None
    sim_rss_mb: float | None
    service_cpu_cores: float
    sim_cpu_cores: float | None
    latency_p99_ms: float | None
    pieces: int
    frames_dropped: int


def _proc_cpu_s(pid: int) -> float | None:
    """A process's user + system CPU seconds from /proc/<pid>/stat (None once it is gone)."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields_[11]) + int(fields_[12])) / CLK_TCK  # utime, stime (fields 14, 15 of stat)


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def sample_line(line: Line, sim: SimProcess, duration: float, every_s: float, out: list[SoakSample]) -> None:
    """Append a sample every `every_s` seconds for `duration` seconds (the demo's `during` action)."""
    service, sim_pid = line.service, sim.proc.pid
    t0 = last_t = time.monotonic()
    last_self, last_sim = _self_cpu_s(), _proc_cpu_s(sim_pid)
    while (now := time.monotonic()) - t0 < duration:
        await asyncio.sleep(min(every_s, duration - (now - t0)))
        now, cpu_self, cpu_sim = time.monotonic(), _self_cpu_s(), _proc_cpu_s(sim_pid)
        dt = max(now - last_t, 1e-6)
        rss, sim_rss = read_rss(), read_rss(Path(f"/proc/{sim_pid}/status"))
        stats = service.stats
        out.append(
            SoakSample(
                t_s=round(now - t0, 2),
                service_rss_mb=None if rss is None else rss.total,
                sim_rss_mb=None if sim_rss is None else sim_rss.total,
                service_cpu_cores=round((cpu_self - last_self) / dt, 3),
                sim_cpu_cores=None if cpu_sim is None or last_sim is None else round((cpu_sim - last_sim) / dt, 3),
                latency_p99_ms=stats.latency_ms_p99,
                pieces=service.counters.pieces,
                frames_dropped=stats.frames_dropped,
            )
        )
        last_t, last_self, last_sim = now, cpu_self, cpu_sim


def summary(samples: list[SoakSample], every_s: float) -> dict[str, Any]:
    """What the report says of the run's course: RSS growth after the buffers filled, mean CPU, latency."""
    if not samples:
        return {"every_s": every_s, "samples": 0}
    end = samples[-1]
    settled_at = SETTLED_S if end.t_s >= 2 * SETTLED_S else end.t_s / 2  # a short run: from its middle
    settled = next(s for s in samples if s.t_s >= settled_at)
    rss = [s.service_rss_mb for s in samples if s.service_rss_mb is not None]
    lat = [s.latency_p99_ms for s in samples if s.latency_p99_ms is not None]
    sim_cpu = [s.sim_cpu_cores for s in samples if s.sim_cpu_cores is not None]

    def growth(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 1)

    return {
        "every_s": every_s,
        "samples": len(samples),
        "settled_at_s": settled.t_s,
        "service_rss_mb": {
            "settled": settled.service_rss_mb,
            "end": end.service_rss_mb,
            "max": max(rss) if rss else None,
            "growth_settled_to_end": growth(settled.service_rss_mb, end.service_rss_mb),
        },
        "sim_rss_mb": {
            "settled": settled.sim_rss_mb,
            "end": end.sim_rss_mb,
            "growth_settled_to_end": growth(settled.sim_rss_mb, end.sim_rss_mb),
        },
        "cpu_cores_mean": {
            "service": round(sum(s.service_cpu_cores for s in samples) / len(samples), 3),
            "sim": round(sum(sim_cpu) / len(sim_cpu), 3) if sim_cpu else None,
        },
        "latency_p99_ms": {"max": max(lat) if lat else None, "end": end.latency_p99_ms},
    }


def write_csv(samples: list[SoakSample], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(SoakSample)])
        w.writeheader()
        for s in samples:
            w.writerow(asdict(s))


def plot(samples: list[SoakSample], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t_s / 60 for s in samples]
    fig, (ax_mem, ax_cpu, ax_lat) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ax_mem.plot(t, [s.service_rss_mb for s in samples], label="service")
    ax_mem.plot(t, [s.sim_rss_mb for s in samples], label="simulator")
    ax_mem.set_ylabel("RSS, MB")
    ax_mem.legend()
    ax_cpu.plot(t, [s.service_cpu_cores for s in samples], label="service")
    ax_cpu.plot(t, [s.sim_cpu_cores for s in samples], label="simulator")
    ax_cpu.set_ylabel("CPU, cores")
    ax_cpu.legend()
    ax_lat.plot(t, [s.latency_p99_ms for s in samples])
    ax_lat.set_ylabel("decision latency p99, ms")
    ax_lat.set_xlabel("minutes of feed")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def run_soak(cfg: SimLineConfig, duration: float, seed: int, run_dir: Path, every_s: float) -> dict[str, Any]:
    """The demo for `duration` s of feed, sampled every `every_s` s; the demo's report with `soak` added."""
    samples: list[SoakSample] = []

    async def sampler(line: Line, sim: SimProcess) -> None:
        await sample_line(line, sim, duration, every_s, samples)

    report = await run_demo(cfg, duration, seed, run_dir, during=sampler)
    write_csv(samples, run_dir / "soak.csv")
    if samples:
        plot(samples, run_dir / "soak.png", f"soak, seed {seed}, {duration:g} s of feed")
    report["soak"] = summary(samples, every_s)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report
