"""A line plot written as PNG with numpy, zlib and struct only (no plotting library).

Enough for a reward curve: white background, light grid lines at the y ticks, axes, one
polyline (NaN points skipped) and a moving average. No text: the caption goes next to the
image (BENCHMARKS.md, the log line that wrote it).
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Optional, Sequence

import numpy as np


def write_png(path: "str | os.PathLike", rgb: np.ndarray) -> None:
    """Write an [H, W, 3] uint8 image as an 8-bit RGB PNG."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8; got {rgb.shape} {rgb.dtype}")
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _line(img: np.ndarray, x0, y0, x1, y1, color, width: int = 1) -> None:
    """Draw a segment (pixel coordinates, any real numbers) in place."""
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n)).astype(int)
    h, w, _ = img.shape
    for dy in range(-(width // 2), width - width // 2):
        for dx in range(-(width // 2), width - width // 2):
            yy, xx = np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)
            img[yy, xx] = color


def line_plot(path: "str | os.PathLike", ys: Sequence[float], y_range: Optional[tuple[float, float]] = (0.0, 1.0),
              size: tuple[int, int] = (480, 320), smooth: int = 5) -> None:
    """Plot ys against their index (raw in light blue, a `smooth`-point moving average in dark
    blue) to a PNG at `path`. y_range None fits the data."""
    ys = np.asarray(ys, np.float64)
    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 30, w - 10, 10, h - 25
    finite = ys[np.isfinite(ys)]
    lo, hi = y_range if y_range is not None else (
        (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    if hi <= lo:
        hi = lo + 1.0
    for frac in np.linspace(0, 1, 5):  # grid
        y = bottom - frac * (bottom - top)
        _line(img, left, y, right, y, (225, 225, 225))
    _line(img, left, bottom, right, bottom, (0, 0, 0))
    _line(img, left, top, left, bottom, (0, 0, 0))
    if len(ys) == 0:
        write_png(path, img)
        return
    xs = left + np.arange(len(ys)) * (right - left) / max(len(ys) - 1, 1)
    to_y = lambda v: bottom - (np.clip(v, lo, hi) - lo) / (hi - lo) * (bottom - top)

    def polyline(values, color, width):
        for i in range(len(values) - 1):
            if np.isfinite(values[i]) and np.isfinite(values[i + 1]):
                _line(img, xs[i], to_y(values[i]), xs[i + 1], to_y(values[i + 1]), color, width)

    polyline(ys, (150, 190, 235), 1)
    if smooth > 1 and len(ys) >= smooth:
        filled = np.where(np.isfinite(ys), ys, np.nan)
        avg = np.array([np.nanmean(filled[max(0, i - smooth + 1): i + 1]) for i in range(len(ys))])
        polyline(avg, (20, 60, 160), 2)
    write_png(path, img)
