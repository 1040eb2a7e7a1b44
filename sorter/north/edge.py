"""The line as a Sparkplug B edge node: a companion of the line service fed with its LineStats.

    LineService --publish(stats), every 0.2 s and at each state change--> inbox (a deque, on the loop)
    worker thread `sparkplug`: inbox -> node metrics -> what changed -> NDATA, or the store-and-forward
                               buffer while the broker is away; connect, NBIRTH, NCMD Rebirth, NDEATH

The service's loop only appends a reference to a deque: a slow, absent or refusing broker costs it
nothing. Everything MQTT happens on the worker thread, which owns the session (sorter/north/sparkplug.py).

Sparkplug B (3.0) as done here:
- NBIRTH: every metric with its datatype and current value, `bdSeq` and `Node Control/Rebirth`, seq 0;
  then NDATA with only the metrics that changed, seq 1, 2, ... 255, 0, ... (names, no aliases);
- NDEATH: the MQTT will registered at connect, with the bdSeq of that session (the broker sends it when
  the line dies or drops off the network); published by the node itself before a clean disconnect;
- NCMD `Node Control/Rebirth` true: a new NBIRTH (same session, same bdSeq);
- store-and-forward: while the broker is away the changes are kept (bounded: `buffer_max` messages,
  the oldest dropped beyond it, alarmed); on return, after the new NBIRTH (current values), they are
  published as NDATA whose metrics carry `is_historical` and the time they changed. A host that wants
  the current value ignores historical metrics; a historian stores them at their timestamps.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sorter.config import SparkplugConfig
from sorter.core.alarms import Condition
from sorter.core.linestate import LineStats
from sorter.core.timebase import REAL_TIME
from sorter.north.sparkplug import (
    BDSEQ,
    BOOLEAN,
    DOUBLE,
    INT32,
    REBIRTH,
    STRING,
    UINT64,
    MetricValue,
    MqttSession,
    SparkplugError,
    decode,
    encode,
    metric_map,
    topic,
)

HISTORICAL_PER_MESSAGE = 200  # buffered changes replayed per NDATA message after an outage
INBOX_MAX = 3000  # LineStats waiting for the worker (10 min at 5 a second): never reached unless it hangs


def node_metrics(s: LineStats) -> dict[str, MetricValue]:
    """The node's metrics from one LineStats: names as a host browses them ("folder/name")."""
    v = MetricValue.of
    m: dict[str, MetricValue] = {
        "Line/Name": v(STRING, s.line),
        "Line/Run Id": v(STRING, s.run_id),
        "Line/State": v(STRING, s.state.label),
        "Line/State Code": v(INT32, int(s.state.value)),
        "Line/Pieces": v(UINT64, s.counters.pieces),
        "Line/Pieces Per Minute": v(DOUBLE, round(s.pieces_per_minute, 1)),
        "Line/Frames Captured": v(UINT64, s.frames_captured),
        "Line/Frames Dropped": v(UINT64, s.frames_dropped),
        "Belt/Speed mm_s": v(DOUBLE, None if s.plc.speed_mm_s is None else round(float(s.plc.speed_mm_s), 1)),
        "PLC/Online": v(BOOLEAN, s.plc.online),
        "PLC/Protocol": v(STRING, s.plc_protocol),
        "PLC/Alarms": v(STRING, ",".join(s.plc.alarms)),
        "Decision/Latency p99 ms": v(DOUBLE, s.latency_ms_p99),
        "Model/Version": v(STRING, s.model_version),
        "Alarms/Active": v(INT32, len(s.alarms_active)),
        "Alarms/Text": v(STRING, "; ".join(a.text() for a in s.alarms_active)),
    }
    for f in s.fractions:
        m[f"Fractions/{f}/Pieces"] = v(UINT64, s.fraction_counts.get(f, 0))
        m[f"Fractions/{f}/Purity Estimate"] = v(DOUBLE, round(s.purity.get(f, float("nan")), 4))
    for c in s.cameras:
        m[f"Cameras/{c.name}/Online"] = v(BOOLEAN, c.online)
        m[f"Cameras/{c.name}/Frames Dropped"] = v(UINT64, c.lost)
    if s.hallbar is not None:
        m["Hall Bar/Online"] = v(BOOLEAN, s.hallbar.online)
    return m


@dataclass
class StoreForward:
    """The changes made while the broker is away, oldest first, at most `max_items` (then the oldest go)."""

    max_items: int
    items: deque[tuple[int, dict[str, MetricValue]]] = field(default_factory=deque)
    dropped: int = 0  # since the node started
    dropped_now: int = 0  # during the current outage: the alarm holds while it is not zero

    def add(self, ts_ms: int, changes: dict[str, MetricValue]) -> None:
        if len(self.items) >= self.max_items:
            self.items.popleft()
            self.dropped += 1
            self.dropped_now += 1
        self.items.append((ts_ms, changes))

    def take(self, n: int) -> list[tuple[int, dict[str, MetricValue]]]:
        return [self.items.popleft() for _ in range(min(n, len(self.items)))]

    def __len__(self) -> int:
        return len(self.items)


class EdgeNode:
    """The companion: start/stop with the line, `publish` as its stats subscriber, `condition` for alarms."""

    name = "sparkplug"

    def __init__(
        self,
        cfg: SparkplugConfig,
        line: str,
        *,
        log: Any,
        session_factory: Callable[..., Any] = MqttSession,
        wall: Callable[[], float] = REAL_TIME.wall,
        now: Callable[[], float] = REAL_TIME.now,
    ) -> None:
        """`wall`, `now`: the line's clocks (its Timebase), to stamp each change with when the line built the
        stats; the network's own waits (reconnects, deadlines) run on the PC's monotonic clock."""
        self.cfg = cfg
        self.log = log
        self.group = cfg.group_id
        self.node = cfg.edge_node_id or line
        self._wall = wall
        self._now = now
        self._session = session_factory(
            cfg,
            cfg.client_id or f"{self.group}-{self.node}",
            on_message=self._on_message,
            on_connected=self._on_connected,
        )
        self.buffer = StoreForward(cfg.buffer_max)
        self._inbox: deque[LineStats] = deque(maxlen=INBOX_MAX)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[str, MetricValue] = {}  # every metric's latest value (what an NBIRTH carries)
        self.bdseq = 0  # of the current (or next) session: the first has 0
        self._bdseq_sent = False  # a CONNECT with this bdSeq in its will went out
        self.seq = 0
        self.born = False  # NBIRTH sent in the current session
        self._need_birth = False
        self._rebirth_asked = False
        self.online_since: float | None = None
        self.offline_since: float | None = time.monotonic()
        self.sent: dict[str, int] = {"NBIRTH": 0, "NDATA": 0, "NDEATH": 0, "historical": 0}
        self.rebirths = 0

    @property
    def t_nbirth(self) -> str:
        return topic(self.group, "NBIRTH", self.node)

    # --- the service's side (its loop) ---
    def publish(self, stats: LineStats) -> None:
        """A reference into the inbox and a wake-up: all the loop ever pays for the edge node."""
        self._inbox.append(stats)
        self._wake.set()

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sparkplug", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Publish the final values and the NDEATH (if the broker is there), then disconnect."""
        import asyncio

        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    def condition(self) -> Condition | None:
        if self.buffer.dropped_now:
            return Condition(
                "sparkplug_buffer_full",
                f"the MQTT broker is away and {self.buffer.dropped_now} buffered state changes were dropped "
                f"(sparkplug.buffer_max {self.cfg.buffer_max})",
                "bring the broker or the network back; the counters are whole again at the next NBIRTH",
            )
        off = self.offline_since
        if off is not None and time.monotonic() - off > self.cfg.offline_alarm_s:
            why = self._session.error or "not connected"
            return Condition(
                "sparkplug_offline",
                why,
                "check the MQTT broker and the network to it; the line sorts on and buffers its state",
            )
        return None

    # --- the worker thread ---
    def _run(self) -> None:
        backoff = self.cfg.reconnect_min_s
        next_try = 0.0
        while True:
            stopping = self._stopping.is_set()
            self._drain_inbox()
            if stopping:
                break
            s = self._session
            if self._connecting and time.monotonic() - self._connect_t > 2 * self.cfg.keepalive_s:
                # TCP (and TLS) went through but the broker never answered the CONNECT: start again. paho
                # gives up after the keep-alive itself (2.x); this is the backstop should a release not
                s.fail(f"the MQTT broker at {s.address} did not answer the connection in {2 * self.cfg.keepalive_s} s")
                s.disconnect()
                self._went_offline()
                next_try = time.monotonic() + backoff
                backoff = min(backoff * 2, self.cfg.reconnect_max_s)
                continue
            if s.connected or self._connecting:
                if not s.loop(0.05):
                    self._went_offline()
                    next_try = time.monotonic() + backoff
                    backoff = min(backoff * 2, self.cfg.reconnect_max_s)
                    continue
                if self._need_birth or self._rebirth_asked:
                    self._birth()
                    backoff = self.cfg.reconnect_min_s
                if self.born and len(self.buffer):
                    self._replay()
                continue
            now = time.monotonic()
            if now < next_try:
                self._wake.wait(min(0.2, next_try - now))
                self._wake.clear()
                continue
            self._connect()
            if not self._connecting:
                next_try = time.monotonic() + backoff
                backoff = min(backoff * 2, self.cfg.reconnect_max_s)
        self._final()

    _connecting = False  # TCP (and TLS) open, CONNACK not yet seen
    _told_unreachable = False
    _connect_t = 0.0

    def _connect(self) -> None:
        # bdSeq goes up by one from the last CONNECT the broker received (Sparkplug 3.0): an attempt that
        # never reached it (refused, unreachable) sent no CONNECT, so the next one keeps its number
        if self._bdseq_sent:
            self.bdseq = (self.bdseq + 1) % 256
            self._bdseq_sent = False
        will = encode([(BDSEQ, MetricValue(UINT64, self.bdseq), None)], timestamp_ms=self._ms(), seq=None)
        try:
            self._session.connect(topic(self.group, "NDEATH", self.node), will)
        except SparkplugError as exc:
            if not self._told_unreachable:  # once per outage: retries come every few seconds
                self._told_unreachable = True
                self.log.warning("MQTT broker not reachable, retrying", error=str(exc))
            return
        self._bdseq_sent = True
        self._connecting = True
        self._connect_t = time.monotonic()

    def _on_connected(self) -> None:
        """CONNACK accepted (from loop(), on the worker): subscribe to commands, then the NBIRTH."""
        self._connecting = False
        self._session.subscribe(topic(self.group, "NCMD", self.node), qos=0)
        self._need_birth = True

    def _on_message(self, topic_: str, payload: bytes) -> None:
        try:
            _, metrics = decode(payload)
        except SparkplugError as exc:
            self.log.warning("NCMD not understood", topic=topic_, error=str(exc))
            return
        for m in metrics:
            if m.name == REBIRTH and m.value.value is True:
                self._rebirth_asked = True
                self.rebirths += 1
            else:
                self.log.warning("NCMD metric not supported", metric=m.name)

    def _birth(self) -> None:
        self._need_birth = self._rebirth_asked = False
        self.seq = 0
        metrics = dict(self._last)
        metrics[BDSEQ] = MetricValue(UINT64, self.bdseq)
        metrics[REBIRTH] = MetricValue(BOOLEAN, False)
        self._session.publish(self.t_nbirth, encode(metric_map(metrics), timestamp_ms=self._ms(), seq=0))
        self.sent["NBIRTH"] += 1
        if not self.born:
            self.log.info("Sparkplug edge node online", broker=self._session.address, bdSeq=self.bdseq)
        self.born = True
        self._told_unreachable = False
        self.online_since = time.monotonic()
        self.offline_since = None

    def _went_offline(self) -> None:
        self._connecting = False
        if self.born:
            self.log.warning("MQTT broker lost: buffering state changes", error=self._session.error)
            self._told_unreachable = True
        elif not self._told_unreachable:  # e.g. the broker refused the user name or password
            self._told_unreachable = True
            self.log.warning("MQTT broker not reachable, retrying", error=self._session.error)
        self.born = False
        self.online_since = None
        if self.offline_since is None:
            self.offline_since = time.monotonic()

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) % 256
        return self.seq

    def _ms(self) -> int:
        return int(self._wall() * 1000)

    def _drain_inbox(self) -> None:
        while self._inbox:
            self._on_stats(self._inbox.popleft())

    def _on_stats(self, stats: LineStats) -> None:
        values = node_metrics(stats)
        changes = {k: v for k, v in values.items() if self._last.get(k) != v}
        if not changes:
            return
        first = not self._last  # the initial values: what the first NBIRTH says, not a change to keep
        self._last.update(changes)
        # when the line built these stats, as wall time (LineStats.t is the monotonic clock)
        ts = int((self._wall() - max(0.0, self._now() - stats.t)) * 1000)
        # live changes go out at once even while history is still being replayed: the NBIRTH already
        # carried the current values, and history is told apart by its flag and timestamps
        if self.born and self._session.connected:
            if self._send_ndata(metric_map(changes), ts, historical=False) is None:
                self.buffer.add(ts, changes)  # the session went in the meantime: keep it for the next birth
        elif not first:
            self.buffer.add(ts, changes)

    def _send_ndata(self, metrics: Sequence[tuple[str, MetricValue, int | None]], ts: int, *, historical: bool) -> Any:
        payload = encode(metrics, timestamp_ms=ts, seq=self._next_seq(), historical=historical)
        info = self._session.publish(topic(self.group, "NDATA", self.node), payload)
        if info is None:
            return None
        self.sent["NDATA"] += 1
        if historical:
            self.sent["historical"] += 1
        return info

    def _replay(self) -> None:
        """After a new NBIRTH, the changes made while away, as historical metrics at their own times."""
        batch = self.buffer.take(HISTORICAL_PER_MESSAGE)
        metrics = [(k, v, ts) for ts, changes in batch for k, v in changes.items()]
        if self._send_ndata(metrics, self._ms(), historical=True) is None:
            self.buffer.items.extendleft(reversed(batch))  # not queued: the session went; replayed next time
            return
        if not len(self.buffer):
            if self.buffer.dropped_now:
                self.log.warning("store-and-forward buffer was full", dropped=self.buffer.dropped_now)
            self.buffer.dropped_now = 0

    def _final(self) -> None:
        """At stop: the last values and the NDEATH to a broker that is there; a clean disconnect."""
        s = self._session
        deadline = time.monotonic() + 3.0
        while (self._connecting or (s.connected and (self._need_birth or len(self.buffer)))) and (
            time.monotonic() < deadline
        ):
            if not s.loop(0.05):
                break
            if self._need_birth or self._rebirth_asked:
                self._birth()
            if self.born and len(self.buffer):
                self._replay()
        if s.connected and self.born:
            death = encode([(BDSEQ, MetricValue(UINT64, self.bdseq), None)], timestamp_ms=self._ms(), seq=None)
            info = s.publish(topic(self.group, "NDEATH", self.node), death, qos=1)
            self.sent["NDEATH"] += 1
            while info is not None and not info.is_published() and time.monotonic() < deadline:
                if not s.loop(0.05):
                    break
        elif len(self.buffer):
            self.log.warning("MQTT broker away at stop: buffered state changes not published", n=len(self.buffer))
        s.disconnect()
        self.born = False

    # --- Prometheus ---
    def collector(self) -> Collector:
        return _EdgeCollector(self)


class _EdgeCollector(Collector):
    def __init__(self, node: EdgeNode) -> None:
        self.node = node

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        n = self.node
        yield GaugeMetricFamily("sorter_sparkplug_online", "1 while the edge node is born on the broker", n.born)
        yield GaugeMetricFamily(
            "sorter_sparkplug_buffered", "state changes waiting for the broker (store-and-forward)", len(n.buffer)
        )
        yield CounterMetricFamily(
            "sorter_sparkplug_dropped", "buffered state changes dropped (buffer full)", n.buffer.dropped
        )
        sent = CounterMetricFamily("sorter_sparkplug_messages", "Sparkplug messages published", labels=["type"])
        for k, v in n.sent.items():
            sent.add_metric([k], v)
        yield sent
