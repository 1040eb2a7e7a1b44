"""Memory: a decided piece keeps no camera frame alive; the service's RSS as the kernel reports it.

The line's memory budget (docs/memory.md) rests on frames living only as long as the pieces seen in them
are being tracked: a piece's crops are cut from its frames lazily (only the views the classifier gets), and
once it is decided only the cut crops (a few kB) may remain, whoever keeps the decision (the planner
remembers the latest 256 as neighbours). One frame is 2.7 MB, and 120 arrive a second.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from sorter.line.memory import Rss, RssWatch, glibc_trim, parse_status
from sorter.line.records import load_pieces
from sorter.vision.segment import materialise
from tests.line_frames import built_service, move_on, queued, show_piece

pytestmark = pytest.mark.fast


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    """Frames must go when their last reference does, not at a later collection of reference cycles (the
    service freezes what it built at start, and full collections are rare and long)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


async def test_a_piece_keeps_no_frame_alive_once_it_has_left_the_view(tmp_path: Path, no_cyclic_gc: None) -> None:
    """A tracked piece's views hold their frames (crops are cut only for the views classified); once it has
    left the cameras' view its crops are cut (to be classified while it settles) and its frames go, before
    its decision: a backlog of pieces waiting for a decision (a busy computer) holds 12 kB crops, not 2.7 MB
    frames. After the decision nothing has come
    back (the planner remembers the decision, the records have its row)."""
    svc = built_service(tmp_path)
    try:
        shown = await show_piece(svc)
        assert sum(r() is not None for r in shown) == 3 and svc.tracker.open_tracks == 1
        await move_on(svc)
        await asyncio.gather(*svc._ahead_tasks)  # cut and classified while it settled (LineService._classify_ahead)
        pieces = queued(svc)
        assert [len(p.crops) for p in pieces] == [3]
        assert all(materialise(c).shape == (64, 64, 3) for c in pieces[0].crops)
        alive = sum(r() is not None for r in shown)
        assert alive == 0, "a piece waiting for its decision keeps its frames alive"
        await svc._decide(pieces, asyncio.get_running_loop())
        del pieces
        alive = sum(r() is not None for r in shown)
        assert alive == 0
        assert len(svc.planner._recent) == 1
        svc.records.flush()
        rows = load_pieces(svc.records.path)
        assert len(rows) == 1 and rows[0]["outcome"] != "seen"  # decided
        # its decision latency so far: settle (last view -> the frame that finalised it arrived) and compute
        # (finalised by the second frame after it, 2 x 40 ms later, received 20 ms after its exposure)
        assert rows[0]["settle_ms"] == pytest.approx(1000 * (2 * 0.04 + 0.02), abs=1e-3)
        assert rows[0]["compute_ms"] is not None and rows[0]["plc_ms"] is None
    finally:
        await svc.control.shutdown()
        svc.close_workers()
        svc.records.close()


async def test_a_piece_finalised_at_shutdown_has_its_crops_cut_when_classified(
    tmp_path: Path, no_cyclic_gc: None
) -> None:
    """The shutdown decides what is still tracked (tracker.flush(): no frame showed those pieces leaving, so
    their crops are still cutters): the decision cuts them, and nothing decided keeps a frame."""
    svc = built_service(tmp_path)
    try:
        shown = await show_piece(svc)
        pieces = svc.tracker.flush()
        assert [len(p.crops) for p in pieces] == [3] and all(callable(c) for c in pieces[0].crops)
        await svc._decide(pieces, asyncio.get_running_loop())
        del pieces
        alive = sum(r() is not None for r in shown)
        assert alive == 0, "a decided piece keeps its frames alive"
        svc.records.flush()
        rows = load_pieces(svc.records.path)
        assert len(rows) == 1 and rows[0]["settle_ms"] is None  # no frame finalised it: no latency parts
    finally:
        await svc.control.shutdown()
        svc.close_workers()
        svc.records.close()


STATUS = """Name:\tpython
VmPeak:\t 2504448 kB
VmRSS:\t  614400 kB
RssAnon:\t  196608 kB
RssFile:\t   82944 kB
RssShmem:\t  334848 kB
Threads:\t31
"""


def test_rss_is_read_as_the_kernel_splits_it() -> None:
    assert parse_status(STATUS) == Rss(total=600.0, anon=192.0, file=81.0, shmem=327.0)
    assert parse_status("Name:\tkthreadd\nThreads:\t1\n") is None  # a kernel thread has no VmRSS


def test_rss_watch_keeps_start_peak_and_end() -> None:
    seq = iter([Rss(100, 50, 50, 0), Rss(300, 250, 50, 0), Rss(200, 150, 50, 0), None])
    watch = RssWatch(read=lambda: next(seq))
    assert watch.summary() is None
    for _ in range(4):
        watch.sample()
    assert watch.summary() == {
        "start": 100,
        "peak": 300,
        "end": 200,
        "peak_anon": 250,
        "peak_file": 50,
        "peak_shmem": 0,
        "trims": 0,
        "trimmed": 0,
    }


def test_the_heap_is_trimmed_once_it_has_grown_by_the_slack() -> None:
    """Freed frames stay in glibc's heaps: after a moment of many frames alive, the heap is trimmed."""
    now = [Rss(200, 100, 100, 0)]
    trims = []

    def trim() -> None:
        trims.append(1)
        now[0] = Rss(210, 110, 100, 0)  # what the kernel got back

    watch = RssWatch(read=lambda: now[0], trim=trim, slack_mb=48)
    watch.sample()
    now[0] = Rss(240, 140, 100, 0)  # +40 MB of heap: within the slack
    watch.sample()
    assert not watch.trim_due
    now[0] = Rss(300, 200, 100, 0)  # +100: the queues filled once; their frames are freed, not given back
    watch.sample()
    assert watch.trim_due
    watch.trim()
    assert trims == [1] and not watch.trim_due
    assert watch.summary() is not None and watch.summary()["trimmed"] == 90  # type: ignore[index]
    assert not RssWatch(read=lambda: now[0], trim=None).trim_due  # no glibc: nothing to trim


def test_glibc_trim_runs_here() -> None:
    trim = glibc_trim()
    if trim is None:
        pytest.skip("no glibc malloc_trim on this system")
    trim()  # returns 1 if memory was given back, 0 if not: either is fine
