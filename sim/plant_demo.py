"""`make plant-demo` (`sorter plant-demo`): two simulated lines feeding one plant's MQTT broker and
PostgreSQL, each of which is stopped for a while as the lines run.

    mosquitto (loopback, user/password) <- Sparkplug B edge node of line-a, line-b -> observer (own decoder)
    PostgreSQL (loopback, partitioned)  <- journal forwarder of line-a, line-b  -> `sorter report --db`

Each line is a `sorter demo` of its own (a process with its service, plus its simulator's process), so
the two lines share nothing but the broker and the database, as on a plant. To fit two lines on two
cores the demo feeds fewer pieces and renders fewer frames than `make demo` (FEED_PER_S, FPS below).

What it prints (one JSON object): per line the final per-fraction counts
- `report`: from the line's own journal, as `sorter report` counts them (where each piece ended);
- `broker`: the last values of `Fractions/<f>/Pieces` that a subscriber of its own saw on the broker
  (NBIRTH/NDATA, historical metrics left aside), decoded by sim/spb_decode.py, not by the product;
- `database`: from the plant's PostgreSQL, through the plant report (`sorter report --db`);
plus the rows per line in PostgreSQL against the records in its journal (and duplicates), the line's
states during each outage (from its journal's state events), and `outages`: what was stopped and when.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from sim.plantenv import Broker, Postgres, mosquitto_missing, postgres_missing
from sim.spb_decode import decode_payload
from sorter.config import LineConfig, load_config
from sorter.reports.plant import summarise_plant
from sorter.reports.shift import summarise_records

LINES = ("line-a", "line-b")
GROUP = "demo-plant"
FEED_PER_S = 8.0  # pieces a second per line (`make demo`: 32)
FPS = 24.0  # camera frames a second (`make demo`: 60)
BROKER_OUTAGE = (12.0, 10.0)  # (seconds into the feed, seconds down)
DB_OUTAGE = (30.0, 10.0)
USERS = {"sorter": "demo-line-password", "observer": "demo-observer-password"}


class Observer:
    """A Sparkplug host of sorts: the latest live value of every metric of every edge node of the group."""

    def __init__(self, port: int) -> None:
        self.values: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plant-demo-observer")
        self.c.username_pw_set("observer", USERS["observer"])
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"spBv1.0/{GROUP}/#", qos=1)
        self.c.on_message = self._message
        self.c.reconnect_delay_set(1, 2)
        self.c.connect("127.0.0.1", port, keepalive=5)
        self.c.loop_start()

    def _message(self, client: Any, userdata: Any, msg: Any) -> None:
        _, _, kind, node = msg.topic.split("/")[:4]
        p = decode_payload(msg.payload)
        with self._lock:
            seen = self.seen.setdefault(node, {})
            seen[kind] = seen.get(kind, 0) + 1
            seen["historical_metrics"] = seen.get("historical_metrics", 0) + sum(m.is_historical for m in p.metrics)
            if kind in ("NBIRTH", "NDEATH"):  # which session: a death that names an old bdSeq is stale
                seen.setdefault(f"{kind}_bdSeq", []).append(p.values().get("bdSeq"))
            if kind in ("NBIRTH", "NDATA"):
                self.values.setdefault(node, {}).update(p.values(live_only=True))

    def fractions(self, node: str) -> dict[str, int]:
        with self._lock:
            v = self.values.get(node, {})
            return {
                k.split("/")[1]: int(x) for k, x in v.items() if k.startswith("Fractions/") and k.endswith("/Pieces")
            }

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def line_config(base: Path, run_dir: Path, line: str, broker: Broker, db: Postgres) -> Path:
    """The demo line's config for `line`: its name, its edge node and forwarder; no HMI or OPC UA server."""
    raw = yaml.safe_load(base.read_text())
    raw["line"] = line
    raw["classifier"]["model"] = str((base.parent / raw["classifier"]["model"]).resolve())
    raw["hmi"] = None
    raw["opcua_server"] = None
    raw["simulator"]["fps"] = FPS
    raw["simulator"]["feed"]["rate_per_s"] = FEED_PER_S
    raw["sparkplug"] = {
        "host": "127.0.0.1",
        "port": broker.port,
        "group_id": GROUP,
        "username": "sorter",
        "password": USERS["sorter"],
        "keepalive_s": 5,
    }
    raw["plant_db"] = {"url": db.url, "lag_alarm_s": 60.0}
    raw["records"]["path"] = str(run_dir / line / "records.sqlite")  # where `sorter demo --out` keeps it
    path = run_dir / f"{line}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def journal_states(journal: Path, t0: float, t1: float) -> tuple[list[str], list[str]]:
    """The line's PackML states over [t0, t1] from its journal's state events, and why it left Execute."""
    con = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    rows = con.execute("SELECT t_wall, detail FROM events WHERE kind = 'state' ORDER BY t_wall").fetchall()
    con.close()
    before = [json.loads(d)["new"] for t, d in rows if t <= t0]
    during = [json.loads(d) for t, d in rows if t0 < t <= t1]
    why = sorted({d.get("why", "?") for d in during if d.get("old") == "Execute"})
    return ([before[-1]] if before else []) + [d["new"] for d in during], why


async def run_plant_demo(duration: float, seed: int, run_dir: Path, base_config: Path) -> dict[str, Any]:
    for why in (mosquitto_missing(), postgres_missing()):
        if why:
            raise RuntimeError(why)
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    broker = Broker(run_dir / "mqtt", users=USERS)
    db = Postgres(run_dir / "pg")
    outages: list[dict[str, Any]] = []
    procs: dict[str, asyncio.subprocess.Process] = {}
    observer: Observer | None = None
    try:
        broker.start()
        db.init()
        observer = Observer(broker.port)
        configs = {line: line_config(base_config, run_dir, line, broker, db) for line in LINES}
        for k, line in enumerate(LINES):
            log = (run_dir / f"{line}.log").open("wb")
            procs[line] = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sorter",
                "demo",
                "--config",
                str(configs[line]),
                "--duration",
                str(duration),
                "--seed",
                str(seed + k),
                "--out",
                str(run_dir / line),
                "--json",
                "--log-level",
                "info",
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        t_feed = await _wait_all_producing(observer, procs)
        for what, (at, down) in sorted({"broker": BROKER_OUTAGE, "database": DB_OUTAGE}.items(), key=lambda kv: kv[1]):
            await asyncio.sleep(max(0.0, t_feed + at - time.monotonic()))
            t0 = time.time()
            await asyncio.to_thread(broker.stop if what == "broker" else db.stop)
            await asyncio.sleep(down)
            await asyncio.to_thread(broker.start if what == "broker" else db.start)
            outages.append(
                {
                    "stopped": what,
                    "from": round(t0, 3),
                    "to": round(time.time(), 3),
                    "down_s": round(time.time() - t0, 1),
                }
            )
        reports = {}
        for line, p in procs.items():
            out, _ = await p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"{line}: sorter demo exited with {p.returncode} (see {run_dir / (line + '.log')})")
            reports[line] = json.loads(out)
        await asyncio.sleep(1.0)  # the observer's last messages (the final NDATA and the NDEATH)
        return _result(configs, reports, observer, db, outages)
    finally:
        for p in procs.values():
            if p.returncode is None:
                p.kill()
                await p.wait()
        if observer is not None:
            observer.close()
        broker.stop()
        db.cleanup()


async def _wait_all_producing(observer: Observer, procs: dict[str, asyncio.subprocess.Process]) -> float:
    """Until every line's edge node says Execute (its demo feeds from then on); the monotonic time then."""
    end = time.monotonic() + 90
    while time.monotonic() < end:
        for line, p in procs.items():
            if p.returncode is not None:
                raise RuntimeError(f"{line}: sorter demo exited early with {p.returncode}")
        with observer._lock:
            states = {line: observer.values.get(line, {}).get("Line/State") for line in procs}
        if all(s == "Execute" for s in states.values()):
            return time.monotonic()
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the lines did not reach Execute within 90 s: {states}")


def _result(
    configs: dict[str, Path], reports: dict[str, Any], observer: Observer, db: Postgres, outages: list[dict[str, Any]]
) -> dict[str, Any]:
    out: dict[str, Any] = {"lines": {}, "outages": outages}
    cfg0 = load_config(configs[LINES[0]], LineConfig)
    _, plant = summarise_plant(cfg0, db.url, list(LINES), None, None)
    with psycopg.connect(db.url) as conn:
        for line in LINES:
            cfg = load_config(configs[line], LineConfig)
            journal = cfg.records.path
            _, own = summarise_records(cfg, db=journal)
            n_rows, n_keys = conn.execute(
                "SELECT count(*), count(DISTINCT (run_id, piece_id)) FROM plant.pieces WHERE line = %s", (line,)
            ).fetchone() or (0, 0)
            con = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
            n_journal = con.execute("SELECT count(*) FROM pieces").fetchone()[0]
            con.close()
            report_counts = {f: r["count"] for f, r in own["fractions"].items()}
            broker_counts = observer.fractions(line)
            db_counts = {f: r["count"] for f, r in plant["lines"][line]["fractions"].items()}
            out["lines"][line] = {
                "report": report_counts,
                "broker": broker_counts,
                "database": db_counts,
                "equal": report_counts == broker_counts == db_counts,
                "rows": {"journal": n_journal, "database": n_rows, "duplicates": n_rows - n_keys},
                "states_during_outages": {
                    o["stopped"]: journal_states(journal, o["from"], o["to"])[0] for o in outages
                },
                "left_execute_because": {
                    o["stopped"]: why for o in outages if (why := journal_states(journal, o["from"], o["to"])[1])
                },
                "sparkplug_messages": observer.seen.get(line, {}),
                "decision_latency_ms": reports[line].get("decision_latency_ms"),
                "frames_dropped": reports[line].get("frames_dropped"),
            }
    out["plant_mass_balance_closes"] = plant["plant"]["mass_balance"]["closes"]
    out["ok"] = out["plant_mass_balance_closes"] and all(
        v["equal"]
        and v["rows"]["journal"] == v["rows"]["database"]
        and v["rows"]["duplicates"] == 0
        and all(s == ["Execute"] for s in v["states_during_outages"].values())
        for v in out["lines"].values()
    )
    return out
