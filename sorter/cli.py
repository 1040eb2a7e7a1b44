"""The `sorter` command line."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer

from sorter.cli_common import (
    ConfigOpt,
    LogOpt,
    RecordBufferMbOpt,
    RecordFramesOpt,
    RecordLevelOpt,
    RecordMaxMbOpt,
    RecordOpt,
    ShadowModelOpt,
    fail,
    record_options,
    with_shadow_model,
)
from sorter.config import ConfigError, LineConfig, load_config
from sorter.logs import setup_logging

app = typer.Typer(
    help="Control software for magnet-scrap sorting lines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
model_app = typer.Typer(help="Train and inspect classifier models.", no_args_is_help=True)
app.add_typer(model_app, name="model")


def _load(path: Path) -> LineConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise fail(str(exc)) from None


@app.command()
def run(
    config: ConfigOpt,
    start: Annotated[
        bool,
        typer.Option(help="Reset and Start the line when the service is up (--no-start: wait for a Start command)"),
    ] = True,
    capture: Annotated[
        Path | None,
        typer.Option(help="save each piece's crop (and field) to DIR/{train,val,test}/<decided class>/ for review"),
    ] = None,
    record: RecordOpt = None,
    record_level: RecordLevelOpt = "frames",
    record_max_mb: RecordMaxMbOpt = 4096,
    record_frames: RecordFramesOpt = "npy",
    record_buffer_mb: RecordBufferMbOpt = 1024,
    log_level: LogOpt = "info",
    shadow_model: ShadowModelOpt = None,
) -> None:
    """Run the line service: cameras -> classifier -> PLC, until Ctrl-C or SIGTERM.

    SIGHUP re-reads the config's classifier.model and swaps to it without stopping the line
    (after `sorter model check`; a model that fails is refused and the running one stays).
    """
    from sorter.app import run_line
    from sorter.line.recording import RecordingError
    from sorter.vision.classify import ModelError

    setup_logging(log_level)
    cfg = with_shadow_model(_load(config), shadow_model)
    rec = record_options(record, record_level, record_max_mb, record_frames, record_buffer_mb)
    try:
        asyncio.run(run_line(config, cfg, auto_start=start, capture=capture, record=rec))
    except RecordingError as exc:
        raise fail(str(exc)) from None
    except (ModelError, ConfigError) as exc:  # ConfigError: `plant: true` with a demo-only setting
        raise fail(f"{config}: {exc}" if isinstance(exc, ConfigError) else str(exc)) from None


@app.command()
def replay(
    recording: Annotated[Path, typer.Argument(help="a recording folder (`sorter run --record DIR`)")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="line config to replay with (default: the recorded one)")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="classifier model to replay with (default: the config's)")] = None,
    compare: Annotated[
        tuple[Path, Path] | None,
        typer.Option(help="replay with A and with B (each a model .onnx or a line config) and show what changes"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default: RECORDING/replay-<time>)")] = None,
    all_frames: Annotated[
        bool,
        typer.Option(
            "--all-frames", help="give the pipeline every recorded frame, also those the live line dropped when behind"
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as one JSON object")] = False,
    log_level: LogOpt = "warning",
) -> None:
    """Run a recording through the pipeline in virtual time: decisions, records and a report; or compare two
    models/configs on it (docs/recording.md). Exit 2 on bad input, 1 if the replay fails."""
    from sorter.line.recording import RecordingError
    from sorter.replay import ReplayError, Variant, run_replay
    from sorter.replay import compare as run_compare
    from sorter.vision.classify import ModelError

    setup_logging(log_level)
    folder = out or recording / time.strftime("replay-%Y%m%d-%H%M%S")
    try:
        if compare is not None:
            if config is not None or model is not None:
                raise fail("--compare takes its two variants itself; leave out --config and --model")
            a, b = (Variant.parse(p) for p in compare)
            a.all_frames = b.all_frames = all_frames
            result = run_compare(recording, a, b, folder)
            typer.echo(json.dumps(result) if as_json else _compare_text(result))
            return
        report, _ = run_replay(recording, Variant(config, model, all_frames), folder)
    except (RecordingError, ReplayError, ConfigError) as exc:
        raise fail(str(exc)) from None
    except ModelError as exc:
        raise fail(str(exc), 1) from None
    typer.echo(json.dumps(report) if as_json else _replay_text(report))


def _replay_text(r: dict) -> str:  # type: ignore[type-arg]
    lines = [
        f"replay of {r['recording']} with {r['variant']} (model {r['model_version']}): "
        f"{r['virtual_s']} s of line in {r['wall_s']} s",
        f"frames: {r['frames_replayed']} replayed of {r['frames_in_recording']} recorded; pieces decided {r['pieces']}",
        "by fraction: " + ", ".join(f"{k} {v}" for k, v in sorted(r["by_fraction"].items())),
    ]
    if "live" in r:
        lv = r["live"]
        lines.append(
            f"same decision as the live line: {lv['same_decision']} of {lv['live_decided']} ({lv['agreement']}); "
            f"differ {len(lv['differ'])}, live pieces not found {len(lv['live_unmatched'])}"
        )
    if "truth" in r:
        lines.append(
            "decisions vs truth: "
            + ", ".join(
                f"{f} purity {v['purity']} recovery {v['recovery']}" for f, v in r["truth"]["fractions"].items()
            )
        )
    lines.append(f"records: {r['records']}")
    return "\n".join(lines)


def _compare_text(c: dict) -> str:  # type: ignore[type-arg]
    lines = [f"A = {c['a']} ({c['model_a']}), B = {c['b']} ({c['model_b']}) on {c['recording']}"]
    for f, row in c["fractions"].items():
        text = f"  {f}: count {row['count_a']} -> {row['count_b']}"
        text += f", estimated purity {row['estimated_purity_a']} -> {row['estimated_purity_b']}"
        if "purity_a" in row:
            text += f", purity (truth) {row['purity_a']} -> {row['purity_b']}"
            text += f", recovery (truth) {row['recovery_a']} -> {row['recovery_b']}"
        lines.append(text)
    lines.append(
        f"pieces decided otherwise (class or fraction): {len(c['changed'])}, "
        f"to another fraction: {c['changed_fraction']}"
    )
    for p in c["changed"]:
        lines.append(
            f"  piece {p['id_a']} at count {p['count']}, x {p['x_mm']} mm: "
            f"{p['a']['cls']}->{p['a']['fraction']} ({p['a']['confidence']}) becomes "
            f"{p['b']['cls']}->{p['b']['fraction']} ({p['b']['confidence']})"
            + (f"; truly {p['true_cls']}" if p["true_cls"] else "")
        )
    lines.append(f"page with the crops: {c['html']}")
    return "\n".join(lines)


@model_app.command("train")
def model_train(
    data: Annotated[
        list[Path],
        typer.Option(
            help="dataset: DIR/{train,val,test}/<class>/*.png, optional sensors.csv; repeat to merge several "
            "(the shipped set first, complete; then e.g. the crops labelled on the HMI, which may lack splits "
            "and classes)"
        ),
    ],
    out: Annotated[Path, typer.Option(help="ONNX file to write")],
    epochs: Annotated[int, typer.Option(help="most epochs (early stopping on val loss, time budget)")] = 60,
    seed: int = 0,
    input_size: Annotated[
        int | None,
        typer.Option(help="model input side in px (default: lite0 96; cnn 64 for crops up to ~96 px, else 128)"),
    ] = None,
    time_budget: Annotated[
        float, typer.Option(help="seconds the training loop may take: fewer epochs if it would overrun (0: none)")
    ] = 240.0,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    arch: Annotated[
        str,
        typer.Option(
            help="cnn: the small network from scratch; lite0: EfficientNet-Lite0 fine-tuned from its ImageNet "
            "weights (models/MODEL_CARD.md: better on one foreign set, worse on another)"
        ),
    ] = "cnn",
    data_share: Annotated[
        list[float] | None,
        typer.Option(help="per --data, in order: its share of each training epoch (default: each crop once)"),
    ] = None,
) -> None:
    """Train the piece classifier (needs the `train` extra: PyTorch CPU) and export ONNX.

    Progress and tables go to stderr, the metrics as one JSON object to stdout.
    """
    from sorter.ml.backbones import WeightsError
    from sorter.ml.dataset import DatasetError

    try:
        from sorter.ml.train import train

        metrics = train(
            data,
            out,
            epochs=epochs,
            seed=seed,
            input_size=input_size,
            threads=threads,
            time_budget_s=time_budget or None,
            arch=arch,
            data_shares=data_share or None,
        )
    except (DatasetError, ValueError) as exc:
        raise fail(str(exc)) from None
    except (ImportError, WeightsError) as exc:
        raise fail(str(exc)) from None
    typer.echo(json.dumps(metrics, default=str))


@model_app.command("evaluate")
def model_evaluate(
    model: Annotated[Path, typer.Option(help="ONNX model file")],
    data: Annotated[Path, typer.Option(help="dataset: DIR/{train,val,test}/<class>/*.png, optional sensors.csv")],
    split: Annotated[str, typer.Option(help="split to evaluate")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="print the report as one JSON object")] = False,
    out_dir: Annotated[
        Path | None, typer.Option(help="folder for confusion.png and reliability.png (default runs/eval-<time>)")
    ] = None,
    plots: Annotated[bool, typer.Option(help="write the PNGs")] = True,
) -> None:
    """Accuracy (image only and fused with the field), per-class precision/recall, confusion, ECE, and
    the share of pieces that can be kept at 99.9 % accuracy (coverage_at_999); the rest is recirculated."""
    from sorter.ml.dataset import DatasetError
    from sorter.ml.evaluate import EvaluationError, evaluate_model, print_report
    from sorter.vision.classify import ModelError

    target = out_dir or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    try:
        rep = evaluate_model(model, data, split=split, out_dir=target, plots=plots)
    except (ModelError, DatasetError, EvaluationError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(rep, default=str))
    else:
        print_report(rep)


@model_app.command("check")
def model_check(
    file: Annotated[Path, typer.Argument(help="ONNX model file")],
    as_json: Annotated[bool, typer.Option("--json", help="print the result as one JSON object")] = False,
) -> None:
    """Validate a model before deployment: exit 0 ok, 1 it fails a check, 2 unreadable file."""
    from sorter.vision.modelcheck import check_model

    res = check_model(file)
    if as_json:
        typer.echo(json.dumps(res.to_dict()))
    else:
        for c in res.checks:
            mark = "ok  " if c.passed else "FAIL"
            typer.echo(f"  {mark} {c.name}" + (f": {c.detail}" if c.detail else ""), err=True)
        typer.echo(res.message, err=not res.ok)
    raise typer.Exit(res.exit_code)


@app.command("check-config")
def check_config(
    config: Annotated[Path, typer.Argument(help="line config (YAML)")],
    plant: Annotated[
        bool,
        typer.Option(
            "--plant",
            help="also refuse what a real plant must not run with (the demo's users, anonymous or None-policy "
            "OPC UA, an HMI without TLS, a Modbus PLC on a public address), as the service does with `plant: true`",
        ),
    ] = False,
) -> None:
    """Validate a line config; exit status 2 with file, key path and line on error (one line per problem)."""
    from sorter.config.plant import check_plant

    cfg = _load(config)
    if plant or cfg.plant:
        problems = check_plant(cfg)
        for problem in problems:
            typer.echo(f"{config}: {problem}", err=True)
        if problems:
            raise fail(f"{config}: {len(problems)} demo-only setting(s), not for a plant (see above)")
    mode = ", plant settings" if plant or cfg.plant else ""
    typer.echo(f"{config}: ok ({len(cfg.cameras)} cameras, fractions {cfg.fractions}{mode})")


@app.command("report")
def shift_report(
    config: ConfigOpt,
    out: Annotated[Path | None, typer.Option("--out", help="HTML file to write (self-contained)")] = None,
    from_: Annotated[
        str | None, typer.Option("--from", help="start, ISO 8601 (naive: local time), e.g. 2026-11-28T06:00")
    ] = None,
    to: Annotated[str | None, typer.Option("--to", help="end (exclusive), ISO 8601")] = None,
    run_id: Annotated[str | None, typer.Option("--run", help="only this run of the service (a batch)")] = None,
    pdf: Annotated[Path | None, typer.Option("--pdf", help="also write a PDF")] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="also export the range's records as CSV")] = None,
    summary_json: Annotated[Path | None, typer.Option("--json", help="also write the numbers as JSON")] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="records database (default: the config's records.path), or the plant's PostgreSQL "
            "(postgresql://...): the plant report, one section per line plus the plant's totals",
        ),
    ] = None,
    lines: Annotated[
        list[str] | None,
        typer.Option("--line", help="with --db postgresql://...: this line only (repeat for several; default: all)"),
    ] = None,
    shadow: Annotated[
        bool,
        typer.Option(
            "--shadow",
            help="the shadow model's comparison with the live one instead (docs/shadow.md): text, or the JSON with "
            "--json FILE ('-': print it), the crops of the differing pieces with --html FILE",
        ),
    ] = False,
    html_out: Annotated[
        Path | None, typer.Option("--html", help="with --shadow: a self-contained page with the differing crops")
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option("--labels", help="with --shadow: DIR/labels.csv, the label log; both models' accuracy on it"),
    ] = None,
) -> None:
    """Shift or batch report from the piece records: throughput, composition, mass balance, alarms and stops.

    Exit 2 on bad input (no records in range, missing database, --from not before --to)."""
    from sorter.reports.plant import is_db_url, make_plant_report
    from sorter.reports.shift import ReportError, make_report

    cfg = _load(config)
    if shadow:
        _shadow_report(Path(db) if db else cfg.records.path, run_id, summary_json, html_out, labels)
        return
    if html_out is not None or labels is not None:
        raise fail("--html and --labels go with --shadow (the shift report's page is --out)")
    if out is None:
        raise fail("--out FILE is needed: the HTML page of the report")
    if db is not None and is_db_url(db):
        if run_id or pdf or csv:
            raise fail("--run, --pdf and --csv are for a line's own records; the plant report has HTML and --json")
        try:
            p = make_plant_report(cfg, out, db, lines=lines, t_from=from_, t_to=to, summary_json=summary_json)
        except ReportError as exc:
            raise fail(str(exc)) from None
        b = p["plant"]["mass_balance"]
        typer.echo(
            f"{out}: {p['plant']['pieces']} pieces from lines {', '.join(p['plant']['lines'])}, "
            f"{p['plant']['mass_est_kg']:.2f} kg estimated, plant mass balance "
            f"{'closes' if b['closes'] else 'does NOT close'} (in {b['in_count']}, out {b['out_count']})"
        )
        return
    if lines:
        raise fail("--line needs --db postgresql://... (a line's own records hold that line only)")
    try:
        s = make_report(
            cfg,
            out,
            db=Path(db) if db is not None else None,
            t_from=from_,
            t_to=to,
            run=run_id,
            pdf=pdf,
            csv_path=csv,
            summary_json=summary_json,
        )
    except ReportError as exc:
        raise fail(str(exc)) from None
    b = s["mass_balance"]
    typer.echo(
        f"{out}: {s['pieces']} pieces, {s['mass_est_kg']:.2f} kg estimated, "
        f"mass balance {'closes' if b['closes'] else 'does NOT close'} "
        f"(in {b['in_count']}, out {b['out_count']})"
    )


def _shadow_report(
    db: Path, run: str | None, json_out: Path | None, html_out: Path | None, labels: Path | None
) -> None:
    from sorter.reports.errors import ReportError
    from sorter.reports.shadow import shadow_report, shadow_text, write_shadow_html

    try:
        r = shadow_report(db, run, labels)
        if html_out is not None:
            write_shadow_html(html_out, r, db)
    except ReportError as exc:
        raise fail(str(exc)) from None
    if json_out is not None and str(json_out) == "-":
        typer.echo(json.dumps(r))
        return
    if json_out is not None:
        json_out.write_text(json.dumps(r, indent=2))
    typer.echo(shadow_text(r))
    if html_out is not None:
        typer.echo(f"page with the differing crops: {html_out}")


def main() -> None:
    app()


def _add_plugin_commands() -> None:
    """Commands that other installed packages add (the simulator's `demo`, `sim`, `bench*`: sim/cli.py).

    Found by entry point (group `sorter.commands`, each a function taking this app), so the product
    never imports them: a plant's install without the simulator simply has no such commands.
    """
    for ep in entry_points(group="sorter.commands"):
        ep.load()(app)


# --- `sorter clip`: clips on the running line, through its HMI (docs/recording.md) ---

clip_app = typer.Typer(
    help="Clips: every frame, encoder poll, Hall bar line and PLC status, started and stopped on the running line.",
    no_args_is_help=True,
)
app.add_typer(clip_app, name="clip")
ClipUserOpt = Annotated[str, typer.Option("--user", "-u", help="a technician of the config's users")]
ClipUrlOpt = Annotated[
    str | None, typer.Option("--hmi", help="the HMI's address (default: the config's hmi section, on this PC)")
]


def _clip_call(config: Path, user: str, url: str | None, method: str, path: str, body: Any = None) -> Any:
    """Log in to the running line's HMI as `user` (password: $SORTER_HMI_PASSWORD, else asked), make one call."""
    import os

    from sorter.north.hmi.remote import HmiClient, HmiClientError, hmi_url

    cfg = _load(config)
    if cfg.hmi is None or not cfg.hmi.enabled:
        raise fail(f"{config}: the line has no HMI (hmi.enabled): clips are started through it")
    password = os.environ.get("SORTER_HMI_PASSWORD") or typer.prompt(f"password of {user}", hide_input=True)
    client = HmiClient(url or hmi_url(cfg.hmi), cafile=cfg.hmi.certificate)
    try:
        client.login(user, password)
        try:
            return client.request(method, path, body)
        finally:
            client.logout()
    except HmiClientError as exc:
        raise fail(str(exc), 1) from None


def _clip_text(c: dict[str, Any]) -> str:
    state = "recording" if c["active"] else f"stopped by {c['stopped_by']}"
    text = (
        f"{c['folder']}: {state}, {c['frames']} frames, {c['bytes'] / 1024**2:.0f} of {c['max_bytes'] / 1024**2:.0f} MB"
    )
    return text + (f" (stopped early: {c['stopped_early']})" if c.get("stopped_early") else "")


@clip_app.command("start")
def clip_start(
    config: ConfigOpt,
    user: ClipUserOpt = "technician",
    max_mb: Annotated[
        float | None, typer.Option(help="size bound, MB (default records.clip_max_mb): the clip stops itself there")
    ] = None,
    url: ClipUrlOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Start a clip on the running line (`sorter run`): a recording of level frames into a new folder under
    records.recordings_dir. Exit 1 if the HMI refuses (a clip runs already, not a technician, ...)."""
    c = _clip_call(config, user, url, "POST", "/api/clip/start", {"max_mb": max_mb})
    typer.echo(json.dumps(c) if as_json else _clip_text(c))


@clip_app.command("stop")
def clip_stop(
    config: ConfigOpt,
    user: ClipUserOpt = "technician",
    url: ClipUrlOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Stop the running clip; its folder is complete (manifest state closed) when this returns."""
    c = _clip_call(config, user, url, "POST", "/api/clip/stop")
    typer.echo(json.dumps(c) if as_json else _clip_text(c))


@clip_app.command("status")
def clip_status(
    config: ConfigOpt,
    user: ClipUserOpt = "technician",
    url: ClipUrlOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The running clip (or the last one since the service started) and the latest complete clip on disk."""
    r = _clip_call(config, user, url, "GET", "/api/clip")
    if as_json:
        typer.echo(json.dumps(r))
        return
    typer.echo(_clip_text(r["clip"]) if r["clip"] else "no clip since the service started")
    typer.echo(f"latest complete clip: {r['latest'] or 'none'} (folder {r['folder']})")


# --- `sorter opcua`: certificates and user hashes for the line's OPC UA server (docs/opcua-server.md) ---

opcua_app = typer.Typer(help="The line's OPC UA server: certificates, trusted clients, user password hashes.")
app.add_typer(opcua_app, name="opcua")

SERVER_CERT, SERVER_KEY = "line-server-cert.der", "line-server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.der", "client-key.pem"
CLIENT_APPLICATION_URI = "urn:magnet-sorter:opcua-client"  # a client using the made certificate must use this URI


@opcua_app.command("certs")
def opcua_certs(
    out: Annotated[Path, typer.Option(help="folder for the certificates and keys (the config's default is pki/)")],
    hostname: Annotated[
        list[str] | None,
        typer.Option(
            help="a name or IP address clients use to reach the line PC (repeatable); added to this host's "
            "name, localhost and 127.0.0.1"
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="validity in days")] = 3650,
    force: Annotated[bool, typer.Option("--force", help="replace existing certificates and keys")] = False,
) -> None:
    """Make the line server's certificate and key, and a trusted client certificate and key.

    The client certificate (for SCADA or tests) is also put into OUT/trusted, the folder of accepted
    client certificates (the config's opcua_server.trust_dir)."""
    import socket

    from sorter.north.opcua.pki import DEFAULT_APPLICATION_URI, PkiError, make_certificate, trust

    files = [out / SERVER_CERT, out / SERVER_KEY, out / CLIENT_CERT, out / CLIENT_KEY]
    existing = [str(p) for p in files if p.exists()]
    if existing and not force:  # checked for all four first: never leave half a set behind
        raise fail(
            f"{', '.join(existing)} exist; --force replaces them (clients trusting the old server "
            "certificate then need the new one)"
        )
    hosts = [*(hostname or []), socket.gethostname(), "localhost", "127.0.0.1"]
    try:
        make_certificate(
            files[0],
            files[1],
            common_name="magnet-sorter line server",
            application_uri=DEFAULT_APPLICATION_URI,
            hostnames=hosts,
            days=days,
            overwrite=force,
        )
        make_certificate(
            files[2],
            files[3],
            common_name="magnet-sorter OPC UA client",
            application_uri=CLIENT_APPLICATION_URI,
            hostnames=hosts,
            days=days,
            overwrite=force,
        )
        trusted = trust(files[2], out / "trusted")
    except PkiError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"server certificate: {files[0]}\nserver private key: {files[1]}")
    typer.echo(f"client certificate: {files[2]} (application URI {CLIENT_APPLICATION_URI})")
    typer.echo(f"client private key: {files[3]}\ntrusted client:     {trusted}")


@opcua_app.command("trust")
def opcua_trust(
    certificate: Annotated[
        str | None,
        typer.Argument(
            help="a client's certificate file (DER or PEM), or the thumbprint (or file name) of a refused one in "
            "the rejected folder (`--list` shows them)",
            show_default=False,
        ),
    ] = None,
    list_: Annotated[
        bool, typer.Option("--list", help="list the refused client certificates, then the trusted ones")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="take the folders from this line config (opcua_server.trust_dir ...)"),
    ] = None,
    trust_dir: Annotated[
        Path | None, typer.Option(help="the config's opcua_server.trust_dir [default: pki/trusted]")
    ] = None,
    rejected_dir: Annotated[
        Path | None,
        typer.Option(help="the config's opcua_server.rejected_dir [default: `rejected` beside the trust folder]"),
    ] = None,
) -> None:
    """Accept a client (SCADA, MES, HMI): move its refused certificate from the rejected folder into the trust
    folder, or copy a certificate file there. `--list` shows the refused ones (subject, thumbprint, first seen).

    The line's OPC UA server keeps the certificate of every unknown client it refused in the rejected folder;
    the trust folder is re-read at every new session, so the client gets in at its next attempt."""
    from sorter.north.opcua.pki import (
        PkiError,
        find_rejected,
        load_certificate,
        subject_text,
        thumbprint,
        trust,
        trust_rejected,
    )

    trusted_dir, refused_dir = _opcua_folders(config, trust_dir, rejected_dir)
    if list_:
        hint = "`sorter opcua trust THUMBPRINT` trusts one"
        _opcua_print_certificates("refused client certificates", refused_dir, "first seen", hint)
        _opcua_print_certificates("trusted client certificates", trusted_dir, "added", None)
        if certificate is None:
            return
    if certificate is None:
        raise fail("give a certificate file or the thumbprint of a refused certificate (`--list` shows them)")
    try:
        path = Path(certificate)
        if path.is_file() and path.resolve().parent != refused_dir.resolve():
            target = trust(path, trusted_dir)  # a file from elsewhere (e-mailed by the SCADA integrator): copied
            cert = load_certificate(target)
            typer.echo(f"trusted: {target} ({subject_text(cert)}, thumbprint {thumbprint(cert)})")
            return
        found = find_rejected(refused_dir, path.name if path.is_file() else certificate)
        target = trust_rejected(found, trusted_dir)
    except PkiError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"trusted: {target} ({found.subject}, thumbprint {found.thumbprint}), moved from {refused_dir}")


def _opcua_folders(config: Path | None, trust_dir: Path | None, rejected_dir: Path | None) -> tuple[Path, Path]:
    """The trust and rejected folders: the options, else the config's, else pki/trusted and its sibling."""
    if config is not None:
        srv = _load(config).opcua_server
        if srv is None:
            raise fail(f"{config}: no opcua_server section")
        trust_dir = trust_dir or srv.trust_dir
        rejected_dir = rejected_dir or (srv.rejected_path if trust_dir == srv.trust_dir else None)
    trust_dir = trust_dir or Path("pki/trusted")
    return trust_dir, rejected_dir or trust_dir.parent / "rejected"


def _opcua_print_certificates(title: str, folder: Path, when: str, hint: str | None) -> None:
    """One line per certificate: thumbprint, the file's time, subject, application URI, file."""
    from sorter.north.opcua.pki import list_certificates

    certs = list_certificates(folder)
    typer.echo(f"{title} in {folder}: {len(certs) or 'none'}" + (f" ({hint})" if hint and certs else ""))
    for c in certs:
        seen = c.first_seen.strftime("%Y-%m-%d %H:%M:%S UTC")
        typer.echo(f"  {c.thumbprint}  {when} {seen}  {c.subject}  {c.application_uri or '-'}  {c.path}")


@opcua_app.command("hash-password")
def opcua_hash_password(
    stdin: Annotated[bool, typer.Option("--stdin", help="read the password from the first line of stdin")] = False,
) -> None:
    """Print the argon2 hash of a password for the config's `users:` list (password_hash)."""
    from sorter.north.users import hash_password

    if stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    if not password:
        raise fail("an empty password is not allowed")
    typer.echo(hash_password(password))


# --- `sorter hmi`: the operator HMI's TLS certificate (docs/hmi.md, "HTTPS") ---

hmi_app = typer.Typer(help="The operator's web HMI: its HTTPS certificate.", no_args_is_help=True)
app.add_typer(hmi_app, name="hmi")


@hmi_app.command("certs")
def hmi_certs(
    out: Annotated[Path, typer.Option(help="folder for hmi-cert.pem and hmi-key.pem (the plant's pki/ folder)")],
    host: Annotated[
        list[str] | None,
        typer.Option(
            help="a name or IP address the panels use to reach the line PC (repeatable); added to this host's "
            "name, localhost, 127.0.0.1 and ::1"
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="validity in days (825 at most for Safari)")] = 825,
    force: Annotated[bool, typer.Option("--force", help="replace an existing certificate and key")] = False,
) -> None:
    """Make the HMI's self-signed HTTPS server certificate (PEM) and its private key (PEM, mode 0600).

    Put them in the config (hmi.certificate, hmi.private_key) and trust the certificate on each panel's
    browser (docs/hmi.md); its fingerprint is printed to compare there."""
    import socket

    from sorter.north.hmi.tls import CERT_FILE, KEY_FILE, TlsError, fingerprint, make_server_certificate, subject_names

    cert_path, key_path = out / CERT_FILE, out / KEY_FILE
    existing = [str(p) for p in (cert_path, key_path) if p.exists()]
    if existing and not force:  # both checked first: never leave half a pair behind
        raise fail(f"{', '.join(existing)} exist; --force replaces them (the panels then need to trust the new one)")
    hosts = [*(host or []), socket.gethostname(), "localhost", "127.0.0.1", "::1"]
    try:
        cert = make_server_certificate(cert_path, key_path, hostnames=hosts, days=days, overwrite=force)
    except TlsError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"certificate: {cert_path}\nprivate key: {key_path} (mode 0600)")
    typer.echo(f"names:       {', '.join(subject_names(cert))}")
    typer.echo(f"valid until: {cert.not_valid_after_utc:%Y-%m-%d} (UTC)\nSHA-256:     {fingerprint(cert)}")
    typer.echo(
        f"in the line config:\n  hmi:\n    tls: true\n    certificate: {cert_path.resolve()}\n"
        f"    private_key: {key_path.resolve()}"
    )


# --- `sorter cameras`: find GenICam and OpenCV cameras, grab from one (docs/cameras.md) ---

cameras_app = typer.Typer(help="Cameras: find GenICam (GigE Vision / USB3 Vision) and OpenCV devices, grab frames.")
app.add_typer(cameras_app, name="cameras")


def _genicam() -> Any:
    """The GenICam driver module, or exit 2 saying how to install its library."""
    try:
        from sorter.drivers.cameras import genicam
    except ImportError as exc:
        raise fail(str(exc)) from None
    return genicam


@cameras_app.command("discover")
def cameras_discover(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """List every GenICam camera found (GigE Vision on this PC's subnets, USB3 Vision) and every video device."""
    from sorter.drivers.cameras.opencv import opencv_devices

    genicam = _genicam()
    devices = [d.__dict__ for d in genicam.discover()]
    video = opencv_devices()
    if as_json:
        typer.echo(json.dumps({"library": genicam.LIBRARY, "genicam": devices, "opencv": video}, indent=2))
        return
    typer.echo(f"GenICam cameras ({genicam.LIBRARY}): {len(devices)}")
    for d in devices:
        typer.echo(
            f"  {d['vendor']} {d['model']}  serial {d['serial']}  {d['protocol']} {d['address']}  ({d['device_id']})"
        )
    typer.echo(f"OpenCV video devices: {len(video)}")
    for v in video:
        typer.echo(f"  index {v['index']}  {v['device']}  {v['name']}")


@cameras_app.command("grab")
def cameras_grab(
    serial: Annotated[str, typer.Option("--serial", help="the camera: serial number, user ID or IP address")],
    frames: Annotated[int, typer.Option("--frames", min=1, help="complete frames to grab")] = 10,
    trigger: Annotated[
        str, typer.Option("--trigger", help="software: one software trigger per frame; free: free-running")
    ] = "software",
    timeout_s: Annotated[float, typer.Option("--timeout-s", help="give up after this long without a frame")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Open one GenICam camera, grab N frames and print each one's frame ID, timestamp, size, pixel format and
    chunk values, plus the incomplete and lost counts. Exit 2 if the camera is absent, busy or refuses."""
    if trigger not in ("software", "free"):
        raise fail(f"--trigger must be software or free, not {trigger!r}")
    genicam = _genicam()
    try:
        result = genicam.grab(serial, frames, trigger=trigger, timeout_s=timeout_s)
    except genicam.GenICamError as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    dev = result["device"]
    typer.echo(f"{dev['vendor']} {dev['model']} serial {dev['serial']} at {dev['address']}: {result['settings']}")
    for f in result["frames"]:
        chunks = " ".join(f"{k}={v}" for k, v in f["chunks"].items())
        typer.echo(
            f"  frame {f['frame_id']:>8}  t {f['timestamp_ns']} ns  {f['width']}x{f['height']} {f['pixel_format']}"
            + (f"  {chunks}" if chunks else "")
        )
    typer.echo(f"incomplete {result['incomplete']}  lost {result['lost']}  stream {result['stream']}")


_add_plugin_commands()
