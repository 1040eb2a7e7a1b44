"""`sorter report`: shift and batch reports from the piece records alone (sorter/reports/); and
`sorter sim crosscheck` (sim/crosscheck.py), which compares them with the demo's report of the same run."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from sim.cli import sim_app
from sim.config import load_sim_config
from sim.crosscheck import crosscheck_run
from sorter.cli import app
from sorter.config import MassRule, ReportsConfig, load_config
from sorter.line.records import RecordStore
from sorter.reports.load import load_range
from sorter.reports.mass import estimate_mass_g
from sorter.reports.shift import ReportError, make_report
from sorter.reports.times import iso
from tests.hwsim import write_config

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 28, 6, 0, 0).astimezone().timestamp()  # 06:00 local: a shift's start
ROUTE = {"ndfeb": "ndfeb", "ferrite": "ferrite_smco", "smco": "ferrite_smco", "steel": "residue", "other": "residue"}
CLASSES = list(ROUTE)


@pytest.fixture
def cfg(tmp_path):
    c = load_sim_config(ROOT / "config" / "sim.yaml")
    return c.model_copy(update={"records": c.records.model_copy(update={"path": tmp_path / "records.sqlite"})})


def piece(i: int, t: float, cls: str, fraction: str, outcome: str, conf: float = 0.99) -> dict[str, Any]:
    accepted = outcome == "accepted"
    return {
        "id": i,
        "t_wall": t,
        "t_capture": t - 0.1,
        "count": 1000 + 400 * i,
        "count32": 1000 + 400 * i,
        "x_mm": 300.0,
        "x0_mm": 295.0,
        "x1_mm": 305.0,
        "length_mm": 20.0,
        "area_mm2": 200.0,
        "cameras": "cam0",
        "n_views": 2,
        "probs": {c: (conf if c == cls else (1 - conf) / 4) for c in CLASSES},
        "image_probs": {c: (conf if c == cls else (1 - conf) / 4) for c in CLASSES},
        "field_mT": 250.0,
        "field_state": "ok",
        "threshold": 0.9,
        "model": "m1",
        "cls": cls,
        "confidence": conf,
        "fraction": fraction,
        "bank": "A" if accepted else None,
        "valve_mask": 3 if accepted else None,
        "open_at": 5000 if accepted else None,
        "open_for": 200 if accepted else None,
        "outcome": "pending" if accepted else outcome,
    }


def build_db(path: Path, monkeypatch) -> dict[str, Any]:
    """Two runs: r1 06:00-06:10 (600 pieces, a PLC alarm and a hold 06:03:20-06:03:50), r2 06:20-06:22."""
    now = {"t": T0}
    expected: dict[str, Any] = {"r1": {}, "r2": {}}

    def run(run_id: str, t_start: float, n: int, hold: tuple[float, float] | None) -> None:
        store = RecordStore(path, run_id, wall=lambda: now["t"])  # the events' wall clock, driven by hand
        now["t"] = t_start
        store.event("start", model="m1")
        for i, (old, new) in enumerate(
            [("Stopped", "Resetting"), ("Resetting", "Idle"), ("Idle", "Starting"), ("Starting", "Execute")]
        ):
            now["t"] = t_start + 0.2 * (i + 1)
            store.event("state", old=old, new=new, why="test")
        counts: dict[str, int] = {}  # where the service routed them (its counters)
        ended: dict[str, int] = {}  # where they went: no air for an expired command
        for i in range(n):
            t = t_start + 1 + i  # one piece a second
            cls = CLASSES[i % 5]
            held = hold is not None and hold[0] <= t < hold[1]
            fraction = ROUTE[cls] if not held else "residue"
            outcome = (
                "held" if held and ROUTE[cls] != "residue" else ("no_eject" if fraction == "residue" else "accepted")
            )
            if i % 97 == 5 and outcome == "accepted":
                outcome = "expired"  # recorded with the fraction it was routed to, but no air fired
            store.add_piece(piece(i, t, cls, fraction, outcome))
            if outcome == "accepted":
                store.update_outcome(i, "accepted", i, t + 0.05, 120.0 + i % 50)
            counts[fraction] = counts.get(fraction, 0) + 1
            dest = "residue" if outcome == "expired" else fraction
            ended[dest] = ended.get(dest, 0) + 1
            if hold is not None and t == hold[0]:
                now["t"] = t
                store.event("alarm", alarm="plc_offline", reason="no answer", action="check the cable")
                store.event("state", old="Execute", new="Holding", why="PLC link lost")
                store.event("state", old="Holding", new="Held", why="")
            if hold is not None and t == hold[1]:
                now["t"] = t
                store.event("alarm_cleared", alarm="plc_offline")
                store.event("state", old="Held", new="Unholding", why="PLC link back")
                store.event("state", old="Unholding", new="Execute", why="")
        now["t"] = t_start + n + 5
        store.event("state", old="Execute", new="Stopping", why="service stopping")
        store.event("state", old="Stopping", new="Stopped", why="service stopping")
        store.event("stop", pieces=n, **{f"fraction_{f}": c for f, c in counts.items()})
        store.close()
        expected[run_id] = {"pieces": n, "routed": counts, "ended": ended}

    run("r1", T0, 600, (T0 + 201, T0 + 231))
    run("r2", T0 + 1200, 120, None)
    return expected


def test_mass_estimate_is_area_times_nominal_thickness_times_density():
    # a 20 x 10 mm NdFeB block: width 10 mm -> 0.4 x 10 + 1 = 5 mm thick; 200 mm² x 5 mm x 7.5 g/cm³
    model = ReportsConfig().mass_model  # the config's default
    row = {"cls": "ndfeb", "area_mm2": 200.0, "length_mm": 20.0, "x0_mm": 0.0, "x1_mm": 10.0}
    assert estimate_mass_g(row, model) == pytest.approx(7.5)
    assert estimate_mass_g({**row, "cls": "steel"}, model) == pytest.approx(200 * 3.0 * 7.85 / 1000)
    assert estimate_mass_g({**row, "area_mm2": None}, model) == 0.0


def test_mass_model_comes_from_the_line_config(tmp_path, cfg, monkeypatch):
    # a plant's own rule in YAML (reports.mass_model); a class without a rule uses `other`'s
    text = (ROOT / "config" / "sim.yaml").read_text()
    own = "reports:\n  mass_model:\n    other: {density_g_cm3: 2.0, frac_of_width: 0, offset_mm: 2, max_mm: 5}\n"
    (tmp_path / "line.yaml").write_text(text + "\n" + own)
    model = load_config(tmp_path / "line.yaml").reports.mass_model
    assert set(model) == {"other"}
    row = {"cls": "ndfeb", "area_mm2": 200.0, "length_mm": 20.0, "x0_mm": 0.0, "x1_mm": 10.0}
    assert estimate_mass_g(row, model) == pytest.approx(200 * 2.0 * 2.0 / 1000)
    # the report reads cfg.reports.mass_model: twice the density, twice the estimated mass
    build_db(cfg.records.path, monkeypatch)
    s1 = make_report(cfg, tmp_path / "a.html", run="r2")
    default = ReportsConfig().mass_model
    doubled = {c: r.model_copy(update={"density_g_cm3": 2 * r.density_g_cm3}) for c, r in default.items()}
    heavy = cfg.model_copy(update={"reports": ReportsConfig(mass_model=doubled)})
    s2 = make_report(heavy, tmp_path / "b.html", run="r2")
    assert s2["mass_est_kg"] == pytest.approx(2 * s1["mass_est_kg"], abs=0.002) and s1["mass_est_kg"] > 0
    assert s2["mass_model"]["ndfeb"]["density_g_cm3"] == 15.0
    # `other` is required (the fallback), unknown classes are refused
    rule = MassRule(density_g_cm3=7.5, frac_of_width=0.4, offset_mm=1.0, max_mm=20.0)
    with pytest.raises(ValidationError, match="a rule for `other` is needed"):
        ReportsConfig(mass_model={"ndfeb": rule})
    with pytest.raises(ValidationError, match="unknown classes"):
        ReportsConfig(mass_model={"other": rule, "gold": rule})


def test_report_counts_balance_and_outputs(tmp_path, cfg, monkeypatch):
    expected = build_db(cfg.records.path, monkeypatch)
    out = tmp_path / "out" / "shift.html"
    s = make_report(
        cfg,
        out,
        pdf=tmp_path / "out" / "shift.pdf",
        csv_path=tmp_path / "out" / "shift.csv",
        summary_json=tmp_path / "out" / "shift.json",
    )
    n = 600 + 120
    assert s["pieces"] == n
    # fraction counts are the records' (both runs): routed as decided, ended in after what the air did
    for f in cfg.fractions:
        r = s["fractions"][f]
        assert r["routed"] == sum(expected[run]["routed"].get(f, 0) for run in ("r1", "r2"))
        assert r["count"] == sum(expected[run]["ended"].get(f, 0) for run in ("r1", "r2"))
    assert s["fractions"]["ndfeb"]["count"] < s["fractions"]["ndfeb"]["routed"]  # its expired commands
    assert sum(r["count"] for r in s["fractions"].values()) == sum(r["routed"] for r in s["fractions"].values()) == n
    # the mass balance closes: in = every record = sum of the fractions, by count and by estimated mass
    b = s["mass_balance"]
    assert b["closes"] and b["in_count"] == b["out_count"] == n and b["unaccounted"] == 0
    assert b["in_mass_est_kg"] == pytest.approx(sum(r["mass_est_kg"] for r in s["fractions"].values()), abs=0.01)
    assert s["classes"]["ndfeb"]["count"] == n // 5
    # outcomes, holds, alarms, stops, state times
    assert s["outcomes"]["held"] == s["held"] > 0 and s["expired"] > 0
    assert s["ejects_sent"] == s["outcomes"]["accepted"]
    assert s["decision_latency_ms"]["n"] == s["outcomes"]["accepted"]
    (alarm,) = s["alarms"]
    assert alarm["alarm"] == "plc_offline" and alarm["duration_s"] == pytest.approx(30, abs=0.01)
    assert [x["state"] for x in s["stops"]] == ["Held", "Stopped", "Stopped"]
    assert s["stops"][0]["why"] == "PLC link lost"
    assert s["state_s"]["Held"] == pytest.approx(30, abs=0.01)
    # each run's counters at stop equal its records
    assert [rc["run_id"] for rc in s["run_checks"]] == ["r1", "r2"] and all(rc["match"] for rc in s["run_checks"])
    # the files
    text = out.read_text()
    assert text.startswith("<!doctype html>") and text.count("data:image/png;base64,") >= 3
    assert "Mass balance" in text and "plc_offline" in text and "<script" not in text
    assert (tmp_path / "out" / "shift.pdf").read_bytes()[:5] == b"%PDF-"
    with (tmp_path / "out" / "shift.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n and {r["run_id"] for r in rows} == {"r1", "r2"}
    assert json.loads(rows[0]["probs"])["ndfeb"] == pytest.approx(0.99)
    assert json.loads((tmp_path / "out" / "shift.json").read_text())["pieces"] == n


def test_time_range_and_run_filters(tmp_path, cfg, monkeypatch):
    build_db(cfg.records.path, monkeypatch)
    # 06:02:00-06:05:00 local: r1's pieces 119..298 (t = T0 + 1 + i)
    s = make_report(cfg, tmp_path / "a.html", t_from="2026-11-28T06:02", t_to="2026-11-28T06:05:00")
    assert s["pieces"] == 180 and s["from"] == T0 + 120 and s["to"] == T0 + 300
    assert [r["run_id"] for r in s["runs"]] == ["r1"]
    assert s["run_checks"] == []  # only part of r1 is in range: its counters cannot be compared
    assert s["state_s"]["Held"] == pytest.approx(30, abs=0.01) and sum(s["state_s"].values()) == pytest.approx(180)
    # an ISO time with an offset is honoured (the same instant in UTC)
    utc = datetime.fromtimestamp(T0 + 120, UTC).isoformat()
    assert make_report(cfg, tmp_path / "b.html", t_from=utc, t_to=iso(T0 + 300))["pieces"] == 180
    # one run, a batch report
    s = make_report(cfg, tmp_path / "c.html", run="r2")
    assert s["pieces"] == 120 and s["alarms"] == [] and s["run_checks"][0]["match"]
    assert "Batch report, run r2" in (tmp_path / "c.html").read_text()


def test_unknown_fraction_leaves_the_balance_open(tmp_path, cfg, monkeypatch):
    build_db(cfg.records.path, monkeypatch)
    store = RecordStore(cfg.records.path, "r3")
    store.add_piece(piece(1, T0 + 3000, "ndfeb", "mystery_bin", "no_eject"))
    store.close()
    s = make_report(cfg, tmp_path / "r.html", run="r3", pdf=tmp_path / "r.pdf")  # no events: empty state table
    assert not s["mass_balance"]["closes"] and s["mass_balance"]["unaccounted"] == 1
    assert s["state_s"] == {} and (tmp_path / "r.pdf").read_bytes()[:5] == b"%PDF-"


def test_bad_input_exits_2_with_a_clear_message(tmp_path, cfg, monkeypatch):
    runner = CliRunner()
    cfg_path = write_config(cfg, tmp_path / "line.yaml")
    base = ["report", "--config", str(cfg_path), "--out", str(tmp_path / "x.html")]

    r = runner.invoke(app, base)
    assert r.exit_code == 2 and "does not exist" in r.output

    build_db(cfg.records.path, monkeypatch)
    cases = {
        ("--from", "2026-11-28T07:00", "--to", "2026-11-28T06:00"): "is not before --to",
        ("--from", "2026-11-29T06:00"): "no piece records from",
        ("--run", "nope"): "no piece records run nope (runs in the database: r1, r2)",
        ("--from", "yesterday"): "is not an ISO 8601",
        ("--db", str(tmp_path / "missing.sqlite")): "missing.sqlite does not exist",
        ("--report-json", str(tmp_path / "nope.json")): "No such option",  # the cross-check moved to sim/
    }
    for args, message in cases.items():
        r = runner.invoke(app, [*base, *args])
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (args, r.output)
    assert not (tmp_path / "x.html").exists()

    r = runner.invoke(app, [*base, "--run", "r2"])
    assert r.exit_code == 0 and "120 pieces" in r.output and "mass balance closes" in r.output


def test_cross_check_with_a_demo_report(tmp_path, cfg, monkeypatch):
    """`sorter sim crosscheck`: the report's numbers against a demo report (the product's report has none)."""
    build_db(cfg.records.path, monkeypatch)
    s = make_report(cfg, tmp_path / "a.html", run="r2")
    assert "demo_check" not in s and "Cross-check with the demo" not in (tmp_path / "a.html").read_text()
    demo = {
        "records": s["pieces"],
        "eject_outcomes": s["outcomes"],
        "ejects_sent": s["ejects_sent"],
        "decision_latency_ms": s["decision_latency_ms"],
        "fractions": {
            f: {"count": r["count"] + 1, "mass_g": 1000.0, "purity": 0.99, "recovery": 0.97}
            for f, r in s["fractions"].items()
        },
        "pieces_fed": 123,
        "pieces_binned": 123,
    }
    (tmp_path / "demo.json").write_text(json.dumps(demo))
    check = crosscheck_run(cfg, tmp_path / "demo.json", run="r2")
    assert check["all_equal"]
    assert all(b["difference"] == -1 for b in check["bins"].values())  # bins are truth: not required to be equal
    runner = CliRunner()
    base = ["crosscheck", "--config", str(write_config(cfg, tmp_path / "line.yaml")), "--run", "r2", "--demo-report"]
    r = runner.invoke(sim_app, [*base, str(tmp_path / "demo.json"), "--json", str(tmp_path / "check.json")])
    assert r.exit_code == 0, r.output
    assert "CROSS-CHECK WITH THE DEMO" in r.output and "cross-check with the demo report: equal" in r.output
    assert json.loads((tmp_path / "check.json").read_text()) == check
    with pytest.raises(ReportError, match="not a `sorter demo --json` report"):
        (tmp_path / "bad.json").write_text("[1, 2]")
        crosscheck_run(cfg, tmp_path / "bad.json", run="r2")
    r = runner.invoke(sim_app, [*base, str(tmp_path / "nope.json")])
    assert r.exit_code == 2 and "cannot read the demo report" in r.output, r.output
    demo["records"] += 1
    (tmp_path / "demo.json").write_text(json.dumps(demo))
    assert not crosscheck_run(cfg, tmp_path / "demo.json", run="r2")["all_equal"]
    r = runner.invoke(sim_app, [*base, str(tmp_path / "demo.json")])
    assert r.exit_code == 1 and "cross-check with the demo report: DIFFERENT: records" in r.output, r.output


def test_load_range_refuses_from_after_to(cfg):
    with pytest.raises(ReportError, match="is not before"):
        load_range(cfg.records.path, T0 + 10, T0)
