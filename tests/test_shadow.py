"""Shadow mode's logic with in-process fakes (docs/shadow.md): the shadow decision, the running summary, the
bounded runner that skips whole batches, the records' shadow table and its migration, the report and the
label log, the check that a shadow model has the live model's classes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from sorter.cli import app as cli_app
from sorter.config import RoutingConfig
from sorter.core.messages import Decision, FieldReading, FieldState, Piece, ShadowDecision
from sorter.core.shadow import ShadowSummary, accuracy, shadow_decisions
from sorter.line import records as records_mod
from sorter.line.records import RecordStore, load_shadow, shadow_crop
from sorter.line.shadow import ShadowRunner, check_labels
from sorter.line.virtualtime import InPlace
from sorter.reports.errors import ReportError
from sorter.reports.shadow import read_labels, shadow_report, shadow_text, write_shadow_html
from sorter.vision.classify import ModelError

pytestmark = pytest.mark.fast

LABELS = ("ndfeb", "ferrite", "smco", "steel", "other")
ROUTING = RoutingConfig(classes={"ndfeb": "ndfeb", "ferrite": "ferrite", "smco": "smco"}, min_confidence=0.5)


def crop(colour: int) -> np.ndarray:
    return np.full((20, 20, 3), colour, np.uint8)


def live(pid: int, cls: str, colour: int, n_views: int = 1) -> Decision:
    """A live decision for a piece whose crops are all `colour` (the fake classifier reads the class from it)."""
    piece = Piece(pid, 0.0, -5.0, 5.0, 100.0, 95.0, 105.0, 80.0, ("cam0",), n_views, [crop(colour)] * n_views)
    probs = {c: (0.9 if c == cls else 0.025) for c in LABELS}
    fraction = ROUTING.classes.get(cls, "residue")
    return Decision(piece, probs, cls, 0.9, fraction, field=FieldReading(None, FieldState.NO_BAR), model="live-1")


class FakeClassifier:
    """A classifier whose class for a crop is its pixel value (an index into its labels)."""

    def __init__(self, version: str = "cand-1", labels: tuple[str, ...] = LABELS, shift: int = 0) -> None:
        self.labels = labels
        self.version = version
        self.field_model = None
        self.path = Path(f"/models/{version}.onnx")
        self.shift = shift  # a candidate that moves every class by this many places: it disagrees everywhere
        self.calls = 0

    def predict(self, crops: list[np.ndarray]) -> np.ndarray:
        self.calls += 1
        out = np.full((len(crops), len(self.labels)), 0.01)
        for i, c in enumerate(crops):
            out[i, (int(c[0, 0, 0]) + self.shift) % len(self.labels)] = 0.96
        return out


class HeldExecutor(Executor):
    """Work handed over waits until the test releases it: a shadow thread that is behind, without timing."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Future[Any], Any, tuple[Any, ...]]] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self.waiting.append((fut, fn, args))
        return fut

    def release_one(self) -> None:
        fut, fn, args = self.waiting.pop(0)
        try:
            fut.set_result(fn(*args))
        except Exception as exc:
            fut.set_exception(exc)


# --- the shadow decision and the summary (core) ---


def test_shadow_decision_uses_the_live_pieces_field_and_routing() -> None:
    d = live(1, "ndfeb", 0)
    probs = [np.array([[0.02, 0.9, 0.02, 0.03, 0.03]])]  # the candidate sees ferrite
    [(back, s)] = shadow_decisions([d], probs, LABELS, ROUTING, None, "cand-1")
    assert back is d
    assert (s.piece_id, s.live_cls, s.live_fraction, s.cls, s.fraction, s.model) == (
        1,
        "ndfeb",
        "ndfeb",
        "ferrite",
        "ferrite",
        "cand-1",
    )
    assert not s.agrees and s.confidence == pytest.approx(0.9)
    # no view: the shadow has nothing to go on, as the live model would not either
    [(_, none)] = shadow_decisions([d], [None], LABELS, ROUTING, None, "cand-1")
    assert none.cls == "unknown" and none.fraction == "residue"


def test_summary_counts_agreement_by_class_confusion_and_fraction_changes() -> None:
    s = ShadowSummary(model="cand-1")
    mk = lambda a, b, fa, fb: ShadowDecision(0, a, fa, 0.9, b, fb, 0.9, "cand-1")  # noqa: E731
    s.add([mk("ndfeb", "ndfeb", "ndfeb", "ndfeb")] * 3 + [mk("ndfeb", "ferrite", "ndfeb", "ferrite")])
    s.add([mk("steel", "steel", "residue", "residue")])
    s.skip(7)
    d = s.as_dict()
    assert (d["compared"], d["skipped"], d["agree"], d["agreement"]) == (5, 7, 4, 0.8)
    assert d["by_class"]["ndfeb"] == {"pieces": 4, "agree": 3, "agreement": 0.75}
    assert d["by_class"]["steel"]["agreement"] == 1.0
    assert d["confusion"] == {"ndfeb": {"ferrite": 1, "ndfeb": 3}, "steel": {"steel": 1}}
    assert d["fraction_changes"] == {"ndfeb": {"ferrite": 1}}
    assert ShadowSummary().as_dict()["agreement"] is None


def test_accuracy_of_both_models() -> None:
    a = accuracy([("ndfeb", "ndfeb", "ferrite"), ("steel", "steel", "steel"), ("smco", "ndfeb", "smco")])
    assert a == {
        "pieces": 3,
        "live_correct": 2,
        "shadow_correct": 2,
        "live_accuracy": 0.6667,
        "shadow_accuracy": 0.6667,
    }


# --- the runner: its own executor, bounded, results on the loop ---


async def test_runner_skips_whole_batches_when_behind_and_delivers_in_order() -> None:
    ex, got = HeldExecutor(), []
    clf = FakeClassifier(shift=1)
    runner = ShadowRunner(clf, ex, [got.append], max_pending=2)  # type: ignore[arg-type]
    b1 = [live(1, "ndfeb", 0), live(2, "ferrite", 1, n_views=3)]
    b2 = [live(3, "smco", 2)]
    b3 = [live(4, "steel", 3), live(5, "other", 4)]
    runner.offer(b1, ROUTING)
    runner.offer(b2, ROUTING)
    runner.offer(b3, ROUTING)  # two batches already waiting: this one is skipped whole
    assert runner.pending == 2 and runner.summary.skipped == 2 and not got
    ex.release_one()
    ex.release_one()
    await runner.drain()
    assert [[s.piece_id for s in batch] for batch in got] == [[1, 2], [3]]
    assert runner.summary.compared == 3 and runner.summary.agree == 0
    # the crop of a differing piece, as PNG: its first view
    png = got[0][0].crop_png
    assert png is not None
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (20, 20, 3) and int(img[0, 0, 0]) == 0
    runner.offer(b3, ROUTING)  # room again
    assert runner.pending == 1


async def test_runner_agreeing_pieces_carry_no_crop_and_a_failing_batch_is_counted() -> None:
    got: list[list[ShadowDecision]] = []
    errors: list[BaseException] = []
    runner = ShadowRunner(FakeClassifier(), InPlace(), [got.append], on_error=errors.append)  # type: ignore[arg-type]
    runner.offer([live(1, "ndfeb", 0), live(2, "steel", 3)], ROUTING)
    await runner.drain()
    assert [s.agrees for s in got[0]] == [True, True] and all(s.crop_png is None for s in got[0])
    bad = live(3, "ndfeb", 0)
    object.__setattr__(bad.piece, "crops", [np.zeros((4, 4), np.uint8)])  # not a BGR crop: predict refuses it

    def refuse(crops: list[np.ndarray]) -> np.ndarray:
        raise ValueError("not a BGR crop")

    runner.classifier.predict = refuse  # type: ignore[method-assign]
    runner.offer([bad], ROUTING)
    await runner.drain()
    assert runner.failed == 1 and len(errors) == 1 and runner.summary.compared == 2


def test_shadow_model_must_have_the_live_models_classes_in_order() -> None:
    live_clf = FakeClassifier("live-1")
    check_labels(FakeClassifier("cand-1"), live_clf)  # type: ignore[arg-type]
    with pytest.raises(ModelError) as err:
        check_labels(FakeClassifier("cand-2", labels=LABELS[::-1]), live_clf)  # type: ignore[arg-type]
    msg = str(err.value)
    assert "cand-2" in msg and "live-1" in msg and str(list(LABELS)) in msg and str(list(LABELS[::-1])) in msg


# --- records ---


def sd(pid: int, live_cls: str, cls: str, png: bytes | None = b"png", model: str = "cand-1") -> ShadowDecision:
    crop_png = png if live_cls != cls else None
    return ShadowDecision(pid, live_cls, live_cls, 0.9, cls, cls, 0.8, model, "live-1", crop_png)


def test_records_keep_shadow_rows_and_a_bounded_number_of_crops(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(records_mod, "SHADOW_CROPS_MAX", 2)
    db = tmp_path / "r.sqlite"
    store = RecordStore(db, "run-1", wall=lambda: 1000.0)
    store.add_shadow([sd(1, "ndfeb", "ndfeb"), sd(2, "ndfeb", "ferrite", b"A"), sd(3, "steel", "other", b"B")])
    store.add_shadow([sd(4, "smco", "ndfeb", b"C")])  # a third differing piece: its row, not its crop
    store.close()
    rows = load_shadow(db, "run-1")
    assert [(r["piece_id"], r["live_cls"], r["cls"], r["has_crop"]) for r in rows] == [
        (1, "ndfeb", "ndfeb", 0),
        (2, "ndfeb", "ferrite", 1),
        (3, "steel", "other", 1),
        (4, "smco", "ndfeb", 0),
    ]
    assert shadow_crop(db, "run-1", 3) == b"B" and shadow_crop(db, "run-1", 4) is None


def test_an_older_database_gets_the_shadow_table(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(records_mod._PIECES_TABLE + ";")  # a database from before shadow mode: pieces only
    con.close()
    assert load_shadow(db) == []  # read-only readers cope with it before any migration
    store = RecordStore(db, "run-2", wall=lambda: 1.0)
    store.add_shadow([sd(7, "ndfeb", "steel")])
    store.close()
    assert [r["piece_id"] for r in load_shadow(db)] == [7]


# --- the report and the label log ---


def write_labels(folder: Path, rows: list[tuple[str, ...]]) -> None:
    folder.mkdir(exist_ok=True)
    text = "time,user,run_id,piece_id,file,old,new\n" + "".join(",".join(r) + "\n" for r in rows)
    (folder / "labels.csv").write_text(text)


def test_label_log_newest_row_per_piece_wins_and_discard_unlabels(tmp_path: Path) -> None:
    write_labels(
        tmp_path / "lab",
        [
            ("2026-12-07T01:00:00", "tech", "run-1", "2", "a.png", "ndfeb", "ferrite"),
            ("2026-12-07T01:05:00", "tech", "run-1", "2", "a.png", "ferrite", "ndfeb"),  # corrected: ndfeb
            ("2026-12-07T01:00:00", "tech", "run-1", "3", "b.png", "steel", "other"),
            ("2026-12-07T01:02:00", "tech", "run-1", "3", "b.png", "other", "discard"),  # thrown out: no label
            ("2026-12-07T01:00:00", "tech", "run-0", "2", "c.png", "smco", "smco"),
            ("2026-12-07T01:00:00", "tech", "run-0", "4", "d.png", "steel", "steel"),
            ("2026-12-07T01:00:00", "tech", "run-0", "4", "", "steel", "undone"),  # taken back, the same second
        ],
    )
    assert read_labels(tmp_path / "lab") == {("run-1", 2): "ndfeb", ("run-0", 2): "smco"}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "labels.csv").write_text("time,piece_id\n1,2\n")
    with pytest.raises(ReportError, match="lacks columns"):
        read_labels(tmp_path / "bad")
    with pytest.raises(ReportError, match="no label log"):
        read_labels(tmp_path)


def shadow_db(tmp_path: Path) -> Path:
    db = tmp_path / "r.sqlite"
    store = RecordStore(db, "run-1", wall=lambda: 1000.0)
    png = cv2.imencode(".png", crop(9))[1].tobytes()
    store.add_shadow([sd(1, "ndfeb", "ndfeb"), sd(2, "ndfeb", "ferrite", png), sd(3, "steel", "steel")])
    store.event("shadow_stop", user="shutdown", model="cand-1", compared=3, skipped=4, agreement=0.6667)
    store.close()
    return db


def test_shadow_report_with_labels_and_its_page(tmp_path: Path) -> None:
    db = shadow_db(tmp_path)
    write_labels(
        tmp_path / "lab",
        [
            ("t1", "tech", "run-1", "2", "x.png", "ndfeb", "ferrite"),  # the shadow was right
            ("t1", "tech", "run-1", "3", "y.png", "steel", "steel"),
        ],
    )
    r = shadow_report(db, labels=tmp_path / "lab")
    assert (r["run_id"], r["compared"], r["skipped"], r["agree"]) == ("run-1", 3, 4, 2)
    assert r["by_class"]["ndfeb"]["agreement"] == 0.5
    assert r["confusion"]["ndfeb"] == {"ferrite": 1, "ndfeb": 1}
    assert [d["piece_id"] for d in r["differing"]] == [2]
    assert r["labelled"] == {
        "pieces": 2,
        "live_correct": 1,
        "shadow_correct": 2,
        "live_accuracy": 0.5,
        "shadow_accuracy": 1.0,
    }
    assert "agreement 66.7 %" in shadow_text(r)
    page = tmp_path / "s.html"
    write_shadow_html(page, r, db)
    html = page.read_text()
    assert "data:image/png;base64," in html and "piece 2" in html
    with pytest.raises(ReportError, match="run-9 has no shadow decisions"):
        shadow_report(db, "run-9")


def test_report_command_shadow_json(tmp_path: Path) -> None:
    db = shadow_db(tmp_path)
    root = Path(__file__).resolve().parents[1]
    res = CliRunner().invoke(
        cli_app, ["report", "-c", str(root / "config" / "sim.yaml"), "--shadow", "--db", str(db), "--json", "-"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["agreement"] == pytest.approx(2 / 3, abs=1e-4) and out["differing"][0]["piece_id"] == 2
    res = CliRunner().invoke(
        cli_app, ["report", "-c", str(root / "config" / "sim.yaml"), "--shadow", "--db", str(tmp_path / "none.db")]
    )
    assert res.exit_code == 2 and "does not exist" in res.output


def test_runner_results_reach_the_loop_taps_not_the_worker_thread() -> None:
    """Taps (the records, the HMI) are called on the loop that offered the batch, never on the shadow thread."""
    from concurrent.futures import ThreadPoolExecutor

    seen: list[int] = []

    async def main() -> None:
        import threading

        runner = ShadowRunner(
            FakeClassifier(),  # type: ignore[arg-type]
            ThreadPoolExecutor(1),
            [lambda batch: seen.append(threading.get_ident())],
        )
        runner.offer([live(1, "ndfeb", 0)], ROUTING)
        await runner.drain()
        runner.close()
        assert seen == [threading.get_ident()]

    asyncio.run(main())
