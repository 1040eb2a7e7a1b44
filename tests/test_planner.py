"""Ejection planning: valve masks, open/close counts, delays, purity protection."""

from __future__ import annotations

import pytest

from sorter.config import BankConfig, EjectionConfig, RoutingConfig
from sorter.core.decide import decide
from sorter.core.geometry import valve_span
from sorter.core.messages import Decision, Piece
from sorter.core.planner import EjectPlanner

pytestmark = pytest.mark.fast

CPM = 20.0
EJ = EjectionConfig(
    banks=[
        BankConfig(name="A", distance_mm=1000, fraction="ndfeb"),
        BankConfig(name="B", distance_mm=1250, fraction="ferrite_smco"),
    ],
    margin_lead_mm=3,
    margin_trail_mm=3,
    margin_side_mm=2,
    valve_open_delay_ms=4,
    valve_close_delay_ms=3,
)
ROUTING = RoutingConfig(
    classes={
        "ndfeb": "ndfeb",
        "ferrite": "ferrite_smco",
        "smco": "ferrite_smco",
        "steel": "residue",
        "other": "residue",
    },
    min_confidence=0.9,
)


def piece(pid: int, u: float, x0: float, x1: float, lead_mm: float = 10, trail_mm: float = 10) -> Piece:
    return Piece(
        id=pid,
        u=u,
        u_lead=u - lead_mm * CPM,
        u_trail=u + trail_mm * CPM,
        x=(x0 + x1) / 2,
        x0=x0,
        x1=x1,
        area_mm2=100,
        cameras=("cam0",),
        n_views=3,
    )


def decision(p: Piece, fraction: str) -> Decision:
    return Decision(p, {}, fraction, 0.99, fraction)


def planner() -> EjectPlanner:
    return EjectPlanner(EJ, ["ndfeb", "ferrite_smco"], CPM)


def test_window_centred_on_the_centroid_with_delays_compensated():
    p = piece(1, 100_000, 100, 130, lead_mm=8, trail_mm=14)  # asymmetric piece
    [plan] = planner().plan([decision(p, "ndfeb")], speed_mm_s=2500)
    cmd = plan.command
    assert plan.outcome == "planned" and cmd is not None and cmd.bank == 0
    counts_per_ms = 2500 * CPM / 1000
    # the air comes on (open_at + open delay) and goes off (close + close delay) symmetric about the centroid
    on = cmd.open_at + 4 * counts_per_ms
    off = cmd.open_at + cmd.open_for + 3 * counts_per_ms
    assert abs((on + off) / 2 - (p.u + 1000 * CPM)) <= 1
    assert off - on >= (14 + 3) * 2 * CPM - 2  # covers the longer side plus margin, both ways
    valves = [v for v in range(32) if cmd.valve_mask >> v & 1]
    lo, hi = valve_span(EJ, valves[0])[0], valve_span(EJ, valves[-1])[1]
    assert lo <= 100 - 2 and hi >= 130 + 2 and lo > 100 - 2 - 18.75 and hi < 130 + 2 + 18.75


def test_bank_b_and_no_eject():
    pl = planner()
    a, b, c = piece(1, 1e5, 10, 30), piece(2, 2e5, 10, 30), piece(3, 3e5, 10, 30)
    plans = pl.plan([decision(a, "ferrite_smco"), decision(b, "residue"), decision(c, "ndfeb")], 2500)
    assert plans[0].command.bank == 1 and plans[1].command is None and plans[1].outcome == "no_eject"
    assert plans[2].command.bank == 0


def test_neighbour_of_other_fraction_is_spared():
    pl = planner()
    target = piece(1, 100_000, 100, 140)
    beside = piece(2, 100_000, 141, 160)  # touching on the right, residue
    plans = pl.plan([decision(target, "ndfeb"), decision(beside, "residue")], 2500)
    cmd = plans[0].command
    assert cmd is not None
    valves = [v for v in range(32) if cmd.valve_mask >> v & 1]
    # the air may graze it (an edge valve over its first mm), never hit it
    grazed = sum(max(0.0, min(160, valve_span(EJ, v)[1]) - max(141, valve_span(EJ, v)[0])) for v in valves)
    assert grazed / (160 - 141) <= EJ.neighbour_hit_share
    assert sum(max(0.0, min(140, valve_span(EJ, v)[1]) - max(100, valve_span(EJ, v)[0])) for v in valves) >= 30


def test_unavoidable_conflict_skips_the_ejection():
    pl = planner()
    target = piece(1, 100_000, 100, 110)
    over = piece(2, 100_000 + 12 * CPM, 95, 115)  # right behind, same valves, steel
    plans = pl.plan([decision(target, "ndfeb"), decision(over, "residue")], 2500)
    assert plans[0].command is None and plans[0].outcome == "conflict"


def test_neighbour_ejected_upstream_is_no_conflict_for_bank_b():
    pl = planner()
    magnet = piece(1, 100_000, 100, 130)
    ferrite = piece(2, 100_000, 133, 145)  # beside it: the magnet's valve 7 is dropped, it still goes at A
    plans = pl.plan([decision(ferrite, "ferrite_smco"), decision(magnet, "ndfeb")], 2500)
    assert plans[1].command is not None and plans[1].command.bank == 0
    assert not plans[1].command.valve_mask >> 7 & 1
    # at bank B the magnet is gone, so the ferrite's valves may cover where it was
    assert plans[0].command is not None and plans[0].command.bank == 1
    assert plans[0].command.valve_mask >> 6 & 1


def test_low_confidence_goes_to_residue():
    import numpy as np

    p = piece(1, 1e5, 10, 30)
    labels = ["ndfeb", "ferrite", "smco", "steel", "other"]
    sure = decide(p, np.array([[0.99, 0.0025, 0.0025, 0.0025, 0.0025]] * 3), labels, ROUTING)
    unsure = decide(p, np.array([[0.6, 0.4, 0, 0, 0], [0.5, 0.5, 0, 0, 0]]), labels, ROUTING)
    none = decide(p, None, labels, ROUTING)
    assert sure.fraction == "ndfeb" and sure.confidence > 0.98
    assert unsure.fraction == "residue" and unsure.cls == "ndfeb"
    assert none.fraction == "residue"


def test_neighbour_grazed_by_the_margin_is_no_conflict():
    pl = planner()
    target = piece(1, 100_000, 100, 120)  # 20 mm long, window reaches 3 mm past each edge
    behind = piece(2, 100_000 + 21 * CPM, 100, 120, lead_mm=10, trail_mm=10)  # starts 1 mm behind the target
    plans = pl.plan([decision(target, "ndfeb"), decision(behind, "residue")], 2500)
    assert plans[0].outcome == "planned"  # 2 mm of its 20 mm under the air: 10 % is not a hit


def test_magnet_left_on_the_belt_is_not_blown_into_a_later_fraction():
    pl = planner()
    magnet = piece(1, 100_000, 100, 110)
    steel = piece(2, 100_000 + 12 * CPM, 95, 115)  # makes the magnet's bank-A ejection impossible
    ferrite = piece(3, 100_000 - 12 * CPM, 95, 115)  # ejected at bank B, right next to the magnet
    plans = pl.plan([decision(ferrite, "ferrite_smco"), decision(magnet, "ndfeb"), decision(steel, "residue")], 2500)
    assert plans[1].outcome == "conflict"
    assert plans[0].outcome == "conflict"  # the magnet is still on the belt at bank B


def test_window_closes_early_to_spare_a_small_neighbour_right_behind():
    pl = planner()
    target = piece(1, 100_000, 100, 120)  # 20 mm long
    behind = piece(2, 100_000 + 13.5 * CPM, 105, 111, lead_mm=3, trail_mm=3)  # 6 mm steel, 0.5 mm behind
    plans = pl.plan([decision(target, "ndfeb"), decision(behind, "residue")], 2500)
    cmd = plans[0].command
    assert plans[0].outcome == "planned" and cmd is not None
    counts_per_ms = 2500 * CPM / 1000
    air_off = cmd.open_at + cmd.open_for + 3 * counts_per_ms - 1000 * CPM  # back in belt-fixed counts
    assert air_off <= behind.u_lead  # the air is off before the neighbour arrives
    assert air_off >= target.u_trail - 4 * CPM  # and the target is still (mostly) covered


def test_an_edge_valve_that_only_grazes_the_neighbour_stays_on_the_target():
    pl = planner()
    target = piece(1, 100_000, 113, 149)  # valves 6 and 7 (131.25-150 mm) cover it
    beside = piece(2, 100_000, 149.5, 189.5)  # residue: valve 7 reaches 0.5 mm of its 40, valve 8 half of it
    plans = pl.plan([decision(target, "ndfeb"), decision(beside, "residue")], 2500)
    cmd = plans[0].command
    assert cmd is not None and cmd.valve_mask >> 7 & 1 and not cmd.valve_mask >> 8 & 1


def air_window(cmd, speed_mm_s: float = 2500) -> tuple[float, float]:
    """Where the air is really on, back in belt-fixed counts at the camera line (bank A's row)."""
    counts_per_ms = speed_mm_s * CPM / 1000
    on = cmd.open_at + EJ.valve_open_delay_ms * counts_per_ms - 1000 * CPM
    return on, cmd.open_at + cmd.open_for + EJ.valve_close_delay_ms * counts_per_ms - 1000 * CPM


def test_diagonal_touching_neighbour_is_spared_by_a_window_over_most_of_the_target():
    # a steel piece touching the magnet's back corner: their boxes overlap along (no closing early over
    # the margin alone) and across (dropping valves leaves too little of the magnet under air)
    target = piece(1, 100_000, 100, 130)  # 20 mm long, valves 5-6
    corner = piece(2, 100_000 + 18 * CPM, 115, 145)  # leading edge 8 mm behind the magnet's centroid
    plans = planner().plan([decision(target, "ndfeb"), decision(corner, "residue")], 2500)
    cmd = plans[0].command
    assert plans[0].outcome == "planned" and cmd is not None
    on, off = air_window(cmd)
    # the air is off before the steel arrives, by the uncertainty of the border between touching pieces
    assert target.u < off <= corner.u_lead - EJ.touching_gap_mm * CPM + 1
    assert abs((on + off) / 2 - target.u) <= 1  # centred on the magnet's centroid, so it is not spun off
    assert off - on >= 0.5 * (target.u_trail - target.u_lead)  # over half of it at least
    # without a window over part of the piece (share 1) the magnet is spared instead
    strict = EjectPlanner(EJ.model_copy(update={"min_footprint_share": 1.0}), ["ndfeb", "ferrite_smco"], CPM)
    assert strict.plan([decision(target, "ndfeb"), decision(corner, "residue")], 2500)[0].outcome == "conflict"


def test_a_window_over_part_of_the_target_keeps_its_centroid_and_share():
    # the neighbour's edge 1.5 mm behind the centroid: the air over the front half only is not enough
    target = piece(1, 100_000, 100, 110)
    behind = piece(2, 100_000 + 11.5 * CPM, 95, 115)
    assert planner().plan([decision(target, "ndfeb"), decision(behind, "residue")], 2500)[0].outcome == "conflict"


def probs_decision(p: Piece, fraction: str, probs: dict[str, float]) -> Decision:
    return Decision(p, probs, max(probs, key=lambda c: probs[c]), max(probs.values()), fraction)


def test_conflict_decided_by_expected_value():
    target = piece(1, 100_000, 100, 110)
    over = piece(2, 100_000 + 12 * CPM, 95, 115)  # right behind, same valves: no window spares it
    magnet = {"ndfeb": 0.99, "steel": 0.01}
    routes = dict(ROUTING.classes)
    ej = EJ.model_copy(update={"conflict_value": {"ndfeb": 0.5}})

    def outcome(neighbour_probs: dict[str, float], cfg: EjectionConfig = ej) -> str:
        pl = EjectPlanner(cfg, ["ndfeb", "ferrite_smco"], CPM, routes=routes)
        d = probs_decision(target, "ndfeb", magnet)
        n = probs_decision(over, "residue", neighbour_probs)  # unsure: residue
        return pl.plan([d, n], 2500)[0].outcome

    # an unsure neighbour that is most likely a magnet too: 0.5 x 0.99 > 0.3 expected contaminant
    assert outcome({"ndfeb": 0.7, "steel": 0.3}) == "planned"
    # a neighbour that is surely steel: 0.5 x 0.99 < 0.95 expected contaminant, the magnet is spared
    assert outcome({"ndfeb": 0.05, "steel": 0.95}) == "conflict"
    # no value said in the config: the neighbour is always spared
    assert outcome({"ndfeb": 0.7, "steel": 0.3}, EJ) == "conflict"


def test_a_window_over_part_of_the_target_keeps_clear_of_the_uncertain_border():
    # 6.5 mm from the centroid to the neighbour's edge as segmented: 6 mm of air each way (0.5 mm short
    # of it) covers 60 % of the 20 mm magnet; 2 mm short, 4.5 mm each way, only 45 %
    target = piece(1, 100_000, 100, 130)
    corner = piece(2, 100_000 + 16.5 * CPM, 115, 145)
    d = [decision(target, "ndfeb"), decision(corner, "residue")]
    assert EJ.touching_gap_mm == 0.5 and planner().plan(d, 2500)[0].outcome == "planned"
    wary = EjectPlanner(EJ.model_copy(update={"touching_gap_mm": 2.0}), ["ndfeb", "ferrite_smco"], CPM)
    assert wary.plan(d, 2500)[0].outcome == "conflict"
