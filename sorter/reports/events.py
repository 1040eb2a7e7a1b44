"""The line's history from the events table: PackML state periods, alarms, and stops/holds/suspensions."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

# states in which the line is producing (or pausing for lack of feed)
PRODUCING_STATES = ("Execute", "Suspending", "Suspended", "Unsuspending")
# states a stop, hold or suspension ends in
STOP_STATES = ("Stopped", "Aborted", "Held", "Suspended")


def state_periods(events: list[dict[str, Any]], t_end: float) -> list[tuple[str, float, float, str]]:
    """(state, t0, t1, run) for each run's PackML states, from its start/state/stop events."""
    out: list[tuple[str, float, float, str]] = []
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_run[e["run_id"]].append(e)
    for run_id, evs in by_run.items():
        cur: str | None = None
        t0 = 0.0
        for e in evs:
            if e["kind"] == "start":
                cur, t0 = "Stopped", e["t_wall"]
            elif e["kind"] == "state":
                if cur is not None:
                    out.append((cur, t0, e["t_wall"], run_id))
                cur, t0 = e["detail"].get("new", "?"), e["t_wall"]
            elif e["kind"] == "stop":
                if cur is not None:
                    out.append((cur, t0, e["t_wall"], run_id))
                cur = None
        if cur is not None:  # still running (or crashed without a stop event)
            out.append((cur, t0, max(t_end, t0), run_id))
    return out


def overlap_s(t0: float, t1: float, lo: float, hi: float) -> float:
    """Seconds of [t0, t1] inside [lo, hi]."""
    return max(0.0, min(t1, hi) - max(t0, lo))


def time_per_state(events: list[dict[str, Any]], lo: float, hi: float) -> dict[str, float]:
    """Seconds in each state within [lo, hi], summed over the runs."""
    state_s: dict[str, float] = defaultdict(float)
    for st, t0, t1, _ in state_periods(events, hi):
        if (d := overlap_s(t0, t1, lo, hi)) > 0:
            state_s[st] += d
    return state_s


def alarm_periods(events: list[dict[str, Any]], lo: float, hi: float) -> list[dict[str, Any]]:
    """Each alarm active within [lo, hi): raised, cleared (or the run's stop, if still active), duration."""
    alarms: list[dict[str, Any]] = []
    open_alarms: dict[tuple[str, str], dict[str, Any]] = {}
    for e in events:
        d, key = e["detail"], (e["run_id"], e["detail"].get("alarm", ""))
        if e["kind"] == "alarm":
            a = {
                "alarm": d.get("alarm"),
                "raised": e["t_wall"],
                "cleared": None,
                "active_at_stop": False,
                "reason": d.get("reason", ""),
                "run_id": e["run_id"],
            }
            open_alarms[key] = a
            alarms.append(a)
        elif e["kind"] == "alarm_cleared" and key in open_alarms:
            open_alarms.pop(key)["cleared"] = e["t_wall"]
        elif e["kind"] == "stop":
            for k in [k for k in open_alarms if k[0] == e["run_id"]]:
                a = open_alarms.pop(k)  # still active when the service stopped: nobody watches any more
                a["cleared"], a["active_at_stop"] = e["t_wall"], True
    alarms = [a for a in alarms if a["raised"] < hi and (a["cleared"] is None or a["cleared"] >= lo)]
    for a in alarms:
        a["duration_s"] = round((a["cleared"] if a["cleared"] is not None else hi) - a["raised"], 1)
    return alarms


def stops(events: list[dict[str, Any]], lo: float, hi: float) -> list[dict[str, Any]]:
    """Each entry into a stop, hold or suspension within [lo, hi), with why (the acting state's reason)."""
    out: list[dict[str, Any]] = []
    last_why: dict[str, str] = {}
    for e in events:
        if e["kind"] != "state":
            continue
        d = e["detail"]
        why = d.get("why", "")
        if why in ("", "state complete"):  # Held after Holding...: the reason is the acting state's
            why = last_why.get(e["run_id"], why)
        last_why[e["run_id"]] = why
        if d.get("new") in STOP_STATES and lo <= e["t_wall"] < hi:
            out.append({"t": e["t_wall"], "state": d.get("new"), "why": why, "run_id": e["run_id"]})
    return out
