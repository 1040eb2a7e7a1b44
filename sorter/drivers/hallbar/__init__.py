"""The Hall-sensor bar under the belt: its serial protocol (docs/hall-bar.md), the
board-clock sync, the serial link and the map of its readings onto the belt.

pyserial is imported only in `sorter/drivers/hallbar/link.py`.
"""

from sorter.drivers.hallbar.fieldmap import FieldMap, FieldResult
from sorter.drivers.hallbar.link import BarReading, HallBar
from sorter.drivers.hallbar.protocol import DataLine, InfoLine, LineError, format_data, format_info, parse_line
from sorter.drivers.hallbar.sync import BoardClock

__all__ = [
    "BarReading",
    "BoardClock",
    "DataLine",
    "FieldMap",
    "FieldResult",
    "HallBar",
    "InfoLine",
    "LineError",
    "format_data",
    "format_info",
    "parse_line",
]
