"""The simulator's commands on the `sorter` command line: `demo`, `sim`, `sim dataset`, `bench*`.

Registered through the `sorter.commands` entry point (pyproject.toml), so the product's CLI
(sorter/cli.py) never imports the simulator.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from sim.config import SimLineConfig, load_sim_config, operating_point
from sorter.cli_common import (
    LogOpt,
    RecordBufferMbOpt,
    RecordFramesOpt,
    RecordLevelOpt,
    RecordMaxMbOpt,
    RecordOpt,
    ShadowModelOpt,
    fail,
    record_options,
    stderr_console,
    with_shadow_model,
)
from sorter.config import ConfigError
from sorter.logs import setup_logging

DEFAULT_CONFIG = Path("config/sim.yaml")
SimConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="line config with a `simulator:` section (YAML)")]

sim_app = typer.Typer(help="The simulated line: run it, render datasets, record videos.")


def _load(path: Path) -> SimLineConfig:
    try:
        return load_sim_config(path)
    except ConfigError as exc:
        raise fail(str(exc)) from None


def register(app: typer.Typer) -> None:
    """Add the simulator's commands to the `sorter` app (the `sorter.commands` entry point)."""
    app.command()(demo)
    app.add_typer(sim_app, name="sim")
    app.command()(bench)
    app.command()(soak)
    app.command("bench-opcua")(bench_opcua)
    app.command("bench-hmi")(bench_hmi)
    app.command("plant-demo")(plant_demo)
    app.command("bench-plant")(bench_plant)


def bench_plant(
    config: SimConfigOpt = DEFAULT_CONFIG,
    duration: Annotated[float, typer.Option(help="seconds of feed per run")] = 30.0,
    seed: Annotated[int, typer.Option(help="feed seed")] = 7,
    repeat: Annotated[int, typer.Option(min=1, help="pairs of runs; p99 pooled over them")] = 1,
    out: Annotated[Path | None, typer.Option(help="folder for the runs (default runs/bench-plant-<time>)")] = None,
) -> None:
    """Decision latency p99 and frames dropped with the Sparkplug edge node and the plant database forwarder
    on vs off, same seed, at the config's feed (sim/bench_plant.py)."""
    from sim.bench_plant import run_bench_plant

    setup_logging("warning")
    run_dir = out or Path("runs") / time.strftime("bench-plant-%Y%m%d-%H%M%S")
    try:
        result = asyncio.run(run_bench_plant(_load(config), duration, seed, run_dir, repeat))
    except RuntimeError as exc:
        raise fail(str(exc), 1) from None
    typer.echo(json.dumps(result, indent=2))


def plant_demo(
    config: SimConfigOpt = DEFAULT_CONFIG,
    duration: Annotated[float, typer.Option(help="seconds of feed per line (the outages need 45)")] = 60.0,
    seed: Annotated[int, typer.Option(help="feed seed of the first line (the second: seed + 1)")] = 7,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/plant-demo-<time>)")] = None,
) -> None:
    """Two simulated lines on one MQTT broker (Sparkplug B) and one PostgreSQL, each stopped 10 s while
    they run; prints one JSON object (sim/plant_demo.py). Exit 1 if a count differs or a row is missing."""
    from sim.plant_demo import run_plant_demo

    setup_logging("warning")
    if duration < 45:
        raise fail("--duration must be at least 45 s: the broker and the database are each stopped 10 s in it")
    run_dir = out or Path("runs") / time.strftime("plant-demo-%Y%m%d-%H%M%S")
    try:
        result = asyncio.run(run_plant_demo(duration, seed, run_dir, config))
    except RuntimeError as exc:
        raise fail(str(exc), 1) from None
    typer.echo(json.dumps(result, indent=2))
    if not result["ok"]:
        raise typer.Exit(1)


def demo(
    config: SimConfigOpt = DEFAULT_CONFIG,
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
    speed: Annotated[float | None, typer.Option(help="belt speed, mm/s (default: the config's)")] = None,
    rate: Annotated[float | None, typer.Option(help="feed rate, pieces/s (default: the config's)")] = None,
    touching: Annotated[
        float | None, typer.Option(help="share of pieces fed touching another, 0..1 (default: the config's)")
    ] = None,
    lockstep: Annotated[
        bool,
        typer.Option(
            "--lockstep",
            help="simulator and service on one virtual clock, in one process: as fast as the CPU allows, "
            "the same figures every run (docs/architecture.md)",
        ),
    ] = False,
    record: RecordOpt = None,
    record_level: RecordLevelOpt = "frames",
    record_max_mb: RecordMaxMbOpt = 4096,
    record_frames: RecordFramesOpt = "npy",
    record_buffer_mb: RecordBufferMbOpt = 1024,
    log_level: LogOpt = "warning",
    faults: Annotated[
        str | None,
        typer.Option(
            "--faults",
            help="inject faults, e.g. 'plc-restart,camera-stall:cam0:3s@40,service-kill' or 'all' "
            "(sim/faults.py); the service then runs as its own process",
        ),
    ] = None,
    shadow_model: ShadowModelOpt = None,
) -> None:
    """Run the simulated line sorted by the real line service and print the report."""
    from sim.demo import DemoError, run_demo
    from sorter.line.recording import RecordingError
    from sorter.vision.classify import ModelError

    setup_logging(log_level)
    cfg = with_shadow_model(_load(config), shadow_model)
    if cfg.simulator is None:
        raise fail(f"{config}: the demo needs a `simulator:` section")
    if faults is not None:
        if capture is not None:
            raise fail("--capture is not available with --faults")
        _fault_demo(cfg, faults, duration, seed, as_json, out, camera_only, plc)
        return
    if camera_only:
        cfg = cfg.model_copy(update={"magnetometer": None})
    if plc not in (None, "modbus", "opcua"):
        raise fail(f"--plc must be modbus or opcua, not {plc!r}")
    if plc is not None:
        cfg = cfg.model_copy(update={"plc": cfg.plc.model_copy(update={"protocol": plc})})
    try:
        cfg = operating_point(cfg, speed, rate, touching)
    except ValidationError as exc:
        raise fail(f"operating point: {exc}") from None
    run_dir = out or Path("runs") / time.strftime("lockstep-%Y%m%d-%H%M%S" if lockstep else "demo-%Y%m%d-%H%M%S")
    if lockstep and cfg.plc.protocol != "modbus":
        raise fail("--lockstep runs the Modbus PLC link")
    rec = record_options(record, record_level, record_max_mb, record_frames, record_buffer_mb)
    try:
        show = not as_json and sys.stderr.isatty()
        if lockstep:
            from sim.lockstep import run_lockstep

            report = run_lockstep(cfg, duration, seed, run_dir, rec, capture=capture)
        else:
            report = asyncio.run(run_demo(cfg, duration, seed, run_dir, progress=show, capture=capture, record=rec))
    except (ModelError, DemoError, RecordingError) as exc:
        raise fail(str(exc), 1) from None
    if as_json:
        typer.echo(json.dumps(report))
    else:
        _print_report(report)


def soak(
    config: SimConfigOpt = DEFAULT_CONFIG,
    duration: Annotated[float, typer.Option(help="seconds of feed")] = 3600.0,
    seed: Annotated[int, typer.Option(help="feed seed")] = 7,
    every: Annotated[float, typer.Option(min=1.0, help="seconds between samples")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as one JSON object")] = False,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/soak-<time>)")] = None,
) -> None:
    """The simulated line for a long run: RSS, CPU and decision latency over time (soak.csv, soak.png, report)."""
    from sim.demo import DemoError
    from sim.soak import run_soak
    from sorter.vision.classify import ModelError

    setup_logging("warning")
    cfg = _load(config)
    if cfg.simulator is None:
        raise fail(f"{config}: the soak needs a `simulator:` section")
    run_dir = out or Path("runs") / time.strftime("soak-%Y%m%d-%H%M%S")
    try:
        report = asyncio.run(run_soak(cfg, duration, seed, run_dir, every))
    except (ModelError, DemoError) as exc:
        raise fail(str(exc), 1) from None
    if as_json:
        typer.echo(json.dumps(report))
    else:
        _print_report(report)
        typer.echo(json.dumps(report["soak"], indent=2))
        typer.echo(f"samples: {run_dir / 'soak.csv'}, plot: {run_dir / 'soak.png'}")


def _fault_demo(
    cfg: SimLineConfig,
    spec: str,
    duration: float,
    seed: int,
    as_json: bool,
    out: Path | None,
    camera_only: bool,
    plc: str | None,
) -> None:
    """`sorter demo --faults`: exit 0 only if every fault was detected and recovered and every piece accounted."""
    from sim.demo import DemoError
    from sim.faults import FaultSpecError, parse_faults, run_fault_demo

    if camera_only:
        cfg = cfg.model_copy(update={"magnetometer": None})
    if plc not in (None, "modbus"):
        raise fail("--faults runs with the Modbus PLC link (plc-restart resynchronisation is the Modbus link's)")
    cfg = cfg.model_copy(update={"plc": cfg.plc.model_copy(update={"protocol": "modbus"})})
    try:
        faults = parse_faults(spec, [c.name for c in cfg.cameras], duration)
        if cfg.magnetometer is None and any(f.name == "hallbar-unplug" for f in faults):
            raise FaultSpecError("hallbar-unplug: this line has no Hall bar (--camera-only)")
        run_dir = out or Path("runs") / time.strftime("faults-%Y%m%d-%H%M%S")
        report = asyncio.run(run_fault_demo(cfg, duration, seed, run_dir, faults))
    except FaultSpecError as exc:
        raise fail(f"--faults: {exc}") from None
    except DemoError as exc:
        raise fail(str(exc), 1) from None
    if as_json:
        typer.echo(json.dumps(report))
    else:
        for f in report["faults"]:
            typer.echo(
                f"{f['name']:<28} at {f['at_s']:>7} s  detected {f['detected_s']!s:>7} s  "
                f"recovered {f['recovered_s']!s:>7} s  pieces affected {f['pieces_affected']}"
            )
        typer.echo(
            f"pieces fed {report['pieces_fed']} = accounted {report['pieces_accounted']} + unseen "
            f"{report['pieces_unseen']} ({'holds' if report['identity_holds'] else 'DOES NOT HOLD'}); "
            f"fail-safe {report['fail_safe_ms']} ms; NdFeB purity {report['ndfeb_purity']}; "
            f"report: {report['run_dir']}/report.json"
        )
    if not (report["identity_holds"] and report["all_detected_and_recovered"]):
        raise typer.Exit(1)


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
    if (sh := report.get("shadow")) is not None:
        agree = "-" if sh["agreement"] is None else f"{100 * sh['agreement']:.1f} %"
        tr = sh["truth"]
        con.print(
            f"shadow model {sh['model']}: compared {sh['compared']}, skipped {sh['skipped']}, agreement {agree}, "
            f"differing {sh['differing']}; accuracy on the truth: live {tr['live_accuracy']}, "
            f"shadow {tr['shadow_accuracy']} (sorter report --shadow)"
        )
    con.print(f"run folder: {report['run_dir']}")


@sim_app.callback(invoke_without_command=True)
def sim(
    ctx: typer.Context,
    config: SimConfigOpt = DEFAULT_CONFIG,
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
        raise fail(f"{config}: no `simulator:` section")
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
    with Progress(transient=True, console=stderr_console()) as bar:
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
            raise fail(f"--look must be 'line', 'studio' or 'studio-plant', got {look!r}")
    typer.echo(json.dumps(summary, default=str))


def bench(
    config: SimConfigOpt = DEFAULT_CONFIG,
    frames: Annotated[int, typer.Option(help="frames per camera to measure")] = 240,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    against: Annotated[
        str | None,
        typer.Option(help="also bench this git revision, alternating with this code; prints medians and ratios"),
    ] = None,
    repeat: Annotated[int, typer.Option(min=1, help="with --against: pairs of runs")] = 3,
) -> None:
    """Per-stage cost per frame, whole-pipeline cost, and the highest feed rate this machine keeps up with."""
    setup_logging("warning")
    if against is not None:
        from sim.bench_against import AgainstError, compare

        try:
            result = compare(against, frames, repeat, progress=lambda msg: stderr_console().print(msg))
        except AgainstError as exc:
            raise fail(str(exc), 1) from None
    else:
        from sim.bench import run_bench

        result = run_bench(_load(config), frames)
    typer.echo(json.dumps(result, indent=None if as_json else 2))


def bench_opcua(
    config: SimConfigOpt = DEFAULT_CONFIG,
    duration: Annotated[float, typer.Option(help="seconds of feed per run")] = 30.0,
    seed: Annotated[int, typer.Option(help="feed seed")] = 7,
    out: Annotated[Path | None, typer.Option(help="folder for both runs (default runs/bench-opcua-<time>)")] = None,
) -> None:
    """Decision latency p99 with the line's OPC UA server flooded (reads + garbage) vs quiet, same seed."""
    from sim.bench_opcua import run_bench_opcua

    setup_logging("warning")
    run_dir = out or Path("runs") / time.strftime("bench-opcua-%Y%m%d-%H%M%S")
    typer.echo(json.dumps(asyncio.run(run_bench_opcua(_load(config), duration, seed, run_dir)), indent=2))


def bench_hmi(
    config: SimConfigOpt = DEFAULT_CONFIG,
    duration: Annotated[float, typer.Option(help="seconds of feed per run")] = 30.0,
    seed: Annotated[int, typer.Option(help="feed seed")] = 7,
    browser_nice: Annotated[
        int, typer.Option(help="niceness of the browsers (19: they stand in for panel PCs; 0: full priority)")
    ] = 19,
    repeat: Annotated[int, typer.Option(min=1, help="pairs of runs; p99 pooled over them (single runs vary)")] = 1,
    out: Annotated[Path | None, typer.Option(help="folder for the runs (default runs/bench-hmi-<time>)")] = None,
) -> None:
    """Decision latency p99 with two headless browsers on the live HMI vs none, same seed."""
    from sim.bench_hmi import run_bench_hmi

    setup_logging("warning")
    run_dir = out or Path("runs") / time.strftime("bench-hmi-%Y%m%d-%H%M%S")
    result = asyncio.run(run_bench_hmi(_load(config), duration, seed, run_dir, nice=browser_nice, repeat=repeat))
    typer.echo(json.dumps(result, indent=2))


def sim_main() -> None:
    typer.main.get_command(sim_app)(prog_name="python -m sim")


@sim_app.command("crosscheck")
def sim_crosscheck(
    demo_report: Annotated[
        Path, typer.Option("--demo-report", help="the run's `sorter demo --json` report (its folder's report.json)")
    ],
    config: SimConfigOpt = DEFAULT_CONFIG,
    db: Annotated[Path | None, typer.Option(help="records database (default: the config's records.path)")] = None,
    run_id: Annotated[str | None, typer.Option("--run", help="only this run of the service")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the cross-check as JSON")] = None,
) -> None:
    """Cross-check `sorter report`'s numbers from the records against the demo's report of the same run.

    Exit 2 on bad input (missing database or report, no records);
    exit 1 if a figure that both count from the same records differs (sim/crosscheck.py)."""
    from sim.crosscheck import crosscheck_run, crosscheck_tables, differences
    from sorter.reports.shift import ReportError
    from sorter.reports.tables import text_lines

    cfg = _load(config)
    try:
        check = crosscheck_run(cfg, demo_report, db=db, run=run_id)
    except ReportError as exc:
        raise fail(str(exc)) from None
    for table in crosscheck_tables(check):
        typer.echo("\n".join(text_lines(table)))
    if json_out is not None:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(check, indent=2, default=str))
        except OSError as exc:
            raise fail(f"cannot write {json_out}: {exc}") from None
    bad = differences(check)
    typer.echo("cross-check with the demo report: " + ("equal" if not bad else f"DIFFERENT: {', '.join(bad)}"))
    if bad:
        raise typer.Exit(1)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise fail(f"not a comma-separated list of numbers: {text!r}") from None


@sim_app.command()
def touching(
    seeds: Annotated[str, typer.Option(help="feed seeds, comma-separated")] = "3,5,11,12",
    share: Annotated[float, typer.Option(help="share of pieces placed against another")] = 0.15,
    vision: Annotated[str, typer.Option(help="vision settings over the defaults, JSON: '{\"downscale\": 1}'")] = "{}",
) -> None:
    """How segmentation parts the feed's touching pieces, frame by frame: pieces lost, centroids off, fragments
    (one JSON line per seed, then the totals as seed -1)."""
    import json

    from sim.touching import report
    from sorter.config import VisionConfig

    cfg = VisionConfig(**json.loads(vision))
    for row in report([int(s) for s in seeds.split(",")], cfg, touching=share):
        typer.echo(json.dumps(row))


@sim_app.command()
def envelope(
    config: SimConfigOpt = DEFAULT_CONFIG,
    speeds: Annotated[str, typer.Option(help="belt speeds, mm/s, comma-separated")] = "2000,2750,3500",
    rates: Annotated[str, typer.Option(help="feed rates, pieces/s, comma-separated")] = "20,40,60",
    touching: Annotated[str, typer.Option(help="touching shares, comma-separated")] = "0,0.15",
    duration: Annotated[float, typer.Option(help="seconds of feed per point")] = 30.0,
    seed: Annotated[int, typer.Option(help="feed seed (report on seeds >= 100: the rules were tuned below)")] = 101,
    real_time: Annotated[
        bool, typer.Option("--real-time", help="real-time demos (frames dropped, latency: on a quiet machine)")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="folder (default runs/envelope-<time>)")] = None,
) -> None:
    """The line over a grid of its operating envelope: a table, a plot, and the points short of a target."""
    from sim.envelope import grid, run_envelope

    points = grid(_floats(speeds), _floats(rates), _floats(touching))
    folder = out or Path("runs") / time.strftime("envelope-%Y%m%d-%H%M%S")
    con = stderr_console()

    def progress(i: int, n: int, p: object) -> None:
        con.print(f"point {i + 1}/{n}: {p}")

    run_envelope(config, points, duration=duration, seed=seed, out=folder, lockstep=not real_time, progress=progress)
    typer.echo((folder / "envelope.md").read_text())
