"""The mass estimate of a recorded piece, from its projected area and the config's mass model.

The camera sees a piece's projected area, not its volume: mass ≈ area × nominal thickness × density
of the decided class, with a thickness rule per class (the line config's `reports.mass_model`,
`MassRule` in sorter/config/schema.py). Good for trends and rough kg/h, not for invoicing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sorter.config import MassRule


def estimate_mass_g(row: dict[str, Any], model: Mapping[str, MassRule]) -> float:
    """Estimated mass of a recorded piece (g): projected area × nominal thickness × density of its class.

    A class without a rule of its own in `model` uses the rule for `other`.
    """
    area = row.get("area_mm2") or 0.0
    if area <= 0:
        return 0.0
    rule = model.get(row.get("cls") or "", model["other"])
    across = (row.get("x1_mm") or 0.0) - (row.get("x0_mm") or 0.0)
    longest = max(row.get("length_mm") or 0.0, across, 1e-6)
    width = min(area / longest, longest)  # mean width across the piece's longest extent
    thickness = min(rule.frac_of_width * width + rule.offset_mm, rule.max_mm)
    return area * thickness * rule.density_g_cm3 / 1000.0


def add_mass_estimates(pieces: list[dict[str, Any]], model: Mapping[str, MassRule]) -> None:
    """Set each piece record's `mass_est_g` (in place)."""
    for p in pieces:
        p["mass_est_g"] = estimate_mass_g(p, model)
