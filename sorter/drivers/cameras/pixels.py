"""GenICam pixel formats to the pipeline's BGR images: no camera library needed, so it is testable anywhere."""

from __future__ import annotations

import cv2
import numpy as np

# PFNC codes (GenICam Pixel Format Naming Convention) of the formats this driver converts
PIXEL_FORMATS: dict[int, str] = {
    0x01080001: "Mono8",
    0x01080008: "BayerGR8",
    0x01080009: "BayerRG8",
    0x0108000A: "BayerGB8",
    0x0108000B: "BayerBG8",
    0x02180014: "RGB8",
    0x02180015: "BGR8",
}
# OpenCV names a Bayer pattern by the 2x2 block starting at the second row and column, GenICam by the first
# pixel of the image: GenICam RGGB (BayerRG) is OpenCV's BayerBG, and so on.
_DEBAYER = {
    "BayerRG8": cv2.COLOR_BayerBG2BGR,
    "BayerGR8": cv2.COLOR_BayerGB2BGR,
    "BayerGB8": cv2.COLOR_BayerGR2BGR,
    "BayerBG8": cv2.COLOR_BayerRG2BGR,
}


def to_bgr(data: bytes, width: int, height: int, pixel_format: str) -> np.ndarray:
    """A frame's payload as an H x W x 3 BGR uint8 image (Bayer debayered, mono made grey)."""
    channels = 3 if pixel_format in ("RGB8", "BGR8") else 1
    need = width * height * channels
    if len(data) < need:
        raise ValueError(f"{pixel_format} {width}x{height} needs {need} bytes, the frame has {len(data)}")
    raw = np.frombuffer(data, np.uint8, count=need)
    if channels == 3:
        rgb = raw.reshape(height, width, 3)
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if pixel_format == "RGB8" else rgb.copy()
    img = raw.reshape(height, width)
    if pixel_format == "Mono8":
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    code = _DEBAYER.get(pixel_format)
    if code is None:
        raise ValueError(f"pixel format {pixel_format} is not supported (Mono8, Bayer*8, RGB8, BGR8)")
    return cv2.cvtColor(img, code)
