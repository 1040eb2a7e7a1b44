"""The simulated line's config: the `simulator:` section of a line config, read by the simulator only.

The service's loader skips that section (sorter/config/loader.py RESERVED_SECTIONS); the simulator
loads the same file with `SimLineConfig`, the line's schema plus its own section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from sorter.config import LineConfig, Strict, load_config


class SimFeedConfig(Strict):
    rate_per_s: float = Field(32.0, gt=0)
    composition: dict[str, float] = Field(
        default_factory=lambda: {"ndfeb": 0.35, "ferrite": 0.25, "smco": 0.07, "steel": 0.18, "other": 0.15}
    )
    size_mm: tuple[float, float] = (5.0, 50.0)
    touching_share: float = Field(0.04, ge=0, le=1)
    margin_mm: float = Field(10.0, ge=0, description="keep pieces this far from the belt edges")


class SimCameraTruth(Strict):
    """Where the simulated camera really is (may differ from the config's mapping)."""

    centre_mm: tuple[float, float] | None = None
    mm_per_px: float | None = None
    rotation_deg: float | None = None


class SimHallBarConfig(Strict):
    """The simulated Hall-sensor bar: its true errors (the service's config does not know them)."""

    enabled: bool = True
    period_ms: float = Field(10.0, gt=0, description="report period; longer when a line takes longer to send")
    lift_off_mm: float = Field(5.0, gt=0, description="sensor distance below the pieces' bottom face")
    noise_mT: float = Field(0.8, ge=0)
    offset_sigma_mT: float = Field(2.0, ge=0, description="true per-channel zero offsets are drawn with this spread")
    gain_sigma: float = Field(0.03, ge=0, description="true per-channel gains are drawn around 1 with this spread")
    clock_ppm: float = Field(40.0, description="the board's crystal error")
    drop_rate: float = Field(0.002, ge=0, le=1, description="share of lines lost on the wire")
    corrupt_rate: float = Field(0.002, ge=0, le=1, description="share of lines garbled on the wire")


class SimPlcOpcUaConfig(Strict):
    """How the virtual PLC serves OPC UA beside Modbus, on plc.opcua.endpoint: the security it demands."""

    enabled: bool = True
    security: Literal["none", "sign_encrypt"] = Field(
        "none", description="sign_encrypt: only a Basic256Sha256 SignAndEncrypt endpoint, trusted clients, a user"
    )
    certificate: Path | None = Field(None, description="the PLC's certificate (needed with sign_encrypt)")
    private_key: Path | None = None
    trust_dir: Path | None = Field(None, description="accepted client certificates (needed with sign_encrypt)")
    username: str | None = None
    password_hash: str | None = Field(None, description="argon2 hash of the PLC user's password")


class SimConfig(Strict):
    seed: int = 7
    encoder_start: int = Field(2**32 - 250_000, ge=0, lt=2**32)
    speed_drift: float = Field(0.05, ge=0, lt=0.5, description="belt speed wanders within +-this share")
    fps: float = Field(60.0, gt=0)
    delivery_delay_ms: tuple[float, float] = (10.0, 60.0)
    exposure_us: float = Field(60.0, gt=0)
    noise_sigma: float = Field(3.0, ge=0)
    valve_open_delay_ms: float = Field(4.0, description="the valves' true delay (the config's ejection one is assumed)")
    valve_close_delay_ms: float = 3.0
    encoder_counts_per_mm: float | None = Field(
        None,
        gt=0,
        description="the encoder's true resolution (hw.calibrate_encoder finds it); None: belt.counts_per_mm",
    )
    watchdog_ms: float = 500.0
    camera_rt_priority: int = Field(
        10,
        ge=1,
        le=99,
        description="the simulated cameras' real-time priority (rendering, sending) under `priority.policy` "
        "rr/fifo: below the service's (`priority.rt_priority`, which the rest of the simulator has: PLC, "
        "encoder, Hall bar), above any normal work. On a plant a camera renders on hardware of its own; here "
        "it shares the computer, so the service's threads come first when both want a core (at equal "
        "priority the renders held the service's frames up; docs/results.md)",
    )
    eject_queue_size: int = Field(64, ge=1)
    belt_end_mm: float = Field(1600.0, gt=0, description="pieces not ejected leave the belt into residue here")
    feed: SimFeedConfig = SimFeedConfig()
    cameras: dict[str, SimCameraTruth] = Field(default_factory=dict)
    hallbar: SimHallBarConfig = SimHallBarConfig()
    plc_opcua: SimPlcOpcUaConfig = SimPlcOpcUaConfig()


class SimLineConfig(LineConfig):
    """A line config with the simulated line's section."""

    simulator: SimConfig | None = None

    @model_validator(mode="after")
    def _sim_cameras_known(self) -> SimLineConfig:
        if self.simulator is not None:
            unknown = set(self.simulator.cameras) - {c.name for c in self.cameras}
            if unknown:
                raise ValueError(f"simulator.cameras names unknown cameras {sorted(unknown)}")
        return self

    def paths_resolved(self, base: Path) -> dict[str, Any]:
        update = super().paths_resolved(base)
        if self.simulator is not None:
            spo = self.simulator.plc_opcua
            spo_paths = {
                k: v if v.is_absolute() else (base / v).resolve()
                for k in ("certificate", "private_key", "trust_dir")
                if (v := getattr(spo, k))
            }
            if spo_paths:
                update["simulator"] = self.simulator.model_copy(update={"plc_opcua": spo.model_copy(update=spo_paths)})
        return update


def load_sim_config(path: str | Path) -> SimLineConfig:
    """Load a line config with its `simulator:` section (ConfigError as `load_config`)."""
    return load_config(path, SimLineConfig)


def operating_point(
    cfg: SimLineConfig, speed: float | None = None, rate: float | None = None, touching: float | None = None
) -> SimLineConfig:
    """The config at another point of the operating envelope: belt speed (mm/s), feed rate (pieces/s),
    touching share; None keeps the config's. Validated as the file is (pydantic.ValidationError)."""
    assert cfg.simulator is not None
    data = cfg.model_dump()
    feed = data["simulator"]["feed"]
    feed |= {k: v for k, v in (("rate_per_s", rate), ("touching_share", touching)) if v is not None}
    if speed is not None:
        data["belt"]["nominal_speed_mm_s"] = speed
    return SimLineConfig.model_validate(data)
