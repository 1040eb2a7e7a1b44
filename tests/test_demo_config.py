"""What `sorter demo` hands both sides of a run (sim/demo.py `demo_config`)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]


def test_a_demo_run_gets_a_distinct_port_for_every_server(tmp_path):
    """Cameras, the PLC's Modbus and OPC UA servers and the line's own OPC UA server each get a port of their
    own (chosen together, so the kernel cannot hand the same free port out twice)."""
    from sim.config import load_sim_config
    from sim.demo import demo_config, free_ports

    assert len(set(free_ports(16))) == 16
    cfg = demo_config(load_sim_config(ROOT / "config" / "sim.yaml"), tmp_path, seed=1)
    ports = [int(c.source.address.rsplit(":", 1)[1]) for c in cfg.cameras]
    ports += [cfg.plc.port, int(cfg.plc.opcua.endpoint.rsplit(":", 1)[1])]
    if cfg.opcua_server:
        ports.append(int(cfg.opcua_server.endpoint.rsplit(":", 1)[1]))
    assert len(ports) == len(set(ports)) >= 4


@pytest.mark.parametrize("held", ["records.sqlite", "truth.sqlite", "report.json"])
def test_a_run_folder_that_holds_a_run_is_refused_before_anything_starts(tmp_path, held):
    """A second demo into the same --out would mix its records with the first's (and failed midway on the
    server certificate): it is refused with the folder named, and the first run's files are left as they were."""
    import asyncio

    from sim.config import load_sim_config
    from sim.demo import DemoError, run_demo
    from sim.lockstep import run_lockstep

    (tmp_path / held).write_text("the first run's")
    cfg = load_sim_config(ROOT / "config" / "sim.yaml")
    with pytest.raises(DemoError, match=f"{tmp_path}.*{held}"):
        asyncio.run(run_demo(cfg, 1.0, 1, tmp_path))
    with pytest.raises(DemoError, match="holds a run already"):
        run_lockstep(cfg, 1.0, 1, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [held]
    assert (tmp_path / held).read_text() == "the first run's"
