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
    width_mm: float = Field(600.0, gt=0, description="usable belt width, mm; the valves must cover all of it")
    counts_per_mm: float = Field(
        20.0, gt=0, description="encoder counts per mm of belt travel (hw.calibrate_encoder measures it)"
    )
    nominal_speed_mm_s: float = Field(
        2500.0,
        gt=0,
        description="the belt's set speed, mm/s: the simulator runs at it and the hw/ calibrations plan with it; "
        "the service times everything from the encoder, never from this",
    )


class CameraMapping(Strict):
    """Pixel -> belt millimetres for one camera.

    Belt coordinates: x across the belt from its left edge, y along the belt
    relative to the cameras' centre line, positive downstream. Image columns
    run across the belt, rows along it (downstream = increasing row).
    """

    centre_mm: tuple[float, float] = Field(description="belt (x, y) of the image centre, mm (hw.calibrate_camera)")
    mm_per_px: float = Field(0.25, gt=0, description="image scale: belt mm per pixel (hw.calibrate_camera)")
    rotation_deg: float = Field(
        0.0,
        description="angle of the image's horizontal axis (increasing column) to the belt's x axis, degrees; "
        "positive turns it downstream (hw.calibrate_camera)",
    )


class SimCameraSource(Strict):
    type: Literal["sim"] = Field("sim", description="frames from the simulator's camera server (sim/camera.py)")
    address: str = Field(description="host:port of the simulator's camera stream")


class OpenCVSource(Strict):
    type: Literal["opencv"] = Field(
        "opencv", description="frames through OpenCV: a camera device, a video file or a network stream"
    )
    uri: str | int = Field(description="device index, video file, or RTSP/HTTP URL")
    realtime: bool = Field(True, description="pace video files at their frame rate")
    fps: float | None = Field(None, gt=0, description="frame rate to request from a device")


GENICAM_PIXEL_FORMATS = ("Mono8", "BayerRG8", "BayerGR8", "BayerGB8", "BayerBG8", "RGB8", "BGR8")


class GenICamSource(Strict):
    """A GigE Vision or USB3 Vision camera through its GenICam features (sorter/drivers/cameras/genicam.py).

    Where each frame was on the belt (`position`, docs/cameras.md): `chunk` reads the encoder count the camera
    latched at exposure from the frame's chunk data; `trigger` counts frames of a camera triggered every
    `counts_per_trigger` encoder counts; `timestamp` maps the camera's timestamp to PC time and through the
    clock model to counts; `arrival` uses the time the frame reached the PC. The service refuses a method whose
    expected error at the belt's speed exceeds the eject margins.
    """

    type: Literal["genicam"] = Field("genicam", description="a GigE Vision / USB3 Vision camera (GenICam)")
    device: str = Field(
        description="which camera: its serial number, user-defined name (DeviceUserID), IP address or the "
        "library's device id (`sorter cameras discover` lists them)"
    )
    pixel_format: Literal["Mono8", "BayerRG8", "BayerGR8", "BayerGB8", "BayerBG8", "RGB8", "BGR8"] | None = Field(
        None,
        description="pixel format set at open (Bayer is debayered on the PC, Mono8 made grey BGR); null: keep "
        "the camera's",
    )
    exposure_us: float | None = Field(None, gt=0, description="exposure time set at open, µs; null: keep the camera's")
    gain_db: float | None = Field(None, ge=0, description="gain set at open, dB; null: keep the camera's")
    offset_x: int = Field(0, ge=0, description="region of interest: first column, px (width is cameras[].width)")
    offset_y: int = Field(0, ge=0, description="region of interest: first row, px (height is cameras[].height)")
    trigger: Literal["line", "software", "free"] = Field(
        "line",
        description="`line`: FrameStart on a hardware input (the encoder trigger, production); `software`: "
        "triggered by the PC at 10 Hz (tests, checks); `free`: free-running at the camera's frame rate (checks)",
    )
    trigger_line: str = Field("Line0", description="the input the encoder trigger is wired to (TriggerSource)")
    trigger_activation: Literal["RisingEdge", "FallingEdge"] = Field(
        "RisingEdge", description="the trigger input's active edge"
    )
    position: Literal["chunk", "trigger", "timestamp", "arrival"] = Field(
        "trigger",
        description="how a frame's belt position is known: `chunk` (encoder count in the chunk data), `trigger` "
        "(frame ID × counts_per_trigger), `timestamp` (device timestamp → clock model), `arrival` (PC arrival "
        "time → clock model)",
    )
    chunk: str = Field(
        "EncoderValue",
        description="the chunk holding the encoder count latched at exposure, as ChunkSelector names it "
        "(SFNC `EncoderValue`, or `CounterValue`; vendors differ); enabled at open, read as Chunk<name>",
    )
    counts_per_trigger: int | None = Field(
        None, ge=1, description="encoder counts between two triggers (the PLC's compare step); needed for `trigger`"
    )
    trigger_phase: int = Field(
        0,
        ge=0,
        description="the encoder count (mod counts_per_trigger) at which the PLC fires the trigger "
        "(docs/cameras.md); used with `trigger`",
    )
    settings: list[str] = Field(
        [],
        description="further GenICam features written at open, in order, as `Name=Value` (e.g. "
        "`CounterSelector=Counter0`, `GevSCPSPacketSize=8192`); a refused one is an error naming it",
    )
    buffers: int = Field(8, ge=2, le=256, description="frame buffers queued to the stream")

    @model_validator(mode="after")
    def _consistent(self) -> GenICamSource:
        if self.position == "trigger":
            if self.counts_per_trigger is None:
                raise ValueError("position `trigger` needs counts_per_trigger (the PLC's trigger step in counts)")
            if self.trigger != "line":
                raise ValueError(
                    f"position `trigger` counts encoder triggers: it needs trigger `line`, not `{self.trigger}`"
                )
        for setting in self.settings:
            name, sep, value = setting.partition("=")
            if not sep or not name.strip() or not value.strip() or " " in name.strip():
                raise ValueError(f"setting {setting!r} is not `Name=Value`")
        return self


SourceConfig = Annotated[SimCameraSource | OpenCVSource | GenICamSource, Field(discriminator="type")]


class CameraConfig(Strict):
    name: str = Field(description="the camera's name in logs, records, the HMI and `simulator.cameras`; unique")
    source: SourceConfig = Field(description="where the frames come from, chosen by `type`")
    width: int = Field(1280, gt=0, description="image width the camera delivers, px (frames are never resized)")
    height: int = Field(720, gt=0, description="image height the camera delivers, px")
    mapping: CameraMapping = Field(description="pixel -> belt mm (hw.calibrate_camera writes it)")
    stall_timeout_s: float = Field(2.0, gt=0, description="no frame for this long marks the camera offline")
    latency_ms: float = Field(
        0.0,
        ge=0,
        description="exposure → time the frame is stamped with (its arrival, or the mapped device timestamp), "
        "ms; subtracted where a frame is placed by time (opencv sources, genicam `timestamp`/`arrival`); "
        "hw.calibrate_camera measures it",
    )
    timing_jitter_ms: float | None = Field(
        None,
        ge=0,
        description="the spread (±) of that latency as measured on this camera (hw.camera_check), ms; null: the "
        "method's typical value (docs/cameras.md). Sets the expected position error checked against the margins",
    )


class VisionConfig(Strict):
    """Segmentation of the camera images (sorter/vision/segment.py).

    Touching pieces are parted three ways: at a narrow neck of the blob (`neck_*`, `colour_step`, `hole_*`),
    between two notches of its outline (`cut_*`), and on from one sharp crevice (`crevice_deg`). Colour distances
    are in grey levels: the distance between the mean (B, G, R) of two sides of a blob, 0 .. 441. The defaults
    were measured on the simulated feed.
    """

    threshold: int = Field(34, ge=1, le=254, description="grey level separating pieces from the dark belt")
    downscale: int = Field(
        2,
        ge=1,
        le=8,
        description="find the pieces on an image this many times smaller (blobs that may hold touching pieces "
        "are parted on the frame itself: `split_full_res`). 1 finds them on the frame too: `sorter sim touching` "
        "loses as many touching pieces (23 of 1,965; 48 centroids over 1 mm off against 47) for more segmentation "
        "CPU, and a vision thread that falls behind then has no lighter way to part them (`full_res_max_lag_ms`) "
        "(docs/results.md)",
    )
    split_full_res: bool = Field(
        True,
        description="part a blob that may hold touching pieces (not convex, or with a hole) on the frame itself, "
        "not on the image `downscale` times smaller it was found on; only such blobs pay for full resolution. "
        "`sorter sim touching`: 23 of 1,965 touching pieces lost against 61 without, centroids over 1 mm off 47 "
        "against 90 (docs/results.md)",
    )
    full_res_max_lag_ms: float = Field(
        25.0,
        gt=0,
        description="a frame that waited longer than this for its vision thread has its touching pieces parted "
        "on the downscaled image only (counted as `frames_parted_coarse`): a thread that falls behind sheds "
        "the full-resolution work before it would drop frames. 25 ms: 1.5 frame intervals at 60 fps",
    )
    min_area_mm2: float = Field(10.0, gt=0, description="blobs smaller than this (mm²) are dirt or noise, not pieces")
    split_touching: bool = Field(True, description="part blobs of touching pieces (every `neck_*`/`cut_*` setting)")
    edge_margin_px: int = Field(2, ge=0, description="blobs this close to the top/bottom edge are partial views")
    opencv_threads: int = Field(
        1,
        ge=0,
        description="threads OpenCV may use inside one call (the process-wide setting; 0: OpenCV's own "
        "choice, all cores). The line already runs a vision thread per camera beside inference and the "
        "simulator, so a pool inside each call only competes for the same cores: measured with "
        "`sorter bench`, 1 thread costs 26 % less CPU per frame than OpenCV's default on 2 cores",
    )
    crop_min_mm: float = Field(24.0, gt=0, description="crops never cover less than this, so size stays visible")
    crop_margin_mm: float = Field(3.0, ge=0, description="belt shown around a piece in its classifier crop, mm")
    crop_seam_mm: float = Field(
        1.0,
        ge=0,
        description="a piece parted from a touching neighbour is shown in its classifier crop without this much "
        "of its side along the neighbour, mm: segmentation may misplace that border, and a sliver of a bright "
        "magnet in a ferrite's crop makes it look like a magnet; 0 keeps the whole mask",
    )
    neck_sure: float = Field(
        0.45,
        gt=0,
        le=1,
        description="a blob narrowing below this share of its smaller side's half-width is always two pieces "
        "(measured on the distance map). Raise it if touching pieces of one colour stay one blob; lower it if "
        "single pieces with a waist (screws, brackets) are cut in two. At most `neck_colour`",
    )
    neck_colour: float = Field(
        0.8,
        gt=0,
        le=1,
        description="a blob narrowing below this share (but not below `neck_sure`) is two pieces only if the two "
        "sides also differ in colour by `colour_step`. Raise it to part pieces of two materials touching along "
        "a wide edge; lower it if single pieces with a highlight or two-tone coating are cut in two",
    )
    colour_step: float = Field(
        28.0,
        gt=0,
        le=442,
        description='colour distance (grey levels, mean B, G, R) that says "another material" at a moderate '
        "neck (`neck_colour`) or a doubtful notch cut (`cut_sure`); the sides of any notch cut this far apart "
        "have their border moved from the straight cut onto the edge between their colours. Lower it if touching "
        "pieces of similar colour stay together; raise it if single pieces with a highlight or a coating edge "
        "are split",
    )
    hole_min_share: float = Field(
        0.15,
        gt=0,
        le=0.5,
        description="a blob with a hole (two pieces touching at both ends, an arc on a screw) is parted by colour "
        "alone only if its smaller side holds at least this share of the blob. Raise it if rings or plates "
        "with bolt holes lose a sliver; lower it to part smaller pieces resting on bigger ones",
    )
    hole_colour_step: float = Field(
        56.0,
        gt=0,
        le=442,
        description="colour distance (grey levels) between the sides of a holed blob needed to part it by "
        "colour alone: stricter than `colour_step`. Raise it if single holed pieces (rings with a highlight) "
        "are parted; lower it if an arc resting on a screw or bar stays one blob",
    )
    hole_rim_max_share: float = Field(
        0.8,
        ge=0.5,
        le=1,
        description="a holed blob is parted by colour only if no side holds more than this share of the hole's "
        "rim (the hole must lie between the pieces, not inside one, like a plate's bolt hole). Lower it if "
        "plates with holes are parted; 1 switches this test off",
    )
    cut_sure: float = Field(
        0.8,
        gt=0,
        description="two notches of a blob's outline closer than this × the deeper notch's depth are where two "
        "pieces touch: the blob is cut between them. Raise it to cut more touching pairs without a colour "
        "check; lower it if single pieces (arcs, brackets) are cut. At most `cut_ratio`",
    )
    cut_ratio: float = Field(
        1.3,
        gt=0,
        description="notches closer than this × the deeper depth (but not closer than `cut_sure`) are cut only if "
        "the two sides differ in colour by `colour_step` (a screw's wide head looks like a disc on a bar). "
        "Single pieces measured at 1.55 and above: keep it below that",
    )
    cut_sharp_deg: float = Field(
        100.0,
        ge=0,
        le=180,
        description="a notch whose outline turns sharper than this (inside angle, degrees, over 1.5 × "
        "`cut_depth_mm`) is a crevice where two outlines meet; a pair of them closer than `cut_ratio` is cut "
        "without the colour test, and of several pairs the sharpest is cut. A wide screw head meets its "
        "shank at about 115°: keep it below that. 0 asks the colour of every pair beyond `cut_sure`",
    )
    cut_far_ratio: float = Field(
        3.0,
        gt=0,
        description="notches farther apart than `cut_ratio` but closer than this × the deeper depth are cut only "
        "if the two sides differ in colour by `cut_far_colour_step`: a small piece pressed against a bigger one "
        "of another material leaves shallow notches far apart for their depth. At most `cut_ratio` switches it off",
    )
    cut_far_colour_step: float = Field(
        80.0,
        gt=0,
        le=442,
        description="colour distance (grey levels) between the sides of a far notch cut (`cut_far_ratio`): "
        "stricter than `colour_step`, since single pieces with a coating edge or rust patch have far notches "
        "too. A pair one of whose notches is a crevice (`crevice_deg`) is cut with no colour test. Raise it if "
        "such pieces are cut; lower it if small pieces pressed on others stay one blob",
    )
    crevice_deg: float = Field(
        60.0,
        ge=0,
        le=180,
        description="a notch at least 2 × `cut_depth_mm` deep whose outline turns sharper than this (inside angle, "
        "as for `cut_sharp_deg`) is where a piece is pressed into another, even with no notch at the contact's "
        "other end: it is cut on from its tip along its own line to the outline, if that is no farther than 1.5 × "
        "its depth; paired with another notch (closer than `cut_far_ratio`), the pair is cut with no colour test. "
        "Single pieces' notches that deep measured 84° and wider: keep it below that. 0 switches it off",
    )
    cut_depth_mm: float = Field(
        1.0,
        gt=0,
        description="outline notches shallower than this (mm) are roughness, never where pieces touch. Raise it "
        "if rough or chipped pieces are cut at their chips; lower it if small touching pieces stay one blob",
    )
    cut_min_px: int = Field(
        12,
        ge=1,
        description="each side of a notch cut must cover at least this many pixels of the segmentation image "
        "(after `downscale`); smaller crumbs stay with the piece. Raise it if fragments are reported as pieces",
    )
    cut_levels: int = Field(
        3,
        ge=0,
        le=8,
        description="notch cuts nest at most this deep (each side of a cut may be cut again, and so on): raise it "
        "if clusters of many touching pieces are left partly whole; 0 switches notch cutting off",
    )

    @model_validator(mode="after")
    def _ordered(self) -> VisionConfig:
        if self.neck_sure > self.neck_colour:
            raise ValueError(f"neck_sure ({self.neck_sure}) must not exceed neck_colour ({self.neck_colour})")
        if self.cut_sure > self.cut_ratio:
            raise ValueError(f"cut_sure ({self.cut_sure}) must not exceed cut_ratio ({self.cut_ratio})")
        return self


class TrackingConfig(Strict):
    gate_mm: float = Field(4.0, gt=0, description="max along-belt distance between views of one piece")
    settle_mm: float = Field(
        60.0, ge=0, description="wait this far past a piece's exit before deciding, so neighbours are known"
    )


class ClassifierConfig(Strict):
    model: Path = Field(description="the classifier's ONNX model file (relative to the config file)")
    batch_size: int = Field(
        16,
        ge=1,
        description="crops per inference run: the pieces ready together are classified in runs of at most "
        "this many crops (ONNX Runtime keeps the memory of the largest run it has made: 256 crops cost "
        "135 MB of RSS for good, 16 about 13 MB; docs/memory.md)",
    )
    max_views: int = Field(
        4,
        ge=1,
        description="the most views classified per piece (whole views first, the largest of them are kept; "
        "past the first only where it is not sure: sure_confidence)",
    )
    sure_confidence: float = Field(
        0.99,
        gt=0.0,
        le=1.0,
        description="a piece's largest view is classified first, and its other views only when that view's top "
        "class is below this probability; the piece is then judged on all of them (1: every view, always; "
        "sorter/vision/classify.py, docs/results.md)",
    )
    threads: int = Field(1, ge=1, description="CPU threads the model's inference may use")
    shadow_model: Path | None = Field(
        None,
        description="a candidate ONNX model run beside the live one in shadow mode: it classifies the same crops "
        "with the same field reading, its decisions are recorded and compared, never acted on; checked at start "
        "like `model` and must have the same classes in the same order (relative to the config file; null: none; "
        "docs/shadow.md)",
    )


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
    default_fraction: str = Field(
        "residue",
        description="the fraction no bank ejects (it runs off the belt's end): unrouted, unsure and held pieces",
    )

    @model_validator(mode="after")
    def _known_classes(self) -> RoutingConfig:
        unknown = set(self.classes) - set(CLASSES)
        if unknown:
            raise ValueError(f"unknown classes {sorted(unknown)}; known: {list(CLASSES)}")
        return self


class BankConfig(Strict):
    name: str = Field(description="the bank's name in records, logs and valve tests (A, B, ...)")
    distance_mm: float = Field(gt=0, description="valve row distance downstream of the cameras' centre line")
    fraction: str = Field(description="the output fraction this bank's valves blow pieces into")


class EjectionConfig(Strict):
    valves_per_bank: int = Field(32, ge=1, le=32, description="valves in each bank's row (one 32-bit mask)")
    valve_pitch_mm: float = Field(18.75, gt=0, description="distance between neighbouring valves across the belt, mm")
    first_valve_x_mm: float = Field(0.0, description="belt x of the left edge of valve 0")
    banks: list[BankConfig] = Field(
        description="the valve rows in the PLC's bank order: the first is bank 0 (A), the first row downstream"
    )
    margin_lead_mm: float = Field(
        3.0, ge=0, description="air comes on this far ahead of a piece's leading edge, mm (less to spare a neighbour)"
    )
    margin_trail_mm: float = Field(
        3.0, ge=0, description="air stays on this far past a piece's trailing edge, mm (less to spare a neighbour)"
    )
    margin_side_mm: float = Field(
        2.0, ge=0, description="the valves opened cover the piece's width plus this much on each side, mm"
    )
    valve_open_delay_ms: float = Field(4.0, ge=0, description="command -> air on at the valve row")
    valve_close_delay_ms: float = Field(3.0, ge=0, description="command -> air off at the valve row")
    min_lead_ms: float = Field(30.0, ge=0, description="a command must reach the PLC this long before it fires")
    min_valve_coverage: float = Field(0.5, gt=0, le=1, description="share of a piece's width its valves must cover")
    protect_purity: bool = Field(
        True,
        description="skip an ejection that would also blow a piece of another fraction (unless "
        "`conflict_value` says it is worth it); false: eject anyway",
    )
    min_footprint_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="when no window over the whole piece spares a touching neighbour, a window over part of it "
        "(centred on its centroid, shortened to the neighbour's edge along and narrowed to fewer valves across) "
        "ejects it if it covers at least this share of the piece's footprint (its box); 1: never trim over the "
        "piece",
    )
    touching_gap_mm: float = Field(
        0.5,
        ge=0,
        description="a window over part of a piece (`min_footprint_share`) stops this far short of the touching "
        "neighbour's edge, mm: where two pieces touch, segmentation may misplace the border between them. "
        "Raise it if such neighbours are co-ejected; lower it if too many touching pieces end in conflict "
        "(3.5 m/s, 60 pieces/s, 15 % touching, seed 42: 2 mm instead of 0.5 lost 0.5 % of each product's "
        "recovery and gained no purity)",
    )
    conflict_value: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description="per ejected fraction: what recovering one of its pieces is worth, in units of what one piece "
        "of another fraction blown into it costs. When the air cannot spare a neighbour, the piece is ejected "
        "anyway if this value times the probability that it belongs there exceeds the pieces of another "
        "fraction expected in with it (each neighbour hit, weighted by the probability that it does not "
        "belong there); a fraction not listed: 0, the neighbour is always spared",
    )
    neighbour_hit_share: float = Field(
        0.1, ge=0, le=1, description="air on more than this share of a neighbour's footprint counts as hitting it"
    )


class ModbusMap(Strict):
    """The PLC's Modbus addresses: 0-based, as in the request (docs/plc-interface.md, sections 2-5)."""

    unit_id: int = Field(1, ge=0, le=247, description="Modbus unit id of the PLC")
    ir_encoder: int = Field(0, description="input registers: encoder count, high word (low word at the next one)")
    ir_speed: int = Field(2, description="input register: belt speed, mm/s (display only)")
    ir_status: int = Field(3, description="input register: status bits")
    ir_queue_free: int = Field(4, description="input register: free entries in the PLC's eject queue")
    ir_last_seq: int = Field(5, description="input register: seq of the last command the PLC accepted")
    ir_ejects_done: int = Field(6, description="input register: commands executed (wrapping counter)")
    ir_ejects_late: int = Field(7, description="input register: commands too late to execute (wrapping counter)")
    hr_heartbeat: int = Field(0, description="holding register: the PC's heartbeat")
    hr_command: int = Field(1, description="holding register: command (1 start, 2 stop, 3 reset faults)")
    hr_slots: int = Field(100, description="holding registers: first eject-command slot")
    slot_stride: int = Field(8, ge=7, description="registers per command slot")
    slot_count: int = Field(16, ge=2, description="command slots in the mailbox")
    coil_valves: int = Field(0, description="coil of valve 0 of bank A (valve v of bank b: + 32·b + v)")
    ir_chute_counts: int | None = Field(
        8,
        description="optional: first of one input register per bank counting the pieces that broke the bank's "
        "chute light barrier (hw.calibrate_eject); null: the PLC has none",
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

    encoder_count: str = Field("EncoderCount", description="UInt32 variable: the encoder count")
    belt_speed: str = Field("BeltSpeed", description="Float variable: belt speed, mm/s (display only)")
    status: str = Field("Status", description="UInt16 variable: status bits")
    eject_queue_free: str = Field("EjectQueueFree", description="UInt16 variable: free eject-queue entries")
    last_seq_accepted: str = Field("LastSeqAccepted", description="UInt16 variable: seq of the last accepted command")
    ejects_done: str = Field("EjectsDone", description="UInt32 variable: commands executed since power-up")
    ejects_late: str = Field("EjectsLate", description="UInt32 variable: commands too late to execute")
    heartbeat: str = Field("Heartbeat", description="UInt16 variable the PC changes as its heartbeat")
    command: str = Field("Command", description="UInt16 variable: command (1 start, 2 stop, 3 reset faults)")
    schedule_eject: str = Field("ScheduleEject", description="method: one eject command")
    set_valve: str = Field("SetValve", description="method: switch one valve (manual valve test)")
    chute_counts: str = Field(
        "ChuteCounts", description="optional UInt32 array, one per bank: pieces through the bank's chute light barrier"
    )


class OpcUaSecurity(Strict):
    """Client-side OPC UA security: what the server demands decides what must be given here."""

    policy: Literal["None", "Basic256Sha256"] = Field(
        "None", description="security policy; Basic256Sha256 needs `certificate` and `private_key`"
    )
    mode: Literal["None", "Sign", "SignAndEncrypt"] = Field(
        "None", description="message security mode: None exactly when `policy` is None"
    )
    certificate: Path | None = Field(None, description="this client's certificate (DER or PEM)")
    private_key: Path | None = Field(None, description="this client's private key (PEM)")
    server_certificate: Path | None = Field(None, description="pin the server's certificate (DER or PEM)")
    username: str | None = Field(None, description="user name to log in with (with `password_env`); none: anonymous")
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

    endpoint: str = Field("opc.tcp://127.0.0.1:4840", description="the PLC's OPC UA endpoint URL")
    namespace: str = Field("urn:magnet-sorter:plc", description="namespace URI of the PLC's browse names")
    line_path: list[str] = Field(["Line"], min_length=1, description="browse path below Objects to the line object")
    nodes: PlcNodeNames = Field(PlcNodeNames(), description="browse names of the line object's variables and methods")
    security: OpcUaSecurity = Field(OpcUaSecurity(), description="what the PLC's server demands")
    publishing_interval_ms: float = Field(10.0, gt=0, description="subscription publishing interval")
    session_timeout_s: float = Field(10.0, gt=0, description="OPC UA session timeout asked of the PLC, s")


class PlcConfig(Strict):
    """The link to the PLC that runs the belt and fires the valves (docs/plc-interface.md)."""

    protocol: Literal["modbus", "opcua"] = Field(
        "modbus", description="Modbus TCP (`host`, `port`, `registers`) or OPC UA (`opcua`)"
    )
    host: str = Field("127.0.0.1", description="the PLC's address (Modbus)")
    port: int = Field(5020, ge=1, le=65535, description="the PLC's Modbus TCP port (502 on most PLCs)")
    timeout_s: float = Field(0.5, gt=0, description="no answer within this long breaks the connection")
    poll_interval_ms: float = Field(
        10.0, gt=0, description="the encoder count and status are read this often (OPC UA: the encoder count)"
    )
    heartbeat_interval_ms: float = Field(
        50.0, gt=0, le=100, description="the PC changes its heartbeat this often (the PLC's watchdog watches it)"
    )
    reconnect_min_s: float = Field(0.2, gt=0, description="first wait before reconnecting; doubles on each failure")
    reconnect_max_s: float = Field(5.0, gt=0, description="longest wait between reconnection attempts")
    registers: ModbusMap = Field(ModbusMap(), description="Modbus addresses (protocol modbus)")
    opcua: PlcOpcUaConfig = Field(PlcOpcUaConfig(), description="the PLC's OPC UA server (protocol opcua)")


class MagnetometerConfig(Strict):
    """The Hall-sensor bar under the belt (see docs/hall-bar.md for its serial protocol)."""

    port: str = Field(description="serial device of the bar, e.g. /dev/ttyUSB0 (the simulator's pty link)")
    baudrate: int = Field(115200, gt=0, description="serial speed, baud (8N1, no flow control)")
    channels: int = Field(48, ge=1, le=256, description="Hall sensors in the bar, one per channel")
    pitch_mm: float = Field(12.5, gt=0, description="distance between neighbouring channels across the belt")
    first_channel_x_mm: float = Field(6.25, description="belt x of channel 0's sensor")
    distance_mm: float = Field(200.0, gt=0, description="sensor row distance downstream of the cameras' centre line")
    offsets_mT: list[float] | None = Field(None, description="per-channel zero offsets (hw.calibrate_magnetometer)")
    gains: list[float] | None = Field(None, description="per-channel gains, applied after the offset")
    stall_timeout_s: float = Field(0.5, gt=0, description="no valid line for this long marks the bar offline")
    reconnect_min_s: float = Field(0.2, gt=0, description="first wait before reopening the port; doubles each time")
    reconnect_max_s: float = Field(5.0, gt=0, description="longest wait between attempts to reopen the port")
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
    frames_per_camera: int = Field(
        8, ge=1, description="frames waiting per camera for the vision stage; more are dropped (`drop_policy`)"
    )
    drop_policy: Literal["drop_oldest", "drop_newest"] = Field(
        "drop_oldest", description="which frame a full queue drops: the oldest waiting, or the one arriving"
    )


class PriorityConfig(Strict):
    """The OS priority of the threads that keep pace with the belt (sorter/core/priority.py, deploy/README.md)."""

    policy: Literal["rr", "fifo", "normal"] = Field(
        "rr",
        description="rr/fifo: Linux real-time scheduling (SCHED_RR/SCHED_FIFO) for the event loop, frame grabs, "
        "vision, inference and the Hall bar's reader, ahead of any other work on the computer; needs root or "
        "CAP_SYS_NICE, else they run at normal priority and the service logs it; normal: the OS default",
    )
    rt_priority: int = Field(20, ge=1, le=99, description="the real-time priority (1-99; kernel IRQ threads: 50)")


class RecordsConfig(Strict):
    path: Path = Field(
        Path("runs/records.sqlite"),
        description="SQLite database with one row per piece (relative to the config file)",
    )
    buffer_max_rows: int = Field(
        50_000,
        ge=100,
        description=(
            "rows (pieces, outcome updates, events) kept in memory while the disk refuses writes (full, "
            "read-only): written in order once it takes them again; past this many new rows are refused and "
            "counted (alarm records_dropped). About 1 kB each: 50 000 is some 15 min of a busy line"
        ),
    )
    min_free_mb: float = Field(
        100.0,
        ge=0,
        description=(
            "alarm records_disk_low while the disk holding the records has less free space than this, MB "
            "(checked about once a second, after a flush): before the disk refuses writes. 0: never"
        ),
    )
    recordings_dir: Path | None = Field(
        None,
        description=(
            "folder for the clips a technician starts and stops on the running line (HMI technician panel, "
            "`sorter clip start`): each clip is a new recording folder of level frames in it (docs/recording.md); "
            "the HMI's model comparison replays the latest. Default: `recordings/` beside records.path"
        ),
    )
    clip_max_mb: float = Field(
        2048.0,
        gt=0,
        description=(
            "size bound of a clip when its start does not give one, MB: at the bound the clip stops itself "
            "(log warning, records event `clip_stop`) and the line goes on. The demo line's two cameras "
            "write ~330 MB/s"
        ),
    )

    def clips_folder(self) -> Path:
        """Where clips go: recordings_dir, or `recordings/` beside the records database."""
        return self.recordings_dir if self.recordings_dir is not None else self.path.parent / "recordings"


class LabellingConfig(Strict):
    """Labelling on the HMI (technician): a queue of the line's crops to confirm or correct (docs/hmi.md)."""

    enabled: bool = Field(
        True,
        description=(
            "keep a queue of crops for labelling on the HMI (only where the HMI is served): a few MB on disk and "
            "one writer thread; the line never waits for it"
        ),
    )
    folder: Path | None = Field(
        None,
        description=(
            "the labelled dataset (the layout `sorter model train --data` reads), its `labels.csv` log and the "
            "pending crops (`_pending/`). Default: `labels/` beside records.path"
        ),
    )
    queue_max: int = Field(
        300, ge=1, le=100_000, description="crops waiting for a label at most; past it the least useful one goes"
    )
    uncertain_below: float = Field(
        0.9, ge=0, le=1, description="a decision less confident than this is queued as uncertain"
    )
    sample_share: float = Field(
        0.02,
        ge=0,
        le=1,
        description=(
            "share of the confident pieces queued at random, last in line, so that the labels are not only hard cases"
        ),
    )


Role = Literal["viewer", "operator", "technician"]


class UserConfig(Strict):
    """A person (or SCADA account) allowed on the line's OPC UA server and the HMI."""

    name: str = Field(min_length=1, description="user name to log in with")
    role: Role = Field(
        description="viewer: read only; operator: also commands the line (Start, Stop, ...); technician: also "
        "configures"
    )
    password_hash: str = Field(description="argon2 hash made by `sorter opcua hash-password`; never the password")

    @field_validator("password_hash")
    @classmethod
    def _argon2(cls, v: str) -> str:
        if not v.startswith("$argon2"):
            raise ValueError("password_hash must be an argon2 hash (`sorter opcua hash-password`), not a password")
        return v


class OpcUaServerConfig(Strict):
    """The line's own OPC UA server for SCADA/MES (docs/opcua-server.md)."""

    enabled: bool = Field(True, description="false: the service starts without its OPC UA server")
    endpoint: str = Field("opc.tcp://0.0.0.0:4841", description="listen address and port")
    namespace: str = Field("urn:magnet-sorter:line", description="namespace URI of the server's nodes")
    certificate: Path = Field(
        Path("pki/line-server-cert.der"), description="the server's certificate, made by `sorter opcua certs`"
    )
    private_key: Path = Field(Path("pki/line-server-key.pem"), description="the server's private key (PEM)")
    trust_dir: Path = Field(Path("pki/trusted"), description="folder of accepted client certificates (DER/PEM)")
    rejected_dir: Path | None = Field(
        None,
        description="folder where the server keeps the certificates of refused (unknown) clients, for an "
        "administrator to trust (`sorter opcua trust --list`, `sorter opcua trust THUMBPRINT`); null: `rejected` "
        "beside `trust_dir`",
    )
    allow_none_security: bool = Field(
        False,
        description="also offer the unencrypted None endpoint, where client certificates are not checked (demo "
        "only: never in a plant, `sorter check-config --plant` refuses it)",
    )
    allow_anonymous: bool = Field(
        False, description="let clients in without a user name, as viewers (never in a plant)"
    )

    @property
    def rejected_path(self) -> Path:
        """The folder of refused client certificates: `rejected_dir`, or `rejected` beside the trust folder."""
        return self.rejected_dir if self.rejected_dir is not None else self.trust_dir.parent / "rejected"


class HmiConfig(Strict):
    """The operator's web HMI, served by the line service (docs/hmi.md)."""

    enabled: bool = Field(True, description="false: the service starts without its HMI")
    host: str = Field("127.0.0.1", description="listen address; 0.0.0.0 to reach it from a panel PC")
    port: int = Field(8080, ge=0, le=65535, description="0 picks a free port")
    tls: bool | None = Field(
        None,
        description="HTTPS: true needs certificate and private_key and serves HTTPS only; false serves plain HTTP "
        "(the demo on loopback, never a plant) and allows no certificate; null: HTTPS exactly when a certificate "
        "is set",
    )
    certificate: Path | None = Field(
        None,
        description="the HMI's TLS server certificate (PEM, `sorter hmi certs`); set: the HMI serves HTTPS only, "
        "with HSTS and Secure cookies",
    )
    private_key: Path | None = Field(
        None, description="the certificate's private key (PEM, unencrypted, readable by the service's user only)"
    )
    session_idle_s: float = Field(900.0, gt=0, description="a session without activity for this long expires")
    session_max_s: float = Field(12 * 3600.0, gt=0, description="a session expires after this long in any case")
    push_hz: float = Field(5.0, gt=0, le=30, description="live updates pushed to each browser per second")
    camera_fps: float = Field(4.0, gt=0, le=15, description="live camera images per second per browser")

    @model_validator(mode="after")
    def _tls_consistent(self) -> HmiConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together (`sorter hmi certs` makes both)")
        if self.tls is True and self.certificate is None:
            raise ValueError("tls: true needs certificate and private_key (`sorter hmi certs`)")
        if self.tls is False and self.certificate is not None:
            raise ValueError("tls: false serves plain HTTP: remove certificate and private_key, or tls: false")
        return self

    @property
    def https(self) -> bool:
        """Served over HTTPS (TLS): exactly when a certificate is configured (the validator keeps `tls` in step)."""
        return self.certificate is not None


class SparkplugConfig(Strict):
    """The line as a Sparkplug B edge node on the plant's MQTT broker (docs/plant-data.md)."""

    enabled: bool = Field(True, description="false: the service starts without its edge node")
    host: str = Field("127.0.0.1", description="the MQTT broker's host name or address")
    port: int = Field(1883, ge=1, le=65535, description="the broker's port (8883 is the usual one for TLS)")
    group_id: str = Field(
        "magnet-sorting", min_length=1, description="Sparkplug group id: the first level of the line's topics"
    )
    edge_node_id: str | None = Field(None, description="Sparkplug edge node id; null: the line's name (`line`)")
    client_id: str | None = Field(
        None, description="MQTT client id; null: `<group_id>-<edge_node_id>` (unique per broker)"
    )
    username: str | None = Field(None, description="user name at the broker; null: none sent")
    password: str | None = Field(
        None,
        description="the broker user's password (keep the config file readable by the service's user only); "
        "null: none sent",
    )
    tls: bool = Field(False, description="connect over TLS (the broker's certificate is checked)")
    ca_file: Path | None = Field(
        None, description="CA certificate(s) (PEM) that signed the broker's certificate; null: the system's CAs"
    )
    certificate: Path | None = Field(None, description="client certificate (PEM) where the broker asks for one")
    private_key: Path | None = Field(None, description="the client certificate's private key (PEM)")
    keepalive_s: int = Field(
        10,
        ge=2,
        le=600,
        description="MQTT keep-alive: the broker publishes the NDEATH this long x1.5 after it last heard the line",
    )
    reconnect_min_s: float = Field(0.5, gt=0, description="first wait before connecting again after a failure")
    reconnect_max_s: float = Field(5.0, gt=0, description="the wait doubles up to this")
    buffer_max: int = Field(
        20000,
        ge=1,
        description="store-and-forward: NDATA messages kept while the broker is away (5 a second at most); when "
        "full the oldest are dropped and the alarm `sparkplug_buffer_full` is raised",
    )
    offline_alarm_s: float = Field(
        10.0, gt=0, description="the broker unreachable this long raises the alarm `sparkplug_offline`"
    )

    @model_validator(mode="after")
    def _consistent(self) -> SparkplugConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        if not self.tls and (self.ca_file is not None or self.certificate is not None):
            raise ValueError("ca_file, certificate and private_key need tls: true")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must not be above reconnect_max_s")
        for name, v in (("group_id", self.group_id), ("edge_node_id", self.edge_node_id)):
            if v is not None and any(ch in v for ch in "/+#"):
                raise ValueError(f"{name} must not contain '/', '+' or '#' (they are MQTT topic separators)")
        return self


class PlantDbConfig(Strict):
    """The forwarder of the piece records to the plant's central PostgreSQL (docs/plant-data.md)."""

    enabled: bool = Field(True, description="false: the records stay in the line's SQLite only")
    url: str = Field(
        description="libpq connection URI, e.g. postgresql://sorter@db.plant:5432/plant?sslmode=verify-full; "
        "keep the password out of it (~/.pgpass or PGPASSFILE)"
    )
    batch_rows: int = Field(500, ge=1, le=10000, description="rows per transaction at most")
    interval_s: float = Field(1.0, gt=0, description="how often the forwarder looks for new rows when caught up")
    connect_timeout_s: int = Field(5, ge=1, description="a connection attempt gives up after this long")
    reconnect_max_s: float = Field(10.0, gt=0, description="the wait between connection attempts doubles up to this")
    pending_grace_s: float = Field(
        30.0,
        gt=0,
        description="an open piece row (seen, planned, pending: about to change) holds the forwarder back at most "
        "this long from when it meets it; then it is forwarded as it is, and its final state follows",
    )
    lag_alarm_s: float = Field(
        120.0, gt=0, description="the oldest record not yet forwarded older than this raises `plant_db_lag`"
    )
    final_drain_s: float = Field(
        10.0,
        ge=0,
        description="at shutdown, the forwarder tries this long to ship the last rows (the rest "
        "follows at the next start)",
    )

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, v: str) -> str:
        if not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("url must be a postgresql:// connection URI")
        return v


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
    line: str = Field("line-1", description="the line's name, shown on the HMI and in its status")
    plant: bool = Field(
        False,
        description="a real plant's line: the service refuses to start with a demo-only setting (the demo's users, "
        "anonymous or None-policy OPC UA, an HMI without TLS, a Modbus PLC on a public address, MQTT without TLS, "
        "a password in the plant database URL), as "
        "`sorter check-config --plant` does",
    )
    belt: BeltConfig = Field(BeltConfig(), description="the conveyor belt and its encoder")
    cameras: list[CameraConfig] = Field(description="the cameras above the belt, at least one; names unique")
    vision: VisionConfig = Field(VisionConfig(), description="finding the pieces in the camera images")
    tracking: TrackingConfig = Field(TrackingConfig(), description="joining the views of one piece")
    classifier: ClassifierConfig = Field(description="the image classifier (ONNX model)")
    routing: RoutingConfig = Field(description="which class goes to which output fraction")
    ejection: EjectionConfig = Field(description="the air valve banks and when they fire")
    plc: PlcConfig = Field(PlcConfig(), description="the link to the PLC")
    magnetometer: MagnetometerConfig | None = Field(
        None, description="the Hall-sensor bar under the belt; absent: pieces are decided on the camera alone"
    )
    queues: QueueConfig = Field(QueueConfig(), description="frame queues between the cameras and the vision stage")
    priority: PriorityConfig = Field(
        PriorityConfig(), description="the OS priority of the time-critical threads (real-time where allowed)"
    )
    records: RecordsConfig = Field(RecordsConfig(), description="the database of every piece decided")
    reports: ReportsConfig = Field(
        ReportsConfig(), description="shift and batch reports from the records (`sorter report`): the mass estimate"
    )
    states: StateMachineConfig = Field(StateMachineConfig(), description="the line's PackML state machine")
    opcua_server: OpcUaServerConfig | None = Field(
        None, description="the line's OPC UA server for SCADA/MES; absent: none is started"
    )
    hmi: HmiConfig | None = Field(None, description="the operator's web HMI; absent: none is served")
    labelling: LabellingConfig = Field(LabellingConfig(), description="the queue of crops technicians label on the HMI")
    sparkplug: SparkplugConfig | None = Field(
        None, description="the line's Sparkplug B edge node on the plant's MQTT broker; absent: none"
    )
    plant_db: PlantDbConfig | None = Field(
        None, description="forwarding the piece records to the plant's PostgreSQL; absent: SQLite only"
    )
    users: list[UserConfig] = Field([], description="who may log in to the line's OPC UA server and HMI")

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
        if unknown := set(self.ejection.conflict_value) - fractions:
            raise ValueError(f"ejection.conflict_value names fractions no bank serves: {sorted(unknown)}")
        width = self.ejection.valves_per_bank * self.ejection.valve_pitch_mm
        if self.ejection.first_valve_x_mm + width < self.belt.width_mm - 1e-6:
            raise ValueError(f"valves cover {width} mm but the belt is {self.belt.width_mm} mm wide")
        return self

    def labels_folder(self) -> Path:
        """Where labelled crops go: labelling.folder, or `labels/` beside the records database."""
        lab = self.labelling
        return lab.folder if lab.folder is not None else self.records.path.parent / "labels"

    def paths_resolved(self, base: Path) -> dict[str, Any]:
        """The config's relative paths made relative to `base` (the file's folder), as a model_copy update."""
        cfg = self

        def rel(p: Path) -> Path:
            return p if p.is_absolute() else (base / p).resolve()

        update = {
            "classifier": cfg.classifier.model_copy(
                update={
                    "model": rel(cfg.classifier.model),
                    "shadow_model": None if cfg.classifier.shadow_model is None else rel(cfg.classifier.shadow_model),
                }
            ),
            "records": cfg.records.model_copy(
                update={
                    "path": rel(cfg.records.path),
                    "recordings_dir": None if cfg.records.recordings_dir is None else rel(cfg.records.recordings_dir),
                }
            ),
        }
        sec = cfg.plc.opcua.security
        sec_paths = {k: rel(v) for k in ("certificate", "private_key", "server_certificate") if (v := getattr(sec, k))}
        if sec_paths:
            opcua = cfg.plc.opcua.model_copy(update={"security": sec.model_copy(update=sec_paths)})
            update["plc"] = cfg.plc.model_copy(update={"opcua": opcua})
        srv = cfg.opcua_server
        if srv is not None:
            update["opcua_server"] = srv.model_copy(
                update={
                    k: rel(v)
                    for k in ("certificate", "private_key", "trust_dir", "rejected_dir")
                    if (v := getattr(srv, k)) is not None
                }
            )
        if cfg.labelling.folder is not None:
            update["labelling"] = cfg.labelling.model_copy(update={"folder": rel(cfg.labelling.folder)})
        hmi = cfg.hmi
        if hmi is not None and hmi.certificate is not None and hmi.private_key is not None:
            update["hmi"] = hmi.model_copy(
                update={"certificate": rel(hmi.certificate), "private_key": rel(hmi.private_key)}
            )
        spb = cfg.sparkplug
        if spb is not None:
            spb_paths = {k: rel(v) for k in ("ca_file", "certificate", "private_key") if (v := getattr(spb, k))}
            if spb_paths:
                update["sparkplug"] = spb.model_copy(update=spb_paths)
        mag = cfg.magnetometer
        if mag is not None and "/" in mag.port and not Path(mag.port).is_absolute():  # not a bare name such as COM3
            update["magnetometer"] = mag.model_copy(update={"port": str(rel(Path(mag.port)))})
        return update

    @property
    def fractions(self) -> list[str]:
        """Output fractions in bank order, then the default (not ejected) fraction."""
        return [b.fraction for b in self.ejection.banks] + [self.routing.default_fraction]
