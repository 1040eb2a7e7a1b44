"""Plant data logic without a broker or a database: the edge node's metrics, change detection, buffer and
sessions with an in-process fake session; the forwarder's journal reading; the migrations' numbering."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from sim.spb_decode import decode_payload
from sorter.config import PlantDbConfig, SparkplugConfig
from sorter.core.packml import State
from sorter.line.records import RecordStore
from sorter.north.edge import EdgeNode, StoreForward, node_metrics
from sorter.north.plantdb.forwarder import Hold, Journal, cut_at_open
from sorter.north.plantdb.migrate import migrations
from sorter.north.sparkplug import UINT64, MetricValue
from tests.test_metrics import make_stats

pytestmark = pytest.mark.fast


class FakeSession:
    """Stands in for MqttSession: records what is published; the test says when the broker answers."""

    def __init__(self, cfg: Any, client_id: str, *, on_message: Any, on_connected: Any) -> None:
        self.client_id = client_id
        self.on_connected = on_connected
        self.on_message = on_message
        self.connected = False
        self.reachable = True
        self.error: str | None = None
        self.address = "fake"
        self.published: list[tuple[str, bytes]] = []
        self.wills: list[bytes] = []

    def fail(self, why: str) -> None:
        self.error = why

    def connect(self, will_topic: str, will: bytes) -> None:
        from sorter.north.sparkplug import SparkplugError

        if not self.reachable:
            raise SparkplugError("no broker")
        self.wills.append(will)
        self.connected = True
        self.on_connected()

    def loop(self, timeout: float) -> bool:
        return self.connected

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> object | None:
        if not self.connected:  # paho refuses to queue without a connection
            return None
        self.published.append((topic, payload))
        return object()

    def subscribe(self, topic: str, qos: int = 0) -> None:
        pass

    def disconnect(self) -> None:
        self.connected = False

    def kinds(self) -> list[str]:
        return [t.split("/")[2] for t, _ in self.published]


def node(**kw: Any) -> tuple[EdgeNode, FakeSession]:
    made: list[FakeSession] = []

    def factory(*a: Any, **k: Any) -> FakeSession:
        made.append(FakeSession(*a, **k))
        return made[-1]

    n = EdgeNode(SparkplugConfig(**kw), "line-3", log=structlog.get_logger(), session_factory=factory)
    return n, made[0]


def test_node_metrics_cover_the_issue_list() -> None:
    m = node_metrics(make_stats())
    for name in (
        "Line/State",
        "Fractions/ndfeb/Pieces",
        "Fractions/residue/Purity Estimate",
        "Line/Pieces Per Minute",
        "Belt/Speed mm_s",
        "PLC/Online",
        "Cameras/cam0/Online",
        "Decision/Latency p99 ms",
        "Model/Version",
    ):
        assert name in m, name
    assert m["Fractions/ferrite_smco/Purity Estimate"].value is None  # NaN is sent as null
    assert "Hall Bar/Online" not in m  # no bar, no metric
    assert node_metrics(make_stats(latency_ms_p99=None))["Decision/Latency p99 ms"].value is None


def test_store_forward_is_bounded_and_counts_what_it_drops() -> None:
    b = StoreForward(2)
    for i in range(5):
        b.add(i, {"x": MetricValue(UINT64, i)})
    assert len(b) == 2 and b.dropped == 3 and b.dropped_now == 3
    assert [ts for ts, _ in b.take(10)] == [3, 4]


def test_edge_node_session_rules_with_a_fake_broker() -> None:
    n, s = node(group_id="g")
    n.publish(make_stats(t=time.monotonic()))
    n._drain_inbox()
    n._connect()
    assert n._need_birth
    n._birth()
    assert s.kinds() == ["NBIRTH"] and decode_payload(s.wills[0]).values() == {"bdSeq": 0}
    # a change goes out as NDATA with the next seq
    n.publish(make_stats(t=time.monotonic(), state=State.HELD))
    n._drain_inbox()
    assert s.kinds() == ["NBIRTH", "NDATA"] and decode_payload(s.published[1][1]).seq == 1
    # the broker goes: changes are buffered, none published
    s.connected = False
    n._went_offline()
    for st in (State.EXECUTE, State.SUSPENDED):
        n.publish(make_stats(t=time.monotonic(), state=st))
    n._drain_inbox()
    assert len(n.buffer) == 2 and len(s.published) == 2
    # back: new will with the next bdSeq, a birth with the present, then the history
    n._connect()
    n._birth()
    n._replay()
    assert decode_payload(s.wills[1]).values() == {"bdSeq": 1}
    birth, hist = (decode_payload(p) for _, p in s.published[2:])
    assert birth.values()["bdSeq"] == 1 and birth.values()["Line/State"] == "Suspended" and birth.seq == 0
    assert hist.seq == 1 and [m.value for m in hist.metrics if m.name == "Line/State"] == ["Execute", "Suspended"]
    assert all(m.is_historical for m in hist.metrics)
    # seq wraps after 255
    n.seq = 255
    assert n._next_seq() == 0


def test_rebirth_command_is_understood_and_others_ignored() -> None:
    from sim.spb_decode import encode_rebirth

    n, s = node()
    s.on_message("spBv1.0/g/NCMD/line-3", encode_rebirth())
    assert n._rebirth_asked and n.rebirths == 1
    n._rebirth_asked = False
    s.on_message("spBv1.0/g/NCMD/line-3", b"\xff\xff")  # garbage: logged, no rebirth
    assert not n._rebirth_asked


def test_offline_alarm_after_its_delay() -> None:
    n, s = node(offline_alarm_s=0.01)
    s.reachable = False
    n._connect()
    time.sleep(0.02)
    cond = n.condition()
    assert cond is not None and cond.name == "sparkplug_offline"


def test_open_rows_hold_the_forwarder_for_the_grace_only(tmp_path: Path) -> None:
    db = tmp_path / "j.sqlite"
    store = RecordStore(db, "now")
    t = time.time()
    for i, outcome in enumerate(["accepted", "held", "pending", "accepted", "seen"]):
        store.add_piece(
            {"id": i, "t_wall": t, "t_capture": 0.0, "count": i, "count32": i, "fraction": "x", "outcome": outcome}
        )
    store.flush()
    j = Journal(db)
    rows = j.pieces_after(0, 10)
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4]
    # the first open row (pending) holds the rest back, from when it is first met
    b, hold = cut_at_open(rows, None, now=100.0, grace_s=30, final=False)
    assert [r["id"] for r in b.rows] == [0, 1] and b.blocked and hold == Hold("now/2", 100.0)
    b, hold2 = cut_at_open(rows, hold, now=129.0, grace_s=30, final=False)
    assert len(b.rows) == 2 and hold2 is hold
    # past the grace it goes as it is; the next open row (seen) is a new wait
    b, hold3 = cut_at_open(rows, hold, now=131.0, grace_s=30, final=False)
    assert [r["id"] for r in b.rows] == [0, 1, 2, 3] and hold3 == Hold("now/4", 131.0)
    # the service has stopped: nothing will change, nothing waits
    b, hold4 = cut_at_open(rows, None, now=0.0, grace_s=30, final=True)
    assert len(b.rows) == 5 and not b.blocked and hold4 is None
    assert j.key_at("pieces", 3) == "now/2" and j.key_at("pieces", 99) is None
    assert j.backlog(1) == (4, t)
    assert [r["id"] for r in j.rows_at([5, 1])] == [0, 4]
    j.close()
    store.close()


def test_migrations_are_numbered_without_gaps() -> None:
    ms = migrations()
    assert [m.version for m in ms] == list(range(1, len(ms) + 1))
    assert "PARTITION BY RANGE (t_wall)" in ms[0].sql


def test_config_refuses_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="postgresql://"):
        PlantDbConfig(url="mysql://x")
    with pytest.raises(ValueError, match="topic separators"):
        SparkplugConfig(group_id="a/b")
    with pytest.raises(ValueError, match="tls: true"):
        SparkplugConfig(ca_file=Path("ca.pem"))


def test_build_line_wires_the_edge_node_and_the_forwarder(tmp_path: Path) -> None:
    """Companions, stats subscriber, final-drain closer and metrics collectors, only where configured."""
    from sorter.app import build_line
    from sorter.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "config" / "sim.yaml")
    cfg = cfg.model_copy(
        update={
            "records": cfg.records.model_copy(update={"path": tmp_path / "records.sqlite"}),
            "opcua_server": None,
            "hmi": None,
        }
    )
    plain = build_line(cfg, auto_start=False)
    assert plain.edge is None and plain.forwarder is None
    # no north side: only what any real-time line has
    assert [c.name for c in plain.service.parts.companions] == ["thread_priority", "loop_watch"]
    on = cfg.model_copy(
        update={"sparkplug": SparkplugConfig(port=1), "plant_db": PlantDbConfig(url="postgresql://x@127.0.0.1:1/p")}
    )
    line = build_line(on, auto_start=False)
    assert line.edge is not None and line.forwarder is not None
    parts = line.service.parts
    assert parts.companions[2:] == [line.edge, line.forwarder]
    assert line.edge.publish in parts.subscribers
    assert line.forwarder.close in parts.closers
    assert line.forwarder.run_id == line.service.run_id  # its pending rows are the ones that may still change
    assert line.edge.node == cfg.line
    text = line.metrics.render()[0].decode()
    assert "sorter_sparkplug_online 0.0" in text and "sorter_plantdb_lag_rows 0.0" in text
    off = on.model_copy(update={"sparkplug": SparkplugConfig(enabled=False)})
    assert build_line(off, auto_start=False, north=False).edge is None


def test_plant_check_refuses_plain_mqtt_and_a_password_in_the_db_url() -> None:
    from sorter.config import load_config
    from sorter.config.plant import check_plant

    cfg = load_config(Path(__file__).parent.parent / "config" / "sim.yaml")
    base = {str(p) for p in check_plant(cfg)}
    cfg = cfg.model_copy(
        update={
            "sparkplug": SparkplugConfig(),
            "plant_db": PlantDbConfig(url="postgresql://sorter:secret@db.plant/plant"),
        }
    )
    new = {p.key for p in check_plant(cfg) if str(p) not in base}
    assert new == {"sparkplug.tls", "plant_db.url"}
    ok = cfg.model_copy(
        update={
            "sparkplug": SparkplugConfig(tls=True, port=8883),
            "plant_db": PlantDbConfig(url="postgresql://sorter@db.plant/plant?sslmode=verify-full"),
        }
    )
    assert {str(p) for p in check_plant(ok)} == base


def test_every_journal_column_has_a_column_in_the_plant_schema() -> None:
    """A column added to the journal (sorter/line/records.py) needs a migration, or the forwarder would stop."""
    import re

    from sorter.line.records import PIECE_COLUMNS

    sql = "\n".join(m.sql for m in migrations())
    table = sql[sql.index("CREATE TABLE plant.pieces") :]
    table = table[: table.index(") PARTITION BY")]
    declared = {m.group(1) for m in re.finditer(r"^\s+([a-z_0-9]+)\s+[a-z]", table, re.M)}
    declared |= {m.group(1) for m in re.finditer(r"ALTER TABLE plant\.pieces ADD COLUMN (\w+)", sql)}
    wanted = {"piece_id" if c == "id" else c.lower() for c in PIECE_COLUMNS}
    assert wanted <= declared, f"journal columns without a plant.pieces column: {sorted(wanted - declared)}"


def test_a_message_paho_refuses_is_kept_for_later() -> None:
    """The session dropped between two loops: the NDATA that could not be queued goes into the buffer."""
    n, s = node()
    n.publish(make_stats(t=time.monotonic()))
    n._drain_inbox()
    n._connect()
    n._birth()
    s.connected = False  # gone, and the worker has not looped yet
    n.publish(make_stats(t=time.monotonic(), state=State.HELD))
    n._drain_inbox()
    assert s.kinds() == ["NBIRTH"] and len(n.buffer) == 1
    s.connected = True
    n._replay()
    assert s.kinds() == ["NBIRTH", "NDATA"] and len(n.buffer) == 0
    s.connected = False
    n.buffer.add(1, {"x": MetricValue(UINT64, 1)})
    n._replay()  # refused: back in the buffer, in order
    assert len(n.buffer) == 1
