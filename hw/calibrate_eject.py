"""Eject timing offset (`ejection.valve_open_delay_ms`): where the air really hits, found from hits.

What is measured, and why this way. The planner opens the valves `valve_open_delay_ms` (and closes
them `valve_close_delay_ms`) before the piece reaches the valve row; if the valves, the PLC's
outputs and the air's travel together take longer or shorter, the air window lands downstream or
upstream of the piece. Whether a piece was hit is what a plant can observe cheaply and reliably:
a light barrier in the bank's chute counts every piece that falls in (the PLC counts it beside
the encoder: an optional input per bank, docs/plc-interface.md). A check camera at the valve row
would see each piece's deflection, but it is another camera with its own triggering and
calibration, and what it sees (a piece nudged, a piece blown) still has to be turned into hit or
miss; the barrier says exactly that.

So the script runs the line's own pipeline (sorter.line.service.LineService: cameras, tracking,
planner, PLC link) with a calibration variant of the config - every test piece routed to the
bank, the air window deliberately narrow (no lead/trail margins: exactly the piece's length) -
and sends groups of test pieces through at candidate timing offsets, shifting the whole air
window (opening and closing delays together). Per group, the chute counter's increase over the
commands the PLC accepted is the hit ratio. The hit ratio against the offset is a plateau whose
edges lie where the narrow window slides off the piece; its centre is the offset that puts the
air window's centre on the piece's centre, whatever share of a piece the air must catch to
deflect it. The scan is coarse (every 2 ms over the range) then fine (0.5 ms across each edge);
each edge is where the ratio crosses half the plateau.

Hits see the window's centre, so what is found is the common timing offset: the opening and
closing delays are both shifted by it (their difference, the valves' datasheet asymmetry, is
kept). Groups are kept apart on the belt (`--gap-mm`, pieces in between are let through) so the
chute's counts can be told apart even though pieces fall for a while before the barrier.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import sqlite3
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from hw.common import (
    Change,
    HwError,
    config_option,
    console,
    load,
    prompt,
    run_app,
    script_errors,
    show_measurement,
    write_changes,
    yes_option,
)
from hw.plc import connected_plc, describe_plc, plc_check
from sorter.app import build_line
from sorter.config import LineConfig
from sorter.core.messages import Decision
from sorter.core.messages import Outcome as PlanOutcome
from sorter.core.packml import State
from sorter.core.planner import EjectPlanner, Plan
from sorter.drivers.plc.base import PlcError, chute_delta
from sorter.line.service import LineService
from sorter.logs import setup_logging
from sorter.vision.classify import ModelError

SCRIPT = "calibrate_eject"
COARSE_MS = 2.0
FINE_MS = 0.5
_POLL_S = 0.02  # chute counter reads: 50 mm of belt at 2.5 m/s, well inside half a gap
_IDLE_S = 15.0  # no test piece for this long: they ran out


# --- which offsets to try ---
@dataclass
class Point:
    offset_ms: float
    hits: int
    n: int


@dataclass(frozen=True)
class Edges:
    rise: float  # ms: the hit ratio crosses half its plateau going up ...
    fall: float  # ... and going down
    sigma_rise: float
    sigma_fall: float
    bracket_rise: tuple[float, float]  # the neighbouring offsets tried around each edge
    bracket_fall: tuple[float, float]
    plateau: float

    @property
    def centre(self) -> float:
        return (self.rise + self.fall) / 2

    @property
    def sigma(self) -> float:
        return math.hypot(self.sigma_rise, self.sigma_fall) / 2

    @property
    def half_width(self) -> float:
        return (self.fall - self.rise) / 2


def pooled(points: list[Point]) -> list[Point]:
    by: dict[float, Point] = {}
    for p in points:
        q = by.setdefault(round(p.offset_ms, 6), Point(round(p.offset_ms, 6), 0, 0))
        q.hits += p.hits
        q.n += p.n
    return sorted((p for p in by.values() if p.n), key=lambda p: p.offset_ms)


def _crossing(a: Point, b: Point, half: float) -> tuple[float, float]:
    """Where the ratio crosses `half` between two offsets (linear), and how well that is known."""
    ra, rb = a.hits / a.n, b.hits / b.n
    x = a.offset_ms + (half - ra) / (rb - ra) * (b.offset_ms - a.offset_ms)
    step = abs(b.offset_ms - a.offset_ms)
    # the step's resolution, plus the counting noise of the two ratios through the slope
    noise = math.sqrt(half * (1 - half) / min(a.n, b.n)) * step / max(abs(rb - ra), 1e-9)
    return x, math.sqrt(step**2 / 12 + noise**2)


def find_edges(points: list[Point]) -> Edges:
    """The hit curve's two edges; HwError when the scan did not catch both."""
    pts = pooled(points)
    if not pts:
        raise HwError("no group of test pieces was ejected at all", "are the valves connected and the air on?")
    ratios = [p.hits / p.n for p in pts]
    plateau = max(ratios)
    if plateau < 0.5:
        raise HwError(
            f"no timing offset hit more than {100 * plateau:.0f} % of the test pieces",
            "check the air pressure and the valves of the bank, the test pieces' weight, and --range-ms",
        )
    half = plateau / 2
    above = [i for i, r in enumerate(ratios) if r >= half]
    first, last = above[0], above[-1]
    if first == 0 or last == len(pts) - 1:
        side, at = ("smallest", pts[0]) if first == 0 else ("largest", pts[-1])
        raise HwError(
            f"the test pieces were still hit at the {side} offset tried ({at.offset_ms:g} ms): "
            "the hit curve's edge lies outside the scan",
            "widen --range-ms (or correct ejection.valve_open_delay_ms roughly by hand first)",
        )
    rise, s_rise = _crossing(pts[first - 1], pts[first], half)
    fall, s_fall = _crossing(pts[last], pts[last + 1], half)
    return Edges(
        rise,
        fall,
        s_rise,
        s_fall,
        (pts[first - 1].offset_ms, pts[first].offset_ms),
        (pts[last].offset_ms, pts[last + 1].offset_ms),
        plateau,
    )


def grid(lo: float, hi: float, step: float) -> list[float]:
    n = math.floor((hi - lo) / step + 1e-9)
    return [round(lo + i * step, 6) for i in range(n + 1)]


class Scan:
    """Coarse grid over the range, then a fine grid across each edge the coarse one found."""

    def __init__(self, centre_ms: float, range_ms: float, coarse_ms: float = COARSE_MS, fine_ms: float = FINE_MS):
        # offsets below 0 are fine to plan with (the air window just moves on): valves faster than the
        # config thinks put the hit curve's rising edge there
        self.lo = centre_ms - range_ms
        self.fine = fine_ms
        self.queue: deque[float] = deque(grid(self.lo, centre_ms + range_ms, coarse_ms))
        self.planned = len(self.queue) + 2 * (int(coarse_ms / fine_ms) + 1)  # for the progress bar
        self.stage = "coarse"
        self.points: list[Point] = []
        self.outstanding = 0  # groups sent whose result is not in yet
        self.done = False

    def next_offset(self) -> float | None:
        """The offset for the next group of pieces; None: wait (let the pieces pass) until results are in."""
        if self.done or not self.queue:
            return None
        self.outstanding += 1
        return self.queue.popleft()

    def result(self, offset_ms: float, hits: int, n: int) -> None:
        self.outstanding -= 1
        if n == 0:  # nothing ejected (commands expired, say): try that offset again
            self.queue.appendleft(offset_ms)
            return
        self.points.append(Point(offset_ms, hits, n))
        if self.outstanding == 0 and not self.queue:
            self._advance()

    def _advance(self) -> None:
        if self.stage == "fine":
            self.done = True
            return
        edges = find_edges(self.points)
        tried = {round(p.offset_ms, 6) for p in self.points}
        fine: list[float] = []
        for a, b in (edges.bracket_rise, edges.bracket_fall):
            fine += [x for x in grid(a - self.fine, b + self.fine, self.fine) if x not in tried]
        self.queue.extend(sorted(set(fine)))
        self.stage = "fine"
        if not self.queue:
            self.done = True


# --- groups of test pieces, each planned at one offset ---
@dataclass
class Group:
    offset_ms: float
    pieces: list[int] = field(default_factory=list)
    u_first: float = 0.0
    u_last: float = 0.0
    closed: bool = False
    evaluated: bool = False


class ScanPlanner(EjectPlanner):
    """The line's planner, at the timing offset of the group each test piece falls in.

    A group is up to `size` consecutive pieces; a new one starts only `gap` counts after the last
    piece ejected, so that each group's pieces have all fallen into the chute before the next one's
    arrive (pieces in between are let through, not ejected).
    """

    def __init__(self, cfg: LineConfig, bank: int, size: int, gap_mm: float, scan: Scan):
        fractions = [b.fraction for b in cfg.ejection.banks]
        super().__init__(cfg.ejection, fractions, cfg.belt.counts_per_mm)
        self.ejection = cfg.ejection
        self.fractions = fractions
        self.cpm = cfg.belt.counts_per_mm
        self.fraction = fractions[bank]
        self.size = size
        self.gap = gap_mm * self.cpm
        self.scan = scan
        self.groups: list[Group] = []
        self.skipped = 0
        self.seen = 0
        self._last_u: float | None = None
        self._planners: dict[float, EjectPlanner] = {}

    def at(self, offset_ms: float) -> EjectPlanner:
        """The line's planner with the whole air window shifted: both delays by the same amount."""
        if offset_ms not in self._planners:
            e = self.ejection
            shift = offset_ms - e.valve_open_delay_ms
            shifted = e.model_copy(
                update={"valve_open_delay_ms": offset_ms, "valve_close_delay_ms": e.valve_close_delay_ms + shift}
            )
            self._planners[offset_ms] = EjectPlanner(shifted, self.fractions, self.cpm)
        return self._planners[offset_ms]

    def plan(self, decisions: list[Decision], speed_mm_s: float) -> list[Plan]:
        order = sorted(range(len(decisions)), key=lambda i: decisions[i].piece.u)
        plans = {i: self._one(decisions[i], speed_mm_s) for i in order}
        return [plans[i] for i in range(len(decisions))]

    def _one(self, d: Decision, speed_mm_s: float) -> Plan:
        if d.fraction != self.fraction:  # not routed to the bank (held, no usable view): lets it pass
            return Plan(d, None, PlanOutcome.NO_EJECT)
        self.seen += 1
        u = d.piece.u
        g = self.groups[-1] if self.groups else None
        if g is not None and not g.closed and u - g.u_last > self.gap:
            g.closed = True  # a gap on the belt ends a group early
        if g is None or g.closed:
            if self._last_u is not None and u - self._last_u < self.gap:
                self.skipped += 1
                return Plan(d, None, PlanOutcome.NO_EJECT)
            offset = self.scan.next_offset()
            if offset is None:
                self.skipped += 1
                return Plan(d, None, PlanOutcome.NO_EJECT)
            plan = self.at(offset).plan([d], speed_mm_s)[0]
            if plan.command is None:  # no belt speed yet, say: no group, the offset goes back
                self.scan.result(offset, 0, 0)
                return plan
            g = Group(offset, u_first=u)
            self.groups.append(g)
        else:
            plan = self.at(g.offset_ms).plan([d], speed_mm_s)[0]
        if plan.command is not None:
            g.pieces.append(d.piece.id)
            g.u_last = self._last_u = u
            g.closed = len(g.pieces) >= self.size
        return plan


# --- the chute counter and the records ---
class Chute:
    """The bank's chute light-barrier counter, read with the encoder count the belt was at."""

    def __init__(self, bank: int, banks: int) -> None:
        self.bank, self.banks = bank, banks
        self.counts: list[float] = []  # encoder count at each reading (rising)
        self.totals: list[int] = []  # pieces counted since the first reading
        self._raw: int | None = None

    def add(self, count: float, raw: int) -> None:
        total = self.totals[-1] + chute_delta(raw, self._raw) if self._raw is not None else 0
        self._raw = raw
        if self.counts and count <= self.counts[-1]:  # the belt stood still: the newer value holds
            self.totals[-1] = total
            return
        self.counts.append(count)
        self.totals.append(total)

    def at(self, count: float) -> int | None:
        """The counter as of the belt reaching `count` (None: not read that far yet)."""
        i = bisect.bisect_left(self.counts, count)
        return self.totals[i] if i < len(self.counts) else None


def ejected(records: Path, run_id: str, ids: list[int]) -> int:
    """How many of these pieces' commands reached the PLC: all but those the records say did not
    (expired, timed out, offline); a row not yet flushed counts as sent."""
    if not ids:
        return 0
    db = sqlite3.connect(f"file:{records}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(ids))
        (lost,) = db.execute(
            f"SELECT COUNT(*) FROM pieces WHERE run_id=? AND id IN ({marks})"
            " AND outcome NOT IN ('accepted', 'pending')",
            [run_id, *ids],
        ).fetchone()
    finally:
        db.close()
    return len(ids) - int(lost)


def calibration_config(cfg: LineConfig, bank: int, records: Path) -> LineConfig:
    """The line for the calibration: every piece to the bank, a window exactly a piece long, nothing else on."""
    frac = cfg.ejection.banks[bank].fraction
    routing = cfg.routing.model_copy(
        update={
            "classes": {c: frac for c in cfg.routing.classes},
            "min_confidence": 0.0,
            "fallback_min_confidence": 0.0,
        }
    )
    ejection = cfg.ejection.model_copy(update={"margin_lead_mm": 0.0, "margin_trail_mm": 0.0})
    return cfg.model_copy(
        update={
            "routing": routing,
            "ejection": ejection,
            "magnetometer": None,  # routing does not need the field; the bar stays free
            "opcua_server": None,  # no SCADA on a calibration run
            "records": cfg.records.model_copy(update={"path": records}),
            "states": cfg.states.model_copy(update={"starved_after_s": 3600.0}),
        }
    )


# --- the run ---
@dataclass
class Outcome:
    edges: Edges
    points: list[Point]
    speed_mm_s: float
    length_mm: float
    groups: int
    skipped: int


async def check_chutes(cfg: LineConfig, bank: int) -> None:
    async with connected_plc(cfg) as link:
        try:
            await link.read_chute_counts(len(cfg.ejection.banks))
        except PlcError as exc:
            raise HwError(
                f"{describe_plc(cfg.plc)}: no chute light-barrier counter to count the hits: {exc}",
                f"this calibration needs a light barrier in bank {cfg.ejection.banks[bank].name}'s chute counted by "
                "the PLC (docs/plc-interface.md, chute counters)",
            ) from None


async def run_scan(cfg: LineConfig, bank: int, size: int, gap_mm: float, range_ms: float, timeout_s: float) -> Outcome:
    await check_chutes(cfg, bank)
    ej = cfg.ejection
    scan = Scan(ej.valve_open_delay_ms, range_ms)
    with tempfile.TemporaryDirectory(prefix="calibrate-eject-") as tmp:
        records = Path(tmp) / "records.sqlite"
        cal = calibration_config(cfg, bank, records)
        planner = ScanPlanner(cal, bank, size, gap_mm, scan)
        try:
            # the line's own wiring with this script's planner: it plans every piece from the first on
            line = build_line(cal, run_id=f"{SCRIPT}-{time.strftime('%Y%m%d-%H%M%S')}", planner=planner, north=False)
        except ModelError as exc:
            raise HwError(f"the line's classifier cannot be loaded: {exc}", "check classifier.model") from None
        service = line.service
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop), name="line-service")
        try:
            await _until_running(service, task, cfg)
            console.print("[bold cyan]>[/] the line runs: feed the test pieces now")
            return await _scan(service, task, planner, scan, cal, bank, records, timeout_s)
        finally:
            stop.set()
            try:
                await asyncio.wait_for(task, 30)
            except (TimeoutError, Exception):  # the result (or the error being raised) matters more
                task.cancel()


async def _until_running(service: LineService, task: asyncio.Task[None], cfg: LineConfig) -> None:
    deadline = time.monotonic() + cfg.states.start_timeout_s + 5
    left_stopped = False
    while (state := service.control.state) is not State.EXECUTE:
        if task.done():
            task.result()
            raise HwError("the line service stopped while starting the line", "see the messages above")
        left_stopped = left_stopped or state is not State.STOPPED
        if time.monotonic() > deadline or (left_stopped and state is State.STOPPED):  # Starting gave up
            st = service.plc.status
            if not st.online:
                raise HwError(f"{describe_plc(cfg.plc)} not reachable: {st.last_error}", plc_check(cfg.plc))
            silent = [f"camera {n}: {c.offline_reason}" for n, c in service.captures.items() if not c.online]
            raise HwError(
                "the line did not start: " + ("; ".join(silent) or f"state {service.control.state.label}"),
                "check the cameras' cables and trigger, the belt drive, the e-stop",
            )
        await asyncio.sleep(0.05)


async def _scan(
    service: LineService,
    task: asyncio.Task[None],
    planner: ScanPlanner,
    scan: Scan,
    cfg: LineConfig,
    bank: int,
    records: Path,
    timeout_s: float,
) -> Outcome:
    cpm = cfg.belt.counts_per_mm
    row = cfg.ejection.banks[bank].distance_mm * cpm
    half_gap = planner.gap / 2
    chute = Chute(bank, len(cfg.ejection.banks))
    speeds: list[float] = []
    t0 = last_piece = time.monotonic()
    seen = extra = 0
    cols = (TextColumn("{task.description}"), BarColumn())
    with Progress(*cols, console=console, transient=True) as bar:
        job = bar.add_task("scanning", total=scan.planned)
        while not scan.done:
            if task.done():
                task.result()
                raise HwError("the line service stopped during the calibration", "see the messages above")
            plc = service.plc
            if not plc.online:
                raise HwError(f"{describe_plc(cfg.plc)} lost: {plc.status.last_error}", plc_check(cfg.plc))
            t_req = time.monotonic()
            try:
                raw = (await plc.read_chute_counts(chute.banks))[bank]
            except PlcError as exc:
                raise HwError(
                    f"{describe_plc(cfg.plc)}: chute counter read failed: {exc}", plc_check(cfg.plc)
                ) from None
            now = time.monotonic()
            chute.add(service.clock.count_at((t_req + now) / 2), raw)
            speeds.append(plc.status.speed_mm_s)
            for g in planner.groups:
                if g.evaluated or not g.pieces:
                    continue
                end = chute.at(g.u_last + row + half_gap)  # every piece of it has fallen by then
                start = chute.at(g.u_first + row - half_gap)
                if end is None or start is None:
                    continue
                g.closed = g.evaluated = True
                n = ejected(records, service.run_id, g.pieces)
                if end - start > n:  # something else fell in: a neighbour blown along, a piece bouncing
                    extra += end - start - n
                scan.result(g.offset_ms, min(end - start, n), n)
            if planner.seen != seen:
                seen, last_piece = planner.seen, now
            if now - last_piece > _IDLE_S or now - t0 > timeout_s:
                raise HwError(
                    f"the test pieces ran out: {len(scan.points)} groups measured, about "
                    f"{max(scan.planned - len(scan.points), 1)} more needed",
                    "keep feeding test pieces (recirculate them from the chute) until the scan ends",
                )
            stage = f"{scan.stage}: {len(scan.points)} groups, {seen} pieces seen"
            bar.update(job, completed=len(scan.points), total=max(scan.planned, len(scan.points)), description=stage)
            await asyncio.sleep(max(0.0, _POLL_S - (time.monotonic() - t_req)))
    if extra:
        console.print(f"[yellow]{extra} more pieces fell into the chute than were ejected: is the belt clear?[/]")
    return Outcome(
        find_edges(scan.points),
        pooled(scan.points),
        float(np.median([s for s in speeds if s > 0] or [cfg.belt.nominal_speed_mm_s])),
        _piece_length(records, service.run_id, [i for g in planner.groups for i in g.pieces]),
        sum(1 for g in planner.groups if g.evaluated),
        planner.skipped,
    )


def _piece_length(records: Path, run_id: str, ids: list[int]) -> float:
    if not ids:
        return float("nan")
    db = sqlite3.connect(f"file:{records}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(ids))
        rows = db.execute(f"SELECT length_mm FROM pieces WHERE run_id=? AND id IN ({marks})", [run_id, *ids]).fetchall()
    finally:
        db.close()
    return float(np.median([r[0] for r in rows])) if rows else float("nan")


# --- the report ---
def curve_table(points: list[Point], edges: Edges) -> Table:
    t = Table(title="hit ratio against the timing offset (narrow window)")
    for col in ("offset ms", "hit / ejected", "ratio", ""):
        t.add_column(col, justify="right" if col != "" else "left")
    for p in points:
        r = p.hits / p.n
        t.add_row(f"{p.offset_ms:.1f}", f"{p.hits}/{p.n}", f"{r:.2f}", "#" * round(20 * r))
    return t


def margins_table(cfg: LineConfig, old_ms: float, new_ms: float, sigma_ms: float, v: float) -> Table:
    """Where the configured lead/trail margins really were before, and are now (mm of belt)."""
    e = cfg.ejection
    late_old = (new_ms - old_ms) * v / 1000  # the air came this much later than planned (upstream on the piece)
    t = Table(title=f"valve-window margins at {v:.0f} mm/s (mm; negative: the air misses part of the piece)")
    for col in ("", "lead (before the piece)", "trail (after it)"):
        t.add_column(col, justify="right")
    t.add_row("configured", f"{e.margin_lead_mm:.1f}", f"{e.margin_trail_mm:.1f}")
    t.add_row("before (old delay)", f"{e.margin_lead_mm - late_old:.1f}", f"{e.margin_trail_mm + late_old:.1f}")
    unc = sigma_ms * v / 1000
    t.add_row("after (new delay)", f"{e.margin_lead_mm:.1f} ± {unc:.1f}", f"{e.margin_trail_mm:.1f} ± {unc:.1f}")
    return t


def main(
    config: Path = config_option(),
    yes: bool = yes_option(),
    pieces: int = typer.Option(8, "--pieces", min=2, max=100, help="test pieces per timing offset tried"),
    bank_name: str | None = typer.Option(None, "--bank", help="the valve bank to calibrate (default: the first)"),
    range_ms: float = typer.Option(15.0, "--range-ms", min=2.0, help="scan the offset this far either side"),
    gap_mm: float = typer.Option(400.0, "--gap-mm", min=50.0, help="empty belt kept between groups of pieces"),
    timeout_s: float = typer.Option(600.0, "--timeout-s", min=10.0, help="give up after this long"),
) -> None:
    """Find the eject timing offset; write ejection.valve_open_delay_ms (and valve_close_delay_ms, shifted alike).

    Prepare:

    - the encoder and the cameras calibrated first (hw.calibrate_encoder, ...): the timing is found in counts;

    - the line service stopped: this script runs the line itself, every piece going to the bank;

    - a light barrier in the bank's chute, counted by the PLC (docs/plc-interface.md, chute counters);

    - about PIECES x 25 identical test pieces, compact and easily blown (e.g. 20 mm NdFeB discs);

    - feed them singly (recirculate them from the chute), in groups of PIECES, GAP-MM of belt between groups.

    The script runs the line and ejects each group at one timing offset, the window a piece long (no margins).

    From the chute's hits per group it scans the offset coarse then fine and finds the hit curve's centre.

    It reports the offset, its tolerance, and the margins the configured window really had before and has now.
    """
    setup_logging("warning")
    with script_errors():
        cfg = load(config)
        names = [b.name for b in cfg.ejection.banks]
        if bank_name is not None and bank_name not in names:
            raise HwError(f"no valve bank {bank_name!r}", f"banks: {', '.join(names)}")
        bank = names.index(bank_name) if bank_name is not None else 0
        prompt(
            f"have about {pieces * 25} identical test pieces ready; once the belt runs, feed them singly, "
            f"in groups of {pieces} with {gap_mm:g} mm of empty belt between groups; they go into bank "
            f"{names[bank]}'s chute",
            yes,
        )
        out = asyncio.run(run_scan(cfg, bank, pieces, gap_mm, range_ms, timeout_s))
        e, old = out.edges, cfg.ejection.valve_open_delay_ms
        console.print(curve_table(out.points, e))
        if e.centre < 0:
            raise HwError(
                f"the air hits the pieces {-e.centre:.1f} ms before the valves are even switched: impossible",
                f"check ejection.banks[{bank}].distance_mm and belt.counts_per_mm (hw.calibrate_encoder)",
            )
        show_measurement("eject timing offset (valve_open_delay_ms)", e.centre, e.sigma, "ms", digits=3)
        v = out.speed_mm_s
        console.print(
            f"  config has {old:g} ms: the air came {e.centre - old:+.2f} ms = {(e.centre - old) * v / 1000:+.1f} mm "
            "late (+) or early (-) on the pieces"
        )
        slack = (cfg.ejection.margin_lead_mm + cfg.ejection.margin_trail_mm) / 2 / v * 1000
        console.print(
            f"  timing tolerance: ±{e.half_width:.1f} ms with a window exactly a piece long "
            f"({out.length_mm:.1f} mm test pieces), ±{e.half_width + slack:.1f} ms with the configured margins"
        )
        console.print(margins_table(cfg, old, e.centre, e.sigma, v))
        shift = e.centre - old
        close = cfg.ejection.valve_close_delay_ms + shift
        if close < 0:
            console.print("[yellow]the closing delay would be negative: written as 0[/]")
        write_changes(
            config,
            [
                Change("ejection.valve_open_delay_ms", round(e.centre, 2)),
                Change("ejection.valve_close_delay_ms", round(max(close, 0.0), 2)),
            ],
            script=SCRIPT,
            yes=yes,
            residuals={
                "sigma_ms": e.sigma,
                "rise_ms": e.rise,
                "fall_ms": e.fall,
                "tolerance_ms": e.half_width,
                "plateau": e.plateau,
            },
            measured={
                "bank": names[bank],
                "offset_ms": e.centre,
                "speed_mm_s": v,
                "piece_length_mm": out.length_mm,
                "groups": out.groups,
                "pieces_let_through": out.skipped,
                "hit_curve": [[p.offset_ms, p.hits, p.n] for p in out.points],
            },
        )


if __name__ == "__main__":
    run_app(main)
