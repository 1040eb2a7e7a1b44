"""The `sorter` command line."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from sorter.config import ConfigError, LineConfig, load_config
from sorter.logs import setup_logging

DEFAULT_CONFIG = Path("config/sim.yaml")

app = typer.Typer(
    help="Control software for magnet-scrap sorting lines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
sim_app = typer.Typer(help="The simulated line: run it, render datasets, record videos.")
model_app = typer.Typer(help="Train and inspect classifier models.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")
app.add_typer(model_app, name="model")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="line config (YAML)")]
LogOpt = Annotated[str, typer.Option("--log-level", help="debug, info, warning, error")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _load(path: Path) -> LineConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


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
    log_level: LogOpt = "info",
) -> None:
    """Run the line service: cameras -> classifier -> PLC, until Ctrl-C or SIGTERM.

    SIGHUP re-reads the config's classifier.model and swaps to it without stopping the line
    (after `sorter model check`; a model that fails is refused and the running one stays).
    """
    from sorter.classify import ModelError
    from sorter.service import LineService

    setup_logging(log_level)
    cfg = _load(config)

    async def main() -> None:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        service = LineService(cfg, auto_start=start, capture=capture)
        reloads: set[asyncio.Task[None]] = set()

        async def reload_model() -> None:
            try:
                path = load_config(config).classifier.model
                await service.swap_model(path)
            except (ConfigError, ModelError) as exc:
                service.log.error("model reload refused", error=str(exc))

        def on_hup() -> None:
            task = asyncio.create_task(reload_model())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        await service.run(stop)

    try:
        asyncio.run(main())
    except ModelError as exc:
        raise _fail(str(exc)) from None


@app.command()
def demo(
    config: ConfigOpt = DEFAULT_CONFIG,
    duration: Annotated[float, typer.Option(help="seconds of feed")] = 60.0,
    seed: Annotated[int, typer.Option(help="feed seed (deterministic scrap mix)")] = 7,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as one JSON object")] = False,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/demo-<time>)")] = None,
    camera_only: Annotated[
        bool, typer.Option("--camera-only", help="a line without the Hall-sensor bar: decide on the camera alone")
    ] = False,
    capture: Annotated[
        Path | None, typer.Option(help="save each piece's crop (and field) as a dataset under DIR, as `run` does")
    ] = None,
    plc: Annotated[
        str | None,
        typer.Option(help="PLC protocol for this run, modbus or opcua (the virtual PLC serves both); default: config"),
    ] = None,
    log_level: LogOpt = "warning",
) -> None:
    """Run the simulated line sorted by the real line service and print the report."""
    from sorter.classify import ModelError
    from sorter.demo import DemoError, run_demo

    setup_logging(log_level)
    cfg = _load(config)
    if cfg.simulator is None:
        raise _fail(f"{config}: the demo needs a `simulator:` section")
    if camera_only:
        cfg = cfg.model_copy(update={"magnetometer": None})
    if plc not in (None, "modbus", "opcua"):
        raise _fail(f"--plc must be modbus or opcua, not {plc!r}")
    if plc is not None:
        cfg = cfg.model_copy(update={"plc": cfg.plc.model_copy(update={"protocol": plc})})
    run_dir = out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        show = not as_json and sys.stderr.isatty()
        report = asyncio.run(run_demo(cfg, duration, seed, run_dir, progress=show, capture=capture))
    except (ModelError, DemoError) as exc:
        raise _fail(str(exc), 1) from None
    if as_json:
        typer.echo(json.dumps(report))
    else:
        _print_report(report)


def _print_report(report: dict) -> None:  # type: ignore[type-arg]
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"Demo report ({report['duration_s']} s of feed, seed {report['seed']})")
    for col in ("fraction", "count", "purity", "recovery", "purity (mass)", "recovery (mass)"):
        t.add_column(col, justify="right")
    for name, f in report["fractions"].items():
        t.add_row(
            name,
            str(f["count"]),
            *(
                f"{f[k]:.4f}" if f[k] is not None else "-"
                for k in ("purity", "recovery", "purity_mass", "recovery_mass")
            ),
        )
    con.print(t)
    con.print(
        f"pieces fed {report['pieces_fed']}, accounted {report['pieces_accounted']}; "
        f"frames captured {report['frames_captured']}, dropped {report['frames_dropped']}; "
        f"ejects late {report['ejects_late']}"
    )
    con.print(f"decision latency ms {report['decision_latency_ms']}; eject error mm {report['eject_error_mm']}")
    con.print(f"run folder: {report['run_dir']}")


@sim_app.callback(invoke_without_command=True)
def sim(
    ctx: typer.Context,
    config: ConfigOpt = DEFAULT_CONFIG,
    truth: Annotated[Path | None, typer.Option(help="write ground truth to this SQLite file")] = None,
    control: Annotated[str, typer.Option(help="'stdio' to take JSON-line commands on stdin")] = "none",
    seed: Annotated[int | None, typer.Option(help="override simulator.seed")] = None,
    feed: Annotated[bool, typer.Option(help="start feeding scrap at once")] = True,
    record: Annotated[Path | None, typer.Option(help="record each camera to DIR/<camera>.avi")] = None,
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    start_belt: Annotated[
        bool, typer.Option(help="run the belt at once instead of waiting for the PLC command")
    ] = False,
    hallbar_link: Annotated[
        Path | None, typer.Option(help="simulate the Hall bar on a pty and point this symlink at it")
    ] = None,
    log_level: LogOpt = "info",
) -> None:
    """Run the simulated line (PLC on Modbus TCP, camera streams) until Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    from sim.runner import run_sim

    setup_logging(log_level, json_logs=True if control == "stdio" else None)
    cfg = _load(config)
    if cfg.simulator is None:
        raise _fail(f"{config}: no `simulator:` section")
    asyncio.run(run_sim(cfg, truth, control, seed, feed, record, duration, start_belt, hallbar_link))


@sim_app.command("dataset")
def sim_dataset(
    out: Annotated[Path, typer.Option(help="dataset folder (ImageFolder layout)")],
    per_class: Annotated[int, typer.Option(help="crops per class over all splits")] = 800,
    seed: int = 0,
    crop_size: Annotated[int | None, typer.Option(help="crop side in px (default: 64 line, 128 studio)")] = None,
    look: Annotated[
        str,
        typer.Option(
            help="'line': the simulated line's own crops (what its model trains on); 'studio': deliberately "
            "different-looking crops (other belts, lighting, scale, shapes, Hall bar; sim/lookalike.py) "
            "to prove that training generalises, belt, light and scale varying per crop; 'studio-plant': "
            "the same with one belt, one light and one camera scale"
        ),
    ] = "line",
    sensors: Annotated[bool, typer.Option(help="write each split's sensors.csv (file,field_mT)")] = True,
) -> None:
    """Render a labelled crop dataset: OUT/{train,val,test}/<class>/*.png and OUT/<split>/sensors.csv."""
    from rich.progress import Progress

    setup_logging("info")
    with Progress(transient=True, console=_stderr_console()) as bar:
        task = bar.add_task(f"rendering ({look})", total=per_class * 5)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        if look == "line":
            from sim.dataset import write_dataset

            summary = write_dataset(
                out, per_class=per_class, seed=seed, crop_size=crop_size or 64, sensors=sensors, progress=progress
            )
        elif look in ("studio", "studio-plant"):
            from sim.lookalike import write_lookalike

            summary = write_lookalike(
                out,
                per_class=per_class,
                seed=seed,
                size=crop_size or 128,
                sensors=sensors,
                progress=progress,
                style="plant" if look == "studio-plant" else "mixed",
            )
        else:
            raise _fail(f"--look must be 'line', 'studio' or 'studio-plant', got {look!r}")
    typer.echo(json.dumps(summary, default=str))


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@model_app.command("train")
def model_train(
    data: Annotated[Path, typer.Option(help="dataset: DIR/{train,val,test}/<class>/*.png, optional sensors.csv")],
    out: Annotated[Path, typer.Option(help="ONNX file to write")],
    epochs: Annotated[int, typer.Option(help="most epochs (early stopping on val loss, time budget)")] = 60,
    seed: int = 0,
    input_size: Annotated[
        int | None, typer.Option(help="model input side in px (default: 64 for crops up to ~96 px, else 128)")
    ] = None,
    time_budget: Annotated[
        float, typer.Option(help="seconds the training loop may take: fewer epochs if it would overrun (0: none)")
    ] = 210.0,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
) -> None:
    """Train the piece classifier (needs the `train` extra: PyTorch CPU) and export ONNX.

    Progress and tables go to stderr, the metrics as one JSON object to stdout.
    """
    from sorter.dataset import DatasetError

    try:
        from sorter.train import train

        metrics = train(
            data,
            out,
            epochs=epochs,
            seed=seed,
            input_size=input_size,
            threads=threads,
            time_budget_s=time_budget or None,
        )
    except DatasetError as exc:
        raise _fail(str(exc)) from None
    except ImportError as exc:
        raise _fail(str(exc)) from None
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
    from sorter.classify import ModelError
    from sorter.dataset import DatasetError
    from sorter.evaluate import EvaluationError, evaluate_model, print_report

    target = out_dir or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    try:
        rep = evaluate_model(model, data, split=split, out_dir=target, plots=plots)
    except (ModelError, DatasetError, EvaluationError) as exc:
        raise _fail(str(exc)) from None
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
    from sorter.modelcheck import check_model

    res = check_model(file)
    if as_json:
        typer.echo(json.dumps(res.to_dict()))
    else:
        for c in res.checks:
            mark = "ok  " if c.passed else "FAIL"
            typer.echo(f"  {mark} {c.name}" + (f": {c.detail}" if c.detail else ""), err=True)
        typer.echo(res.message, err=not res.ok)
    raise typer.Exit(res.exit_code)


@app.command()
def bench(
    config: ConfigOpt = DEFAULT_CONFIG,
    frames: Annotated[int, typer.Option(help="frames per camera to measure")] = 240,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Per-stage cost per frame, whole-pipeline cost, and the highest feed rate this machine keeps up with."""
    from sorter.bench import run_bench

    setup_logging("warning")
    result = run_bench(_load(config), frames)
    typer.echo(json.dumps(result, indent=None if as_json else 2))


@app.command("bench-opcua")
def bench_opcua(
    config: ConfigOpt = DEFAULT_CONFIG,
    duration: Annotated[float, typer.Option(help="seconds of feed per run")] = 30.0,
    seed: Annotated[int, typer.Option(help="feed seed")] = 7,
    out: Annotated[Path | None, typer.Option(help="folder for both runs (default runs/bench-opcua-<time>)")] = None,
) -> None:
    """Decision latency p99 with the line's OPC UA server flooded (reads + garbage) vs quiet, same seed."""
    from sorter.bench_opcua import run_bench_opcua

    setup_logging("warning")
    run_dir = out or Path("runs") / time.strftime("bench-opcua-%Y%m%d-%H%M%S")
    typer.echo(json.dumps(asyncio.run(run_bench_opcua(_load(config), duration, seed, run_dir)), indent=2))


@app.command("bench-hmi")
def bench_hmi(
    config: ConfigOpt = DEFAULT_CONFIG,
    duration: Annotated[float, typer.Option(help="seconds of feed per run")] = 30.0,
    seed: Annotated[int, typer.Option(help="feed seed")] = 7,
    browser_nice: Annotated[
        int, typer.Option(help="niceness of the browsers (19: they stand in for panel PCs; 0: full priority)")
    ] = 19,
    repeat: Annotated[int, typer.Option(min=1, help="pairs of runs; p99 pooled over them (single runs vary)")] = 1,
    out: Annotated[Path | None, typer.Option(help="folder for the runs (default runs/bench-hmi-<time>)")] = None,
) -> None:
    """Decision latency p99 with two headless browsers on the live HMI vs none, same seed."""
    from sorter.bench_hmi import run_bench_hmi

    setup_logging("warning")
    run_dir = out or Path("runs") / time.strftime("bench-hmi-%Y%m%d-%H%M%S")
    result = asyncio.run(run_bench_hmi(_load(config), duration, seed, run_dir, nice=browser_nice, repeat=repeat))
    typer.echo(json.dumps(result, indent=2))


@app.command("check-config")
def check_config(config: Annotated[Path, typer.Argument(help="line config (YAML)")]) -> None:
    """Validate a line config; exit status 2 with file, key path and line on error."""
    cfg = _load(config)
    typer.echo(f"{config}: ok ({len(cfg.cameras)} cameras, fractions {cfg.fractions})")


@app.command("report")
def shift_report(
    config: ConfigOpt,
    out: Annotated[Path, typer.Option("--out", help="HTML file to write (self-contained)")],
    from_: Annotated[
        str | None, typer.Option("--from", help="start, ISO 8601 (naive: local time), e.g. 2026-11-28T06:00")
    ] = None,
    to: Annotated[str | None, typer.Option("--to", help="end (exclusive), ISO 8601")] = None,
    run_id: Annotated[str | None, typer.Option("--run", help="only this run of the service (a batch)")] = None,
    pdf: Annotated[Path | None, typer.Option("--pdf", help="also write a PDF")] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="also export the range's records as CSV")] = None,
    report_json: Annotated[
        Path | None, typer.Option("--report-json", help="a `sorter demo --json` report of this run to cross-check")
    ] = None,
    summary_json: Annotated[Path | None, typer.Option("--json", help="also write the numbers as JSON")] = None,
    db: Annotated[
        Path | None, typer.Option("--db", help="records database (default: the config's records.path)")
    ] = None,
) -> None:
    """Shift or batch report from the piece records: throughput, composition, mass balance, alarms and stops.

    Exit 2 on bad input (no records in range, missing database, --from not before --to);
    exit 1 if a --report-json cross-check finds a difference in figures both count from the same records."""
    from sorter.shiftreport import ReportError, make_report

    cfg = _load(config)
    try:
        s = make_report(
            cfg,
            out,
            db=db,
            t_from=from_,
            t_to=to,
            run=run_id,
            pdf=pdf,
            csv_path=csv,
            demo_report=report_json,
            summary_json=summary_json,
        )
    except ReportError as exc:
        raise _fail(str(exc)) from None
    b = s["mass_balance"]
    typer.echo(
        f"{out}: {s['pieces']} pieces, {s['mass_est_kg']:.2f} kg estimated, "
        f"mass balance {'closes' if b['closes'] else 'does NOT close'} "
        f"(in {b['in_count']}, out {b['out_count']})"
    )
    check = s.get("demo_check")
    if check is not None:
        bad = [k for k, c in check["exact"].items() if not c["equal"]]
        typer.echo("cross-check with the demo report: " + ("equal" if not bad else f"DIFFERENT: {', '.join(bad)}"))
        if bad:
            raise typer.Exit(1)


def main() -> None:
    app()


def sim_main() -> None:
    typer.main.get_command(sim_app)(prog_name="python -m sim")


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

    from sorter.opcua_pki import PkiError, make_certificate, trust
    from sorter.opcua_server import DEFAULT_APPLICATION_URI

    files = [out / SERVER_CERT, out / SERVER_KEY, out / CLIENT_CERT, out / CLIENT_KEY]
    existing = [str(p) for p in files if p.exists()]
    if existing and not force:  # checked for all four first: never leave half a set behind
        raise _fail(
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
        raise _fail(str(exc)) from None
    typer.echo(f"server certificate: {files[0]}\nserver private key: {files[1]}")
    typer.echo(f"client certificate: {files[2]} (application URI {CLIENT_APPLICATION_URI})")
    typer.echo(f"client private key: {files[3]}\ntrusted client:     {trusted}")


@opcua_app.command("trust")
def opcua_trust(
    certificate: Annotated[Path, typer.Argument(help="a client's certificate (DER or PEM)")],
    trust_dir: Annotated[Path, typer.Option(help="the config's opcua_server.trust_dir")] = Path("pki/trusted"),
) -> None:
    """Accept a client (SCADA, MES, HMI) by copying its certificate into the trust folder."""
    from sorter.opcua_pki import PkiError, trust

    try:
        typer.echo(f"trusted: {trust(certificate, trust_dir)}")
    except PkiError as exc:
        raise _fail(str(exc)) from None


@opcua_app.command("hash-password")
def opcua_hash_password(
    stdin: Annotated[bool, typer.Option("--stdin", help="read the password from the first line of stdin")] = False,
) -> None:
    """Print the argon2 hash of a password for the config's `users:` list (password_hash)."""
    from sorter.users import hash_password

    if stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    if not password:
        raise _fail("an empty password is not allowed")
    typer.echo(hash_password(password))
