"""What the line shows to the outside (OPC UA server, later the HMI): one immutable snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field

from sorter.packml import State


@dataclass(frozen=True, slots=True)
class LineSnapshot:
    state: State
    fraction_counts: dict[str, int] = field(default_factory=dict)  # every configured fraction, bank order
    pieces_per_minute: float = 0.0  # over the last minute
    purity: dict[str, float] = field(default_factory=dict)  # live estimate from decision confidences; nan if none
    model_version: str = ""
    alarms: list[str] = field(default_factory=list)  # active alarms, "name: cause" each
