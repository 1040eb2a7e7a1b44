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
