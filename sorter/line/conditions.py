"""The line's alarm conditions, read off one LineStats: what holds right now, and what to do about it.

The alarm board (sorter/core/alarms.py) turns conditions into alarms (debounced, acknowledged, kept
for the hand-over); the side services (HMI, OPC UA server) add their own conditions.
"""

from __future__ import annotations

from sorter.core.alarms import Condition
from sorter.core.linestate import LineStats
from sorter.core.packml import State

PLC_ALARM_ACTIONS = {
    "offline": "check the PLC's network cable and power; the line is held meanwhile",
    "estop": "release the e-stop when it is safe, then Clear and Reset",
    "air_pressure_low": "check the compressor and the valve manifold's air supply",
    "watchdog_tripped": "the PLC stopped hearing the PC; Reset once the link is stable",
    "eject_queue_overflow": "the PC sent more commands than the PLC queue holds; Reset",
}
# cameras are expected to deliver only while the belt runs for production
CAMERAS_EXPECTED = frozenset({State.EXECUTE, State.SUSPENDED, State.HELD})
RECORDS_BACKLOG = 1000  # rows waiting for the disk beyond this: the database is not keeping up


def line_conditions(stats: LineStats) -> list[Condition]:
    """The alarm conditions that hold in `stats`."""
    st = stats.plc
    out = [
        Condition(
            f"plc_{a}",
            (st.last_error or "no answer") if a == "offline" else f"the PLC reports {a.replace('_', ' ')}",
            PLC_ALARM_ACTIONS.get(a, "check the PLC"),
        )
        for a in st.alarms
    ]
    bar = stats.hallbar
    if bar is not None and not bar.online:
        out.append(
            Condition(
                "hallbar_offline",
                bar.reason or "no data",
                "check the bar's USB/serial cable and power (deciding on the camera alone meanwhile)",
            )
        )
    if stats.state in CAMERAS_EXPECTED:
        out += [
            Condition(f"camera_{c.name}_offline", c.reason or "no frames", "check the camera's cable and power")
            for c in stats.cameras
            if not c.online
        ]
    if stats.records_error is not None:
        out.append(
            Condition(
                "records_disk",
                f"the records database refuses writes ({stats.records_error}); "
                f"{stats.records_pending} rows held in memory",
                "free space on (or repair) the disk holding the records database: the rows are written once it "
                "takes them, up to records.buffer_max_rows",
            )
        )
    if stats.records_disk_low is not None:
        out.append(
            Condition(
                "records_disk_low",
                stats.records_disk_low,
                "free space on the disk holding the records database before it fills up (rows would then wait "
                "in memory, up to records.buffer_max_rows)",
            )
        )
    if stats.records_dropped:
        out.append(
            Condition(
                "records_dropped",
                f"{stats.records_dropped} rows refused: the in-memory buffer (records.buffer_max_rows) was full",
                "these rows are lost: free the records disk; the shift report misses those pieces",
            )
        )
    if stats.records_pending > RECORDS_BACKLOG:
        out.append(
            Condition(
                "records_not_written",
                f"{stats.records_pending} rows waiting",
                "check the disk holding the records database",
            )
        )
    return out
