"""`sorter bench-hmi`: what do operator panels showing the live HMI cost the sorting loop?

Two demo runs of the same seed and length, the HMI served in both: one with no browser connected,
one with two headless Chromium browsers (Debian's, through Playwright) logged in - an operator and
a viewer - each showing the live page: the state pushed at `hmi.push_hz`, both cameras' images at
`hmi.camera_fps`. The browsers start with the line and stay `duration` s from the moment both show
it; the figure is the ratio of decision latency p99 over that time to p99 over the whole feed without
browsers. Also reported: the service process's CPU time per run (the HMI's threads included).

The browsers run at niceness 19 (`--browser-nice`; their sessions' autogroups too, see
`panel_browser`): they stand in for panel PCs, which are computers of their own; on this machine they
would otherwise take the CPU the line needs, which no panel on the plant network does.
`--browser-nice 0` measures them competing at full priority.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from sim.config import SimLineConfig
from sim.report import headline

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PANELS = (("operator", "demo-operator"), ("viewer", "demo-viewer"))  # config/sim.yaml's demo users


def panel_browser(folder: Path, nice: int = 19) -> Path:
    """An executable that starts Chromium at low priority, as a stand-in for a panel PC's browser.

    `nice` alone does not do it: Playwright starts the browser in a session of its own (setsid), and
    Linux's autogroup scheduling shares the CPU between sessions whatever their processes' niceness;
    Chromium even raises its browser and GPU processes to nice -8 when it can. The wrapper sets its
    session's autogroup niceness (/proc/self/autogroup, inherited by every Chromium process) first.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "panel-chromium"
    path.write_text(
        f'#!/bin/sh\n{{ echo {nice} > /proc/self/autogroup; }} 2>/dev/null\nexec nice -n {nice} {CHROMIUM} "$@"\n'
    )
    path.chmod(0o755)
    return path


def browse_main() -> None:
    """python -m sim.bench_hmi URL CHROMIUM: two browsers on the live page until "stop" on stdin.

    Waits for the HMI to answer, logs both panels in, prints {"event": "ready"}; on "stop" prints
    what each page received per second as JSON.
    """
    import urllib.request

    from playwright.sync_api import sync_playwright

    url, executable = sys.argv[1], sys.argv[2]
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with sync_playwright() as p:
        browsers, pages = [], []
        for user, password in PANELS:
            b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)  # one browser per panel
            page = b.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            page.fill("#login-user", user)
            page.fill("#login-password", password)
            page.click("#login-submit")
            page.wait_for_selector("#main:not([hidden])")
            browsers.append(b)
            pages.append((user, page))
        base = {user: page.evaluate("window.hmiStats") for user, page in pages}
        print(json.dumps({"event": "ready"}), flush=True)
        t0 = time.monotonic()
        sys.stdin.readline()  # "stop" (or the bench going away)
        elapsed = time.monotonic() - t0
        out: dict[str, Any] = {}
        for user, page in pages:
            stats, b0 = page.evaluate("window.hmiStats"), base[user]
            out[user] = {
                "states_per_s": round((stats["states"] - b0["states"]) / elapsed, 2),
                "frames_per_s": {
                    k: round((v - b0["frames"].get(k, 0)) / elapsed, 2) for k, v in stats["frames"].items()
                },
            }
        for b in browsers:
            b.close()
    print(json.dumps(out), flush=True)


async def _panels(proc: asyncio.subprocess.Process, seconds: float, into: dict[str, Any]) -> None:
    """During the feed: wait until both panels show the line (they log in while it starts), keep them `seconds`."""
    assert proc.stdout is not None and proc.stdin is not None
    t0 = time.monotonic()
    try:
        ready = await asyncio.wait_for(proc.stdout.readline(), 180)
    except TimeoutError:
        raise RuntimeError("the browsers did not log in within 180 s (at low priority: is the machine busy?)") from None
    if not ready:
        raise RuntimeError(f"the browsers failed; is {CHROMIUM} installed (make browser)?")
    into["connected_after_feed_start_s"] = round(time.monotonic() - t0, 2)
    into["t_connected"] = time.time()
    await asyncio.sleep(seconds)
    into["t_stop"] = time.time()
    proc.stdin.write(b"stop\n")
    await proc.stdin.drain()
    into.update(json.loads(await asyncio.wait_for(proc.stdout.readline(), 30) or b"{}"))


async def _pair(cfg: SimLineConfig, duration: float, seed: int, run_dir: Path, nice: int) -> dict[str, Any]:
    """One demo run without browsers, one with two; latencies and figures of both."""
    from sim.demo import free_port, run_demo
    from sim.report import percentiles
    from sorter.line.records import load_pieces

    assert cfg.hmi is not None
    t0 = time.process_time()
    none = await run_demo(cfg, duration, seed, run_dir / "none")
    cpu_none = time.process_time() - t0
    # the panels start before the line does (on a port fixed for this run) and log in while it starts
    port = free_port()
    cfg = cfg.model_copy(update={"hmi": cfg.hmi.model_copy(update={"host": "127.0.0.1", "port": port})})
    browser = panel_browser(run_dir, nice) if nice else Path(CHROMIUM)
    cmd = [sys.executable, "-m", "sim.bench_hmi", f"http://127.0.0.1:{port}/", str(browser)]
    proc = await asyncio.create_subprocess_exec(
        *(["nice", "-n", str(nice), *cmd] if nice else cmd),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    panels: dict[str, Any] = {}
    t0 = time.process_time()
    try:
        two = await run_demo(
            cfg, duration, seed, run_dir / "two", during=lambda svc, sim: _panels(proc, duration, panels)
        )
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    cpu_two = time.process_time() - t0
    # at low priority the browsers may be logged in only after the feed has started: the run with them
    # counts the `duration` s with both connected, the run without them its whole feed (also `duration` s)
    t_on, t_off = panels.pop("t_connected"), panels.pop("t_stop")
    lat_none = [
        r["latency_ms"] for r in load_pieces(run_dir / "none" / "records.sqlite") if r["latency_ms"] is not None
    ]
    lat_two = [
        r["latency_ms"]
        for r in load_pieces(run_dir / "two" / "records.sqlite")
        if r["latency_ms"] is not None and t_on <= r["t_wall"] <= t_off
    ]

    def figures(r: dict[str, Any], cpu: float) -> dict[str, Any]:
        return {**headline(r), "service_cpu_s": round(cpu, 1), "feed_s": r["duration_s"]}

    return {
        "lat_none": lat_none,
        "lat_two": lat_two,
        "no_browser": figures(none, cpu_none),
        "two_browsers": {
            **figures(two, cpu_two),
            "latency_ms_while_connected": percentiles(lat_two),
            "browsers": panels,
        },
    }


async def run_bench_hmi(
    cfg: SimLineConfig, duration: float, seed: int, run_dir: Path, nice: int = 19, repeat: int = 1
) -> dict[str, Any]:
    """`repeat` pairs of runs (no browser, two browsers); p99 of each side pooled over the pairs, and their ratio.

    Single runs on a shared 2-core machine vary by tens of percent in p99 between identical runs:
    more pairs make the ratio mean something.
    """
    from sim.report import percentiles

    if cfg.hmi is None or not cfg.hmi.enabled:
        raise ValueError("the config's hmi section must be enabled")
    pairs = [await _pair(cfg, duration, seed, run_dir / f"pair-{i + 1}", nice) for i in range(repeat)]
    pooled_none = percentiles([v for p in pairs for v in p.pop("lat_none")])
    pooled_two = percentiles([v for p in pairs for v in p.pop("lat_two")])
    q, b = pooled_none["p99"], pooled_two["p99"]
    return {
        "latency_ms_no_browser": pooled_none,
        "latency_ms_two_browsers_connected": pooled_two,
        "p99_ratio": round(b / q, 3) if q and b else None,
        "pairs": pairs,
        "browser_nice": nice,
        "duration_s": duration,
        "seed": seed,
    }


if __name__ == "__main__":
    browse_main()
