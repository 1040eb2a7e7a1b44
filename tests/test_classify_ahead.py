"""A piece is cut and classified while it settles (LineService._classify_ahead): once it has left every
camera's view its views are all in, so the frame that finalises it leaves only fusion and planning. The
decision rests on that classification, never on a second one, unless the piece gained a view after it or
it failed; either way the piece is still decided and recorded."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sorter.core.messages import Piece
from sorter.line.records import load_pieces
from sorter.line.service import LineService
from tests.line_frames import built_service, move_on, queued, show_piece

pytestmark = pytest.mark.fast


def classified_ids(svc: LineService, fail_first: bool = False) -> list[list[int]]:
    """The ids of the pieces each classification run got (the first run raising, with `fail_first`)."""
    runs: list[list[int]] = []
    real = svc._classify

    def counted(pieces: list[Piece]) -> Any:
        runs.append([p.id for p in pieces])
        if fail_first and len(runs) == 1:
            raise RuntimeError("inference failed")
        return real(pieces)

    svc._classify = counted  # type: ignore[method-assign]
    return runs


async def settled(svc: LineService) -> list[Piece]:
    """One piece shown in three frames, then the belt moved on until it is finalised; the pieces queued."""
    await show_piece(svc)
    await move_on(svc)
    await asyncio.gather(*svc._ahead_tasks)
    return queued(svc)


def decided_rows(svc: LineService) -> list[dict[str, Any]]:
    svc.records.flush()
    return load_pieces(svc.records.path)


async def close(svc: LineService) -> None:
    await svc.control.shutdown()
    svc.close_workers()
    svc.records.close()


async def test_a_piece_is_classified_once_while_it_settles_and_decided_on_that(tmp_path: Path) -> None:
    svc = built_service(tmp_path)
    runs = classified_ids(svc)
    try:
        await show_piece(svc)
        assert runs == []  # still in view: more views may come
        await move_on(svc)
        await asyncio.gather(*svc._ahead_tasks)
        pieces = queued(svc)
        assert [p.id for p in pieces] and runs == [[pieces[0].id]]
        await svc._decide(pieces, asyncio.get_running_loop())
        assert runs == [[pieces[0].id]], "classified again at its decision"
        assert not svc._ahead
        rows = decided_rows(svc)
        assert len(rows) == 1 and rows[0]["outcome"] != "seen" and rows[0]["cls"]
    finally:
        await close(svc)


async def test_a_piece_that_gained_a_view_after_its_classification_is_classified_again(tmp_path: Path) -> None:
    svc = built_service(tmp_path)
    runs = classified_ids(svc)
    try:
        pieces = await settled(svc)
        grown = [replace(pieces[0], n_views=pieces[0].n_views + 1)]  # a late view joined its track
        await svc._decide(grown, asyncio.get_running_loop())
        assert runs == [[pieces[0].id], [pieces[0].id]]
        assert decided_rows(svc)[0]["outcome"] != "seen"
    finally:
        await close(svc)


async def test_a_classification_ahead_that_failed_is_done_at_the_decision(tmp_path: Path) -> None:
    svc = built_service(tmp_path)
    runs = classified_ids(svc, fail_first=True)
    try:
        pieces = await settled(svc)
        await svc._decide(pieces, asyncio.get_running_loop())
        assert runs == [[pieces[0].id], [pieces[0].id]]
        rows = decided_rows(svc)
        assert len(rows) == 1 and rows[0]["outcome"] != "seen" and rows[0]["cls"]
        assert svc.counters.batches_failed == 0  # the decision itself did not fail
    finally:
        await close(svc)


async def test_a_piece_dropped_by_the_tracker_leaves_no_classification_behind(tmp_path: Path) -> None:
    """A merged view's track (Tracker.finalise drops it) was classified ahead for nothing: forgotten."""
    svc = built_service(tmp_path)
    try:
        await show_piece(svc)
        svc.tracker.dropped.append(12345)
        svc._ahead[12345] = asyncio.get_running_loop().create_future()
        await move_on(svc)
        await asyncio.gather(*svc._ahead_tasks)
        assert 12345 not in svc._ahead
        await svc._decide(queued(svc), asyncio.get_running_loop())
        assert not svc._ahead
    finally:
        await close(svc)


async def test_a_model_swapped_in_after_its_classification_decides_it(tmp_path: Path) -> None:
    """From a swap on, every decision is the new model's (LineService._swap_model)."""
    svc = built_service(tmp_path)
    runs = classified_ids(svc)
    try:
        pieces = await settled(svc)
        svc.classifier = svc.parts.load_model(Path(svc.classifier.path))  # another instance: another model
        await svc._decide(pieces, asyncio.get_running_loop())
        assert runs == [[pieces[0].id], [pieces[0].id]]
    finally:
        await close(svc)
