"""Calibrate the Hall-sensor bar: each channel's zero offset and gain, written to `magnetometer:`.

The service turns a raw reading into mT as B = (raw - offsets_mT) * gains
(sorter/drivers/hallbar/link.py). A sensor reads raw = g * B + o, so the config needs
offsets_mT = o and gains = 1 / g.

Offsets, with an empty belt: the bar does not report samples but, per line, the
signed peak of all samples since the previous line (docs/hall-bar.md). With
noise, that peak lies further from zero than the offset: about 1.5 noise sigmas
with ~10 samples a line, well over a millitesla, so a plain median of the lines
would be biased. The zero-field lines are fitted with the peak-hold model
instead: each line is the sample of largest |x| among n samples x ~ N(o, sigma),
rounded to whole mT; sigma and n are the board's (shared by all channels), o is
per channel. The same model with n = 1 is a board without peak hold.

Gains: a reference magnet of known field slid along the bar reads, at its peak
over each channel, g * B_ref + o, plus the noise of the highest sample near the
crest (about 1.2 sigma, corrected; the spread is in the uncertainty).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import serial
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from hw.common import (
    Change,
    HwError,
    config_option,
    console,
    help_paragraphs,
    load,
    prompt,
    run_app,
    script_errors,
    show_measurement,
    write_changes,
    yes_option,
)
from sorter.config import MagnetometerConfig
from sorter.drivers.hallbar.protocol import DataLine, InfoLine, LineError, LineSplitter, parse_line

NO_VALID_LINE_S = 3.0  # an open port with no valid data line for this long is not a working bar
MIN_ZERO_LINES = 100
OUTLIER_SHARE = 1e-3  # the fit's allowance for stray readings (a garbled line that passed, a spike)
DISTURBED_MT = 15.0  # a zero-field reading this far from its channel's median: something magnetic moved
DISTURBED_SHARE = 0.02
COVERED = 0.5  # a channel has seen the magnet once its reading rose above this share of the reference
# the peak reading is the highest of the noisy samples near the crest (2-20 of them, by speed and magnet),
# which reads high by 0.6-1.9 noise sigmas: corrected by the middle, the rest is uncertainty
CREST_BIAS_SIGMAS, CREST_UNC_SIGMAS = 1.2, 0.7
GAIN_RANGE = (0.5, 2.0)  # raw / true field outside this: a bad sensor or a pass that missed it
MU_STEP = 0.05  # mT, grid of candidate offsets (refined by a parabola)
# samples per line and noise sigma tried by the coarse fit (then refined around the best)
N_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
SIGMA_GRID = tuple(np.exp(np.linspace(np.log(0.1), np.log(6.0), 20)))
JOINT_68 = 2.30 / 2  # log-likelihood drop of a joint 68 % region of two shared parameters


# --- the bar's raw lines ---
class RawBar:
    """The bar's serial port read the way the service does it, but raw (no offsets, gains or baseline)."""

    def __init__(self, mag: MagnetometerConfig) -> None:
        self.mag = mag
        self.bytes_read = 0
        self.bad: dict[str, int] = {}
        self.info: InfoLine | None = None
        self._splitter = LineSplitter()
        try:
            self._port = serial.Serial(mag.port, mag.baudrate, timeout=0.05, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise HwError(
                f"cannot open the Hall bar's serial port {mag.port}: {exc}",
                f"is the bar plugged in and powered (ls -l {mag.port}; dmesg | tail)? is magnetometer.port right "
                "(a /dev/serial/by-id/... name survives replugging)? is another program using it (stop the line "
                "service)? may you open it (group dialout)?",
            ) from None

    def close(self) -> None:
        self._port.close()

    def lines(self, seconds: float | None) -> Iterator[DataLine | None]:
        """Data lines for `seconds` (None: until the caller stops); None now and then while nothing arrives."""
        end = None if seconds is None else time.monotonic() + seconds
        last_valid = time.monotonic()
        while end is None or time.monotonic() < end:
            try:
                chunk = self._port.read(self._port.in_waiting or 1)
            except (serial.SerialException, OSError) as exc:
                raise HwError(
                    f"reading the Hall bar's port {self.mag.port} failed: {exc}", "the cable, the USB hub"
                ) from None
            now = time.monotonic()
            self.bytes_read += len(chunk)
            got = False
            for line in self._parse(chunk):
                got = True
                last_valid = now
                yield line
            if not got:
                if now - last_valid > NO_VALID_LINE_S:
                    raise self._silent_error()
                yield None

    def _parse(self, chunk: bytes) -> Iterator[DataLine]:
        for kind, data in self._splitter.feed(chunk):
            try:
                if kind == "fragment":
                    raise LineError("truncated", "cut short")
                msg = parse_line(data)
            except LineError as exc:
                self.bad[exc.reason] = self.bad.get(exc.reason, 0) + 1
                continue
            if isinstance(msg, InfoLine):
                self.info = msg
                continue
            if len(msg.values) != self.mag.channels:
                raise HwError(
                    f"the Hall bar on {self.mag.port} sends {len(msg.values)} channels, the config says "
                    f"{self.mag.channels}",
                    "magnetometer.channels, or is it another bar?",
                )
            yield msg

    def _silent_error(self) -> HwError:
        port = self.mag.port
        if self.bytes_read == 0:
            return HwError(
                f"the Hall bar on {port} sends nothing (no byte in {NO_VALID_LINE_S:g} s)",
                "is the bar powered? is it the right port? the cable",
            )
        bad = ", ".join(f"{n} {reason}" for reason, n in sorted(self.bad.items())) or "no complete line"
        return HwError(
            f"the device on {port} sends no valid Hall-bar data line ({self.bytes_read} bytes read; bad lines: {bad})",
            f"is {port} the Hall bar (and not another serial device)? magnetometer.baudrate "
            f"({self.mag.baudrate}) must match the bar's; the cable and its shielding",
        )


# --- offsets: the peak-hold model ---
def _norm_cdf(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7): numpy has no erf."""
    x = np.abs(z) / np.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t
    return 0.5 * (1.0 + np.sign(z) * (1.0 - poly * np.exp(-x * x)))


def peak_hold_probs(mu: np.ndarray, sigma: float, n: float, rmin: int, rmax: int) -> np.ndarray:
    """P(reported value = r) for r in rmin..rmax (columns), per offset in `mu` (rows).

    The report is the sample of largest |x| among n samples x ~ N(mu, sigma), rounded.
    Its |x| has CDF G(t) = P(|x| < t)^n; given |x| = t the sample was positive with
    probability phi(t - mu) / (phi(t - mu) + phi(t + mu)) = (1 + tanh(t mu / sigma^2)) / 2.
    """
    m = max(2, int(np.ceil(4.0 / sigma)))  # grid steps per half mT: at least 8 per sigma
    h = 0.5 / m
    t = np.arange(0, (max(abs(rmin), abs(rmax)) * 2 + 1) * m + 1) * h
    mm = mu[:, None]
    f = np.clip(_norm_cdf((t - mm) / sigma) - _norm_cdf((-t - mm) / sigma), 0.0, 1.0)
    g = f**n
    dg = np.diff(g, axis=1)
    pos = 0.5 * (1.0 + np.tanh((t[1:] + t[:-1]) / 2 * mm / sigma**2))
    zero = np.zeros((len(mu), 1))
    cum_pos = np.concatenate([zero, np.cumsum(pos * dg, axis=1)], axis=1)
    cum_neg = np.concatenate([zero, np.cumsum((1.0 - pos) * dg, axis=1)], axis=1)
    out = np.empty((len(mu), rmax - rmin + 1))
    for j, r in enumerate(range(rmin, rmax + 1)):
        if r == 0:
            out[:, j] = g[:, m]
        else:
            cum = cum_pos if r > 0 else cum_neg
            out[:, j] = cum[:, (2 * abs(r) + 1) * m] - cum[:, (2 * abs(r) - 1) * m]
    return np.clip(out, 0.0, 1.0)


@dataclass(frozen=True)
class OffsetFit:
    offsets: np.ndarray  # mT per channel
    se: np.ndarray  # standard error per channel (statistical and from the shared parameters)
    sigma: float  # noise of one sample, mT
    samples: float  # effective samples per line
    lines: int


def fit_offsets(values: np.ndarray) -> OffsetFit:
    """Maximum-likelihood offsets from zero-field lines (rows: lines, columns: channels) under peak hold."""
    values = np.asarray(values, dtype=np.int64)
    lines, channels = values.shape
    med = np.median(values, axis=0)
    # a stray reading far off counts as an outlier (the model's floor), not as a reason for a huge grid
    values = np.clip(values, int(np.floor(med.min() - DISTURBED_MT)), int(np.ceil(med.max() + DISTURBED_MT)))
    rmin, rmax = int(values.min()), int(values.max())
    width = rmax - rmin + 1
    counts = np.stack([np.bincount(values[:, c] - rmin, minlength=width) for c in range(channels)])
    mus = np.arange(med.min() - 6.0, med.max() + 6.0 + MU_STEP, MU_STEP)

    def loglik(sigma: float, n: float) -> np.ndarray:  # (channels, candidate offsets)
        p = peak_hold_probs(mus, sigma, n, rmin, rmax)
        return counts @ np.log((1.0 - OUTLIER_SHARE) * p.T + OUTLIER_SHARE / width)

    def best(ll: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        k = np.clip(ll.argmax(axis=1), 1, len(mus) - 2)
        rows = np.arange(channels)
        a, b, c = ll[rows, k - 1], ll[rows, k], ll[rows, k + 1]
        curv = np.minimum(a - 2 * b + c, -1e-12)
        shift = np.clip(0.5 * (a - c) / curv, -1.0, 1.0)
        mu = mus[k] + shift * MU_STEP
        se = MU_STEP / np.sqrt(-curv)
        return float((b - 0.25 * (a - c) * shift).sum()), mu, se

    trials = [(s, float(n)) for n in N_GRID for s in SIGMA_GRID]
    scored = [(best(loglik(s, n))[0], s, n) for s, n in trials]
    _, s0, n0 = max(scored)
    fine = [
        (s0 * fs, max(1.0, n0 * fn))
        for fn in np.exp(np.linspace(-0.6, 0.6, 9))
        for fs in np.exp(np.linspace(-0.25, 0.25, 9))
    ]
    results = [(*best(loglik(s, n)), s, n) for s, n in fine]
    top = max(r[0] for r in results)
    _, mu, se, sigma, n = max(results, key=lambda r: r[0])
    # the shared parameters are uncertain too: the offsets' spread over their 68 % region is added
    near = np.array([r[1] for r in results if r[0] >= top - JOINT_68])
    systematic = np.abs(near - mu).max(axis=0)
    return OffsetFit(mu, np.hypot(se, systematic), float(sigma), float(n), lines)


# --- the script ---
def measure_zero(bar: RawBar, seconds: float) -> np.ndarray:
    rows: list[tuple[int, ...]] = []
    with Progress(
        TextColumn("  reading the empty belt"),
        BarColumn(),
        TextColumn("{task.fields[lines]} lines"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("zero", total=seconds, lines=0)
        t0 = time.monotonic()
        for line in bar.lines(seconds):
            if line is not None:
                rows.append(line.values)
            progress.update(task, completed=time.monotonic() - t0, lines=len(rows))
    if len(rows) < MIN_ZERO_LINES:
        raise HwError(
            f"only {len(rows)} data lines from the Hall bar in {seconds:g} s (need {MIN_ZERO_LINES})",
            "measure longer (--seconds), check the bar's line rate and the cable",
        )
    values = np.array(rows, dtype=np.int64)
    far = np.abs(values - np.median(values, axis=0)) > DISTURBED_MT
    disturbed = np.flatnonzero(far.mean(axis=0) > DISTURBED_SHARE)
    if disturbed.size:
        raise HwError(
            f"channels {', '.join(map(str, disturbed))} saw fields during the zero measurement "
            f"(up to {np.abs(values[:, disturbed]).max()} mT raw)",
            "the belt must be empty and stopped, no magnet or steel tool near the bar; then run again",
        )
    return values


def measure_pass(bar: RawBar, offsets: np.ndarray, reference: float, timeout: float) -> np.ndarray:
    """Each channel's raw peak (signed like the reference) as the magnet passes; ends when all have seen it."""
    channels = len(offsets)
    sign = 1.0 if reference > 0 else -1.0
    best = np.full(channels, -np.inf)  # largest (raw - offset) * sign so far
    peak_raw = np.zeros(channels)
    passed = np.zeros(channels, dtype=bool)  # the magnet came and went: the peak is complete
    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("  channels passed"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("pass", total=channels)
        for line in bar.lines(None):
            if line is not None:
                raw = np.asarray(line.values, dtype=float)
                rel = (raw - offsets) * sign
                higher = rel > best
                best[higher], peak_raw[higher] = rel[higher], raw[higher]
                seen = best >= COVERED * abs(reference)
                passed |= seen & (rel < 0.5 * best)
                progress.update(task, completed=int(passed.sum()))
                if passed.all():
                    return peak_raw
            if time.monotonic() > deadline:
                break
    missing = np.flatnonzero(~passed)
    raise HwError(
        f"after {timeout:g} s the reference magnet had not passed channels {', '.join(map(str, missing))} "
        f"(their highest reading: {', '.join(f'{max(b, 0):.0f}' for b in best[missing])} mT)",
        "slide it along the guide over the whole bar, right over the sensor row; a channel that never "
        "responds has a dead sensor",
    )


def results_table(fit: OffsetFit, peak_raw: np.ndarray, gains: np.ndarray, gain_unc: np.ndarray) -> Table:
    table = Table(title="Hall bar channels", show_edge=False)
    for col in ("channel", "offset mT", "peak raw mT", "gain (config)"):
        table.add_column(col, justify="right")
    for c in range(len(gains)):
        table.add_row(
            str(c),
            f"{fit.offsets[c]:+.2f} ± {fit.se[c]:.2f}",
            f"{peak_raw[c]:.0f}",
            f"{gains[c]:.4f} ± {gain_unc[c]:.4f}",
        )
    return table


def main(
    config: Path = config_option(),
    yes: bool = yes_option(),
    reference_mt: float = typer.Option(
        ...,
        "--reference-mT",
        help="field (mT) of the reference magnet at a sensor right below it, at the bar's lift-off "
        "(north face down: positive)",
    ),
    seconds: float = typer.Option(5.0, "--seconds", min=1.0, help="how long to read the empty belt for the offsets"),
    timeout: float = typer.Option(120.0, "--timeout", min=1.0, help="how long to wait for the magnet's pass"),
) -> None:
    """Calibrate the Hall-sensor bar's per-channel zero offsets and gains (magnetometer.offsets_mT, .gains).

    Prepare:

    - stop the line service (it holds the bar's serial port);

    - an empty, stopped belt, and no magnets or steel tools within 30 cm of the bar;

    - a reference magnet whose field at the sensors is known: REFERENCE-MT is the field it produces at a
    sensor right below it when it lies on the belt, i.e. at the bar's lift-off distance (measure it once with a
    gaussmeter probe at that distance, or use the magnet supplied with the bar), north face down for a positive
    value;

    - a guide (a straight edge across the belt over the sensor row) to slide it along.

    Step 1 reads the empty belt for SECONDS seconds (offsets). Step 2: slide the magnet slowly (about 10-20 cm/s)
    along the guide across the whole bar, over every sensor; the script follows its progress and ends when every
    channel has seen it. The result is shown as a config diff and written only on confirmation (--yes: without
    asking).
    """
    with script_errors():
        cfg = load(config)
        mag = cfg.magnetometer
        if mag is None:
            raise HwError(f"{config} has no magnetometer: section", "add the Hall bar (docs/hall-bar.md) first")
        if abs(reference_mt) < 10:
            raise HwError(f"a reference field of {reference_mt:g} mT is too weak to calibrate against", "use >= 50 mT")
        prompt(
            f"Empty and stop the belt; keep magnets and steel tools away from the bar. Step 1 reads {mag.port} "
            f"for {seconds:g} s.",
            yes,
        )
        bar = RawBar(mag)
        try:
            values = measure_zero(bar, seconds)
            fit = fit_offsets(values)
            console.print(
                f"  {fit.lines} lines; board noise {fit.sigma:.2f} mT per sample, about {fit.samples:.0f} samples "
                "held per line (their peak biases the plain median: corrected)"
            )
            show_measurement("largest offset", float(np.abs(fit.offsets).max()), float(fit.se.max()), "mT", 3)
            prompt(
                f"Now pass the reference magnet ({reference_mt:g} mT) slowly along the guide over every channel "
                f"of the bar (waiting up to {timeout:g} s).",
                yes,
            )
            peak_raw = measure_pass(bar, fit.offsets, reference_mt, timeout)
        finally:
            bar.close()
        crest = peak_raw - np.sign(reference_mt) * CREST_BIAS_SIGMAS * fit.sigma
        sensor_gain = (crest - fit.offsets) / reference_mt  # raw per true mT
        bad = np.flatnonzero((sensor_gain < GAIN_RANGE[0]) | (sensor_gain > GAIN_RANGE[1]))
        if bad.size:
            raise HwError(
                "channels " + ", ".join(f"{c} (reads {sensor_gain[c]:.2f} x the reference)" for c in bad),
                "is --reference-mT right? did the magnet pass right over the sensor row? a faulty sensor?",
            )
        gains = 1.0 / sensor_gain
        crest_unc = CREST_UNC_SIGMAS * fit.sigma
        gain_unc = gains * np.sqrt(fit.se**2 + crest_unc**2 + 1 / 12) / np.abs(crest - fit.offsets)
        console.print(results_table(fit, peak_raw, gains, gain_unc))
        show_measurement("gain spread (config gains)", float(gains.std()), None, "", 3)
        write_changes(
            config,
            [
                Change("magnetometer.offsets_mT", [round(float(v), 2) for v in fit.offsets]),
                Change("magnetometer.gains", [round(float(v), 4) for v in gains]),
            ],
            script="calibrate_magnetometer",
            yes=yes,
            residuals={
                "offset_se_mT_max": round(float(fit.se.max()), 3),
                "gain_unc_max": round(float(gain_unc.max()), 5),
                "noise_mT": round(fit.sigma, 3),
                "samples_per_line": round(fit.samples, 1),
            },
            measured={
                "reference_mT": reference_mt,
                "zero_lines": fit.lines,
                "peak_raw_mT": [float(v) for v in peak_raw],
                "offset_se_mT": [round(float(v), 3) for v in fit.se],
            },
        )


main.__doc__ = help_paragraphs(main.__doc__)

if __name__ == "__main__":
    run_app(main)
