"""The simulated line for hw/ script tests: the simulator process on free ports, and the config it serves.

A test plays the technician: it prepares the line through the simulator's control channel (place a
target, feed test pieces, unplug a cable) and runs the script unattended against the written config,
exactly as a technician runs it against a real line's config.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from sim.config import load_sim_config
from sim.demo import SimProcess, demo_config
from sorter.config import LineConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SimLine:
    config: Path  # the line config the scripts calibrate (written for this run: free ports, run folder)
    cfg: LineConfig
    sim: SimProcess
    run_dir: Path

    async def send(self, **cmd: object) -> dict[str, object]:
        return await self.sim.send(**cmd)

    async def script(self, module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `python -m hw.<module> --config CONFIG --yes ARGS` without blocking the simulator's loop."""
        cmd = [sys.executable, "-m", f"hw.{module}", "--config", str(self.config), "--yes", *args]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
        return subprocess.CompletedProcess(cmd, proc.returncode or 0, out.decode(), err.decode())


def write_config(cfg: LineConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


@asynccontextmanager
async def simulated_line(
    run_dir: Path, cfg: LineConfig | None = None, *, seed: int = 7, hallbar: bool = True
) -> AsyncIterator[SimLine]:
    """Start the simulator (belt stopped, no feed) serving a config written to run_dir/line.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(cfg or load_sim_config(ROOT / "config" / "sim.yaml"), run_dir, seed)
    if not hallbar:
        cfg = cfg.model_copy(update={"magnetometer": None})
    path = write_config(cfg, run_dir / "line.yaml")
    bar = cfg.magnetometer.port if cfg.magnetometer else None
    sim = await SimProcess.start(path, run_dir / "truth.sqlite", run_dir / "sim.log", bar)
    try:
        await sim.wait_for("ready", 30)
        yield SimLine(path, cfg, sim, run_dir)
    finally:
        await sim.close()
