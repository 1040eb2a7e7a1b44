"""The line configuration's schema: one strict pydantic model per section, the single source of line geometry.

Unknown keys are errors, and every error names the file, the key path and the
line, because a technician editing YAML at a panel PC needs to find it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CLASSES: tuple[str, ...] = ("ndfeb", "ferrite", "smco", "steel", "other")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BeltConfig(Strict):
    width_mm: float = Field(600.0, gt=0)
    counts_per_mm: float = Field(20.0, gt=0, description="encoder counts per mm of belt travel")
    nominal_speed_mm_s: float = Field(2500.0, gt=0)


class CameraMapping(Strict):
    """Pixel -> belt millimetres for one camera.

    Belt coordinates: x across the belt from its left edge, y along the belt
    relative to the cameras' centre line, positive downstream. Image columns
    run across the belt, rows along it (downstream = increasing row).
    """

    centre_mm: tuple[float, float] = Field(description="belt (x, y) of the image centre")
    mm_per_px: float = Field(0.25, gt=0)
    rotation_deg: float = 0.0


class SimCameraSource(Strict):
    type: Literal["sim"] = "sim"
    address: str = Field(description="host:port of the simulator's camera stream")


class OpenCVSource(Strict):
    type: Literal["opencv"] = "opencv"
    uri: str | int = Field(description="device index, video file, or RTSP/HTTP URL")
    realtime: bool = Field(True, description="pace video files at their frame rate")
    fps: float | None = Field(None, gt=0, description="frame rate to request from a device")


SourceConfig = Annotated[SimCameraSource | OpenCVSource, Field(discriminator="type")]


class CameraConfig(Strict):
    name: str
    source: SourceConfig
    width: int = Field(1280, gt=0)
    height: int = Field(720, gt=0)
    mapping: CameraMapping
    stall_timeout_s: float = Field(2.0, gt=0, description="no frame for this long marks the camera offline")


class VisionConfig(Strict):
    threshold: int = Field(34, ge=1, le=254, description="grey level separating pieces from the dark belt")
    downscale: int = Field(2, ge=1, le=8, description="segment on an image this many times smaller")
    min_area_mm2: float = Field(10.0, gt=0)
    split_touching: bool = True
    edge_margin_px: int = Field(2, ge=0, description="blobs this close to the top/bottom edge are partial views")
    crop_min_mm: float = Field(24.0, gt=0, description="crops never cover less than this, so size stays visible")
    crop_margin_mm: float = Field(3.0, ge=0)


class TrackingConfig(Strict):
    gate_mm: float = Field(4.0, gt=0, description="max along-belt distance between views of one piece")
    settle_mm: float = Field(
        60.0, ge=0, description="wait this far past a piece's exit before deciding, so neighbours are known"
    )


class ClassifierConfig(Strict):
    model: Path
    batch_size: int = Field(16, ge=1)
    max_views: int = Field(4, ge=1, description="views classified per piece (the sharpest are kept)")
    threads: int = Field(1, ge=1)


class RoutingConfig(Strict):
    classes: dict[str, str] = Field(description="class -> output fraction")
    min_confidence: float = Field(0.9, ge=0, le=1, description="below this a piece goes to the default fraction")
    fallback_min_confidence: float = Field(
        0.97,
        ge=0,
        le=1,
        description="threshold for a piece decided on the camera alone although the line has a Hall-sensor bar "
        "(bar offline, or no reading for that piece): stricter, so that purity holds",
    )
    default_fraction: str = "residue"

    @model_validator(mode="after")
    def _known_classes(self) -> RoutingConfig:
        unknown = set(self.classes) - set(CLASSES)
        if unknown:
            raise ValueError(f"unknown classes {sorted(unknown)}; known: {list(CLASSES)}")
        return self


class BankConfig(Strict):
    name: str
    distance_mm: float = Field(gt=0, description="valve row distance downstream of the cameras' centre line")
    fraction: str


class EjectionConfig(Strict):
    valves_per_bank: int = Field(32, ge=1, le=32)
    valve_pitch_mm: float = Field(18.75, gt=0)
    first_valve_x_mm: float = Field(0.0, description="belt x of the left edge of valve 0")
    banks: list[BankConfig]
    margin_lead_mm: float = Field(3.0, ge=0)
    margin_trail_mm: float = Field(3.0, ge=0)
    margin_side_mm: float = Field(2.0, ge=0)
    valve_open_delay_ms: float = Field(4.0, ge=0, description="command -> air on at the valve row")
    valve_close_delay_ms: float = Field(3.0, ge=0)
    min_lead_ms: float = Field(30.0, ge=0, description="a command must reach the PLC this long before it fires")
    min_valve_coverage: float = Field(0.5, gt=0, le=1, description="share of a piece's width its valves must cover")
    protect_purity: bool = Field(True, description="skip an ejection that would also blow a piece of another fraction")
    neighbour_hit_share: float = Field(
        0.1, ge=0, le=1, description="air on more than this share of a neighbour's footprint counts as hitting it"
    )


class ModbusMap(Strict):
    unit_id: int = Field(1, ge=0, le=247)
    ir_encoder: int = 0
    ir_speed: int = 2
    ir_status: int = 3
    ir_queue_free: int = 4
    ir_last_seq: int = 5
    ir_ejects_done: int = 6
    ir_ejects_late: int = 7
    hr_heartbeat: int = 0
    hr_command: int = 1
    hr_slots: int = 100
    slot_stride: int = Field(8, ge=7)
    slot_count: int = Field(16, ge=2)
    coil_valves: int = 0
    ir_chute_counts: int | None = Field(
        8,
        description="optional: first of one input register per bank counting the pieces that broke the bank's "
        "chute light barrier (hw.calibrate_eject); None: the PLC has none",
    )

    @property
    def input_addresses(self) -> list[int]:
        """Every input register the link polls (the encoder takes two; the chute counters are read apart)."""
        return [
            self.ir_encoder,
            self.ir_encoder + 1,
            self.ir_speed,
            self.ir_status,
            self.ir_queue_free,
            self.ir_last_seq,
            self.ir_ejects_done,
            self.ir_ejects_late,
        ]


class PlcNodeNames(Strict):
    """Browse names (in the PLC's namespace) below the line object: what a plant's PLC program calls them."""

    encoder_count: str = "EncoderCount"
    belt_speed: str = "BeltSpeed"
    status: str = "Status"
    eject_queue_free: str = "EjectQueueFree"
    last_seq_accepted: str = "LastSeqAccepted"
    ejects_done: str = "EjectsDone"
    ejects_late: str = "EjectsLate"
    heartbeat: str = "Heartbeat"
    command: str = "Command"
    schedule_eject: str = "ScheduleEject"
    set_valve: str = "SetValve"
    chute_counts: str = Field(
        "ChuteCounts", description="optional UInt32 array, one per bank: pieces through the bank's chute light barrier"
    )


class OpcUaSecurity(Strict):
    """Client-side OPC UA security: what the server demands decides what must be given here."""

    policy: Literal["None", "Basic256Sha256"] = "None"
    mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    certificate: Path | None = Field(None, description="this client's certificate (DER or PEM)")
    private_key: Path | None = Field(None, description="this client's private key (PEM)")
    server_certificate: Path | None = Field(None, description="pin the server's certificate (DER or PEM)")
    username: str | None = None
    password_env: str | None = Field(
        None, description="name of the environment variable holding the password (never the password itself)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaSecurity:
        if (self.policy == "None") != (self.mode == "None"):
            raise ValueError("policy and mode must both be None or both be set")
        if self.policy != "None" and (self.certificate is None or self.private_key is None):
            raise ValueError(f"security policy {self.policy} needs certificate and private_key")
        if (self.username is None) != (self.password_env is None):
            raise ValueError("username and password_env go together")
        return self


class PlcOpcUaConfig(Strict):
    """The PLC as an OPC UA server (docs/plc-interface.md, OPC UA address space)."""

    endpoint: str = "opc.tcp://127.0.0.1:4840"
    namespace: str = "urn:magnet-sorter:plc"
    line_path: list[str] = Field(["Line"], min_length=1, description="browse path below Objects to the line object")
    nodes: PlcNodeNames = PlcNodeNames()
    security: OpcUaSecurity = OpcUaSecurity()
    publishing_interval_ms: float = Field(10.0, gt=0, description="subscription publishing interval")
    session_timeout_s: float = Field(10.0, gt=0)


class PlcConfig(Strict):
    protocol: Literal["modbus", "opcua"] = "modbus"
    host: str = "127.0.0.1"
    port: int = Field(5020, ge=1, le=65535)
    timeout_s: float = Field(0.5, gt=0)
    poll_interval_ms: float = Field(10.0, gt=0)
    heartbeat_interval_ms: float = Field(50.0, gt=0, le=100)
    reconnect_min_s: float = Field(0.2, gt=0)
    reconnect_max_s: float = Field(5.0, gt=0)
    registers: ModbusMap = ModbusMap()
    opcua: PlcOpcUaConfig = PlcOpcUaConfig()


class MagnetometerConfig(Strict):
    """The Hall-sensor bar under the belt (see docs/hall-bar.md for its serial protocol)."""

    port: str = Field(description="serial device of the bar, e.g. /dev/ttyUSB0 (the simulator's pty link)")
    baudrate: int = Field(115200, gt=0)
    channels: int = Field(48, ge=1, le=256)
    pitch_mm: float = Field(12.5, gt=0, description="distance between neighbouring channels across the belt")
    first_channel_x_mm: float = Field(6.25, description="belt x of channel 0's sensor")
    distance_mm: float = Field(200.0, gt=0, description="sensor row distance downstream of the cameras' centre line")
    offsets_mT: list[float] | None = Field(None, description="per-channel zero offsets (hw.calibrate_magnetometer)")
    gains: list[float] | None = Field(None, description="per-channel gains, applied after the offset")
    stall_timeout_s: float = Field(0.5, gt=0, description="no valid line for this long marks the bar offline")
    reconnect_min_s: float = Field(0.2, gt=0)
    reconnect_max_s: float = Field(5.0, gt=0)
    wait_ms: float = Field(
        150.0, ge=0, description="how long a decision may wait for the bar's readings of a piece past the bar"
    )

    @model_validator(mode="after")
    def _per_channel(self) -> MagnetometerConfig:
        for name in ("offsets_mT", "gains"):
            vals = getattr(self, name)
            if vals is not None and len(vals) != self.channels:
                raise ValueError(f"{name} has {len(vals)} values for {self.channels} channels")
        return self


class QueueConfig(Strict):
    frames_per_camera: int = Field(8, ge=1)
    drop_policy: Literal["drop_oldest", "drop_newest"] = "drop_oldest"


class RecordsConfig(Strict):
    path: Path = Path("runs/records.sqlite")


Role = Literal["viewer", "operator", "technician"]


class UserConfig(Strict):
    """A person (or SCADA account) allowed on the line's OPC UA server and, later, the HMI."""

    name: str = Field(min_length=1)
    role: Role
    password_hash: str = Field(description="argon2 hash made by `sorter opcua hash-password`; never the password")

    @field_validator("password_hash")
    @classmethod
    def _argon2(cls, v: str) -> str:
        if not v.startswith("$argon2"):
            raise ValueError("password_hash must be an argon2 hash (`sorter opcua hash-password`), not a password")
        return v


class OpcUaServerConfig(Strict):
    """The line's own OPC UA server for SCADA/MES (docs/opcua-server.md)."""

    enabled: bool = True
    endpoint: str = "opc.tcp://0.0.0.0:4841"
    namespace: str = "urn:magnet-sorter:line"
    certificate: Path = Field(Path("pki/line-server-cert.der"), description="made by `sorter opcua certs`")
    private_key: Path = Path("pki/line-server-key.pem")
    trust_dir: Path = Field(Path("pki/trusted"), description="folder of accepted client certificates (DER/PEM)")
    allow_none_security: bool = Field(False, description="also offer the unencrypted None endpoint (never in a plant)")
    allow_anonymous: bool = Field(False, description="let clients in without a user name, as viewers")


class HmiConfig(Strict):
    """The operator's web HMI, served by the line service (docs/hmi.md)."""

    enabled: bool = True
    host: str = Field("127.0.0.1", description="listen address; 0.0.0.0 to reach it from a panel PC")
    port: int = Field(8080, ge=0, le=65535, description="0 picks a free port")
    session_idle_s: float = Field(900.0, gt=0, description="a session without activity for this long expires")
    session_max_s: float = Field(12 * 3600.0, gt=0, description="a session expires after this long in any case")
    push_hz: float = Field(5.0, gt=0, le=30, description="live updates pushed to each browser per second")
    camera_fps: float = Field(4.0, gt=0, le=15, description="live camera images per second per browser")


class StateMachineConfig(Strict):
    """The line's PackML state machine (docs/opcua-server.md)."""

    starved_after_s: float = Field(
        10.0, gt=0, description="no piece seen for this long in Execute: the line suspends itself (feed ran dry)"
    )
    start_timeout_s: float = Field(15.0, gt=0, description="Starting gives up (and stops) after this long")


class MassRule(Strict):
    """How `sorter report` estimates a piece's mass from its projected area (sorter/reports/mass.py).

    Mass = area × nominal thickness × density; thickness (mm) = frac_of_width × the piece's mean width
    + offset_mm, capped at max_mm.
    """

    density_g_cm3: float = Field(gt=0, description="density of the decided class's material, g/cm³")
    frac_of_width: float = Field(ge=0, description="nominal thickness per mm of the piece's mean width")
    offset_mm: float = Field(ge=0, description="nominal thickness added to the width share, mm")
    max_mm: float = Field(gt=0, description="nominal thickness never exceeds this, mm")


def _default_mass_model() -> dict[str, MassRule]:
    # Handbook densities; thickness rules from the pieces' usual shapes: sintered magnets are chunky (blocks,
    # arcs, discs: thickness grows with size), steel parts are mostly sheet/washers/screws, "other" is a mix
    # (copper, brass, aluminium, plastic, PCB: a mixed density).
    magnet = {"frac_of_width": 0.4, "offset_mm": 1.0, "max_mm": 20.0}
    flat = {"frac_of_width": 0.15, "offset_mm": 1.5, "max_mm": 10.0}
    return {
        "ndfeb": MassRule(density_g_cm3=7.5, **magnet),
        "ferrite": MassRule(density_g_cm3=4.9, **magnet),
        "smco": MassRule(density_g_cm3=8.4, **magnet),
        "steel": MassRule(density_g_cm3=7.85, **flat),
        "other": MassRule(density_g_cm3=4.0, **flat),
    }


class ReportsConfig(Strict):
    """Shift and batch reports from the piece records (`sorter report`, sorter/reports/)."""

    mass_model: dict[str, MassRule] = Field(
        default_factory=_default_mass_model,
        description="mass estimate per decided class (the camera sees area, not volume): good for trends and "
        "kg/h, not for invoicing; check it against weighed bins and adjust it here. A class without a rule "
        "uses `other`'s, so `other` is required; a mass_model given here replaces the whole default",
    )

    @field_validator("mass_model")
    @classmethod
    def _known_classes_and_other(cls, model: dict[str, MassRule]) -> dict[str, MassRule]:
        unknown = set(model) - set(CLASSES)
        if unknown:
            raise ValueError(f"unknown classes {sorted(unknown)}; known: {list(CLASSES)}")
        if "other" not in model:
            raise ValueError("a rule for `other` is needed: classes without a rule of their own use it")
        return model


class LineConfig(Strict):
    line: str = "line-1"
    belt: BeltConfig = BeltConfig()
    cameras: list[CameraConfig]
    vision: VisionConfig = VisionConfig()
    tracking: TrackingConfig = TrackingConfig()
    classifier: ClassifierConfig
    routing: RoutingConfig
    ejection: EjectionConfig
    plc: PlcConfig = PlcConfig()
    magnetometer: MagnetometerConfig | None = None
    queues: QueueConfig = QueueConfig()
    records: RecordsConfig = RecordsConfig()
    reports: ReportsConfig = Field(
        ReportsConfig(), description="shift and batch reports from the records (`sorter report`): the mass estimate"
    )
    states: StateMachineConfig = StateMachineConfig()
    opcua_server: OpcUaServerConfig | None = None
    hmi: HmiConfig | None = None
    users: list[UserConfig] = []

    @field_validator("cameras")
    @classmethod
    def _unique_cameras(cls, cameras: list[CameraConfig]) -> list[CameraConfig]:
        names = [c.name for c in cameras]
        if not cameras:
            raise ValueError("at least one camera is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"camera names must be unique, got {names}")
        return cameras

    @model_validator(mode="after")
    def _consistent(self) -> LineConfig:
        fractions = {b.fraction for b in self.ejection.banks}
        routed = set(self.routing.classes.values()) | {self.routing.default_fraction}
        missing = routed - fractions - {self.routing.default_fraction}
        if missing:
            raise ValueError(f"fractions {sorted(missing)} are routed to but no ejection bank serves them")
        if self.routing.default_fraction in fractions:
            raise ValueError("the default fraction must be the one that is not ejected")
        width = self.ejection.valves_per_bank * self.ejection.valve_pitch_mm
        if self.ejection.first_valve_x_mm + width < self.belt.width_mm - 1e-6:
            raise ValueError(f"valves cover {width} mm but the belt is {self.belt.width_mm} mm wide")
        return self

    def paths_resolved(self, base: Path) -> dict[str, Any]:
        """The config's relative paths made relative to `base` (the file's folder), as a model_copy update."""
        cfg = self

        def rel(p: Path) -> Path:
            return p if p.is_absolute() else (base / p).resolve()

        update = {
            "classifier": cfg.classifier.model_copy(update={"model": rel(cfg.classifier.model)}),
            "records": cfg.records.model_copy(update={"path": rel(cfg.records.path)}),
        }
        sec = cfg.plc.opcua.security
        sec_paths = {k: rel(v) for k in ("certificate", "private_key", "server_certificate") if (v := getattr(sec, k))}
        if sec_paths:
            opcua = cfg.plc.opcua.model_copy(update={"security": sec.model_copy(update=sec_paths)})
            update["plc"] = cfg.plc.model_copy(update={"opcua": opcua})
        srv = cfg.opcua_server
        if srv is not None:
            update["opcua_server"] = srv.model_copy(
                update={k: rel(getattr(srv, k)) for k in ("certificate", "private_key", "trust_dir")}
            )
        mag = cfg.magnetometer
        if mag is not None and "/" in mag.port and not Path(mag.port).is_absolute():  # not a bare name such as COM3
            update["magnetometer"] = mag.model_copy(update={"port": str(rel(Path(mag.port)))})
        return update

    @property
    def fractions(self) -> list[str]:
        """Output fractions in bank order, then the default (not ejected) fraction."""
        return [b.fraction for b in self.ejection.banks] + [self.routing.default_fraction]
