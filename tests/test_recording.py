"""The recording format (sorter/line/recording.py, docs/recording.md): what is written reads back exactly,
the size bound stops the recording and not the line, and a reader refuses what it cannot read."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sorter.core.messages import Frame, PlcStatus
from sorter.line import recording as recmod
from sorter.line.recording import Recorder, Recording, RecordingError, RecordOptions, ReplaySource, status_word
from sorter.line.virtualtime import VirtualClock, VirtualTimeLoop

pytestmark = pytest.mark.fast

CONFIG = {"line": "test-line", "classifier": {"model": "models/x.onnx"}}


def recorder(folder: Path, in_place: bool = True, **opts: Any) -> Recorder:
    return Recorder(
        RecordOptions(folder, **opts),
        config=CONFIG,
        run_id="run-1",
        model_version="m-1",
        now=lambda: 100.0,
        wall=lambda: 1_700_000_000.0,
        in_place=in_place,
    )


def frame(seq: int, rng: np.random.Generator, camera: str = "cam0") -> Frame:
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    return Frame(camera, seq, image, 10.0 + seq / 60, (2**32 - 3 + seq) % 2**32, 10.02 + seq / 60)


@pytest.mark.parametrize("fmt", ["npy", "png"])
@pytest.mark.parametrize("in_place", [True, False])
def test_everything_written_reads_back_exactly(tmp_path: Path, fmt: str, in_place: bool) -> None:
    rng = np.random.default_rng(1)
    rec = recorder(tmp_path / "r", in_place=in_place, frame_format=fmt)
    frames = [frame(i, rng, cam) for i in range(6) for cam in ("cam0", "cam1")]
    for f in frames:
        rec.frame(f)
    st = PlcStatus(online=True, belt_running=True, air_ok=True, speed_mm_s=2500.0, queue_free=16, last_seq=3)
    rec.poll(10.0, 10.001, 2**32 - 5, st)
    rec.poll(10.010, 10.011, 20, st)
    raw = bytes(range(256)) + b"\r\n"  # any byte at all, a line cut anywhere
    rec.bar_chunk(raw, 10.5)
    rec.processed("cam0", frames[0])
    rec.close()

    r = Recording(tmp_path / "r")
    assert r.closed and r.manifest["format_version"] == recmod.FORMAT_VERSION
    assert r.manifest["counts"]["frames"] == 12 and r.manifest["counts"]["frames_dropped_queue"] == 0
    rows = r.frames()
    assert [(x["camera"], x["seq"]) for x in rows] == [(f.camera, f.seq) for f in frames]
    for row, f in zip(rows, frames, strict=True):
        assert np.array_equal(r.load_image(row), f.image)  # lossless
        assert (row["count32"], row["t_capture"], row["t_received"]) == (f.count, f.t_capture, f.t_received)
    polls = r.polls()
    assert [p["count32"] for p in polls] == [2**32 - 5, 20]
    assert polls[0]["status"] == status_word(st) == 0b11 and polls[0]["speed_mm_s"] == 2500.0
    assert len(r.plc_status()) == 1  # a change only
    assert r.hallbar() == [(10.5, raw)]
    assert r.processed() == {("cam0", 0): 100.0}
    assert (tmp_path / "r" / "config.yaml").read_text().startswith("line: test-line")


def test_npy_frames_are_readable_with_numpy_alone(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rec = recorder(tmp_path / "r")
    frames = [frame(i, rng) for i in range(3)]
    for f in frames:
        rec.frame(f)
    rec.close()
    with open(tmp_path / "r" / "frames" / "cam0.npys", "rb") as fh:  # a plain stream of .npy records
        for f in frames:
            assert np.array_equal(np.load(fh), f.image)


def test_the_size_bound_stops_the_recording_and_counts_what_it_left_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    one = 24 * 32 * 3 + 128
    rec = recorder(tmp_path / "r", max_bytes=3 * one + 500)
    for i in range(10):
        rec.frame(frame(i, rng))
    rec.poll(1.0, 1.001, 5, PlcStatus(online=True))
    rec.close()
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["counts"]["frames"] == 3
    assert m["counts"]["frames_dropped_full"] == 7
    assert m["bytes"] <= 3 * one + 500
    assert "size bound" in m["stopped_early"]
    assert len(Recording(tmp_path / "r").frames()) == 3  # the index names only frames on disk


def test_a_full_queue_drops_from_the_recording_never_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recmod, "FRAME_QUEUE_BYTES", 3 * 24 * 32 * 3)
    rec = recorder(tmp_path / "r", in_place=False)
    gate = threading.Event()
    real = rec._write_frames

    def slow(frames: list[Frame]) -> None:
        gate.wait(5)
        real(frames)

    monkeypatch.setattr(rec, "_write_frames", slow)
    rng = np.random.default_rng(4)
    for i in range(10):  # returns at once although nothing is written yet
        rec.frame(frame(i, rng))
    dropped = rec.stats()["frames_dropped_queue"]
    gate.set()
    rec.close()
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert dropped >= 6
    assert m["counts"]["frames"] + m["counts"]["frames_dropped_queue"] == 10


def test_decisions_come_from_the_records_with_their_outcomes(tmp_path: Path) -> None:
    db = tmp_path / "records.sqlite"
    con = sqlite3.connect(db)
    cols = (
        "id, run_id, t_capture, count, count32, x_mm, x0_mm, x1_mm, area_mm2, cls, confidence, fraction, probs,"
        " field_mT, field_state, model, outcome, bank, seq, open_at"
    )
    con.execute(f"CREATE TABLE pieces ({cols})")
    con.execute(
        f"INSERT INTO pieces ({cols}) VALUES (1, 'run-1', 1.0, 5000, 5000, 10.0, 8.0, 12.0, 40.0, 'ndfeb', 0.9,"
        " 'ndfeb', '{\"ndfeb\": 0.9}', 50.0, 'ok', 'm-1', 'accepted', 'A', 1, 9000)"
    )
    con.execute(
        f"INSERT INTO pieces ({cols}) VALUES (1, 'other-run', 1.0, 5, 5, 1.0, 0, 2, 4, 'steel', 0.9,"
        " 'residue', NULL, NULL, 'ok', 'm-1', 'no_air', NULL, NULL, NULL)"
    )
    con.commit()
    con.close()
    rec = recorder(tmp_path / "r")
    rec.close(db)
    (d,) = Recording(tmp_path / "r").decisions()
    assert (d["id"], d["count"], d["cls"], d["fraction"], d["outcome"]) == (1, 5000, "ndfeb", "ndfeb", "accepted")
    assert d["probs"] == {"ndfeb": 0.9}


def test_refuses_a_used_folder_and_a_format_it_cannot_read(tmp_path: Path) -> None:
    recorder(tmp_path / "r").close()
    with pytest.raises(RecordingError, match="already holds a recording"):
        recorder(tmp_path / "r")
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    m["format_version"] = recmod.FORMAT_VERSION + 1
    (tmp_path / "r" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RecordingError, match="format version"):
        Recording(tmp_path / "r")
    with pytest.raises(RecordingError, match="not a recording"):
        Recording(tmp_path / "nothing")
    with pytest.raises(RecordingError, match="level"):
        recorder(tmp_path / "s", level="everything")  # type: ignore[arg-type]


def test_a_stream_cut_by_a_crash_reads_up_to_its_last_whole_line(tmp_path: Path) -> None:
    rec = recorder(tmp_path / "r")
    rec.bar_chunk(b"a\n", 1.0)
    rec.bar_chunk(b"b\n", 2.0)
    rec.close()
    path = tmp_path / "r" / "hallbar.jsonl"
    path.write_text(path.read_text()[:-5])  # the last line half written
    assert Recording(tmp_path / "r").hallbar() == [(1.0, b"a\n")]


def test_replay_source_delivers_at_the_recorded_arrival_times(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rec = recorder(tmp_path / "r")
    frames = [frame(i, rng) for i in range(4)]
    for f in frames:
        rec.frame(f)
    rec.close()
    r = Recording(tmp_path / "r")
    clock = VirtualClock(9.0, 0.0)
    src = ReplaySource(r, "cam0", r.frames(), clock.now)
    got: list[tuple[float, Frame]] = []

    async def run() -> None:
        async for f in src.frames():
            got.append((clock.now(), f))

    loop = VirtualTimeLoop(clock)
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    assert [t for t, _ in got] == pytest.approx([f.t_received for f in frames])
    assert all(np.array_equal(g.image, f.image) and g.count == f.count for (_, g), f in zip(got, frames, strict=True))
    assert src.done


def test_level_pieces_rotates_by_size_and_keeps_each_piece_whole(tmp_path: Path) -> None:
    from sorter.core.messages import Decision, FieldReading, FieldState, Piece

    rng = np.random.default_rng(6)
    bound = 200_000  # parts of 25 kB: two pieces each
    rec = recorder(tmp_path / "r", level="pieces", max_bytes=bound)
    for i in range(60):  # each piece ~9 kB of crops (noise does not compress): ~560 kB in all, ~3x the bound
        crops = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
        p = Piece(i, 1000.0 * i, 1000.0 * i - 50, 1000.0 * i + 50, 100.0, 95.0, 105.0, 40.0, ("cam0",), 3, crops)
        d = Decision(p, {"ndfeb": 0.9}, "ndfeb", 0.9, "ndfeb", field=FieldReading(80.0, FieldState.OK))
        rec.decided([d])
        rec.poll(float(i), i + 0.001, i, PlcStatus(online=True))
    rec.frame(frame(0, rng))  # level pieces keeps no frames
    rec.close()
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["stopped_early"] is None  # rotation, not a stop
    assert m["counts"]["parts_rotated_out"] > 0 and m["parts_rotated_out"]
    on_disk = sum(f.stat().st_size for f in (tmp_path / "r").rglob("*") if f.is_file() and f.parent != tmp_path / "r")
    assert on_disk == m["bytes"] <= bound
    assert not (tmp_path / "r" / "frames").exists()
    kept = []
    for part in m["parts"]:
        stream = tmp_path / "r" / part / "pieces.jsonl"
        for line in stream.read_text().splitlines() if stream.exists() else []:
            row = json.loads(line)
            kept.append(row["id"])
            assert len(row["crops"]) == 3 and all((tmp_path / "r" / part / c).exists() for c in row["crops"])
    assert kept == list(range(kept[0], 60))  # the newest pieces, none lost in between
    assert not any((tmp_path / "r" / old).exists() for old in m["parts_rotated_out"])
