"""The label store (sorter/line/labelling.py): which crops are queued and in what order, labels into the dataset
layout with their sensors rows and log, undo, a restart, a full queue, a slow disk, a shadow model's
disagreement; and a labels folder as an added training set (sorter.ml.dataset.scan_addition)."""

from __future__ import annotations

import csv
import random
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from sorter.core.messages import Decision, FieldReading, FieldState, Piece, ShadowDecision
from sorter.line import labelling
from sorter.line.labelling import DISCARD, LOG_COLUMNS, UNDONE, LabelError, LabelStore
from sorter.ml.dataset import DatasetError, merge_datasets, scan_addition, scan_dataset

pytestmark = pytest.mark.fast

CLASSES = ("ndfeb", "smco", "ferrite", "steel", "other")
RUN = "run1"


def decision(
    pid: int,
    cls: str = "ndfeb",
    conf: float = 0.99,
    image_cls: str | None = None,
    field: float | None = 120.0,
    area: float = 200.0,
) -> Decision:
    crop = np.full((64, 64, 3), pid % 250, np.uint8)
    piece = Piece(pid, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, area, ("cam0",), 1, crops=[crop])
    rest = (1 - conf) / (len(CLASSES) - 1)
    probs = {c: (conf if c == cls else rest) for c in CLASSES}
    ic = image_cls or cls
    image_probs = {c: (0.6 if c == ic else 0.1) for c in CLASSES}
    reading = FieldReading(field, FieldState.OK) if field is not None else FieldReading(None, FieldState.MISSING)
    return Decision(piece, probs, cls, conf, "x", image_probs=image_probs, field=reading, model="m")


def store(root: Path, **kw: Any) -> LabelStore:
    opts: dict[str, Any] = {"queue_max": 50, "uncertain_below": 0.9, "sample_share": 0.0, "with_field": True}
    opts.update(kw)
    return LabelStore(root, RUN, classes=lambda: CLASSES, wall=lambda: 1_790_000_000.0, **opts)


def fed(root: Path, decisions: list[Decision], **kw: Any) -> LabelStore:
    s = store(root, **kw)
    s.add(decisions)
    s.drain()
    return s


def log_rows(root: Path) -> list[dict[str, str]]:
    with (root / "labels.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def sensor_rows(root: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in root.glob("*/sensors.csv"):
        with p.open(newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["file", "field_mT", "area_mm2"]
        out |= {f"{p.parent.name}/{r[0]}": r for r in rows[1:]}
    return out


def test_queue_order_disagreement_then_uncertain_confident_left_out(tmp_path: Path) -> None:
    s = fed(
        tmp_path,
        [
            decision(1, conf=0.99),  # confident, agreeing: not queued (no sample share)
            decision(2, conf=0.7),  # uncertain
            decision(3, conf=0.95, image_cls="ferrite"),  # camera alone says ferrite, with the field ndfeb
            decision(4, conf=0.5),  # more uncertain
            decision(5, conf=0.6, field=None),  # no field reading on a line with a bar: no sensors row possible
        ],
    )
    head = s.head(10)
    assert [(c.piece_id, c.reason) for c in head] == [(3, "disagree"), (4, "uncertain"), (2, "uncertain")]
    assert head[0].image_guess == "ferrite" and head[0].guess == "ndfeb"
    assert head[0].field_mT == 120.0 and head[0].area_mm2 == 200.0
    assert all((tmp_path / "_pending" / f"{c.name}.png").is_file() for c in head)
    s.close()


def test_random_share_of_confident_pieces(tmp_path: Path) -> None:
    s = store(tmp_path, sample_share=0.25, rng=random.Random(3))
    s.add([decision(i) for i in range(200)])
    s.drain()
    n = s.stats()["pending"]
    assert 25 <= n <= 75  # about a quarter, seeded
    assert {c.reason for c in s.head(200)} == {"sample"}
    s.close()


def test_label_confirm_correct_discard_into_dataset_and_log(tmp_path: Path) -> None:
    s = fed(tmp_path, [decision(1, conf=0.5), decision(2, conf=0.6), decision(3, conf=0.7, field=-80.0)])
    files = [
        s.label(f"{RUN}-0000001", "ndfeb", "tech"),  # confirmed
        s.label(f"{RUN}-0000002", "ferrite", "tech"),  # corrected
        s.label(f"{RUN}-0000003", DISCARD, "tech"),
    ]
    assert files[2] == ""
    assert all((tmp_path / f).is_file() for f in files[:2])
    assert files[1].split("/")[1] == "ferrite"
    assert (tmp_path / "_discarded" / f"{RUN}-0000003.png").is_file()
    rows = log_rows(tmp_path)
    assert list(rows[0]) == list(LOG_COLUMNS)
    assert [(r["user"], r["run_id"], r["piece_id"], r["file"], r["old"], r["new"]) for r in rows] == [
        ("tech", RUN, "1", files[0], "ndfeb", "ndfeb"),
        ("tech", RUN, "2", files[1], "ndfeb", "ferrite"),
        ("tech", RUN, "3", "", "ndfeb", DISCARD),
    ]
    sensors = sensor_rows(tmp_path)
    assert sorted(sensors) == sorted(files[:2])
    assert sensors[files[1]][1:] == ["120.0", "200.0"]
    assert s.stats()["labelled"] == {"ndfeb": 1, "ferrite": 1} and s.stats()["pending"] == 0
    ds = scan_addition(tmp_path)
    assert sum(len(sp) for sp in ds.splits.values()) == 2
    assert all(sp.fields is not None for sp in ds.splits.values())
    s.close()


def test_label_refusals(tmp_path: Path) -> None:
    s = fed(tmp_path, [decision(1, conf=0.5)])
    with pytest.raises(LabelError, match="not a class"):
        s.label(f"{RUN}-0000001", "unobtainium", "tech")
    with pytest.raises(LookupError):
        s.label(f"{RUN}-0000009", "ndfeb", "tech")
    with pytest.raises(LabelError, match="nothing to undo"):
        s.undo("tech")
    assert s.crop_file("../../etc/passwd") is None and s.crop_file(f"{RUN}-0000009") is None
    assert s.crop_file(f"{RUN}-0000001") == tmp_path / "_pending" / f"{RUN}-0000001.png"
    (tmp_path / "_pending" / f"{RUN}-0000001.png").unlink()  # deleted by hand: off the queue, not stuck at its head
    with pytest.raises(LookupError, match="gone"):
        s.label(f"{RUN}-0000001", "ndfeb", "tech")
    assert s.stats()["pending"] == 0 and not (tmp_path / "labels.csv").exists()
    s.close()


def test_undo_takes_the_label_back(tmp_path: Path) -> None:
    s = fed(tmp_path, [decision(1, conf=0.5), decision(2, conf=0.6), decision(3, conf=0.4, image_cls="smco")])
    first = s.label(f"{RUN}-0000001", "steel", "tech")
    second = s.label(f"{RUN}-0000002", "steel", "tech")
    other = s.label(f"{RUN}-0000003", "smco", "someone-else")
    back = s.undo("tech")  # tech's last: piece 2
    assert back.piece_id == 2 and s.head(1)[0].piece_id == 2
    assert not (tmp_path / second).exists() and (tmp_path / "_pending" / f"{RUN}-0000002.png").is_file()
    assert (tmp_path / first).is_file() and (tmp_path / other).is_file()
    assert sorted(sensor_rows(tmp_path)) == sorted([first, other])
    assert log_rows(tmp_path)[-1]["new"] == UNDONE and log_rows(tmp_path)[-1]["piece_id"] == "2"
    s.undo("tech")
    s.undo("someone-else")
    # nothing labelled is left: no empty class folder or header-only sensors.csv the dataset reader would refuse
    assert not any(p for split in ("train", "val", "test") for p in (tmp_path / split).glob("*"))
    assert s.stats()["labelled"] == {"steel": 0, "smco": 0} and s.stats()["pending"] == 3
    s.close()


def test_pending_and_counts_survive_a_restart(tmp_path: Path) -> None:
    s = fed(tmp_path, [decision(i, conf=0.5 + i / 100) for i in range(1, 6)])
    s.label(f"{RUN}-0000001", "ndfeb", "tech")
    before = [c.name for c in s.head(10)]
    s.close()
    (tmp_path / "_pending" / "run0-0000099.png").write_bytes(b"half")  # a crash between the crop and its json
    again = store(tmp_path)
    assert [c.name for c in again.head(10)] == before
    assert again.stats()["labelled"] == {"ndfeb": 1}
    assert not (tmp_path / "_pending" / "run0-0000099.png").exists()
    again.close()


def test_full_queue_keeps_the_most_useful(tmp_path: Path) -> None:
    s = fed(tmp_path, [decision(i, conf=0.8) for i in range(1, 4)], queue_max=3)
    s.add([decision(10, conf=0.85)])  # no better than the worst: not kept
    s.add([decision(11, conf=0.6, image_cls="steel")])  # a disagreement pushes out an uncertain one
    s.drain()
    assert s.stats()["passed"] == 1 and s.stats()["evicted"] == 1
    assert s.head(1)[0].piece_id == 11 and s.stats()["pending"] == 3
    assert len(list((tmp_path / "_pending").glob("*.png"))) == 3
    s.close()


def test_slow_disk_drops_candidates_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    real = labelling.cv2.imwrite

    def slow(path: str, img: np.ndarray) -> bool:
        entered.set()
        release.wait(10)
        return bool(real(path, img))

    monkeypatch.setattr(labelling.cv2, "imwrite", slow)
    s = store(tmp_path, queue_max=500)
    s.add([decision(1, conf=0.5)])
    assert entered.wait(10)  # the writer holds the first crop
    s.add([decision(i, conf=0.5) for i in range(2, 2 + labelling.WRITE_QUEUE + 3)])  # returns at once
    assert s.stats()["dropped"] == 3
    release.set()
    s.drain()
    assert s.stats()["pending"] == 1 + labelling.WRITE_QUEUE
    s.close()


def test_shadow_disagreement_goes_first(tmp_path: Path) -> None:
    s = fed(tmp_path, [decision(1, conf=0.5), decision(2, conf=0.8), decision(3, conf=0.99)])
    assert [c.piece_id for c in s.head(5)] == [1, 2]
    s.note_shadow(2, "ndfeb")  # agrees with the live model: nothing changes
    assert [c.piece_id for c in s.head(5)] == [1, 2]
    s.note_shadow(2, "steel")
    s.note_shadow(3, "smco")  # a confident piece not queued: queued now for the shadow's disagreement
    s.drain()
    head = s.head(5)
    assert [(c.piece_id, c.reason, c.shadow) for c in head[:2]] == [(2, "shadow", "steel"), (3, "shadow", "smco")]
    assert head[2].piece_id == 1
    s.close()
    assert [c.reason for c in store(tmp_path).head(2)] == ["shadow", "shadow"]  # kept on disk too


def test_the_shadow_tap_queues_only_the_pieces_it_names_otherwise(tmp_path: Path) -> None:
    s = fed(tmp_path, [decision(1, conf=0.5), decision(2, conf=0.99), decision(3, conf=0.99)])
    assert [c.piece_id for c in s.head(5)] == [1]

    def shadow(piece_id: int, cls: str) -> ShadowDecision:
        return ShadowDecision(piece_id, "ndfeb", "ndfeb", 0.99, cls, "magnets", 0.9, "candidate")

    s.shadowed([shadow(2, "ndfeb"), shadow(3, "ferrite")])  # 2 agrees, 3 does not
    s.drain()
    assert [(c.piece_id, c.reason, c.shadow) for c in s.head(5)] == [(3, "shadow", "ferrite"), (1, "uncertain", None)]
    s.close()


def test_no_bar_line_queues_without_field(tmp_path: Path) -> None:
    s = fed(tmp_path, [decision(1, conf=0.5, field=None)], with_field=False)
    f = s.label(f"{RUN}-0000001", "ndfeb", "tech")
    assert (tmp_path / f).is_file() and not sensor_rows(tmp_path)
    s.close()


def _write_set(root: Path, spec: dict[str, dict[str, int]], fields: bool = True) -> None:
    for split, classes in spec.items():
        rows = ["file,field_mT,area_mm2"]
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cv2.imwrite(str(root / split / cls / f"{i}.png"), np.full((8, 8, 3), i, np.uint8))
                rows.append(f"{cls}/{i}.png,{10 + i},{100 + i}")
        if fields:
            (root / split / "sensors.csv").write_text("\n".join(rows) + "\n")


def test_labels_folder_added_to_a_complete_set(tmp_path: Path) -> None:
    main, labels = tmp_path / "main", tmp_path / "labels"
    _write_set(main, {"train": {"ndfeb": 3, "ferrite": 3}, "val": {"ndfeb": 1, "ferrite": 1}})
    # one split only, a class the main set has not, an empty class folder an undo left behind
    _write_set(labels, {"train": {"steel": 2, "ndfeb": 1}})
    (labels / "train" / "smco").mkdir()
    (labels / "_pending").mkdir()
    with pytest.raises(DatasetError):  # as a main set it is incomplete
        scan_dataset(labels, required=("train", "val"))
    add = scan_addition(labels)
    assert add.labels == ("ndfeb", "steel") and set(add.splits) == {"train"}
    ds, origin = merge_datasets([scan_dataset(main), add])
    assert ds.labels == ("ndfeb", "ferrite", "steel")
    assert len(ds["train"]) == 9 and len(ds["val"]) == 2
    assert ds["train"].fields is not None and list(origin["train"]).count(1) == 3
    assert ds["train"].counts() == {"ndfeb": 4, "ferrite": 3, "steel": 2}


def test_addition_refusals(tmp_path: Path) -> None:
    (tmp_path / "train" / "ndfeb").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no labelled images"):
        scan_addition(tmp_path)
    _write_set(tmp_path, {"train": {"ndfeb": 2}})
    (tmp_path / "train" / "sensors.csv").write_text("file,field_mT,area_mm2\nndfeb/0.png,10,100\n")
    with pytest.raises(DatasetError, match="no row"):
        scan_addition(tmp_path)


def test_shadow_note_for_a_piece_on_its_way_to_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    real = labelling.cv2.imwrite

    def slow(path: str, img: np.ndarray) -> bool:
        entered.set()
        release.wait(10)
        return bool(real(path, img))

    monkeypatch.setattr(labelling.cv2, "imwrite", slow)
    s = store(tmp_path)
    s.add([decision(1, conf=0.5), decision(2, conf=0.6)])
    assert entered.wait(10)
    s.note_shadow(2, "smco")  # piece 2 waits behind piece 1 for the disk
    release.set()
    s.drain()
    assert [(c.piece_id, c.reason, c.shadow) for c in s.head(2)] == [(2, "shadow", "smco"), (1, "uncertain", None)]
    s.close()
