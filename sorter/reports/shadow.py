"""`sorter report --shadow`: how a shadow model's decisions compare with the live model's (docs/shadow.md).

Read from the records' `shadow` table (sorter/line/records.py): agreement overall and by live class, the live ×
shadow confusion, fraction changes, the pieces where they differ (with their crops in the HTML page) and, where
a technician has labelled pieces (the label log `labels.csv` the labelling feature writes), both models'
accuracy on those pieces.
"""

from __future__ import annotations

import base64
import csv
import html
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

from sorter.core.shadow import accuracy, summary_dict
from sorter.line.records import load_shadow
from sorter.reports.errors import ReportError

# a label log's `new` values that mean no label: the crop was thrown out (`discard`), or the label before was
# taken back and the piece queued again (`undone`, the labelling feature's undo)
NO_LABEL = ("discard", "undone")
LABEL_COLUMNS = ("time", "user", "run_id", "piece_id", "file", "old", "new")


def read_labels(folder: Path) -> dict[tuple[str, int], str]:
    """(run_id, piece_id) -> label from `folder/labels.csv`: the newest row per piece wins (rows are appended in
    time order; `time` breaks ties written out of order), `discard` or `undone` leave the piece unlabelled."""
    path = folder / "labels.csv"
    if not path.is_file():
        raise ReportError(f"{path}: no label log (the labelling feature writes labels.csv in its folder)")
    newest: dict[tuple[str, int], tuple[str, int, str]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ReportError(f"{path}: the label log lacks columns {missing} (expected {','.join(LABEL_COLUMNS)})")
        for n, row in enumerate(reader):
            try:
                key = (row["run_id"], int(row["piece_id"]))
            except ValueError:
                raise ReportError(f"{path}: line {n + 2}: piece_id {row['piece_id']!r} is not a number") from None
            stamp = (row["time"], n, row["new"].strip())
            if key not in newest or stamp[:2] >= newest[key][:2]:
                newest[key] = stamp
    return {k: v[2] for k, v in newest.items() if v[2] and v[2] not in NO_LABEL}


def _runs(db: Path) -> list[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in con.execute("SELECT run_id FROM shadow GROUP BY run_id ORDER BY MAX(t_wall)")]
    except sqlite3.Error:
        return []
    finally:
        con.close()


def shadow_report(db: Path, run: str | None = None, labels: Path | None = None) -> dict[str, Any]:
    """The comparison of one run (default: the latest run that had a shadow model) as JSON-ready figures."""
    if not db.exists():
        raise ReportError(f"records database {db} does not exist (the config's records.path)")
    runs = _runs(db)
    if not runs:
        raise ReportError(f"{db}: no shadow decisions recorded (start a shadow model: docs/shadow.md)")
    run = run or runs[-1]
    if run not in runs:
        raise ReportError(f"{db}: run {run} has no shadow decisions; runs that have: {', '.join(runs)}")
    rows = load_shadow(db, run)
    models = sorted({r["model"] for r in rows})
    confusion: Counter[tuple[str, str]] = Counter((r["live_cls"], r["cls"]) for r in rows)
    fractions: Counter[tuple[str, str]] = Counter((r["live_fraction"], r["fraction"]) for r in rows)
    out = summary_dict(", ".join(models), len(rows), 0, confusion, fractions)
    # the records hold what was compared; how many were skipped, the service's shadow_stop events say
    out |= {"db": str(db), "run_id": run, "skipped": _skipped(db, run)}
    out["differing"] = [
        {k: r[k] for k in ("piece_id", "model", "live_cls", "live_confidence", "cls", "confidence", "has_crop")}
        | {"live_fraction": r["live_fraction"], "fraction": r["fraction"]}
        for r in rows
        if r["live_cls"] != r["cls"]
    ]
    if labels is not None:
        lab = read_labels(labels)
        out["labelled"] = accuracy(
            (lab[run, r["piece_id"]], r["live_cls"], r["cls"]) for r in rows if (run, r["piece_id"]) in lab
        )
    return out


def _skipped(db: Path, run: str) -> int | None:
    """Pieces the shadow skipped, from the run's shadow_stop events and its stop (None: not known yet)."""
    import json

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT detail FROM events WHERE run_id=? AND kind='shadow_stop'", (run,)).fetchall()
    finally:
        con.close()
    vals = [json.loads(d).get("skipped") for (d,) in rows if d]
    return sum(v for v in vals if isinstance(v, int)) if vals else None


def shadow_text(r: dict[str, Any]) -> str:
    """The comparison as text for the terminal."""
    lines = [
        f"shadow model {r['model']} beside the live one, run {r['run_id']} ({r['db']})",
        f"compared {r['compared']} pieces"
        + (f", skipped {r['skipped']}" if r.get("skipped") is not None else "")
        + f"; agreement {_pct(r['agreement'])}",
        "",
        "by live class:       pieces  agree  agreement",
    ]
    for c, v in r["by_class"].items():
        lines.append(f"  {c:<18} {v['pieces']:>6} {v['agree']:>6}  {_pct(v['agreement'])}")
    classes = sorted({c for row in r["confusion"].values() for c in row} | set(r["confusion"]))
    lines += ["", "live \\ shadow       " + " ".join(f"{c[:10]:>10}" for c in classes)]
    for a in sorted(r["confusion"]):
        lines.append(f"  {a:<18}" + " ".join(f"{r['confusion'][a].get(b, 0):>10}" for b in classes))
    if r["fraction_changes"]:
        lines += ["", "fraction changes (live -> shadow):"]
        for a, to in r["fraction_changes"].items():
            lines += [f"  {a} -> {b}: {n}" for b, n in to.items()]
    lines += ["", f"differing pieces: {len(r['differing'])}"]
    for d in r["differing"][:20]:
        lines.append(
            f"  piece {d['piece_id']}: live {d['live_cls']} ({d['live_confidence']:.3f}) "
            f"shadow {d['cls']} ({d['confidence']:.3f})"
        )
    if len(r["differing"]) > 20:
        lines.append(f"  ... {len(r['differing']) - 20} more (--json, --html)")
    if "labelled" in r:
        a = r["labelled"]
        lines += [
            "",
            f"on {a['pieces']} labelled pieces: live {_pct(a['live_accuracy'])} correct, "
            f"shadow {_pct(a['shadow_accuracy'])} correct",
        ]
    return "\n".join(lines)


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def write_shadow_html(path: Path, r: dict[str, Any], db: Path) -> None:
    """One self-contained page: the text's tables and the differing pieces' crops (base64 PNG)."""
    crops = {row["piece_id"]: row["crop"] for row in load_shadow(db, r["run_id"], crops=True) if row["crop"]}
    esc = html.escape
    classes = sorted({c for row in r["confusion"].values() for c in row} | set(r["confusion"]))
    conf = "".join(
        f"<tr><td>{esc(a)}</td>"
        + "".join(f"<td{' class=same' if a == b else ''}>{r['confusion'][a].get(b, 0)}</td>" for b in classes)
        + "</tr>"
        for a in sorted(r["confusion"])
    )
    by_class = "".join(
        f"<tr><td>{esc(c)}</td><td>{v['pieces']}</td><td>{v['agree']}</td><td>{_pct(v['agreement'])}</td></tr>"
        for c, v in r["by_class"].items()
    )
    cards = "".join(
        "<figure>"
        + (
            f"<img alt='piece {d['piece_id']}' src='data:image/png;base64,{_b64(crops[d['piece_id']])}'>"
            if d["piece_id"] in crops
            else "<div class=nocrop>no crop kept</div>"
        )
        + f"<figcaption>piece {d['piece_id']}<br>live {esc(d['live_cls'])} {d['live_confidence']:.2f}"
        f"<br>shadow {esc(d['cls'])} {d['confidence']:.2f}</figcaption></figure>"
        for d in r["differing"]
    )
    labelled = ""
    if "labelled" in r:
        a = r["labelled"]
        labelled = (
            f"<h2>Labelled pieces</h2><p>{a['pieces']} labelled: live {_pct(a['live_accuracy'])}, "
            f"shadow {_pct(a['shadow_accuracy'])} correct</p>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Shadow model {esc(r["model"])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1000px;color:#222}}
table{{border-collapse:collapse;font-size:.9em}} td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:right}}
td:first-child{{text-align:left}} .same{{background:#e8f5e9}} figure{{display:inline-block;margin:.3em;font-size:.8em}}
figure img{{width:96px;height:96px;image-rendering:pixelated}} .nocrop{{width:96px;height:96px;background:#eee}}</style>
</head><body><h1>Shadow model {esc(r["model"])}</h1>
<p>run {esc(r["run_id"])}: {r["compared"]} pieces compared, agreement {_pct(r["agreement"])}</p>
<h2>Agreement by live class</h2><table><tr><th>class</th><th>pieces</th><th>agree</th><th>agreement</th></tr>
{by_class}</table>
<h2>Live (rows) × shadow (columns)</h2><table><tr><th></th>{"".join(f"<th>{esc(c)}</th>" for c in classes)}</tr>
{conf}</table>{labelled}
<h2>Differing pieces ({len(r["differing"])})</h2>{cards}</body></html>"""
    path.write_text(page)
