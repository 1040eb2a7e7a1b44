"""A vision thread that falls behind sheds the full-resolution parting of touching pieces (LineService._segment,
`vision.full_res_max_lag_ms`) before its camera's queue would drop frames; the frames it did so for are
counted."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import sorter.line.service as service_module
from tests.line_frames import COUNT0, built_service, frame

pytestmark = pytest.mark.fast


async def test_a_frame_that_waited_past_the_lag_limit_is_parted_on_the_downscaled_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = built_service(tmp_path)
    seen: list[bool] = []
    real = service_module.segment

    def recorded(image: Any, vision: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(vision.split_full_res and kwargs.get("full_res", True))  # parted on the frame itself?
        return real(image, vision, *args, **kwargs)

    monkeypatch.setattr(service_module, "segment", recorded)
    limit_s = svc.cfg.vision.full_res_max_lag_ms / 1000
    now = 200.0
    svc._now = lambda: now  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    try:
        for k, waited in enumerate((0.2 * limit_s, 2 * limit_s, 0.5 * limit_s)):
            f = frame("cam0", k + 1, COUNT0 + 1000 * k, now - waited - 0.02, (360, 640))  # received at t + 0.02
            await svc._process("cam0", f, loop)
        assert seen == [True, False, True]
        assert svc.counters.frames_parted_coarse == 1
        assert svc.counters.flat()["frames_parted_coarse"] == 1
    finally:
        await svc.control.shutdown()
        svc.close_workers()
        svc.records.close()
